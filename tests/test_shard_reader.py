"""Reading shards: every tar member accounted for, broken samples and broken tars reported."""

import io
import json
import tarfile

import pytest
from PIL import Image

from datacomp_sieve.errors import UserError
from datacomp_sieve.shards import ImageError, decode_image, iter_samples, list_shards


def jpeg(color=(200, 20, 20), size=(40, 30), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, "JPEG")
    return buf.getvalue()


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, samples, stats=None):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
    if stats is not None:
        path.with_name(path.name.replace(".tar", "_stats.json")).write_text(json.dumps(stats))


def sample(key, uid="0" * 31 + "1", text="a red square", image=None):
    m = {"jpg": jpeg() if image is None else image, "txt": text.encode() if isinstance(text, str) else text}
    m["json"] = json.dumps({"uid": uid, "key": key, "caption": text if isinstance(text, str) else None}).encode()
    return key, m


def test_samples_statuses_and_counts(tmp_path):
    good = sample("000000000", uid="a" * 32)
    no_json = ("000000001", {"jpg": jpeg(), "txt": b"no json here"})
    no_uid = ("000000002", {"jpg": jpeg(), "txt": b"x", "json": b'{"key": "000000002"}'})
    bad_text = sample("000000003", uid="b" * 32, text=b"caf\xe9 latin-1 bytes")
    empty_img = sample("000000004", uid="c" * 32, image=b"")
    no_img = ("000000005", {"txt": b"text only", "json": json.dumps({"uid": "d" * 32}).encode()})
    bad_json = ("000000006", {"jpg": jpeg(), "txt": b"t", "json": b"{not json"})
    extra = ("000000007", {"jpg": jpeg(), "txt": b"t", "json": json.dumps({"uid": "e" * 32}).encode(), "cls": b"3"})
    write_tar(tmp_path / "00000000.tar", [good, no_json, no_uid, bad_text, empty_img, no_img, bad_json, extra],
              stats={"successes": 8})
    [shard] = list_shards(str(tmp_path))
    assert shard.stats == {"successes": 8}
    got = {s.key: s for s in iter_samples(shard)}
    assert got["000000000"].status == "ok" and got["000000000"].uid == "a" * 32
    assert got["000000000"].text == "a red square" and got["000000000"].image_ext == "jpg"
    assert got["000000001"].status == "no_uid" and got["000000001"].uid is None
    assert got["000000002"].status == "no_uid"
    assert got["000000003"].status == "ok" and "UTF-8" in got["000000003"].error
    assert got["000000003"].text == "caf\ufffd latin-1 bytes"
    assert got["000000004"].status == "empty_image"
    assert got["000000005"].status == "no_image"
    assert got["000000006"].status == "bad_json"
    assert got["000000007"].status == "ok"
    r = shard.report
    assert r.samples == 8 and not r.truncated
    assert r.members == 3 * 8 - 1 - 1 + 1  # no_json and no_img lack a member, extra has one more
    assert r.stray == 1 and sum(r.status.values()) == 8


@pytest.mark.parametrize("cut", ["mid_member", "end_of_member", "zero"])
def test_truncated_tar_keeps_the_samples_before_the_break(tmp_path, cut):
    samples = [sample(f"{i:09d}", uid=f"{i:032x}") for i in range(5)]
    write_tar(tmp_path / "00000000.tar", samples, stats={"successes": 5})
    data = (tmp_path / "00000000.tar").read_bytes()
    offsets = []
    with tarfile.open(tmp_path / "00000000.tar") as t:
        for m in t.getmembers():
            offsets.append((m.name, m.offset_data, m.size))
    name, off, size = [o for o in offsets if o[0].startswith("000000003.")][0]
    if cut == "mid_member":
        data = data[: off + size // 2]
    elif cut == "end_of_member":
        data = data[: off - 512]  # right before sample 3's first member header: ends between samples
    else:
        data = b""
    (tmp_path / "00000000.tar").write_bytes(data)
    [shard] = list_shards(str(tmp_path))
    got = list(iter_samples(shard))
    ok = [s for s in got if s.status == "ok"]
    assert shard.report.truncated
    if cut == "zero":
        assert got == []
    else:
        assert [s.uid for s in ok] == [f"{i:032x}" for i in range(3)]
        assert len(got) == shard.report.samples
        if cut == "mid_member":  # sample 3 lost its image to the break: reported, not dropped
            assert [(s.key, s.status) for s in got[3:]] == [("000000003", "truncated")]
        else:  # the tar ends cleanly between samples: only _stats.json tells it is short
            assert len(got) == 3 and "5 were written" in shard.report.error


def test_listing_errors_and_order(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no"):
        list_shards(str(tmp_path))
    for i in [10, 2, 1]:
        write_tar(tmp_path / f"{i:08d}.tar", [sample("000000000")])
    (tmp_path / "00000001_stats.json").write_text("{broken")
    shards = list_shards(str(tmp_path))
    assert [s.stem for s in shards] == ["00000001", "00000002", "00000010"]
    assert shards[0].stats is None


def test_fsspec_memory_folder(tmp_path):
    import fsspec

    write_tar(tmp_path / "00000000.tar", [sample("000000000", uid="f" * 32)])
    fs = fsspec.filesystem("memory")
    fs.pipe("/shards/00000000.tar", (tmp_path / "00000000.tar").read_bytes())
    [shard] = list_shards("memory://shards")
    assert [s.uid for s in iter_samples(shard)] == ["f" * 32]


def _encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_image_modes_and_failures():
    rgb = Image.new("RGB", (20, 10), (10, 200, 30))
    assert decode_image(_encode(rgb, "JPEG")).mode == "RGB"
    assert decode_image(_encode(rgb.convert("CMYK"), "JPEG")).mode == "RGB"
    assert decode_image(_encode(rgb.convert("L"), "PNG")).mode == "RGB"
    assert decode_image(_encode(rgb.convert("P"), "PNG")).mode == "RGB"
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert decode_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError) as e:
        decode_image(b"<html>not an image</html>")
    assert e.value.code == "not_an_image"
    with pytest.raises(ImageError) as e:
        decode_image(_encode(Image.new("RGB", (400, 300)), "JPEG")[:200])
    assert e.value.code in ("truncated_image", "not_an_image")
    with pytest.raises(ImageError) as e:
        decode_image(b"")
    assert e.value.code == "empty_image"
    with pytest.raises(ImageError) as e:
        decode_image(_encode(Image.new("RGB", (300, 300)), "PNG"), max_pixels=10_000)
    assert e.value.code == "too_large"


def test_scorer_gives_every_broken_sample_a_row(tmp_path):
    """Bad input never stops a run: each sample gets a row with a status, counts reconcile."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq

    from datacomp_sieve.score import ScoreConfig, score_pool

    shards = tmp_path / "shards"
    shards.mkdir()
    big = _encode(Image.new("RGB", (9000, 9000)), "PNG")
    write_tar(shards / "00000000.tar", [
        sample("000000000", uid="a" * 32),
        sample("000000001", uid="b" * 32, image=b"GIF89a not really"),
        sample("000000002", uid="c" * 32, image=_encode(Image.new("RGB", (60, 40)), "JPEG")[:300]),
        sample("000000003", uid="d" * 32, image=big),
        sample("000000004", uid="e" * 32, text=b"\xff\xfe bytes"),
        ("000000005", {"jpg": jpeg(), "txt": b"no json"}),
        sample("000000006", uid="f" * 32, image=_encode(Image.new("RGB", (30, 30)).convert("CMYK"), "JPEG")),
        sample("000000007", uid="0" * 32, image=_encode(Image.new("LA", (30, 30)), "PNG")),
    ], stats={"successes": 8})
    m = score_pool(str(shards), str(tmp_path / "store"),
                   ScoreConfig(captioner="label", device="cpu", num_captions=2, max_image_pixels=50_000_000),
                   progress=False)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "store" / "00000000.parquet").to_pylist()}
    assert len(rows) == 8 and m["rows"] == 8 == sum(m["status"].values())
    assert rows["000000000"]["status"] == "ok" and rows["000000000"]["sieve_score"] is not None
    assert rows["000000001"]["status"] == "not_an_image" and rows["000000001"]["sieve_score"] is None
    assert rows["000000002"]["status"] in ("truncated_image", "not_an_image")
    assert rows["000000003"]["status"] == "too_large" and "pixels" in rows["000000003"]["error"]
    assert rows["000000004"]["status"] == "ok" and "UTF-8" in rows["000000004"]["error"]
    assert rows["000000005"]["status"] == "no_uid" and rows["000000005"]["uid"] is None
    assert rows["000000006"]["status"] == "ok" and rows["000000007"]["status"] == "ok"
    assert m["tar"]["members"] == 23
    # the same rows when images are decoded in processes and the text half runs on a thread (GPU runs)
    from datacomp_sieve.score import ShardScorer

    cfg = ScoreConfig(captioner="label", device="cpu", num_captions=2, max_image_pixels=50_000_000)
    scorer = ShardScorer(cfg)
    scorer.decode_workers, scorer.overlap_text = 2, True
    score_pool(str(shards), str(tmp_path / "in_processes"), cfg, progress=False, scorer=scorer)
    scorer.close()
    assert (pq.read_table(tmp_path / "in_processes" / "00000000.parquet")
            .equals(pq.read_table(tmp_path / "store" / "00000000.parquet")))


def test_coverage_counts_both_sides(toy_pool, tmp_path):
    import shutil

    from datacomp_sieve.shards import coverage

    c = coverage(str(toy_pool / "metadata"), str(toy_pool / "shards"))
    assert (c["metadata_rows"], c["downloaded"], c["metadata_without_sample"], c["samples_without_metadata"]) == (84, 78, 6, 0)
    # without the img2dataset parquet, the tars are read; a foreign shard shows up as unmatched
    shards = tmp_path / "shards"
    shutil.copytree(toy_pool / "shards", shards)
    for p in shards.glob("*.parquet"):
        p.unlink()
    write_tar(shards / "00000009.tar", [sample("000000000", uid="9" * 32)])
    c = coverage(str(toy_pool / "metadata"), str(shards))
    assert c["shards_read_from_tar"] == 4 and c["samples_without_metadata"] == 1 and c["matched"] == 78


def test_pool_info_says_when_far_more_is_missing_than_failed_downloads_explain(toy_pool, tmp_path, capsys):
    """6 of 84 rows without a sample (7%) are failed downloads; with one shard of three given, 74 of 84
    (88%) are not, and pool-info no longer calls that normal."""
    import shutil

    from datacomp_sieve.cli import main

    assert main(["pool-info", "--metadata_dir", str(toy_pool / "metadata"), "--shards_dir",
                 str(toy_pool / "shards")]) == 0
    assert "(7.1%; failed downloads, normal)" in capsys.readouterr().out
    one = tmp_path / "shards"
    one.mkdir()
    for p in (toy_pool / "shards").glob("00000001*"):
        shutil.copy(p, one)
    assert main(["pool-info", "--metadata_dir", str(toy_pool / "metadata"), "--shards_dir", str(one)]) == 0
    out = capsys.readouterr().out
    assert "normal" not in out and f"are all the pool's shards in {one}?" in out
