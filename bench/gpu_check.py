"""The fast decoding loop on a GPU, checked against transformers' generate there (prints, exits 1 on a mismatch).

    python bench/gpu_check.py [--device cuda]

The test suite checks the fast loop on the CPU; this runs the same kind of checks where the
defaults differ (fused attention, half precision):
- tiny random BLIP with peaked output biases, fp32: greedy tokens of the fast loop, with and
  without fused attention, equal transformers' greedy tokens exactly;
- BLIP-base size, random weights, fp16 and bf16: the share of greedy tokens equal to transformers'
  greedy tokens in the same precision (rounding may flip near-ties, so this is a figure, not a
  pass/fail), and sampled captions are deterministic per seed;
- the sampler's candidates taken from half-precision logits first (its GPU default) against the
  whole vocabulary made float32: the same probabilities;
- the decoding step as a CUDA graph (``FastBlipSampler.cuda_graphs``): tiny fp32 greedy tokens
  equal transformers' exactly; at BLIP-base size in fp16, sampling is deterministic per seed, and
  the time to decode one batch (256 images x 8 captions, 16 new tokens each) with growing shapes,
  fixed shapes and the graph, and the graph's capture time;
- resizing and cropping on the device (``resample.py``) gives Pillow's pixels, and its time for
  one batch;
- the BLIP-base ViT in fp16 as transformers runs it and with fused attention (the fast path's):
  the largest difference and the time for one batch;
- the text encoder split as with text processes (``TextEncoder.features`` then ``embed``) gives
  ``encode``'s embeddings in the GPU's half precision, and the time of the forward for one
  batch's texts (256 images x 9 texts);
- the engine end to end (tiny BLIP, 64 images): with decoding and text processes, the captioning
  thread and the resize on the device, and with ``input_stream``, the same store as in line;
- a CUDA graph capture that fails: a warning, the same tokens without the graph, and the thread
  back on its own stream.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _hf_greedy(cap, embeds, r):
    s = cap.settings
    e = embeds.repeat_interleave(r, 0)
    return cap.model.text_decoder.generate(
        input_ids=cap.prompt_ids.to(e.device)[None].repeat(e.shape[0], 1), encoder_hidden_states=e,
        do_sample=False, num_beams=1, repetition_penalty=s.repetition_penalty, max_length=s.max_length,
        min_length=s.min_length, eos_token_id=cap.sep_id, pad_token_id=cap.pad_id, bos_token_id=cap.bos_id)


def _photos(n=None):
    """The benchmark's photos as RGB PIL images (the first n)."""
    from PIL import Image

    from bench.score_speed import PHOTOS
    from datacomp_sieve.toy_pool import photo_array

    return [Image.fromarray(photo_array(src)).convert("RGB") for src, _ in PHOTOS[:n]]


def _pixels(cap, device, n):
    import torch

    return torch.stack([cap.preprocess(im) for im in _photos(n)]).to(device)


def _graph_timing(device, images=256, r=8) -> bool:
    """BLIP-base decoding of one batch three ways (prints seconds; fp16 on CUDA, fp32 on the CPU,
    where the "graph" is the fixed-shape step run as it is); True if sampling with the graph is
    deterministic per seed."""
    import time

    import torch

    from bench.score_speed import _sync, random_blip
    from datacomp_sieve.caption import BlipCaptioner, seeded

    dev = torch.device(device)
    precision = "fp16" if dev.type == "cuda" else "fp32"
    model, tok, size = random_blip("base", 0)
    cap = BlipCaptioner(model, tok, device=device, precision=precision, image_size=size)
    s = cap.sampler
    with torch.inference_mode():
        px = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev, cap.dtype)
        emb = cap.encode_images(px)

        def timed(seed=0):
            _sync(dev)
            t = time.perf_counter()
            with seeded(seed, dev):
                out = s.generate(emb, r)
            _sync(dev)
            return out, time.perf_counter() - t

        timed()
        growing = min(timed()[1] for _ in range(3))
        s.cuda_graphs = True
        s._loops.clear()
        a, first = timed(1)  # allocation and capture
        b, graph = timed(1)
        c, _ = timed(2)
        graph = min(graph, *(timed()[1] for _ in range(2)))
        loop = next(iter(s._loops.values()))
        loop.use_graph, loop.graph = False, None
        eager, _ = timed(1)
        fixed = min(timed()[1] for _ in range(3))
        s.cuda_graphs = False
    det = torch.equal(a, b) and not torch.equal(a, c)
    same = torch.equal(a, eager)
    print(f"base {precision} decoding of {images} images x {r} captions ({a.shape[1] - 4} new tokens): growing shapes "
          f"{growing:.3f} s, fixed shapes {fixed:.3f} s, CUDA graph {graph:.3f} s "
          f"({images / graph:.0f} images/s; first call with allocation and capture {first:.3f} s); "
          f"graph sampling deterministic per seed: {det}; graph tokens {'EQUAL' if same else 'DIFFERENT'} to the "
          f"same step run eagerly")
    return det and same


def _tiny_peaked(device):
    """A tiny random BLIP in fp32 whose captions end at varied lengths (peaked output biases), the
    image embeddings of 12 photos, and transformers' greedy tokens for them (4 rows per image)."""
    import torch

    from bench.score_speed import random_blip
    from datacomp_sieve.caption import BlipCaptioner

    model, tok, size = random_blip("tiny", 0)
    head = model.text_decoder.cls.predictions
    with torch.no_grad():
        head.bias.copy_(2.0 * torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(6)))
        head.bias[tok.sep_token_id] = 6.5
    cap = BlipCaptioner(model, tok, device=device, precision="fp32", image_size=size)
    px = _pixels(cap, device, 12)
    with torch.inference_mode():
        emb = cap.encode_images(px)
        return cap, emb, _hf_greedy(cap, emb, 4)


def _tiny_greedy(device) -> bool:
    """Tiny BLIP fp32 greedy tokens, fused attention and CUDA graph on and off, against transformers'."""
    import torch

    ok = True
    cap, emb, ref = _tiny_peaked(device)
    with torch.inference_mode():
        for fused in (False, True):
            for graphs in (False, True):
                cap.sampler.fused_attention, cap.sampler.cuda_graphs = fused, graphs
                fast = cap.sampler.generate(emb, 4, sample=False)
                same = fast.tolist() == ref.tolist()
                ok &= same
                print(f"tiny fp32 greedy, fused attention {fused}, CUDA graph {graphs}: "
                      f"{'EQUAL' if same else 'DIFFERENT'} to transformers "
                      f"({fast.shape[0]} rows, lengths {fast.shape[1]} vs {ref.shape[1]})")
    cap.sampler.fused_attention, cap.sampler.cuda_graphs = None, False
    return ok


def _failed_capture(device) -> bool:
    """A CUDA graph capture that fails (a host sync inside the step): the loop warns, gives
    transformers' greedy tokens without the graph, and leaves this thread on the stream it was
    on (torch's failed ``capture_end`` leaves it on the capture stream). Last of the checks: it
    breaks a capture on purpose."""
    import logging
    from unittest import mock

    import torch

    from datacomp_sieve.decoding import _StaticLoop

    if not str(device).startswith("cuda"):
        print("failed capture: skipped (no CUDA device)")
        return True
    cap, emb, ref = _tiny_peaked(device)
    step = _StaticLoop.step

    def syncing(self):
        step(self)
        if torch.cuda.is_current_stream_capturing():
            bool(self.running.any())  # a host sync: not allowed while capturing

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("datacomp_sieve.decoding").addHandler(handler)
    before = torch.cuda.current_stream(device)
    try:
        with torch.inference_mode(), mock.patch.object(_StaticLoop, "step", syncing):
            cap.sampler.cuda_graphs = True
            fast = cap.sampler.generate(emb, 4, sample=False)
    finally:
        logging.getLogger("datacomp_sieve.decoding").removeHandler(handler)
    same = fast.tolist() == ref.tolist()
    stream = torch.cuda.current_stream(device) == before
    print(f"failed capture: warned {bool(warned)} ({warned[0] if warned else ''}); tokens "
          f"{'EQUAL' if same else 'DIFFERENT'} to transformers; back on the stream it was on: {stream}")
    return bool(warned) and same and stream


def _gpu_normalize(device) -> bool:
    """The decoding processes send uint8 crops, normalised on the GPU: the same numbers as the CPU transform."""
    import numpy as np
    import torch

    from datacomp_sieve.caption import ImageTransform

    t = ImageTransform(224)
    ims = _photos()
    cpu = torch.stack([t(im) for im in ims])
    gpu = t.normalize(torch.from_numpy(np.stack([t.to_uint8(im) for im in ims])).to(device)).cpu()
    same = torch.equal(cpu, gpu)
    print(f"uint8 crops normalised on {device} {'EQUAL' if same else 'DIFFERENT'} to the CPU transform "
          f"(max difference {(cpu - gpu).abs().max().item():.3g})")
    return same


def _warm_timed(run, device):
    """(output, seconds) of ``run()`` called after one untimed call, the device synchronised."""
    import time

    import torch

    from bench.score_speed import _sync

    device = torch.device(device)
    run()
    _sync(device)
    start = time.perf_counter()
    out = run()
    _sync(device)
    return out, time.perf_counter() - start


def _device_resize(device, images: int = 256) -> bool:
    """Resize and crop on the device (``resample.py``) equal to Pillow's; the time for one batch
    of whole 512 x 341 images."""
    import torch

    from datacomp_sieve import resample
    from datacomp_sieve.caption import ImageTransform

    device = torch.device(device)
    t = ImageTransform(224)
    same = resample.matches_pillow(t, device)
    batch = torch.randint(0, 256, (images, 341, 512, 3), dtype=torch.uint8, device=device)
    args = ([(341, 512)] * images, [t.crop_plan(341, 512)] * images, t.size)
    ms = 1000 * _warm_timed(lambda: resample.crop_batch(batch, *args), device)[1]
    print(f"resize and crop on {device}: {'EQUAL' if same else 'DIFFERENT'} to Pillow's; {images} images of "
          f"512 x 341 in {ms:.1f} ms ({1000 * images / ms:.0f} images/s)")
    return same


def _vision_timing(device, images: int = 256) -> bool:
    """BLIP-base ViT in fp16 on one batch: transformers' forward against ``decoding.vision_states``
    with fused attention (the fast path's): the largest difference and both times."""
    import torch

    from bench.score_speed import random_blip
    from datacomp_sieve.decoding import vision_states

    device = torch.device(device)
    if device.type == "cpu":
        print("vision timing: skipped on the CPU (fp16)")
        return True
    model, _, size = random_blip("base", 0)
    vision = model.vision_model
    with torch.no_grad():  # transformers initialises BLIP's ViT with std 1e-10: attention would be uniform
        for p in vision.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    vision = vision.to(device, torch.float16).eval()
    px = torch.randn(images, 3, size, size, device=device, dtype=torch.float16)
    with torch.inference_mode():
        want, hf_s = _warm_timed(lambda: vision(pixel_values=px).last_hidden_state, device)
        got, fused_s = _warm_timed(lambda: vision_states(vision, px, fused=True), device)
    diff = (got.float() - want.float()).abs().max().item()
    print(f"BLIP-base ViT fp16, {images} images: transformers {1000 * hf_s:.1f} ms ({images / hf_s:.0f} images/s), "
          f"fused attention {1000 * fused_s:.1f} ms ({images / fused_s:.0f} images/s); largest difference {diff:.3g}")
    return diff < 0.1


def _text_split(device, images: int = 256) -> bool:
    """all-MiniLM-L6-v2 in the engine's GPU precision: tokenised batches embedded here equal
    ``encode``'s embeddings; the forward's time for one batch's alt-texts and captions."""
    import random

    import numpy as np

    from bench.text_host_cost import WORDS
    from datacomp_sieve.text import TextEncoder

    precision = "fp16" if str(device).startswith("cuda") else "fp32"
    enc = TextEncoder(None, device=device, precision=precision)
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 15))) for _ in range(9 * images)]
    batches, order = enc.features(texts)
    same = np.array_equal(enc.embed(batches, order), enc.encode(texts))
    _, seconds = _warm_timed(lambda: enc.embed(batches, order), device)
    print(f"text encoder {precision}: tokenised elsewhere and embedded here EQUAL to encode: {same}; "
          f"forward of {len(texts)} texts ({images} images x 9) {seconds:.3f} s")
    return same


def _engine(device, images: int = 64) -> bool:
    """The engine end to end on the device (tiny BLIP, bench images in 2 shards): with decoding
    and text processes, the captioning thread and the device's defaults (resize on the device in
    half precision), and again with ``input_stream``, the stores equal the store made with
    everything in line on the same device."""
    import glob
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    from bench.score_speed import build_shards
    from datacomp_sieve.score import ScoreConfig, ShardScorer, score_pool

    work = tempfile.mkdtemp(prefix="gpu_check_engine_")
    try:
        shards = os.path.join(work, "shards")
        build_shards(shards, images, images // 2)
        cfg = ScoreConfig(captioner="tiny", device=device, num_captions=4, batch_size=16)

        def run(name, **attrs):
            scorer = ShardScorer(cfg)
            for k, v in attrs.items():
                setattr(scorer, k, v)
            try:
                manifest = score_pool(shards, os.path.join(work, name), cfg, progress=False, scorer=scorer)
                how = (f"images {scorer.image_decoding()}, text processes {scorer.text_workers}, captioning "
                       f"thread {scorer.overlap_captioning}, input stream {scorer._input_stream() is not None}")
            finally:
                scorer.close()
            tables = [pq.read_table(f) for f in sorted(glob.glob(os.path.join(work, name, "*.parquet")))]
            return manifest["status"], how, tables

        inline = run("inline", decode_workers=0, decode_threads=0, text_workers=0, overlap_text=False,
                     overlap_captioning=False)
        ok = inline[0] == {"ok": images}
        print(f"engine on {device}, tiny BLIP, {images} images: in line ({inline[1]}): {inline[0]}")
        for name, attrs in (("processes", {}), ("input stream", {"input_stream": True})):
            got = run(name, decode_workers=2, text_workers=1, **attrs)
            same = len(got[2]) == len(inline[2]) == 2 and all(a.equals(b) for a, b in zip(got[2], inline[2]))
            ok &= same
            print(f"engine on {device}, {name} ({got[1]}): store EQUAL to the in-line one: {same}")
        return ok
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _half_precision(device) -> bool:
    """BLIP-base fp16/bf16 greedy tokens against transformers' (a figure); sampling deterministic per seed."""
    import torch

    from bench.score_speed import random_blip
    from datacomp_sieve.caption import BlipCaptioner

    ok = True
    for precision in ("fp16", "bf16"):
        model, tok, size = random_blip("base", 0)
        cap = BlipCaptioner(model, tok, device=device, precision=precision, image_size=size)
        px = _pixels(cap, device, 8).to(cap.dtype)
        with torch.inference_mode():
            emb = cap.encode_images(px)
            fast = cap.sampler.generate(emb, 2, sample=False)
            ref = _hf_greedy(cap, emb, 2)
        w = min(fast.shape[1], ref.shape[1])
        share = (fast[:, :w] == ref[:, :w]).float().mean().item()
        a = cap.caption_pixels(px, 8, seed=3)
        b = cap.caption_pixels(px, 8, seed=3)
        c = cap.caption_pixels(px, 8, seed=4)
        det = a == b and a != c
        ok &= det
        print(f"base {precision} greedy: {100 * share:.1f}% of tokens equal to transformers' greedy; "
              f"sampling deterministic per seed: {det}")
    return ok


def _candidates_first(device) -> bool:
    """The sampler's candidates from half-precision logits on the device (top-k first, the penalties
    on those only: the default there) against the whole vocabulary made float32 and penalised: the
    same probabilities, every token above the lowest kept one the same (half-precision logits tie,
    and which tokens tied with the 50th are kept may differ)."""
    import math

    import torch

    from datacomp_sieve.caption import GenerationSettings
    from datacomp_sieve.decoding import FastBlipSampler

    g = torch.Generator().manual_seed(5)
    # close logits, so the penalty moves seen tokens below unseen ones; positive and negative rows
    shift = torch.tensor([10.0, -10.0]).repeat(1024)[:, None]
    logits = (torch.randn(2048, 30524, generator=g) + shift).to(device, torch.float16)
    logits[::16, 102] = 40.0  # [SEP] the best token of some rows: banned below min_length
    seen = logits.float().topk(19).indices
    seen = torch.cat([seen, torch.full_like(seen[:, :1], 102)], 1)
    same = order = True
    for pos in (4, 9):  # below min_length and above
        got = []
        for first in (True, False):
            s = FastBlipSampler.__new__(FastBlipSampler)
            s.settings, s.sep_id, s.candidates_first = GenerationSettings(), 102, first
            got.append(s.candidates(logits.clone(), seen, torch.tensor([pos], device=device)))
        (pa, ia), (pb, ib) = got
        low = torch.where(pb > 0, pb, math.inf).min(1, keepdim=True).values
        da, db = (torch.zeros(logits.shape, device=device).scatter_(1, i, p) for p, i in got)
        same &= torch.equal(pa, pb) and torch.equal(da * (da > low), db * (db > low))
        order &= torch.equal(ia, ib)
    print(f"candidates first from fp16 logits (2048 rows, positions 4 and 9): {'EQUAL' if same else 'DIFFERENT'} "
          f"to the whole vocabulary's; same order {order}")
    return same


def _guarded(check, *args) -> bool:
    """Run one check; an exception prints its traceback and counts as a failure (the others still run)."""
    import traceback

    try:
        return bool(check(*args))
    except Exception:  # noqa: BLE001 - a check that crashes is a finding, not the end of the run
        traceback.print_exc()
        print(f"{check.__name__}: FAILED with an exception")
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--graph_images", type=int, default=256, help="images in the timed decoding batch (default 256)")
    p.add_argument("--graph_only", action="store_true", help="only the CUDA graph timing (it runs on the CPU too)")
    args = p.parse_args(argv)
    if args.graph_only:
        return 0 if _guarded(_graph_timing, args.device, args.graph_images) else 1
    ok = True
    for check in (_tiny_greedy, _candidates_first, _gpu_normalize, _device_resize, _vision_timing, _text_split,
                  _engine, _half_precision):
        ok &= _guarded(check, args.device)
    ok &= _guarded(_graph_timing, args.device, args.graph_images)
    ok &= _guarded(_failed_capture, args.device)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
