"""The toy pool has DataComp's layout and is what img2dataset makes of its metadata."""

import io
import json
import math
import os
import re
import tarfile
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_sieve import toy_pool as tp
from datacomp_sieve.errors import UserError

B32 = "clip_b32_similarity_score"
L14 = "clip_l14_similarity_score"
HEX32 = re.compile(r"^[0-9a-f]{32}$")

EXPECTED_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    (B32, pa.float32()),
    (L14, pa.float32()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
    ("sha256", pa.string()),
])


def metadata(pool):
    files = sorted((pool / "metadata").iterdir())
    return files, pa.concat_tables([pq.read_table(f) for f in files])


def tar_samples(path):
    """{key: {ext: bytes}} of one webdataset shard."""
    out = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out[key][ext] = tf.extractfile(m).read()
    return dict(out)


@pytest.fixture(scope="module")
def manifest(toy_pool):
    return tp.load_manifest(toy_pool)


@pytest.fixture(scope="module")
def shard_rows(toy_pool):
    """img2dataset's per-shard tables, all rows, with the shard name."""
    rows = []
    for f in sorted((toy_pool / "shards").glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows.append(dict(r, shard=f.stem))
    return rows


def test_metadata_layout_and_dtypes(toy_pool, manifest):
    files, table = metadata(toy_pool)
    assert len(files) == 2
    for f in files:
        assert f.suffix == ".parquet" and HEX32.match(f.stem), f.name
        schema = pq.read_schema(f)
        assert schema.names == list(tp.METADATA_COLUMNS) == EXPECTED_SCHEMA.names
        for name in EXPECTED_SCHEMA.names:
            assert schema.field(name).type.equals(EXPECTED_SCHEMA.field(name).type), name
    uids = table.column("uid").to_pylist()
    assert all(HEX32.match(u) for u in uids)
    assert len(set(uids)) == len(uids) == table.num_rows
    assert 60 <= table.num_rows <= 100
    # the manifest lists the rows in metadata order, with the same texts and urls
    assert [r["uid"] for r in manifest["rows"]] == uids
    assert [r["text"] for r in manifest["rows"]] == table.column("text").to_pylist()
    assert [r["url"] for r in manifest["rows"]] == table.column("url").to_pylist()
    # uid is the MD5 of the url; every url names the fictitious .invalid domain
    for r in manifest["rows"]:
        assert r["uid"] == tp.uid_for_url(r["url"])
        assert ".toy-pool.invalid/" in r["url"]
    # sha256 is that of the served bytes; width/height those of the served picture
    for r, sha, w in zip(manifest["rows"], table.column("sha256").to_pylist(),
                         table.column("original_width").to_pylist()):
        assert sha == r["served"]["sha256"]
        if r["served"]["http_status"] != 200:
            assert sha is None and w is None


def test_shard_files_and_stats(toy_pool, manifest, shard_rows):
    files = sorted(p.name for p in (toy_pool / "shards").iterdir())
    n = len(files) // 3
    assert n == 3  # 50 + 34 rows, 40 per shard, cut per metadata file: 40, 10, 34
    assert files == sorted(f"{i:08d}{s}" for i in range(n) for s in (".tar", ".parquet", "_stats.json"))
    # nothing else anywhere in the pool (no _tmp, no wandb, no logs)
    everything = sorted(str(p.relative_to(toy_pool)) for p in toy_pool.rglob("*") if p.is_file())
    assert everything == sorted(
        [f"metadata/{f.name}" for f in metadata(toy_pool)[0]] + [f"shards/{f}" for f in files] + [tp.MANIFEST_NAME]
    )
    total = Counter()
    for i in range(n):
        stats = json.loads((toy_pool / "shards" / f"{i:08d}_stats.json").read_text())
        samples = tar_samples(toy_pool / "shards" / f"{i:08d}.tar")
        assert stats["successes"] == len(samples)
        assert stats["count"] == pq.read_metadata(toy_pool / "shards" / f"{i:08d}.parquet").num_rows
        assert stats["count"] == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"]
        total.update({k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
    assert [total["count"], len(shard_rows)] == [len(manifest["rows"])] * 2
    assert [stats["count"] for stats in (
        json.loads((toy_pool / "shards" / f"{i:08d}_stats.json").read_text()) for i in range(n))] == [40, 10, 34]
    assert total["successes"] == manifest["counts"]["successes"]


def test_tar_samples_match_metadata(toy_pool):
    from PIL import Image

    _, table = metadata(toy_pool)
    meta = {r["uid"]: r for r in table.to_pylist()}
    seen = set()
    for tar in sorted((toy_pool / "shards").glob("*.tar")):
        for key, sample in tar_samples(tar).items():
            assert set(sample) == {"jpg", "txt", "json"}, key
            j = json.loads(sample["json"])
            assert j["key"] == key and j["status"] == "success" and j["error_message"] is None
            m = meta[j["uid"]]
            assert sample["txt"].decode("utf-8") == j["caption"] == m["text"]
            assert j["url"] == m["url"] and j["sha256"] == m["sha256"]
            assert (j["original_width"], j["original_height"]) == (m["original_width"], m["original_height"])
            assert j["face_bboxes"] == m["face_bboxes"]
            im = Image.open(io.BytesIO(sample["jpg"]))
            assert im.format == "JPEG" and im.size == (j["width"], j["height"])
            assert max(im.size) <= 512  # keep_ratio_largest, only if bigger
            if max(m["original_width"], m["original_height"]) <= 512:
                assert im.size == (m["original_width"], m["original_height"])
            assert j["uid"] not in seen
            seen.add(j["uid"])
    assert len(seen) >= 70


def test_outcomes_as_expected(manifest, shard_rows):
    rows = manifest["rows"]
    by_uid = {r["uid"]: r for r in shard_rows}
    expected_ok = [r for r in rows if r["expected_status"] == "success"]
    assert manifest["counts"]["successes"] == len(expected_ok) == 78
    assert [r for r in rows if r["status"] != r["expected_status"]] == []
    for r in rows:
        s = by_uid[r["uid"]]
        assert (s["status"], s["key"], s["error_message"]) == (r["status"], r["key"], r["error_message"])
        if r["status"] == "success":
            assert s["error_message"] is None and r["shard"] is not None
        else:  # broken rows: in the shard parquet with an error, absent from the tars
            assert r["category"].startswith("broken:")
            assert s["error_message"] and s["sha256"] is None and s["width"] is None
    reasons = manifest["counts"]["failures_by_reason"]
    assert reasons["failed_to_download: HTTP Error 404: Not Found"] == 2
    assert reasons["failed_to_download: HTTP Error 410: Gone"] == 1
    assert reasons["failed_to_resize: Image decoding error"] == 2  # HTML page, truncated JPEG
    cats = Counter(r["category"] for r in rows)
    assert cats["aligned"] == cats["misaligned"] == cats["medium_phrase"] == len(manifest["photos"]) - 1
    # the huge picture downloads and is shrunk to 512 x 512
    huge = next(r for r in rows if r["category"] == "broken:huge_image")
    assert huge["status"] == "success"
    assert (by_uid[huge["uid"]]["original_width"], by_uid[huge["uid"]]["width"]) == (10000, 512)


def test_alt_texts(manifest):
    rows = manifest["rows"]
    aligned = {r["photo"]: r["text"] for r in rows if r["category"] == "aligned"}
    for r in rows:
        if r["category"] == "misaligned":
            assert r["text"] in aligned.values() and r["text"] != aligned[r["photo"]]
        if r["category"] == "medium_phrase":
            assert aligned[r["photo"]] in r["text"]
            assert re.search("an image of|a photo of|stock photo|photo stock|image|photo", r["text"], re.I)
        if r["category"] == "hard":
            assert r["text"] != aligned[r["photo"]]
    texts = {r["category"]: r["text"] for r in rows}
    assert texts["broken:empty_text"] == ""
    assert "\u00c3\u00a9" in texts["broken:mojibake_text"]
    assert "\x07" in texts["broken:control_chars_text"]


def test_astronaut_face_bbox(toy_pool, manifest):
    _, table = metadata(toy_pool)
    photo = {r["uid"]: r["photo"] for r in manifest["rows"]}
    for uid, boxes in zip(table.column("uid").to_pylist(), table.column("face_bboxes").to_pylist()):
        if photo[uid] == "astronaut":
            assert len(boxes) == 1 and all(0 <= v <= 1 for v in boxes[0])
            x0, y0, x1, y1 = boxes[0]
            assert x0 < x1 and y0 < y1
        else:
            assert boxes == []


def test_clip_columns_none(toy_pool_noclip):
    _, table = metadata(toy_pool_noclip)
    assert table.column(B32).null_count == table.column(L14).null_count == table.num_rows
    assert tp.load_manifest(toy_pool_noclip)["clip"]["mode"] == "none"


def test_clip_columns_tiny(toy_pool, manifest):
    _, table = metadata(toy_pool)
    rows = manifest["rows"]
    assert "not meaningful" in manifest["clip"][B32] and "not meaningful" in manifest["clip"][L14]
    decodable = {"success"}
    for col in (B32, L14):
        for r, v in zip(rows, table.column(col).to_pylist()):
            if r["status"] in decodable:
                assert v is not None and math.isfinite(v) and -1.0 <= v <= 1.0, (col, r["category"])
            else:
                assert v is None, (col, r["category"])
    assert table.column(B32).to_pylist() != table.column(L14).to_pylist()


def test_tiny_clip_scores_are_reproducible_computations(toy_pool, manifest):
    """Recompute a few rows from the served bytes; a build gives the same float32 values."""
    import numpy as np

    rows = tp._plan_rows()
    routes = tp._served_bodies(rows)
    pick = [i for i, r in enumerate(rows) if r.serve == "photo"][:6]
    pictures = [tp._open_image(routes[rows[i].url][2], full=True) for i in pick]
    cols, _ = tp._clip_columns("tiny", manifest["clip"]["seed"], pictures, [rows[i].text for i in pick])
    _, table = metadata(toy_pool)
    for col in (B32, L14):
        built = table.column(col).to_numpy(zero_copy_only=False)[pick]
        np.testing.assert_allclose(np.asarray(cols[col], dtype=np.float32), built, rtol=0, atol=1e-6)


def test_two_builds_same_metadata(toy_pool, toy_pool_noclip):
    files_a, a = metadata(toy_pool)
    files_b, b = metadata(toy_pool_noclip)
    assert [f.name for f in files_a] == [f.name for f in files_b]
    keep = [c for c in tp.METADATA_COLUMNS if c not in (B32, L14)]
    assert a.select(keep).equals(b.select(keep))
    ma, mb = tp.load_manifest(toy_pool), tp.load_manifest(toy_pool_noclip)
    strip = ("clip",)
    assert {k: v for k, v in ma.items() if k not in strip} == {k: v for k, v in mb.items() if k not in strip}


def test_no_proxy_settings_left_behind(toy_pool):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        assert "127.0.0.1" not in os.environ.get(k, "")


def test_user_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        tp.build_toy_pool(tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="clip"):
        tp.build_toy_pool(tmp_path / "new", clip="big", progress=False)
    with pytest.raises(UserError, match="samples_per_shard"):
        tp.build_toy_pool(tmp_path / "new", samples_per_shard=0, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        tp.build_toy_pool(tmp_path / "no" / "such" / "parent", progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError):
        tp.load_manifest(tmp_path)


def test_openai_needs_cached_weights(tmp_path):
    pytest.importorskip("open_clip")
    from datacomp_sieve.clip import openai_checkpoint

    if openai_checkpoint("ViT-B-32") and openai_checkpoint("ViT-L-14"):
        pytest.skip("OpenAI CLIP weights are cached here")
    with pytest.raises(UserError, match="cache"):
        tp.build_toy_pool(tmp_path / "p", clip="openai", progress=False)
    assert not (tmp_path / "p").exists()


def test_an_unknown_clip_model_is_named_as_such():
    pytest.importorskip("open_clip")
    from datacomp_sieve.clip import ClipScorer

    for pretrained in ("openai", "tiny", "laion2b_s34b_b79k"):
        with pytest.raises(UserError, match="unknown CLIP model 'NoSuchArch'"):
            ClipScorer("NoSuchArch", pretrained=pretrained)


def test_clip_weights_that_cannot_be_had_are_one_line_saying_what_to_pass(monkeypatch):
    """No cached OpenAI weights and no hub: refused at once (no retries against the hub), and every
    failed load says what to pass instead, on one line."""
    pytest.importorskip("open_clip")
    import open_clip

    from datacomp_sieve import clip, models

    monkeypatch.setattr(models, "hub_offline", lambda: False)  # whatever the environment says
    monkeypatch.setattr(clip, "openai_checkpoint", lambda arch: None)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: pytest.fail("went to the hub without a connection"))
    with pytest.raises(UserError, match="cannot be reached; pass --clip_pretrained PATH"):
        clip.ClipScorer("ViT-B-32", pretrained="openai")

    def fails(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'x'.\nPlease check your connection and try again.")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fails)
    with pytest.raises(UserError) as e:
        clip.ClipScorer("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "\n" not in str(e.value) and str(e.value).endswith("pass --clip_pretrained PATH to a local checkpoint")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "true"}, {"TRANSFORMERS_OFFLINE": "1"}])
def test_clip_weights_offline_are_refused_without_a_network_probe(monkeypatch, env):
    """Offline in any of huggingface_hub's spellings (models.hub_offline): no TCP probe of the hub (it ran
    unless HF_HUB_OFFLINE was exactly "1"); the error says offline mode is on."""
    pytest.importorskip("open_clip")
    from datacomp_sieve import clip, models

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(clip, "openai_checkpoint", lambda arch: None)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: pytest.fail("probed the hub while offline"))
    with pytest.raises(UserError, match="offline mode is on.*pass --clip_pretrained PATH"):
        clip.ClipScorer("ViT-B-32", pretrained="openai")
