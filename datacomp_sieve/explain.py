"""Explain one decision: caption an image once and score alt-texts against those captions."""

from __future__ import annotations

import json
import os
import sys


def explain(image_path: str, texts: list[str], config) -> dict:
    """The captions, their masked forms, and for each text its similarities and Sieve score."""
    import torch

    from .caption import build_captioner
    from .errors import UserError
    from .mask import get_masker
    from .shards import ImageError, decode_image
    from .text import TextEncoder, sieve_scores

    if not texts:
        raise UserError("give at least one --text")
    if os.path.isdir(image_path):
        raise UserError(f"--image {image_path} is a folder; give one image file")
    if not os.path.isfile(image_path):
        raise UserError(f"image not found: {image_path}")
    with open(image_path, "rb") as f:
        data = f.read()
    cfg = config.resolved()
    try:
        image = decode_image(data, max_pixels=cfg.max_image_pixels)
    except ImageError as e:
        raise UserError(f"cannot use {image_path}: {e}") from None
    captioner = build_captioner(cfg.captioner, device=cfg.device, precision=cfg.precision, decoding=cfg.decoding)
    gen = torch.Generator().manual_seed(cfg.seed)
    captions = captioner.caption([image], cfg.num_captions, generator=gen)[0]
    encoder = TextEncoder(cfg.text_encoder, device=cfg.device)
    masker = get_masker(cfg.masking)
    masked_caps = masker.mask_all(captions)
    masked_texts = masker.mask_all(texts)
    emb = encoder.encode(masked_caps + masked_texts)
    cap_emb, txt_emb = emb[: len(captions)], emb[len(captions):]
    best, _, which = sieve_scores(encoder, texts, [captions] * len(texts), masking=cfg.masking)
    clip = [None] * len(texts)
    clip_desc = None
    if cfg.clip_model:
        from .clip import ClipScorer

        scorer = ClipScorer(cfg.clip_model, cfg.clip_pretrained, device=cfg.device)
        clip = scorer.score([image] * len(texts), texts)
        clip_desc = scorer.description
    results = []
    for i, t in enumerate(texts):
        sims = (cap_emb @ txt_emb[i]).tolist()
        results.append({"text": t, "masked_text": masked_texts[i], "similarities": [round(x, 6) for x in sims],
                        "sieve_score": float(best[i]), "best_caption": int(which[i]),
                        "clip_score": None if clip[i] is None else float(clip[i])})
    return {"image": image_path, "captioner": captioner.description, "clip": clip_desc,
            "captions": captions, "masked_captions": masked_caps, "results": results}


def print_explanation(e: dict, as_json: bool, out=sys.stdout) -> None:
    if as_json:
        keys = ("captions", "masked_captions", "results")
        print(json.dumps({k: e[k] for k in keys}, ensure_ascii=False), file=out)
        return
    print(f"image: {e['image']}\ncaptioner: {e['captioner']}", file=out)
    if e["clip"]:
        print(f"CLIP: {e['clip']}", file=out)
    print("captions (after masking):", file=out)
    for i, (c, m) in enumerate(zip(e["captions"], e["masked_captions"]), 1):
        print(f"  {i}. {c!r} -> {m!r}", file=out)
    for r in e["results"]:
        print(f"\ntext: {r['text']!r}\n  masked: {r['masked_text']!r}", file=out)
        print("  similarity to each caption: " + " ".join(f"{s:.3f}" for s in r["similarities"]), file=out)
        clip = "n/a (no CLIP model; --clip_model ViT-L-14)" if r["clip_score"] is None else f"{r['clip_score']:.4f}"
        print(f"  Sieve score: {r['sieve_score']:.4f} (best caption {r['best_caption'] + 1})   CLIPScore: {clip}",
              file=out)
