"""datacomp_sieve.shards: listing, streaming samples, broken tars, images, uids and coverage.

Tars are built by hand with ``tarfile`` the way img2dataset (webdataset's TarWriter) writes them:
per sample ``KEY.jpg``, ``KEY.json``, ``KEY.txt`` (extensions sorted), padded to 10240 bytes.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import logging

import pytest
from PIL import Image

from datacomp_sieve.errors import UserError
from datacomp_sieve.shards import (
    CorruptImage, EmptyImage, ImageError, ImageTooLarge, NotAnImage, Sample, Shard, ShardReport,
    TruncatedImage, compare_uids, coverage, decode_image, iter_samples, list_shards, scan_shard,
    shard_uids, split_key,
)

# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _quiet_truncation_warnings(caplog):
    caplog.set_level(logging.ERROR, logger="datacomp_sieve.shards")




def encode(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


JPEG = encode(Image.new("RGB", (24, 16), (200, 30, 30)))


def uid(i):
    return f"{i:032x}"


def sample(i, text=None, image=None, meta=None):
    """(key, members) the way img2dataset writes a successful download."""
    key = f"{i:09d}"
    caption = f"photo number {i}" if text is None else text
    members = {
        "jpg": JPEG if image is None else image,
        "json": json.dumps({"uid": uid(i), "url": f"http://x/{i}.jpg", "key": key, "status": "success",
                            "caption": caption if isinstance(caption, str) else None, "width": 24,
                            **(meta or {})}).encode(),
        "txt": caption.encode() if isinstance(caption, str) else caption,
    }
    return key, members


def tar_bytes(samples, extra=()):
    """A tar in memory; ``extra``: (name, bytes or None for a directory) appended at the end."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext in sorted(members):
                add(tar, f"{key}.{ext}", members[ext])
        for name, data in extra:
            add(tar, name, data)
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_shard(folder, n, data, stats=None, parquet_rows=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{n:08d}.tar").write_bytes(data)
    if stats is not None:
        (folder / f"{n:08d}_stats.json").write_text(json.dumps(stats))
    if parquet_rows is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(parquet_rows), folder / f"{n:08d}.parquet")
    return folder / f"{n:08d}.tar"


def read_one(folder):
    [shard] = list_shards(str(folder))
    got = list(iter_samples(shard))
    assert shard.report.reconciles(), shard.report
    assert shard.report.samples == len(got)
    return shard, got


def layout(data):
    """Per member: (name, header offset, data offset, size)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.name, m.offset, m.offset_data, m.size) for m in t.getmembers()]


# ------------------------------------------------------------------------------------ samples


def test_normal_samples_stream_in_order_with_every_field(tmp_path):
    write_shard(tmp_path, 0, tar_bytes([sample(i) for i in range(3)]), stats={"successes": 3, "count": 4})
    shard, got = read_one(tmp_path)
    assert [s.key for s in got] == ["000000000", "000000001", "000000002"]
    assert [s.uid for s in got] == [uid(0), uid(1), uid(2)]
    s = got[1]
    assert isinstance(s, Sample) and s.ok and s.status == "ok" and s.error is None
    assert s.image == JPEG and s.image_ext == "jpg" and s.text == "photo number 1"
    assert s.json["url"] == "http://x/1.jpg" and s.json["key"] == "000000001"
    r = shard.report
    assert (r.members, r.in_samples, r.stray, r.samples) == (9, 9, 0, 3)
    assert r.status == {"ok": 3} and not r.truncated and r.error is None and r.expected == 3


def test_every_sample_problem_gets_a_status_and_a_reason(tmp_path):
    k = lambda i: f"{i:09d}"  # noqa: E731
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    samples = [
        sample(0),
        (k(1), {"jpg": JPEG, "txt": b"no json"}),                                   # missing json
        (k(2), {"jpg": JPEG, "json": j({"key": k(2)}), "txt": b"t"}),                # json without uid
        (k(3), {"jpg": JPEG, "json": b"{not json", "txt": b"t"}),                    # invalid json
        (k(4), {"jpg": JPEG, "json": b"[1, 2]", "txt": b"t"}),                       # json not an object
        (k(5), {"jpg": JPEG, "json": j({"uid": "xyz"}), "txt": b"t"}),               # uid not 32 hex
        sample(6, text=b"caf\xe9 cr\xe8me"),                                          # latin-1 alt-text
        (k(7), {"jpg": JPEG, "json": j({"uid": uid(7)})}),                            # missing txt
        (k(8), {"json": j({"uid": uid(8)}), "txt": b"text only"}),                    # missing image
        sample(9, image=b""),                                                         # zero-byte jpg
        (k(10), {"jpg": b"", "json": j({}), "txt": b"t"}),                            # two problems
        (k(11), {"png": encode(Image.new("RGB", (4, 4)), "PNG"), "json": j({"uid": uid(11)}), "txt": b""}),
        sample(12, text=""),                                                           # empty alt-text: fine
    ]
    write_shard(tmp_path, 0, tar_bytes(samples))
    shard, got = read_one(tmp_path)
    by = {s.key: s for s in got}
    assert len(got) == 13
    expect = {0: "ok", 1: "no_uid", 2: "no_uid", 3: "bad_json", 4: "bad_json", 5: "bad_uid", 6: "ok",
              7: "no_text", 8: "no_image", 9: "empty_image", 10: "empty_image", 11: "ok", 12: "ok"}
    assert {int(k_): s.status for k_, s in by.items()} == expect
    assert "no json member" in by[k(1)].error and by[k(1)].uid is None and by[k(1)].json is None
    assert by[k(2)].error == "json has no uid" and by[k(2)].json == {"key": k(2)}
    assert by[k(5)].uid is None and "'xyz'" in by[k(5)].error
    assert by[k(6)].text == "caf\ufffd cr\ufffdme" and "UTF-8" in by[k(6)].error and by[k(6)].uid == uid(6)
    assert by[k(7)].text is None and by[k(7)].uid == uid(7)
    assert by[k(8)].image is None and by[k(8)].text == "text only"
    assert by[k(9)].image == b"" and "0 bytes" in by[k(9)].error
    assert "0 bytes" in by[k(10)].error and "no uid" in by[k(10)].error  # every reason, first one wins
    assert by[k(11)].image_ext == "png" and by[k(11)].text == ""
    r = shard.report
    assert r.status == {"ok": 4, "no_uid": 2, "bad_json": 2, "bad_uid": 1, "no_text": 1, "no_image": 1,
                        "empty_image": 2}
    assert r.members == 3 * 13 - 3 and r.stray == 0 and not r.truncated


def test_stray_members_are_counted_never_lost(tmp_path):
    k0, m0 = sample(0)
    data = tar_bytes(
        [(k0, {**m0, "cls": b"3"}),                   # an extension the reader does not use
         (f"{1:09d}", {**sample(1)[1], "png": encode(Image.new("RGB", (2, 2)), "PNG")})],  # a second image
        extra=[("subdir", None), ("README.md", b"hello"), (f"{1:09d}.txt", b"again, not adjacent")],
    )
    write_shard(tmp_path, 0, data)
    shard, got = read_one(tmp_path)
    # README.md forms no sample (nothing usable); the repeated 000000001.txt after it is a new
    # group of its own (webdataset groups adjacent members), which lacks image and json
    assert [(s.key, s.status) for s in got] == [(f"{0:09d}", "ok"), (f"{1:09d}", "ok"), (f"{1:09d}", "no_image")]
    assert got[1].image_ext == "jpg" and got[1].image == JPEG
    r = shard.report
    assert r.members == 4 + 4 + 3 and r.stray == 4 and r.in_samples == 7
    assert set(r.stray_examples) == {f"{0:09d}.cls", f"{1:09d}.png", "subdir", "README.md"}


def test_repeated_member_in_one_sample_is_stray(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for ext, data in [("jpg", JPEG), ("json", json.dumps({"uid": uid(0)}).encode()), ("txt", b"first"),
                          ("txt", b"second")]:
            add(tar, f"{0:09d}.{ext}", data)
    write_shard(tmp_path, 0, buf.getvalue())
    shard, [s] = read_one(tmp_path)
    assert s.text == "first" and shard.report.stray == 1 and shard.report.stray_examples == [f"{0:09d}.txt"]


def test_split_key_follows_webdataset():
    assert split_key("000000001.jpg") == ("000000001", "jpg")
    assert split_key("a/b/000.seg.PNG") == ("a/b/000", "seg.png")
    assert split_key("noext") == ("noext", "")


def test_stopping_early_and_pickling_a_shard(tmp_path):
    write_shard(tmp_path, 0, tar_bytes([sample(i) for i in range(3)]))
    [shard] = list_shards(str(tmp_path))
    it = iter_samples(shard)
    assert next(it).uid == uid(0)
    it.close()  # closes the file; no error
    again = pickle.loads(pickle.dumps(shard))  # process engines send shards to workers
    assert [s.uid for s in iter_samples(again)] == [uid(0), uid(1), uid(2)]
    bare = Shard(stem="00000000", url=str(tmp_path / "00000000.tar"))  # no fs: resolved from the url
    assert scan_shard(bare).status == {"ok": 3}


# ------------------------------------------------------------------------------------ broken tars


def _expected_after_cut(lay, cut):
    """uid -> "ok" / "truncated" for a tar cut after ``cut`` bytes (samples fully absent left out)."""
    out = {}
    for i in range(5):
        ms = [m for m in lay if m[0].startswith(f"{i:09d}.")]
        first_header, data_end = ms[0][1], ms[-1][2] + ms[-1][3]
        if cut >= data_end:
            out[uid(i)] = "ok"
        elif cut >= first_header + 512:
            out[uid(i)] = "truncated"
    return out


def test_truncation_anywhere_keeps_whole_samples_and_reports_the_cut_one(tmp_path):
    """Cut a 5-sample tar at many points (every member boundary +-1, and a sweep): never a crash,
    every sample before the break intact and "ok", the one the break cut reported once as
    "truncated", nothing after it, the shard reported truncated, and the counts reconciling."""
    samples = [sample(i) for i in range(5)]
    full = tar_bytes(samples)
    lay = layout(full)
    end_marker = lay[-1][2] + -(-lay[-1][3] // 512) * 512 + 512  # data, padding, first zero block
    cuts = set(range(0, end_marker, 97))
    for _, hdr, off, size in lay:
        for c in (hdr, hdr + 100, hdr + 511, hdr + 512, off + size // 2, off + size - 1, off + size, off + size + 1):
            cuts.update({c - 1, c, c + 1})
    cuts.update({end_marker - 512, end_marker - 1, end_marker})
    for cut in sorted(c for c in cuts if 0 <= c <= end_marker):
        folder = tmp_path / f"cut{cut}"
        write_shard(folder, 0, full[:cut])
        shard, got = read_one(folder)
        assert shard.report.truncated == (cut < end_marker), cut
        if cut < end_marker:
            assert shard.report.error, cut
        want = _expected_after_cut(lay, cut)
        assert {s.uid: s.status for s in got if s.uid} == {u: st for u, st in want.items()
                                                          if st == "ok" or u in {s.uid for s in got}}, cut
        assert [s.status for s in got].count("truncated") == list(want.values()).count("truncated"), cut
        assert all(s.status == "ok" for s in got[:-1]), cut  # only the last one can be cut
        for s in got:
            if s.status == "ok":
                i = int(s.key)
                assert s.image == JPEG and s.text == f"photo number {i}" and s.uid == uid(i), cut
            else:
                assert s.status == "truncated" and "breaks" in s.error, cut


def test_cut_in_the_middle_of_an_image_member(tmp_path, caplog):
    full = tar_bytes([sample(i) for i in range(4)])
    _, _, off, size = [m for m in layout(full) if m[0] == f"{2:09d}.jpg"][0]
    write_shard(tmp_path, 0, full[: off + size // 2], stats={"successes": 4})
    with caplog.at_level(logging.WARNING, logger="datacomp_sieve.shards"):
        shard, got = read_one(tmp_path)
    assert "shard 00000000 is truncated" in caplog.text  # the run's log says it too
    assert [(s.uid, s.status) for s in got] == [(uid(0), "ok"), (uid(1), "ok"), (None, "truncated")]
    assert got[2].key == f"{2:09d}" and f"{2:09d}.jpg" in got[2].error and got[2].image is None
    r = shard.report
    assert r.truncated and "unexpected end of data" in r.error and "says 4 were written" in r.error
    assert r.status == {"ok": 2, "truncated": 1} and r.members == 7 and r.in_samples == 7


def test_cut_in_the_alt_text_keeps_the_uid_of_the_cut_sample(tmp_path):
    full = tar_bytes([sample(i, text="a long alt-text " * 20) for i in range(3)])
    _, _, off, size = [m for m in layout(full) if m[0] == f"{1:09d}.txt"][0]
    write_shard(tmp_path, 0, full[: off + 10])
    shard, got = read_one(tmp_path)
    assert [(s.uid, s.status) for s in got] == [(uid(0), "ok"), (uid(1), "truncated")]
    assert got[1].text is None and got[1].image == JPEG  # intact fields are kept for reports


def test_tar_cut_between_samples_is_caught_without_stats(tmp_path):
    """tarfile alone reads such a tar as complete: the missing end-of-archive marker tells."""
    full = tar_bytes([sample(i) for i in range(4)])
    hdr = [m for m in layout(full) if m[0] == f"{3:09d}.jpg"][0][1]
    write_shard(tmp_path, 0, full[:hdr])
    shard, got = read_one(tmp_path)
    assert [s.status for s in got] == ["ok"] * 3
    assert shard.report.truncated and "end-of-archive marker" in shard.report.error


def test_complete_tar_but_fewer_samples_than_its_stats(tmp_path):
    write_shard(tmp_path, 0, tar_bytes([sample(i) for i in range(3)]), stats={"successes": 5})
    shard, got = read_one(tmp_path)
    assert len(got) == 3 and shard.report.truncated
    assert shard.report.error == "the tar is short: 3 samples read; its _stats.json says 5 were written"


@pytest.mark.parametrize("stats", [None, {"successes": 10}])
def test_zero_byte_tar_is_an_empty_truncated_shard(tmp_path, stats):
    write_shard(tmp_path, 0, b"", stats=stats)
    shard, got = read_one(tmp_path)
    assert got == [] and shard.size == 0
    r = shard.report
    assert r.truncated and r.error.startswith("the tar is empty") and (r.members, r.samples) == (0, 0)


@pytest.mark.parametrize("data", [b"<html>404 not found</html>" * 40, b"\x00" * 300, bytes(range(256)) * 8])
def test_not_a_tar_is_reported_not_raised(tmp_path, data):
    write_shard(tmp_path, 0, data)
    shard, got = read_one(tmp_path)
    assert got == [] and shard.report.truncated and shard.report.error


def test_corrupt_header_in_the_middle_stops_cleanly(tmp_path):
    full = bytearray(tar_bytes([sample(i) for i in range(4)]))
    hdr = [m for m in layout(bytes(full)) if m[0] == f"{2:09d}.jpg"][0][1]
    full[hdr + 148: hdr + 156] = b"9999999\x00"  # a wrong checksum
    write_shard(tmp_path, 0, bytes(full))
    shard, got = read_one(tmp_path)
    assert [s.status for s in got] == ["ok", "ok"]
    assert shard.report.truncated and "corrupt tar header" in shard.report.error


def test_plain_reader_and_tarfile_read_the_same(tmp_path, monkeypatch):
    """Plain members are read without tarfile, the rest by tarfile from the first header that is
    not plain: samples and reports equal tarfile's alone (every header read by tarfile), for a
    tar mixing plain members with pax headers (a long name, a non-ASCII name), a directory and a
    GNU long name, cut anywhere; for a gzip-compressed tar; and the plain reader is really used."""
    import dataclasses
    import gzip

    from datacomp_sieve import shards as shards_mod

    plain_file = shards_mod._plain_file
    plain = []

    def counted(header, types=b"0\0"):
        out = plain_file(header, types)
        plain.append(out is not None)
        return out

    extents = []  # how many images came as extents, per read with extents=True

    def read(folder, fast: bool, skip_images: bool = False):
        monkeypatch.setattr(shards_mod, "_plain_file", counted if fast else (lambda header, types=None: None))
        [shard] = list_shards(str(folder))
        got = list(iter_samples(shard, extents=skip_images))
        if skip_images:  # the decoding processes' view: each extent read from the tar
            extents.append(sum(isinstance(s.image, shards_mod.ImageExtent) for s in got))
            got = [dataclasses.replace(s, image=s.image.read()) if isinstance(s.image, shards_mod.ImageExtent)
                   else s for s in got]
        return got, dataclasses.asdict(shard.report)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(2):
            for ext, data in sorted(sample(i)[1].items()):
                add(tar, f"{i:09d}.{ext}", data)
        add(tar, "d" * 120 + ".jpg", JPEG)  # a long name: a pax header first
        add(tar, "folder", None)
        for ext, data in sorted(sample(2)[1].items()):
            add(tar, f"ümlaut{2:09d}.{ext}", data)  # a non-ASCII name: a pax header
        for i in range(3, 5):
            for ext, data in sorted(sample(i)[1].items()):
                add(tar, f"{i:09d}.{ext}", data)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="a", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "g" * 150 + ".txt", b"gnu long name")
        for ext, data in sorted(sample(5)[1].items()):
            add(tar, f"{5:09d}.{ext}", data)
    full = buf.getvalue()
    cuts = sorted(set(range(0, len(full) + 1, 173)) | set(range(0, len(full) + 1, 512)) | {len(full)})
    for cut in cuts:
        folder = tmp_path / f"cut{cut}"
        write_shard(folder, 0, full[:cut])
        assert read(folder, True) == read(folder, False) == read(folder, True, skip_images=True), cut
    # the images of the first two samples (tarfile reads from the first pax header on), fewer in cut tars
    assert extents[-1] == 2 and set(extents) == {0, 1, 2}
    got, report = read(tmp_path / f"cut{len(full)}", True)
    assert [s.status for s in got] == ["ok", "ok", "no_uid", "ok", "ok", "ok", "no_image", "ok"]
    assert report["stray_examples"] == ["folder"] and report["members"] == 21 and not report["truncated"]
    write_shard(tmp_path / "gz", 0, gzip.compress(full))
    assert read(tmp_path / "gz", True) == read(tmp_path / f"cut{len(full)}", False)
    assert read(tmp_path / "gz", True, skip_images=True) == read(tmp_path / "gz", True) and extents[-1] == 0
    plain.clear()
    write_shard(tmp_path / "plain", 0, tar_bytes([sample(i) for i in range(4)]))
    got, report = read(tmp_path / "plain", True)
    assert len(got) == 4 and not report["truncated"] and plain.count(True) == 12
    assert read(tmp_path / "plain", True, skip_images=True) == (got, report) and extents[-1] == 4


def test_pax_time_headers_of_img2dataset_tars_are_read_plain(tmp_path, monkeypatch):
    """img2dataset's tars (webdataset's writer: tarfile's pax format, a float mtime) have a pax
    header setting only the time before every member: the plain reader takes those too, and
    gives what tarfile gives, cut anywhere, with and without image extents; a pax header that
    sets anything else (a path, a malformed record) goes to tarfile from there."""
    import dataclasses

    from datacomp_sieve import shards as shards_mod

    plain_file, taken = shards_mod._plain_file, []

    def counted(header, types=b"0\0"):
        out = plain_file(header, types)
        taken.append(out is not None and types == b"0\0")
        return out

    def read(folder, fast: bool, skip_images: bool = False):
        taken.clear()
        monkeypatch.setattr(shards_mod, "_plain_file", counted if fast else (lambda header, types=None: None))
        [shard] = list_shards(str(folder))
        got = [dataclasses.replace(s, image=s.image.read()) if isinstance(s.image, shards_mod.ImageExtent) else s
               for s in iter_samples(shard, extents=skip_images)]
        return got, dataclasses.asdict(shard.report)

    def pax_tar(extra=None):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(4):
                for ext, data in sorted(sample(i)[1].items()):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size, info.mtime = len(data), 1795806804.4445288 + i
                    if extra is not None and i == 2 and ext == "json":
                        info.pax_headers = extra
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    full = pax_tar()
    assert full.count(b"mtime=") == 12  # a pax header before each member
    for cut in sorted(set(range(0, len(full) + 1, 173)) | set(range(0, len(full) + 1, 512)) | {len(full)}):
        folder = tmp_path / f"cut{cut}"
        write_shard(folder, 0, full[:cut])
        assert read(folder, True) == read(folder, False) == read(folder, True, skip_images=True), cut
    got, report = read(tmp_path / f"cut{len(full)}", True)
    assert [s.status for s in got] == ["ok"] * 4 and report["members"] == 12 and taken.count(True) == 12
    # a pax header that sets more than times: tarfile reads from there on, with the same result
    for extra, status in (({"comment": "x"}, "ok"), ({"path": "000000002.txt"}, "no_uid")):
        write_shard(tmp_path / "more", 0, pax_tar(extra))
        got, report = read(tmp_path / "more", True)
        assert taken.count(True) == 7  # the members before that header (3 per sample)
        assert (got, report) == read(tmp_path / "more", False)
        assert [s.status for s in got] == ["ok", "ok", status, "ok"]
    assert not shards_mod._times_only(b"29 mtime=1795806804.4445288\n")  # wrong length
    assert not shards_mod._times_only(b"") and shards_mod._times_only(b"12 atime=-1\n14 ctime=1.25\n")


def test_image_extents_follow_a_tar_replaced_under_the_same_path(tmp_path):
    """A process reading extents keeps the tar open for its next images; a tar replaced at the
    same path (a re-download) is opened again, not read through the old descriptor."""
    from datacomp_sieve.shards import ImageExtent

    def images(folder):
        [shard] = list_shards(str(folder))
        got = [s.image for s in iter_samples(shard, extents=True)]
        assert all(isinstance(x, ImageExtent) for x in got)
        return [x.read() for x in got]

    first = [sample(i, image=bytes([i + 1]) * (100 + i)) for i in range(3)]
    path = write_shard(tmp_path, 0, tar_bytes(first))
    assert images(tmp_path) == [m["jpg"] for _, m in first]
    second = [sample(i, image=bytes([i + 7]) * (300 - i)) for i in range(3)]
    (tmp_path / "new.tar").write_bytes(tar_bytes(second))
    os.replace(tmp_path / "new.tar", path)
    assert images(tmp_path) == [m["jpg"] for _, m in second]


def test_the_header_checksum_is_tars_unsigned_one():
    import random

    from datacomp_sieve.shards import _unsigned_checksum

    rng = random.Random(0)
    headers = [bytes(rng.randrange(256) for _ in range(512)) for _ in range(200)]
    headers += [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256)]
    for h in headers:
        assert _unsigned_checksum(h) == 256 + sum(h[:148]) + sum(h[156:]) == tarfile.calc_chksums(h)[0]


# ------------------------------------------------------------------------------------ listing


def test_listing_sorts_by_number_and_reads_stats(tmp_path):
    one = tar_bytes([sample(0)])
    for n in (10, 2, 1, 100):
        write_shard(tmp_path, n, one, stats={"successes": 1} if n != 2 else None,
                    parquet_rows=[{"uid": uid(0), "status": "success"}] if n == 1 else None)
    (tmp_path / "00000010_stats.json").write_text("{broken")
    (tmp_path / "notes.tar").write_bytes(one)           # not a shard name
    (tmp_path / "00000005.tar.tmp").write_bytes(one)    # an unfinished copy
    (tmp_path / "00000007.parquet").write_bytes(b"x")   # a parquet without its tar
    shards = list_shards(str(tmp_path))
    assert [s.stem for s in shards] == ["00000001", "00000002", "00000010", "00000100"]
    assert [s.number for s in shards] == [1, 2, 10, 100]
    assert shards[0].stats == {"successes": 1} and shards[0].report == ShardReport()
    assert shards[1].stats is None and shards[1].stats_error is None      # absent
    assert shards[2].stats is None and "JSONDecodeError" in shards[2].stats_error  # broken
    assert shards[0].url == str(tmp_path / "00000001.tar") and shards[0].size == len(one)
    assert shards[0].parquet.endswith("00000001.parquet") and shards[1].parquet is None


def test_listing_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        list_shards(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no"):
        list_shards(str(tmp_path / "empty"))
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "shard-a.tar").write_bytes(b"")
    with pytest.raises(UserError, match="shard-a.tar"):
        list_shards(str(tmp_path / "named"))
    (tmp_path / "pool" / "shards").mkdir(parents=True)
    with pytest.raises(UserError, match="did you mean"):
        list_shards(str(tmp_path / "pool"))
    with pytest.raises(UserError):
        list_shards("")


@pytest.fixture
def memfs():
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/test_shards"):
        fs.rm("/test_shards", recursive=True)


def test_fsspec_memory_folder(memfs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    memfs.pipe("/test_shards/00000001.tar", tar_bytes([sample(3), sample(4)]))
    memfs.pipe("/test_shards/00000001_stats.json", json.dumps({"successes": 2}).encode())
    buf = io.BytesIO()
    pq.write_table(pa.table({"uid": [uid(3), uid(4), uid(5)], "status": ["success", "success", "failed_to_download"]}), buf)
    memfs.pipe("/test_shards/00000001.parquet", buf.getvalue())
    memfs.pipe("/test_shards/00000000.tar", tar_bytes([sample(1)])[:700])  # truncated
    shards = list_shards("memory://test_shards")
    assert [s.stem for s in shards] == ["00000000", "00000001"]
    assert shards[1].url.startswith("memory://") and shards[1].stats == {"successes": 2}
    got = list(iter_samples(shards[1]))
    assert [s.uid for s in got] == [uid(3), uid(4)] and not shards[1].report.truncated
    assert shard_uids(shards[1]) == {uid(3): "success", uid(4): "success", uid(5): "failed_to_download"}
    assert shard_uids(shards[0]) is None
    assert [s.status for s in iter_samples(shards[0])] == ["truncated"] and shards[0].report.truncated
    # a Shard rebuilt from its URL alone (another process) reads the same
    assert [s.uid for s in iter_samples(Shard(stem="00000001", url=shards[1].url))] == [uid(3), uid(4)]


# ------------------------------------------------------------------------------------ uids


def test_shard_uids_from_the_img2dataset_parquet(tmp_path):
    rows = [{"uid": uid(0), "status": "success", "key": "000000000"},
            {"uid": uid(1), "status": "failed_to_download", "key": "000000001"},
            {"uid": None, "status": "failed_to_download", "key": "000000002"}]
    write_shard(tmp_path, 0, tar_bytes([sample(0)]), parquet_rows=rows)
    write_shard(tmp_path, 1, tar_bytes([sample(5)]))
    write_shard(tmp_path, 2, tar_bytes([sample(6)]), parquet_rows=[{"uid": uid(6), "other": 1}])
    write_shard(tmp_path, 3, tar_bytes([sample(7)]))
    (tmp_path / "00000003.parquet").write_bytes(b"not a parquet")
    s0, s1, s2, s3 = list_shards(str(tmp_path))
    assert shard_uids(s0) == {uid(0): "success", uid(1): "failed_to_download"}
    assert shard_uids(s1) is None   # absent
    assert shard_uids(s2) is None   # no status column
    assert shard_uids(s3) is None   # unreadable


def test_a_local_img2dataset_parquet_is_read_by_pyarrow_s_own_reader(tmp_path, monkeypatch):
    """pool-info reads every shard's parquet: through a Python file object and read_table's dataset
    layer it took three times as long (7.7 s, not 2.6 s, for 12,800 files)."""
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    write_shard(tmp_path, 0, tar_bytes([sample(0)]), parquet_rows=[{"uid": uid(0), "status": "success"}])
    [shard] = list_shards(str(tmp_path))
    opened = []
    real = LocalFileSystem._open
    monkeypatch.setattr(LocalFileSystem, "_open", lambda self, path, *a, **kw: opened.append(path) or
                        real(self, path, *a, **kw))
    monkeypatch.setattr(pq, "read_table", lambda *a, **kw: opened.append("read_table") or None)
    assert shard_uids(shard) == {uid(0): "success"}
    assert not [p for p in opened if p.endswith(".parquet") or p == "read_table"]


def test_an_object_store_pool_is_read_a_few_files_at_a_time(memfs, monkeypatch):
    """Listing the shards (their _stats.json) and pool-info (their parquet) read the files side by
    side where each read is a round trip: each read here waits until all of them are under way."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.memory import MemoryFileSystem

    n = 3
    for i in range(n):
        buf = io.BytesIO()
        pq.write_table(pa.table({"uid": [uid(i)], "status": ["success"]}), buf)
        memfs.pipe(f"/test_shards/{i:08d}.parquet", buf.getvalue())
        memfs.pipe(f"/test_shards/{i:08d}.tar", tar_bytes([sample(i)]))
        memfs.pipe(f"/test_shards/{i:08d}_stats.json", json.dumps({"successes": 1}).encode())
    buf = io.BytesIO()
    pq.write_table(pa.table({"uid": [uid(i) for i in range(n + 1)]}), buf)
    memfs.pipe("/test_shards/meta/m.parquet", buf.getvalue())
    together = {end: threading.Barrier(n, timeout=10) for end in ("_stats.json", ".parquet")}
    real = MemoryFileSystem._open

    def side_by_side(self, path, *a, **kw):
        for end, barrier in together.items():
            if path.endswith(end) and "/meta/" not in path:
                barrier.wait()  # one read after another breaks the barrier
        return real(self, path, *a, **kw)

    monkeypatch.setattr(MemoryFileSystem, "_open", side_by_side)
    assert [s.stats for s in list_shards("memory://test_shards")] == [{"successes": 1}] * n
    c = coverage("memory://test_shards/meta", "memory://test_shards")
    assert c["matched"] == n and c["metadata_without_sample"] == 1 and c["shards_read_from_tar"] == 0


def test_compare_uids_counts_both_sides():
    c = compare_uids([uid(i) for i in range(10)] + [uid(3)], [uid(i) for i in range(2, 12)] + [uid(5)])
    assert c == {"metadata_rows": 10, "downloaded": 10, "matched": 8, "metadata_without_sample": 2,
                 "samples_without_metadata": 2, "duplicate_metadata_uids": 1, "duplicate_samples": 1}
    assert compare_uids([], [])["matched"] == 0
    with pytest.raises(UserError, match="32 hexadecimal"):
        compare_uids(["nope"], [])


def test_coverage_of_a_pool(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = tmp_path / "metadata"
    meta.mkdir()
    pq.write_table(pa.table({"uid": [uid(i) for i in range(8)], "text": ["t"] * 8}), meta / ("a" * 32 + ".parquet"))
    shards = tmp_path / "shards"
    # shard 0: parquet says 0, 1 downloaded, 2 failed; shard 1: no parquet, read from the tar,
    # with a foreign uid; shard 2: no parquet, truncated in sample 6
    write_shard(shards, 0, tar_bytes([sample(0), sample(1)]),
                parquet_rows=[{"uid": uid(i), "status": s} for i, s in [(0, "success"), (1, "success"), (2, "failed_to_download")]])
    write_shard(shards, 1, tar_bytes([sample(3), sample(99)]))
    full = tar_bytes([sample(5), sample(6)])
    _, _, off, size = [m for m in layout(full) if m[0] == f"{6:09d}.txt"][0]
    write_shard(shards, 2, full[: off + 3])
    c = coverage(str(meta), str(shards))
    assert (c["metadata_rows"], c["downloaded"], c["matched"]) == (8, 5, 4)  # 0 1 3 5 + foreign 99
    assert c["metadata_without_sample"] == 4 and c["samples_without_metadata"] == 1
    assert c["shards_read_from_tar"] == 2 and c["truncated_shards"] == ["00000002"]


# ------------------------------------------------------------------------------------ images


def test_decode_image_converts_every_mode_to_rgb():
    red = Image.new("RGB", (20, 10), (220, 20, 30))
    out = decode_image(encode(red))
    assert out.mode == "RGB" and out.size == (20, 10)
    cmyk = decode_image(encode(red.convert("CMYK")))
    assert cmyk.mode == "RGB" and all(abs(a - b) < 25 for a, b in zip(cmyk.getpixel((5, 5)), (220, 20, 30)))
    gray = decode_image(encode(Image.new("L", (8, 8), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    deep = decode_image(encode(Image.new("I;16", (8, 8), 65535), "PNG"))  # 16-bit grayscale PNG
    assert deep.getpixel((0, 0)) == (255, 255, 255)
    mid = decode_image(encode(Image.new("I;16", (8, 8), 32896), "PNG"))
    assert mid.getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(encode(Image.new("1", (8, 8), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = red.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert decode_image(encode(pal, "PNG")).getpixel((0, 0)) == pal.convert("RGB").getpixel((0, 0))
    assert decode_image(encode(red, "WEBP", lossless=True)).getpixel((0, 0)) == (220, 20, 30)


def test_decode_image_composites_transparency_on_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encode(clear, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert decode_image(encode(opaque, "PNG")).getpixel((0, 0)) == (255, 0, 0)
    half = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG")).getpixel((0, 0))
    assert all(abs(v - 127) <= 1 for v in half)  # black at 50% over white
    la = Image.new("LA", (4, 4), (0, 0))  # transparent black
    assert decode_image(encode(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    assert decode_image(encode(pal, "PNG", transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(encode(pal, "PNG")).getpixel((0, 0)) == (10, 200, 10)


def test_decode_image_failures_have_codes():
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    with pytest.raises(EmptyImage) as e:
        decode_image(b"")
    assert e.value.code == "empty_image"
    with pytest.raises(NotAnImage) as e:
        decode_image(b"<html><body>404</body></html>")
    assert e.value.code == "not_an_image" and "<html>" in str(e.value)
    for cut in (encode(noise)[:3000], encode(noise, "PNG")[:5000], encode(noise)[:200]):
        with pytest.raises(TruncatedImage) as e:
            decode_image(cut)
        assert e.value.code == "truncated_image" and "truncated" in str(e.value)
    assert issubclass(CorruptImage, ImageError) and CorruptImage("x").code == "corrupt_image"
    assert ImageError("custom", "why").code == "custom"  # the base class takes (code, message)


def test_decode_image_refuses_too_many_pixels_before_decoding():
    big = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageTooLarge) as e:
        decode_image(big, max_pixels=50_000)
    assert e.value.code == "too_large" and "300x200 = 60000 pixels" in str(e.value)
    assert decode_image(big, max_pixels=60_000).size == (300, 200)
    assert decode_image(big, max_pixels=None).size == (300, 200)
    # a PNG header claiming 40000 x 40000 with no pixel data: refused from the header alone
    header = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    header[16:24] = (40000).to_bytes(4, "big") * 2
    import zlib

    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    with pytest.raises(ImageTooLarge):
        decode_image(bytes(header))


# ------------------------------------------------------------------------------------ module


def test_module_imports_light():
    code = ("import sys, datacomp_sieve.shards; "
            "print(sorted(m for m in ('numpy', 'PIL', 'pyarrow', 'fsspec', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_image_errors_pickle_with_their_code():
    for e in (ImageError("custom", "why"), TruncatedImage("cut"), ImageTooLarge("big")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and back.code == e.code and str(back) == str(e)
