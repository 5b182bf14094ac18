"""The fast sampling loop (decoding.FastBlipSampler) against transformers' generate (the reference path).

Three checks, on the tiny random BLIP with output biases that make its distribution peaked and
rows end at different lengths:
- greedy: the fast loop's tokens equal transformers' greedy tokens exactly (the forward pass, the
  cache, the prompt sharing, the per-image cross-attention and the batch compaction are right);
- the per-step distribution: the fast loop's candidate probabilities equal the full-vocabulary
  processing of the reference (repetition penalty, min length, top-k 50, top-p 0.9);
- sampling: many captions from each path have the same first-token and length distributions
  (chi-square), and the same test does notice a sampler with a wrong setting.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from datacomp_sieve.caption import GenerationSettings, build_captioner
from datacomp_sieve.decoding import FastBlipSampler

SEP, PAD = 102, 0


@pytest.fixture(scope="module")
def pixels():
    import skimage.data
    from sklearn.datasets import load_sample_images

    cap = build_captioner("tiny", device="cpu")
    china, flower = load_sample_images().images
    ims = [skimage.data.chelsea(), skimage.data.astronaut(), china, flower, skimage.data.coffee(),
           skimage.data.camera()]
    return torch.stack([cap.preprocess(Image.fromarray(a)) for a in ims])


def _peaked(cap, sep_bias, seed=0):
    """Give the tiny model's LM head a spread of output biases (in place)."""
    head = cap.model.text_decoder.cls.predictions
    with torch.no_grad():
        head.bias.copy_(2.0 * torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(seed)))
        head.bias[[1037, 3861, 1997]] = 6.0  # prompt words likely: the repetition penalty matters
        head.bias[SEP] = sep_bias


def _hf_greedy(cap, embeds, r):
    e = embeds.repeat_interleave(r, 0)
    return cap.model.text_decoder.generate(
        input_ids=cap.prompt_ids[None].repeat(e.shape[0], 1), encoder_hidden_states=e, do_sample=False,
        num_beams=1, repetition_penalty=1.1, max_length=20, min_length=5, eos_token_id=SEP, pad_token_id=PAD,
        bos_token_id=cap.bos_id)


@pytest.mark.parametrize("fixed_shapes", [False, True])
@pytest.mark.parametrize("sep_bias,fused", [(None, False), (5.0, False), (6.5, False), (8.0, False), (6.5, True)])
def test_greedy_tokens_equal_transformers_greedy(pixels, sep_bias, fused, fixed_shapes):
    """fused: torch's fused attention kernel (what GPUs use), here on the CPU; fixed_shapes: the
    step a CUDA graph replays (``cuda_graphs``), run as it is."""
    cap = build_captioner("tiny", device="cpu")
    cap.sampler.fused_attention = fused
    cap.sampler.cuda_graphs = fixed_shapes
    if sep_bias is not None:
        _peaked(cap, sep_bias, seed=int(sep_bias or 0))
    with torch.inference_mode():
        emb = cap.encode_images(pixels)
        fast = cap.sampler.generate(emb, 3, sample=False)
        ref = _hf_greedy(cap, emb, 3)
    assert fast.tolist() == ref.tolist()
    if sep_bias == 8.0:
        assert fast.shape[1] < 20  # every row ended early: the loop stopped when they had


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_greedy_equal_with_rows_ending_at_different_steps_and_compaction(monkeypatch, fixed_shapes):
    """Images whose rows end at different steps: the batch is compacted as they end (or, with
    fixed shapes, ended rows are carried to the end); the tokens stay exactly greedy's. (A random tiny BLIP barely looks at the image, so here its
    cross-attention is amplified and the image features are made distinct, and [SEP]'s logit
    depends on the hidden state.)"""
    cap = build_captioner("tiny", device="cpu")
    head = cap.model.text_decoder.cls.predictions
    with torch.no_grad():
        for layer in cap.model.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(30)
            layer.crossattention.self.value.weight.mul_(5)
    g = torch.Generator().manual_seed(9)
    emb = (3.0 * torch.randn(8, 1, 32, generator=g)).expand(8, 17, 32) + 0.1 * torch.randn(8, 17, 32, generator=g)
    found = None
    for seed in range(20):
        _peaked(cap, 5.0, seed=seed)
        with torch.no_grad():
            head.decoder.weight[SEP] = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            ref = _hf_greedy(cap, emb, 2)
        ends = [(row == SEP).nonzero()[0].item() if (row == SEP).any() else 20 for row in ref]
        if len(set(ends)) >= 3 and min(ends) < 8 and max(ends) == 20:
            found = seed
            break
    assert found is not None, "no bias seed gives rows of different lengths"
    if fixed_shapes:
        cap.sampler.cuda_graphs = True
        with torch.inference_mode():
            assert cap.sampler.generate(emb, 2, sample=False).tolist() == ref.tolist()
        return
    sizes = []
    real = FastBlipSampler._layers

    def spy(self, x, cross, cache, pos, r):
        sizes.append(cross[0][0].shape[0])
        return real(self, x, cross, cache, pos, r)

    monkeypatch.setattr(FastBlipSampler, "_layers", spy)
    with torch.inference_mode():
        fast = cap.sampler.generate(emb, 2, sample=False)
    assert fast.tolist() == ref.tolist()
    assert sizes[0] == 8 and min(sizes) < 8  # images left the batch as their captions ended


def _reference_distribution(logits, seen, cur_len, s: GenerationSettings):
    """The reference's processing over the whole vocabulary (transformers 4.30 processors)."""
    logits = logits.clone()
    score = torch.gather(logits, 1, seen)
    logits.scatter_(1, seen, torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty))
    if cur_len < s.min_length:
        logits[:, SEP] = -math.inf
    kth = torch.topk(logits, s.top_k)[0][..., -1, None]
    logits = logits.masked_fill(logits < kth, -math.inf)
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - s.top_p)
    remove[..., -1:] = False
    logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
    return logits.softmax(-1)


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_candidate_probabilities_equal_the_reference_processing(scale):
    s = GenerationSettings()
    sampler = FastBlipSampler.__new__(FastBlipSampler)
    sampler.settings, sampler.sep_id = s, SEP
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = scale * torch.randn(64, 30524, generator=g)
    logits[:, SEP] += 4.0 * scale  # [SEP] among the candidates
    seen = torch.randint(0, 30524, (64, 7), generator=g)
    seen[:, 3] = SEP
    for cur_len in (4, 9):
        want = _reference_distribution(logits, seen, cur_len, s)
        probs, idx = sampler.candidates(logits.clone(), seen, cur_len)
        got = torch.zeros_like(want).scatter_(1, idx, probs)
        assert torch.allclose(got, want, atol=1e-6)
        assert (want[:, SEP] == 0).all() == (cur_len < s.min_length)
        assert ((want > 0).sum(1) < 50).any()  # top-p cut some candidates: the test sees it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_candidates_first_are_the_whole_vocabularys_candidates(dtype):
    """Top-k on the model's logits first, then the penalties on those candidates only, gives the
    whole-vocabulary processing's numbers: rows whose seen tokens are their most likely ones (the
    penalty reorders the top), [SEP] on top below min_length, a temperature, the position as an
    int and as a device tensor (the fixed-shape loop's), half-precision logits (a GPU's: their ties
    may come in another order)."""
    s = GenerationSettings(temperature=0.7)
    g = torch.Generator().manual_seed(5)
    # close logits (the penalty moves seen tokens below unseen ones), positive and negative rows
    logits = (torch.randn(64, 30524, generator=g) + torch.tensor([10.0, -10.0]).repeat(32)[:, None]).to(dtype)
    top = logits.float().topk(30).indices
    seen = torch.cat([top[:, :19], torch.full((64, 1), SEP)], 1)  # a row's 20 tokens, its best 19 among them
    logits[:8, SEP] = 40.0  # [SEP] the best token of 8 rows
    logits[32:40, SEP] = 0.0
    moved = 0
    for cur_len in (4, 9, torch.tensor([4]), torch.tensor([9])):
        got, want = [], []
        for first, out in ((True, got), (False, want)):
            sampler = FastBlipSampler.__new__(FastBlipSampler)
            sampler.settings, sampler.sep_id, sampler.candidates_first = s, SEP, first
            out.extend(sampler.candidates(logits.clone(), seen, cur_len))
        assert torch.equal(got[0], want[0])  # the probabilities, in order
        if dtype == torch.float32:
            assert torch.equal(got[1], want[1])
        else:  # half-precision logits tie often: tied candidates may come in another order, and
            # which of those tied with the 50th is kept may differ (either way exactly 50 are kept)
            low = torch.where(want[0] > 0, want[0], math.inf).min(1, keepdim=True).values
            dense = [torch.zeros(64, 30524).scatter_(1, idx, probs) for probs, idx in (got, want)]
            assert torch.equal(*(d * (d > low) for d in dense))  # every token above the lowest kept
        raw = logits.float().topk(50).indices  # before the penalties
        moved += int((want[1][:, :, None] != raw[:, None, :]).all(-1).any(-1).sum())
    assert moved > 100  # candidates from beyond the top 50 before the penalties: the test sees them


def test_the_padded_lm_head_samples_what_the_head_samples(pixels):
    """``vocab_multiple``: the LM head's output padded to a multiple of 64 columns, -inf beyond the
    vocabulary; both loops sample the same tokens as with the model's own head."""
    cap = _focused(build_captioner("tiny", device="cpu"))
    h = torch.randn(5, cap.model.text_decoder.config.hidden_size)
    with torch.inference_mode():
        want = cap.model.text_decoder.cls(h)
        cap.sampler.vocab_multiple = 64
        got = cap.sampler._logits(h)
    assert got.shape == (5, 30528) and torch.isinf(got[:, 30524:]).all() and (got[:, 30524:] < 0).all()
    assert torch.allclose(got[:, :30524], want, atol=1e-5)
    for graphs in (False, True):
        cap.sampler.cuda_graphs = graphs
        cap.sampler.vocab_multiple = 1
        plain = _samples(cap, pixels[:4], 6, seed=2)
        cap.sampler.vocab_multiple = 64
        assert torch.equal(_samples(cap, pixels[:4], 6, seed=2), plain)
        cap.sampler.candidates_first = True  # on the padded logits
        assert torch.equal(_samples(cap, pixels[:4], 6, seed=2), plain)
        cap.sampler.candidates_first = None
    assert cap.sampler._loops  # (the fixed-shape loop of the last call)
    with torch.no_grad():  # the model's weights changed in place: the padded copy follows, and the
        cap.model.text_decoder.cls.predictions.bias[7] = 1e4  # loops whose graphs read the old one go
    with torch.inference_mode():
        assert (cap.sampler._logits(h)[:, :30524].argmax(-1) == 7).all()
    assert not cap.sampler._loops


def _samples(cap, pixels, r, seed):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return cap._generate_from_embeds(cap.encode_images(pixels), r)


def _focused(cap, settings=GenerationSettings()):
    """A distribution with a clear head and tail: 30 likely tokens, prompt words likely (so the
    repetition penalty matters), [SEP] likely enough that lengths vary."""
    head = cap.model.text_decoder.cls.predictions
    with torch.no_grad():
        head.bias.copy_(torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(3)))
        head.bias[2000:2030] = torch.linspace(5.0, 8.0, 30)
        head.bias[[1037, 3861, 1997]] = 8.0
        head.bias[SEP] = 7.0
    cap.settings = settings
    if hasattr(cap, "sampler"):
        cap.sampler.settings = settings
    return cap


def _first_token_fit(cap, pixels, r, seed):
    """(p-value of a chi-square goodness of fit of the first sampled token of each image to the
    reference's exact probabilities, number of draws of tokens the reference gives probability 0)."""
    from scipy.stats import chisquare

    s = GenerationSettings()
    with torch.inference_mode():
        emb = cap.encode_images(pixels)
        prompt = cap.prompt_ids[None].repeat(len(pixels), 1)
        logits = cap.model.text_decoder(input_ids=prompt, encoder_hidden_states=emb).logits[:, -1].float()
        want = _reference_distribution(logits, prompt, prompt.shape[1], s)
    ids = _samples(cap, pixels, r, seed)[:, 4].view(len(pixels), r)
    observed, expected, impossible = [], [], 0
    for i in range(len(pixels)):
        counts = torch.bincount(ids[i], minlength=want.shape[1]).double()
        impossible += int(counts[want[i] == 0].sum())
        e = want[i] * r
        big = e >= 5
        observed += counts[big].tolist() + [counts[~big].sum().item()]
        expected += e[big].tolist() + [e[~big].sum().item()]
    observed, expected = np.array(observed), np.array(expected)
    keep = expected > 0
    return chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum())[1], impossible


def test_first_token_follows_the_reference_distribution(pixels):
    """Both paths' first sampled tokens fit the exactly computed reference distribution; samplers
    with a setting wrong do not."""
    one = GenerationSettings(max_length=5)  # one sampled token per row: cheap, many rows
    sub = pixels[:3]
    for decoding in ("reference", "fast"):
        cap = _focused(build_captioner("tiny", device="cpu", decoding=decoding), one)
        p, impossible = _first_token_fit(cap, sub, 2000, seed=4)
        assert impossible == 0 and p > 1e-3, (decoding, p, impossible)
    no_top_p = _focused(build_captioner("tiny", device="cpu"), GenerationSettings(max_length=5, top_p=1.0))
    assert _first_token_fit(no_top_p, sub, 2000, seed=4)[1] > 0
    no_penalty = _focused(build_captioner("tiny", device="cpu"),
                          GenerationSettings(max_length=5, repetition_penalty=1.0))
    assert _first_token_fit(no_penalty, sub, 2000, seed=4)[0] < 1e-6


def _chi2_p(a, b):
    """p-value of a chi-square test that two samples of categories come from one distribution."""
    from scipy.stats import chi2_contingency

    cats = sorted(set(a) | set(b))
    table = np.array([[a.count(c) for c in cats], [b.count(c) for c in cats]])
    keep = table.sum(0) >= 10  # pool the rare categories
    table = np.column_stack([table[:, keep], table[:, ~keep].sum(1)]) if (~keep).any() else table
    table = table[:, table.sum(0) > 0]
    return chi2_contingency(table)[1]


def _lengths(ids, r):
    return [(i // r, int((row != PAD).sum())) for i, row in enumerate(ids)]


def test_caption_lengths_and_determinism_match_the_reference_path(pixels):
    sub = pixels[:3]
    r = 200
    ref = _focused(build_captioner("tiny", device="cpu", decoding="reference"))
    fast = _focused(build_captioner("tiny", device="cpu", decoding="fast"))
    la = _lengths(_samples(ref, sub, r, seed=1), r)
    b = _samples(fast, sub, r, seed=2)
    lb = _lengths(b, r)
    assert len(set(la)) > 8  # a spread of lengths: the comparison means something
    assert _chi2_p(la, lb) > 1e-3
    assert torch.equal(b, _samples(fast, sub, r, seed=2))
    assert not torch.equal(b, _samples(fast, sub, r, seed=3))
    late_end = _focused(build_captioner("tiny", device="cpu"), GenerationSettings(min_length=12))
    assert _chi2_p(la, _lengths(_samples(late_end, sub, r, seed=2), r)) < 1e-6


# -- fixed shapes (the step a CUDA graph replays; on the CPU it runs as it is) -------------------


def test_the_draw_is_torch_multinomial():
    """The sampler draws with argmax(probs / Exp(1)), written out so that a CUDA graph can hold it:
    on the CPU the same numbers as torch.multinomial(probs, 1) for the same RNG state."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 50, generator=g).softmax(-1)
    probs[:, 35:] = 0  # top-p cut the tail
    torch.manual_seed(3)
    want = torch.multinomial(probs, 1).squeeze(1)
    torch.manual_seed(3)
    q = torch.empty_like(probs).exponential_()
    got = (probs / q).argmax(-1)
    assert torch.equal(got, want) and len(set(want.tolist())) > 20


def test_fixed_shape_loop_samples_what_the_growing_loop_samples(pixels):
    """Sampling with the fixed-shape step gives the same tokens as the loop with growing shapes
    when that one does not compact (both draw the same numbers in the same order), rows ending
    at many different lengths; a second batch of another shape, and the first shape again
    (its buffers reused), give the same tokens as fresh loops; results repeat per seed."""
    fast = _focused(build_captioner("tiny", device="cpu"))
    fast.sampler.compact_below = 0.0
    want = [_samples(fast, pixels[:k], 30, seed=k) for k in (6, 4)]
    lengths = {int((row != PAD).sum()) for row in want[0]}
    assert len(lengths) > 8 and want[0].shape[1] == 20
    fast.sampler.cuda_graphs = True
    for _ in range(2):
        got = [_samples(fast, pixels[:k], 30, seed=k) for k in (6, 4)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(fast.sampler._loops) == 2
    fast.sampler.static_loops_kept = 1
    assert torch.equal(_samples(fast, pixels[:5], 30, seed=5), _samples(fast, pixels[:5], 30, seed=5))
    assert len(fast.sampler._loops) == 1
    # a graph replays the attention kernels it captured: the other attention gets a loop of its own
    (unfused,) = fast.sampler._loops.values()
    fast.sampler.fused_attention = True
    _samples(fast, pixels[:5], 30, seed=5)
    assert list(fast.sampler._loops.values()) != [unfused]
    fast.sampler.fused_attention = None
    assert not torch.equal(_samples(fast, pixels[:6], 30, seed=1), want[0])
    # other draws for a seed than the growing loop's (no compaction): score stores must tell them apart
    assert fast.identity()["decoding"] != build_captioner("tiny", device="cpu").identity()["decoding"]


def test_a_batch_smaller_than_one_kept_runs_its_steps_without_a_graph(pixels):
    """A shard's last batch (its size varying from shard to shard) is not captured as a graph of
    its own: the fixed-shape steps run as they are (the same tokens: bench/gpu_check.py on a GPU)."""
    cap = build_captioner("tiny", device="cpu", decoding="graph")
    for k in (6, 4, 6):
        _samples(cap, pixels[:k], 3, seed=k)
    assert {key[0][0]: loop.use_graph for key, loop in cap.sampler._loops.items()} == {6: None, 4: False}


def test_fixed_shape_loop_lengths_match_the_reference_path(pixels):
    sub = pixels[:3]
    r = 200
    ref = _focused(build_captioner("tiny", device="cpu", decoding="reference"))
    fast = _focused(build_captioner("tiny", device="cpu"))
    fast.sampler.cuda_graphs = True
    assert _chi2_p(_lengths(_samples(ref, sub, r, seed=1), r), _lengths(_samples(fast, sub, r, seed=2), r)) > 1e-3


def _graphs_standing_in(pixels, monkeypatch, capture):
    """(captioner, the fixed-shape loop's tokens without a graph); afterwards, loops use graphs
    (also on the CPU) and ``capture`` stands in for ``_StaticLoop._capture``."""
    from datacomp_sieve.decoding import _StaticLoop

    fast = _focused(build_captioner("tiny", device="cpu"))
    fast.sampler.cuda_graphs = True
    want = _samples(fast, pixels, 30, seed=1)
    fast.sampler._loops.clear()
    monkeypatch.setattr(_StaticLoop, "_capture", capture)
    monkeypatch.setattr(_StaticLoop, "use_graph", True, raising=False)
    return fast, want


@pytest.mark.parametrize("whole", [True, False])
def test_capturing_changes_no_caption(pixels, monkeypatch, whole):
    """The graph path's bookkeeping, on the CPU: capturing steps the loop on the first batch's
    numbers and draws random numbers; the batch is then loaded again with the RNG as it was, and
    the replays (here: the steps themselves, standing in for the graph) give the eager loop's
    tokens, cut where every row had ended: with a graph of every step (``whole``), which runs on
    past that point, and with a graph of one step, after which the host checks."""
    from types import SimpleNamespace

    from datacomp_sieve.decoding import _StaticLoop

    monkeypatch.setattr(FastBlipSampler, "graph_whole_loop", whole)

    captured = []

    def capture(self):  # what _capture does, minus the CUDA calls
        for _ in range(3):
            self.pos.fill_(self.first)
            self.step()
        self.pos.fill_(self.first)
        self.graph = SimpleNamespace(replay=lambda: self._steps(self.replay_steps))
        captured.append(self)

    fast, want = _graphs_standing_in(pixels[:4], monkeypatch, capture)
    for _ in range(2):
        assert torch.equal(_samples(fast, pixels[:4], 30, seed=1), want)
    assert len(captured) == 1  # captured once for the shape, replayed for the second batch
    assert captured[0].replay_steps == (15 if whole else 1)
    with torch.no_grad():  # every row ends before the last step
        fast.model.text_decoder.cls.predictions.bias[SEP] = 9.0
    fast.sampler.settings = GenerationSettings(max_length=30)
    fast.sampler._loops.clear()
    monkeypatch.setattr(_StaticLoop, "use_graph", False)
    want = _samples(fast, pixels[:4], 30, seed=1)
    assert 5 < want.shape[1] < 30
    monkeypatch.setattr(_StaticLoop, "use_graph", True)
    assert torch.equal(_samples(fast, pixels[:4], 30, seed=1), want)
    assert len(captured) == 2


def test_a_failed_capture_falls_back_to_the_same_step(pixels, monkeypatch, caplog):
    def capture(self):
        self.step()
        raise RuntimeError("operation not permitted when stream is capturing\nmore details")

    fast, want = _graphs_standing_in(pixels[:3], monkeypatch, capture)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert torch.equal(_samples(fast, pixels[:3], 30, seed=1), want)
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert warnings == ["CUDA graph capture failed (operation not permitted when stream is capturing); "
                        "decoding steps run without a graph"]  # once per shape, one line


@pytest.mark.parametrize("hidden,heads", [(32, 4), (36, 3)])
def test_vision_states_equal_the_model(pixels, hidden, heads):
    """The ViT run on its own modules gives transformers' last hidden states bit for bit on the CPU
    (head size 8 and 12: the scale is not a power of two), and the fused attention the same to
    float32 rounding; the fast captioner encodes images with it."""
    from transformers import BlipVisionModel

    from datacomp_sieve.blip_checkpoint import tiny_blip_config
    from datacomp_sieve.decoding import vision_states

    config = tiny_blip_config(64).vision_config
    config.hidden_size, config.num_attention_heads = hidden, heads
    vision = BlipVisionModel(config).eval()
    gen = torch.Generator().manual_seed(hidden)
    with torch.no_grad():  # weights large enough that attention is far from uniform (rounding shows)
        for p in vision.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == hidden else 0.0))
    with torch.inference_mode():
        want = vision(pixel_values=pixels).last_hidden_state
        assert torch.equal(vision_states(vision, pixels), want)
        assert torch.allclose(vision_states(vision, pixels, fused=True), want, atol=1e-4)
        cap = build_captioner("tiny", device="cpu")
        cap.model.vision_model = vision
        assert torch.equal(cap.encode_images(pixels), want)
