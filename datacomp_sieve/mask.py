"""Masking of "medium phrases" ("a photo of", "image", ...) before texts are compared.

Sieve masks the alt-text and every generated caption, so that a caption and an alt-text are not
judged similar merely because both say "a photo of". Maskers, by name (``MASKERS``):

``official`` (default)
    The reference code's masking, quirks included. Each phrase of ``OFFICIAL_PHRASES``, in that
    order, is compiled as a regular expression as it is (no escaping, no word boundaries) with
    ``re.IGNORECASE`` only, and every match is replaced by ``""`` (``pattern.sub("", text)``), one
    phrase after the other. The text is not lowercased, stripped or whitespace-collapsed, so
    "photography" becomes "graphy", "A photo of a cat" becomes " a cat", and "Stock Photo" becomes "".
    One pass over the list only: the result is not always a fixed point ("imaimagege" -> "image").
``long``
    The same semantics with ``LONG_PHRASES``, the longer list defined but unused in the reference.
``words``
    An improved variant: ``WORDS_PHRASES`` (the official list plus the paper's "picture of"),
    matched as whole words (``\\b`` at both ends, any run of whitespace between the words,
    case-insensitive, phrases escaped). Passes over the list repeat until nothing more is removed,
    then runs of whitespace become one space and the ends are stripped. Idempotent.
``none``
    The text unchanged.

``mask_spans(text, name)`` gives the ``(start, end)`` ranges of ``text`` that a masker removes,
for reports that highlight the masked phrases. They are computed by replaying the same sequential
removal while tracking, for every surviving character, its index in the original text: each match
in the current (already partly masked) text maps back to the original indices of its characters,
which are then merged into maximal runs. A phrase that only appears after an earlier removal
closes over the gap that removal left, so it and the gap merge into one span (official masking of
"xphimageotox" removes "image", then "photo": one span (1, 11)). Deleting the
spans from the text gives the ``official``/``long`` result exactly, and the ``words`` result before
its final whitespace normalisation (``remove_spans``; tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import UserError

#: The reference code's list (``REMOVE_PHRASES``), in its order: the one it applies.
OFFICIAL_PHRASES: tuple[str, ...] = (
    "an image of", "a photo of", "stock photo", "photo stock", "a photo", "an image", "image", "photo",
)

#: The reference code's longer list (``REMOVE_PHRASES_LONG``), in its order; defined there but unused.
LONG_PHRASES: tuple[str, ...] = (
    "an image of", "a photo of", "an icon of", "an illustration of", "a template of", "a thumbnail of",
    "a vector of", "photo stock", "stock photo", "a photo", "an image", "an icon", "an illustration",
    "a template", "a thumbnail", "image", "photo", "icon", "illustration", "template", "vector", "thumbnail",
    "free", "print", "sale", "quot", "png", "jpeg", "jpg",
)

#: The ``words`` masker's list: the official one plus the paper's "picture of" (longest first).
WORDS_PHRASES: tuple[str, ...] = (
    "an image of", "a photo of", "a picture of", "picture of", "stock photo", "photo stock", "a photo",
    "an image", "image", "photo",
)

_WS = re.compile(r"\s+")

Span = tuple[int, int]


@dataclass(frozen=True)
class Masker:
    """Sequential regex removal of ``patterns``; ``repeat``: until a fixed point; ``normalize``:
    collapse whitespace runs to one space and strip, at the end."""

    name: str
    phrases: tuple[str, ...]
    patterns: tuple[re.Pattern, ...]
    repeat: bool = False
    normalize: bool = False
    description: str = ""

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"masking needs str, got {type(text).__name__}")
        while True:
            before = text
            for pat in self.patterns:
                text = pat.sub("", text)
            if not self.repeat or text == before:
                break
        return _WS.sub(" ", text).strip() if self.normalize else text

    def mask_all(self, texts: Iterable[str]) -> list[str]:
        return [self(t) for t in texts]

    def spans(self, text: str) -> list[Span]:
        """The original-text ranges this masker removes (see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"masking needs str, got {type(text).__name__}")
        cur = text
        where = list(range(len(text)))  # original index of each character of ``cur``
        removed: list[int] = []
        while True:
            changed = False
            for pat in self.patterns:
                pieces, keep, last = [], [], 0
                for m in pat.finditer(cur):
                    if m.end() == m.start():  # an empty match removes nothing (no phrase can match empty)
                        continue
                    pieces.append(cur[last:m.start()])
                    keep.extend(where[last:m.start()])
                    removed.extend(where[m.start():m.end()])
                    last = m.end()
                if last:
                    pieces.append(cur[last:])
                    keep.extend(where[last:])
                    cur, where, changed = "".join(pieces), keep, True
            if not self.repeat or not changed:
                break
        return _runs(sorted(removed))


def _runs(indices: Sequence[int]) -> list[Span]:
    out: list[Span] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def remove_spans(text: str, spans: Iterable[Span]) -> str:
    """``text`` without the given ``(start, end)`` ranges (sorted, non-overlapping)."""
    out, last = [], 0
    for a, b in spans:
        out.append(text[last:a])
        last = b
    out.append(text[last:])
    return "".join(out)


def _official(name: str, phrases: Sequence[str], description: str) -> Masker:
    # As the reference: the phrase itself is the pattern, only re.IGNORECASE.
    return Masker(name, tuple(phrases), tuple(re.compile(p, re.IGNORECASE) for p in phrases),
                  description=description)


def _word_pattern(phrase: str) -> re.Pattern:
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    return re.compile(rf"\b{body}\b", re.IGNORECASE)


MASKERS: dict[str, Masker] = {
    "official": _official("official", OFFICIAL_PHRASES,
                          "the reference code's: its 8 phrases as case-insensitive regexes, removed in order, "
                          "no word boundaries, no whitespace clean-up"),
    "long": _official("long", LONG_PHRASES, "the reference code's unused longer list, with official semantics"),
    "words": Masker("words", WORDS_PHRASES, tuple(_word_pattern(p) for p in WORDS_PHRASES), repeat=True,
                    normalize=True,
                    description="whole words, 'picture of' added, repeated to a fixed point, whitespace collapsed"),
    "none": Masker("none", (), (), description="no masking"),
}

#: The masker names, the default first.
MASKINGS: tuple[str, ...] = tuple(MASKERS)
DEFAULT_MASKING = "official"


def get_masker(name: str = DEFAULT_MASKING) -> Masker:
    """The masker registered as ``name`` (a callable ``str -> str`` with ``.spans``)."""
    try:
        return MASKERS[name]
    except KeyError:
        raise UserError(f"unknown masking {name!r}: one of {', '.join(MASKINGS)}") from None


def mask(text: str, mode: str = DEFAULT_MASKING) -> str:
    return get_masker(mode)(text)


def mask_texts(texts: Iterable[str], mode: str = DEFAULT_MASKING) -> list[str]:
    return get_masker(mode).mask_all(texts)


def mask_spans(text: str, mode: str = DEFAULT_MASKING) -> list[Span]:
    """Sorted, disjoint, maximal ``(start, end)`` ranges of ``text`` removed by masker ``mode``."""
    return get_masker(mode).spans(text)

