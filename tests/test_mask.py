"""Medium-phrase masking: exact examples of each masker and hypothesis properties."""

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from datacomp_sieve.errors import UserError
from datacomp_sieve.mask import (
    LONG_PHRASES,
    MASKERS,
    MASKINGS,
    OFFICIAL_PHRASES,
    WORDS_PHRASES,
    get_masker,
    mask,
    mask_spans,
    mask_texts,
    remove_spans,
)

# --------------------------------------------------------------------------------------------
# The lists


def test_official_list_is_the_references_in_its_order():
    assert OFFICIAL_PHRASES == ("an image of", "a photo of", "stock photo", "photo stock", "a photo", "an image",
                                "image", "photo")


def test_long_list_is_exposed_but_not_default():
    assert len(LONG_PHRASES) == 29 and len(set(LONG_PHRASES)) == 29
    assert set(OFFICIAL_PHRASES) < set(LONG_PHRASES)
    assert LONG_PHRASES[-7:] == ("free", "print", "sale", "quot", "png", "jpeg", "jpg")
    assert MASKINGS[0] == "official"
    assert mask("free png print") == "free png print"
    assert mask("free png print", "long") == "  "


def test_words_list_adds_picture_of():
    assert "picture of" in WORDS_PHRASES and "picture of" not in OFFICIAL_PHRASES
    assert set(OFFICIAL_PHRASES) < set(WORDS_PHRASES)


def test_registry():
    assert set(MASKINGS) == set(MASKERS) >= {"official", "words", "long", "none"}
    for name in MASKINGS:
        m = get_masker(name)
        assert callable(m) and m.name == name and m.description
    with pytest.raises(UserError, match="unknown masking 'nope'.*official"):
        get_masker("nope")
    with pytest.raises(TypeError):
        mask(None)


# --------------------------------------------------------------------------------------------
# official: exact examples


@pytest.mark.parametrize("text, expected", [
    ("A photo of a cat", " a cat"),
    ("An image of a dog", " a dog"),
    ("photography", "graphy"),
    ("Photograph of a Photographer", "graph of grapher"),  # "a Photo" goes as "a photo"
    ("Stock Photo", ""),
    ("IMAGE", ""),
    ("ImAgE", ""),
    ("photo", ""),
    ("", ""),
    ("  photo  ", "    "),  # whitespace is neither collapsed nor stripped
    ("A Cat photo", "A Cat "),  # the rest keeps its case
    ("images of cats", "s of cats"),  # no word boundaries
    ("a photos", "s"),
    ("a stock photo of x", "a  of x"),  # "stock photo" goes before "a photo" could match
    ("a photo stock photo of x", "  of x"),
    ("an imagephoto", ""),
    ("Beautiful picture of a lake", "Beautiful picture of a lake"),  # "picture of" is not in the list
    ("imaimagege", "image"),  # a single pass: what a removal joins is not removed again
    ("xphimageotox", "xx"),  # ... unless a later phrase matches it
    ("photo.image", "."),
    ("phot o", "phot o"),
])
def test_official_examples(text, expected):
    assert mask(text) == expected
    assert mask(text, "official") == expected


def test_official_is_not_idempotent():
    once = mask("imaimagege")
    assert once == "image" and mask(once) == ""
    assert mask(mask("phphotooto")) != mask("phphotooto") == "photo"


def test_mask_texts():
    assert mask_texts(["A photo of x", "y"]) == [" x", "y"]
    assert mask_texts(["A photo of x", "y"], "words") == ["x", "y"]


# --------------------------------------------------------------------------------------------
# words: exact examples


@pytest.mark.parametrize("text, expected", [
    ("A photo of a cat", "a cat"),
    ("A picture of my dog", "my dog"),
    ("a picture of a photo of a dog", "a dog"),
    ("photography", "photography"),
    ("images of cats", "images of cats"),
    ("imaimagege", "imaimagege"),
    ("Stock Photo", ""),
    ("stock photo: cat", ": cat"),
    ("a  photo \t of\ncat", "cat"),
    ("  cat   on   a mat ", "cat on a mat"),
    ("cat_image", "cat_image"),
    ("Image", ""),
    ("photo-image", "-"),
    ("", ""),
])
def test_words_examples(text, expected):
    assert mask(text, "words") == expected


def test_none():
    assert mask(" A photo  ", "none") == " A photo  "
    assert mask_spans("A photo", "none") == []


# --------------------------------------------------------------------------------------------
# spans


@pytest.mark.parametrize("text, mode, spans", [
    ("A photo of a cat", "official", [(0, 10)]),
    ("cat photo, dog image", "official", [(4, 9), (15, 20)]),
    ("imaimagege", "official", [(3, 8)]),
    ("xphimageotox", "official", [(1, 11)]),
    ("photography", "official", [(0, 5)]),
    ("photography", "words", []),
    ("A picture of a  photo of x", "words", [(0, 12), (13, 24)]),
    ("nothing here", "official", []),
])
def test_span_examples(text, mode, spans):
    assert mask_spans(text, mode) == spans


# --------------------------------------------------------------------------------------------
# properties

FRAGMENTS = ["image", "photo", "IMAGE", "Photo", "pHoTo", "an ", "a ", "A ", " of", "of ", "stock", "picture",
             " ", "  ", "\t", "\n", "ima", "ge", "pho", "to", "graphy", "cat", ",", ".", "_", "s", "é", "ß",
             "\u0130", "\u212a", "\xa0", "png", "free"]
fragment_texts = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)
texts = st.one_of(fragment_texts, st.text(max_size=40))
ascii_texts = st.one_of(
    st.lists(st.sampled_from([f for f in FRAGMENTS if f.isascii()]), max_size=14).map("".join),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)


def oracle(text, phrases=OFFICIAL_PHRASES):
    """The reference's procedure, written out plainly."""
    for phrase in phrases:
        text = re.sub(phrase, "", text, flags=re.IGNORECASE)
    return text


@given(texts)
@example("imaimagege")
@example("A photo of a cat")
def test_official_equals_sequential_oracle(text):
    assert mask(text) == oracle(text)
    assert mask(text, "long") == oracle(text, LONG_PHRASES)


@given(texts, st.sampled_from(MASKINGS))
def test_never_longer(text, mode):
    assert len(mask(text, mode)) <= len(text)


@given(texts)
def test_words_is_normalised_and_idempotent(text):
    out = mask(text, "words")
    assert "  " not in out and out == out.strip()
    assert not re.search(r"\s\s", out)
    assert mask(out, "words") == out
    for pat in get_masker("words").patterns:
        assert not pat.search(out)


@given(texts)
def test_official_idempotent_when_nothing_is_left_to_match(text):
    out = mask(text)
    if not any(p.search(out) for p in get_masker("official").patterns):
        assert mask(out) == out
    else:  # only possible when a removal joined a new phrase together
        assert mask(out) != out


@given(texts, st.sampled_from(MASKINGS))
def test_texts_without_phrases_are_unchanged(text, mode):
    if not any(p.search(text) for p in get_masker(mode).patterns):
        out = mask(text, mode)
        if mode == "words":
            assert out == re.sub(r"\s+", " ", text).strip()
        else:
            assert out == text


@given(ascii_texts, st.sampled_from(MASKINGS))
def test_case_insensitive(text, mode):
    # ASCII only: swapcase keeps positions there (it does not for e.g. "ß").
    assert mask(text.swapcase(), mode) == mask(text, mode).swapcase()
    assert mask(text.upper(), mode) == mask(text, mode).upper()


@given(texts, st.sampled_from(MASKINGS))
@example("xphimageotox", "official")
@example("imaimagege", "official")
def test_spans_match_the_removal(text, mode):
    spans = mask_spans(text, mode)
    for (a, b), nxt in zip(spans, spans[1:] + [None]):
        assert 0 <= a < b <= len(text)
        if nxt is not None:
            assert b < nxt[0]  # sorted, disjoint, maximal
    rest = remove_spans(text, spans)
    if mode == "words":
        assert re.sub(r"\s+", " ", rest).strip() == mask(text, mode)
    else:
        assert rest == mask(text, mode)
        assert sum(b - a for a, b in spans) == len(text) - len(mask(text, mode))


@settings(max_examples=50)
@given(st.lists(st.sampled_from(OFFICIAL_PHRASES), min_size=1, max_size=4), st.sampled_from([", ", "\n", " "]))
def test_phrases_alone_vanish(phrases, sep):
    text = sep.join(phrases)
    assert mask(text, "words").strip(" ,") == ""
    if sep != " ":  # with plain spaces, official masking can cut a phrase across two (below)
        assert mask(text).strip(" ,\n") == ""


def test_official_can_cut_across_phrases():
    # "stock photo" matches across the two "photo stock"s first, leaving "photo  stock".
    assert mask("photo stock photo stock") == "  stock"
    assert mask("photo stock photo stock", "words") == ""
