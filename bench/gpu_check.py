"""The fast decoding loop on a GPU, checked against transformers' generate there (prints, exits 1 on a mismatch).

    python bench/gpu_check.py [--device cuda]

The test suite checks the fast loop on the CPU; this runs the same kind of checks where the
defaults differ (fused attention, half precision):
- tiny random BLIP with peaked output biases, fp32: greedy tokens of the fast loop, with and
  without fused attention, equal transformers' greedy tokens exactly;
- BLIP-base size, random weights, fp16 and bf16: the share of greedy tokens equal to transformers'
  greedy tokens in the same precision (rounding may flip near-ties, so this is a figure, not a
  pass/fail), and sampled captions are deterministic per seed.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from bench.score_speed import random_blip
    from datacomp_sieve.caption import BlipCaptioner

    ok = True
    model, tok, size = random_blip("tiny", 0)
    head = model.text_decoder.cls.predictions
    with torch.no_grad():
        head.bias.copy_(2.0 * torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(6)))
        head.bias[tok.sep_token_id] = 6.5
    cap = BlipCaptioner(model, tok, device=args.device, precision="fp32", image_size=size)
    px = _pixels(cap, args.device, 12)
    with torch.inference_mode():
        emb = cap.encode_images(px)
        ref = _hf_greedy(cap, emb, 4)
        for fused in (False, True):
            cap.sampler.fused_attention = fused
            fast = cap.sampler.generate(emb, 4, sample=False)
            same = fast.tolist() == ref.tolist()
            ok &= same
            print(f"tiny fp32 greedy, fused attention {fused}: {'EQUAL' if same else 'DIFFERENT'} to transformers "
                  f"({fast.shape[0]} rows, lengths {fast.shape[1]} vs {ref.shape[1]})")
    cap.sampler.fused_attention = None

    # the decoding processes send uint8 crops, normalised on the GPU: the same numbers as the CPU transform
    from datacomp_sieve.caption import ImageTransform

    t = ImageTransform(224)
    ims = _photos()
    cpu = torch.stack([t(im) for im in ims])
    gpu = t.normalize(torch.from_numpy(np.stack([t.to_uint8(im) for im in ims])).to(args.device)).cpu()
    same = torch.equal(cpu, gpu)
    ok &= same
    print(f"uint8 crops normalised on {args.device} {'EQUAL' if same else 'DIFFERENT'} to the CPU transform "
          f"(max difference {(cpu - gpu).abs().max().item():.3g})")

    for precision in ("fp16", "bf16"):
        model, tok, size = random_blip("base", 0)
        cap = BlipCaptioner(model, tok, device=args.device, precision=precision, image_size=size)
        px = _pixels(cap, args.device, 8).to(cap.dtype)
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
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
