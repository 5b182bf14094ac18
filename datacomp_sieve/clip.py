"""CLIPScore as DataComp computes its ``clip_*_similarity_score`` columns.

The raw cosine of the L2-normalised image and text features (not x100, not clamped), with
open_clip. ``ClipScorer("ViT-L-14", "openai")`` is DataComp's L/14 column; ``"tiny"`` is a tiny
randomly initialised model for tests and offline demos, whose values mean nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from .errors import UserError, one_line

# Tiny towers built from open_clip's own configs with small overrides (for tests, offline demos).
TINY = {
    "ViT-B-32": dict(embed_dim=32,
                     vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2, head_width=32),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)),
    "ViT-L-14": dict(embed_dim=32,
                     vision_cfg=dict(image_size=56, patch_size=14, width=64, layers=2, head_width=32),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)),
}


def openai_checkpoint(arch: str) -> str | None:
    """A local copy of OpenAI's weights for ``arch`` (open_clip's hub or URL cache), or None. Never downloads."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, "openai") or {}
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                p = try_to_load_from_cache(hub, name)
                if isinstance(p, str) and os.path.isfile(p):
                    return p
    url = cfg.get("url") or ""
    if url:
        p = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(p):
            return p
    return None


@contextlib.contextmanager
def _quiet_no_pretrained():
    """open_clip warns "No pretrained weights loaded" for a random model on purpose; drop that record."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    drop = logging.Filter()
    drop.filter = lambda record: "No pretrained weights loaded" not in record.getMessage()
    if guard is not None:
        root.addHandler(guard)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if guard is not None:
            root.removeHandler(guard)


class ClipScorer:
    """One open_clip model; ``score(images, texts)`` gives one cosine per pair."""

    def __init__(self, arch: str = "ViT-L-14", pretrained: str = "openai", device: str = "cpu",
                 seed: int = 0, batch_size: int = 64):
        import open_clip
        import torch

        self.arch, self.device, self.batch_size = arch, device, batch_size
        if arch not in open_clip.list_models():
            raise UserError(f"unknown CLIP model {arch!r}: open_clip's names, e.g. ViT-B-32, ViT-L-14")
        if pretrained == "tiny":
            if arch not in TINY:
                raise UserError(f"a tiny random CLIP exists for {', '.join(TINY)}, not {arch}")
            with torch.random.fork_rng(devices=[]), _quiet_no_pretrained():
                torch.manual_seed(seed)
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **TINY[arch])
            self.description = (f"tiny random open_clip {arch} config with overrides "
                                f"{json.dumps(TINY[arch], sort_keys=True)}, pretrained=None, torch seed {seed} "
                                "\u2014 not meaningful")
        else:
            source = pretrained
            if pretrained == "openai":
                from .models import hub_offline, hub_reachable

                source = openai_checkpoint(arch)
                if source is None and hub_offline():
                    raise UserError(f"OpenAI's {arch} CLIP weights are not in the local cache and offline mode is on "
                                    "(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); pass --clip_pretrained PATH to a local "
                                    "checkpoint")
                if source is None and not hub_reachable():  # not half a minute of retries, then a long error
                    raise UserError(f"OpenAI's {arch} CLIP weights are not in the local cache and the hub cannot be "
                                    "reached; pass --clip_pretrained PATH to a local checkpoint")
                name = f"{arch}-quickgelu"
                source = source or "openai"
            elif os.path.exists(pretrained):
                name = arch
            else:
                name = arch  # an open_clip pretrained tag such as laion2b_s32b_b82k
            try:
                kwargs = {"weights_only": False} if str(source).endswith(".pt") else {}
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source, **kwargs)
            except Exception as e:  # network, missing tag, bad file: say which, in one line
                raise UserError(f"cannot load CLIP {arch} weights {pretrained!r}: {type(e).__name__}: "
                                f"{one_line(e)}; pass --clip_pretrained PATH to a local checkpoint") from None
            self.description = f"open_clip {name} with weights {source}"
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)

    def score(self, images: list, texts: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                ims = torch.stack([self.preprocess(im) for im in images[s:s + self.batch_size]]).to(self.device)
                toks = self.tokenizer(texts[s:s + self.batch_size]).to(self.device)
                fi = self.model.encode_image(ims).float()
                ft = self.model.encode_text(toks).float()
                fi = fi / fi.norm(dim=-1, keepdim=True)
                ft = ft / ft.norm(dim=-1, keepdim=True)
                out.extend((fi * ft).sum(dim=-1).tolist())
        return out
