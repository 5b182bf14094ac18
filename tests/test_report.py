"""The HTML report (datacomp_sieve.report, `datacomp-sieve report`) and the demo that writes one.

Synthetic stores check the numbers against brute force; the toy pool, with script and attribute
injections in its alt-texts, json and captions, checks escaping; a real headless Chromium checks
that the page loads without a console error, that every gallery image renders and that nothing
runs (its screenshot is kept in test-artifacts/report/).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select as select_fd
import shutil
import subprocess
import sys
import tarfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_sieve import cli
from datacomp_sieve.errors import UserError
from datacomp_sieve.report import _highlight, esc, write_report
from datacomp_sieve.uids import keys_from_strings, write_subset

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "report"
sys.path.insert(0, str(ROOT / "bench"))
from synth_store import random_uids  # noqa: E402

SCRIPT_TEXT = "<script>window.__pwned=1</script> a photo of a cup of espresso"
ATTR_TEXT = '" onerror="window.__pwned=2" x=" stock photo of a tabby cat'
URL_TEXT = 'javascript:window.__pwned=3//"><img src=x onerror="window.__pwned=4">'
CAPTION_TEXT = '<img src=x onerror="window.__pwned=5"> a photo of a dog'


# ---------------------------------------------------------------------------------------------
# synthetic stores


def synth_store(folder: Path, n: int = 20_000, files: int = 4, seed: int = 0) -> dict:
    """A score store with clip_score, failures by reason, several row groups per file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per = n // files
    cols: dict = {"uid": [], "sieve": [], "clip": [], "status": []}
    for i in range(files):
        uid = random_uids(rng, per).to_pylist()
        sieve = rng.beta(2.0, 3.0, per).astype(np.float32)
        clip = rng.normal(0.3, 0.05, per).astype(np.float32)
        status = np.array(["ok"] * per, dtype=object)
        r = rng.random(per)
        status[r < 0.02] = "no_image"
        status[(r >= 0.02) & (r < 0.03)] = "corrupt_image"
        bad = status != "ok"
        table = pa.table({
            "uid": uid,
            "key": [f"{i:04d}{j:05d}" for j in range(per)],
            "sieve_score": pa.array(sieve, mask=bad),
            "sieve_mean": pa.array(sieve / 2, mask=bad),
            "best_caption": pa.array([f"a photo of thing {j}" for j in range(per)], mask=bad),
            "captions": pa.array([[f"a photo of thing {j}", "an image"] for j in range(per)], mask=bad),
            "clip_score": pa.array(clip, mask=bad),
            "status": list(status),
            "error": [None if s == "ok" else "broken" for s in status],
        })
        pq.write_table(table, folder / f"{i:08d}.parquet", row_group_size=1500)
        cols["uid"] += uid
        cols["sieve"].append(np.where(bad, np.nan, sieve).astype(np.float32))
        cols["clip"].append(np.where(bad, np.nan, clip).astype(np.float32))
        cols["status"] += list(status)
    return {"uid": np.array(cols["uid"]), "sieve": np.concatenate(cols["sieve"]),
            "clip": np.concatenate(cols["clip"]), "status": np.array(cols["status"])}


def brute_fused(d: dict, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    ok = ~np.isnan(d["sieve"]) & ~np.isnan(d["clip"])
    s, c = d["sieve"][ok], d["clip"][ok]
    sn = (s - s.min()) / (s.max() - s.min())
    cn = (c - c.min()) / (c.max() - c.min())
    return ok, np.float32(1 - alpha) * sn + np.float32(alpha) * cn


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_report")
    data = synth_store(root / "store")
    return root, data


def test_counts_threshold_and_galleries_match_brute_force(synth, tmp_path):
    root, d = synth
    s = write_report(str(root / "store"), None, tmp_path / "r", per_section=10, scatter_points=500,
                     progress=False)
    ok, fused = brute_fused(d)
    n = int(ok.sum() * 0.2)
    thr = np.sort(fused)[::-1][n]
    kept = fused >= thr
    c = s["counts"]
    assert c["store_rows"] == len(d["uid"]) and c["pool"] is None
    assert c["scored"] == int(ok.sum())
    assert c["failed"] == {k: int((d["status"] == k).sum()) for k in ("corrupt_image", "no_image")}
    assert c["kept"] == int(kept.sum()) and s["threshold"] == pytest.approx(float(thr))
    assert s["filter"] == "sieve_clip" and "store" in s["clip_source"]

    uids = d["uid"][ok]
    order = np.argsort(-fused, kind="stable")
    sec = s["sections"]
    assert sec["kept_top"]["uids"] == list(uids[order[:10]])
    assert sec["dropped_bottom"]["uids"] == list(uids[order[::-1][:10]])
    n_kept = int(kept.sum())
    assert set(sec["border_kept"]["uids"]) == set(uids[order[n_kept - 5:n_kept]])
    assert set(sec["border_dropped"]["uids"]) == set(uids[order[n_kept:n_kept + 5]])
    assert sec["scatter"] == {"eligible": int(ok.sum()), "shown": 500}
    for name, k in (("kept_top", 10), ("dropped_bottom", 10), ("border_kept", 5), ("border_dropped", 5),
                    ("clip_not_sieve", 10), ("sieve_not_clip", 10)):
        assert len(sec[name]["uids"]) == sec[name]["shown"] == k

    # disagreements: each score alone keeps the same fraction (thresholds from the histograms)
    t = s["alone_thresholds"]
    by_uid = {u: (a, b) for u, a, b in zip(d["uid"], d["sieve"], d["clip"])}
    eps = 1e-5
    for u in sec["clip_not_sieve"]["uids"]:
        assert by_uid[u][1] >= t["clip"] - eps and by_uid[u][0] < t["sieve"] + eps
    for u in sec["sieve_not_clip"]["uids"]:
        assert by_uid[u][0] >= t["sieve"] - eps and by_uid[u][1] < t["clip"] + eps
    s_alone = d["sieve"][ok] >= np.sort(d["sieve"][ok])[::-1][n]
    c_alone = d["clip"][ok] >= np.sort(d["clip"][ok])[::-1][n]
    exact = int((c_alone & ~s_alone).sum())
    assert abs(sec["clip_not_sieve"]["eligible"] - exact) <= 0.01 * exact + 5

    # the report's "kept" is what the filter writes
    rc = cli.main(["filter", "--name", "sieve_clip", "--clip_from", "store", "--scores_dir", str(root / "store"),
                   "--save_path", str(tmp_path / "sub.npy"), "--quiet"])
    assert rc == 0 and len(np.load(tmp_path / "sub.npy")) == c["kept"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert "500 of" in page and "sampled uniformly" in page  # says how much it sampled
    assert json.loads((tmp_path / "r" / "report.json").read_text())["counts"] == c


def test_uniform_samples_depend_on_the_seed_only(synth, tmp_path):
    root, _ = synth
    runs = [write_report(str(root / "store"), None, tmp_path / f"r{i}", per_section=8, seed=seed, progress=False)
            for i, seed in enumerate((1, 1, 2))]
    pick = [r["sections"]["sieve_not_clip"]["uids"] for r in runs]
    assert pick[0] == pick[1] != pick[2]
    assert runs[0]["sections"]["kept_top"] == runs[2]["sections"]["kept_top"]


def test_subset_decides_what_is_kept(synth, tmp_path):
    root, d = synth
    ok = ~np.isnan(d["sieve"])
    chosen = list(d["uid"][ok][::97])
    failed = list(d["uid"][~ok][:3])  # in the subset but unscored: not counted as kept
    strangers = ["f" * 32, "0" * 32]
    write_subset(tmp_path / "sub.npy", keys_from_strings(chosen + failed + strangers))
    s = write_report(str(root / "store"), None, tmp_path / "r", subset=str(tmp_path / "sub.npy"), per_section=6,
                     progress=False)
    assert s["counts"]["kept"] == len(chosen)
    assert s["counts"]["subset_uids"] == len(chosen) + len(failed) + len(strangers)
    assert s["threshold"] is None and s["fraction"] == pytest.approx(len(chosen) / s["counts"]["scored"])
    assert set(s["sections"]["kept_top"]["uids"]) <= set(chosen)
    assert not set(s["sections"]["dropped_bottom"]["uids"]) & set(chosen)
    assert "uids in" in s["selection"]
    absent = len(failed) + len(strangers)
    assert [n for n in s["notes"] if "not among the scored" in n] == [
        f"{absent} of the subset's {s['counts']['subset_uids']} uids are not among the scored samples here (a "
        "subset of another pool, or shards not scored yet): kept counts only those that are."]
    # an unsorted file would match almost nothing by binary search: refused, as the resharder refuses it
    np.save(tmp_path / "unsorted.npy", np.load(tmp_path / "sub.npy")[::-1])
    with pytest.raises(UserError, match="is not sorted"):
        write_report(str(root / "store"), None, tmp_path / "r2", subset=str(tmp_path / "unsorted.npy"), progress=False)


def test_sieve_alone_when_there_is_no_clipscore(tmp_path):
    from synth_store import write_folder

    write_folder(str(tmp_path / "store"), rows=3000, files=2, seed=3)
    s = write_report(str(tmp_path / "store"), None, tmp_path / "r", per_section=5, progress=False)
    assert s["filter"] == "sieve" and s["clip_source"] is None
    assert "clip_not_sieve" not in s["sections"] and s["alone_thresholds"] is None
    assert s["counts"]["kept"] >= int(3000 * 0.2) + 1  # n + 1 rows, plus ties
    page = (tmp_path / "r" / "index.html").read_text()
    assert "No CLIPScore" in page and "Sieve vs CLIPScore" not in page
    # the header names the folders given, and only those
    assert f"score store {tmp_path / 'store'}</div>" in page and "· shards" not in page and "· metadata" not in page


def test_escaping_and_masked_phrase_highlighting():
    assert esc('<script>"x"&\'y\'') == "&lt;script&gt;&quot;x&quot;&amp;&#x27;y&#x27;"
    assert esc("bell\x07 esc\x1b[0m\r\n") == "bell\u2407 esc\u241b[0m\u240d\n"
    assert esc(None) == ""
    got = _highlight('A photo of <b onmouseover="x">cat</b> stock photo', "official")
    assert got == ("<mark>A photo of</mark> &lt;b onmouseover=&quot;x&quot;&gt;cat&lt;/b&gt; "
                   "<mark>stock photo</mark>")
    assert _highlight("photography", "official") == "<mark>photo</mark>graphy"  # the reference's quirk
    assert "(empty)" in _highlight("", "official") and "(none)" in _highlight(None, "official")


def test_one_line_errors(synth, tmp_path, capsys):
    root, _ = synth
    (tmp_path / "empty").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    store = str(root / "store")
    cases = [
        (["--scores_dir", str(tmp_path / "nope"), "--shards_dir", str(tmp_path / "shards")], "does not exist"),
        (["--scores_dir", str(tmp_path / "empty"), "--shards_dir", str(tmp_path / "shards")], "is empty"),
        (["--scores_dir", store, "--shards_dir", str(tmp_path / "shards")], "no {:08d}.tar shards"),
        (["--scores_dir", store, "--shards_dir", str(tmp_path / "shards"), "--subset", str(tmp_path / "x.npy")],
         "is not a file"),
        # the scratch folder of the join: a file, or a folder that does not exist
        (["--scores_dir", store, "--shards_dir", str(tmp_path / "shards"), "--tmp_dir",
          str(tmp_path / "other" / "notes.txt")], "--tmp_dir"),
        (["--scores_dir", store, "--shards_dir", str(tmp_path / "shards"), "--tmp_dir", str(tmp_path / "nope")],
         "is not a folder"),
    ]
    for args, msg in cases:
        assert cli.main(["report", *args, "--out", str(tmp_path / "r"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    with pytest.raises(UserError, match="not a report folder"):
        write_report(store, None, tmp_path / "other", progress=False)
    with pytest.raises(UserError, match="--fraction"):
        write_report(store, None, tmp_path / "r", fraction=0.0, progress=False)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# the toy pool, with injections


def test_read_samples_gives_what_iter_samples_gives_for_the_asked_keys(toy_pool, tmp_path):
    from datacomp_sieve.shards import iter_samples, list_shards, read_samples

    shard = list_shards(str(toy_pool / "shards"))[0]
    every = {x.key: x for x in iter_samples(shard)}
    keys = list(every)
    asked = [keys[1], keys[-1], "no-such-key"]
    got = read_samples(shard, asked)
    assert got == {k: every[k] for k in asked[:2]}
    assert read_samples(shard, []) == {}
    # a tar cut in the middle: the samples before the break, none after, nothing half-formed
    (tmp_path / "cut").mkdir()
    data = (toy_pool / "shards" / "00000000.tar").read_bytes()
    (tmp_path / "cut" / "00000000.tar").write_bytes(data[: len(data) // 2 + 100])
    cut = list_shards(str(tmp_path / "cut"))[0]
    whole = {x.key: x for x in iter_samples(cut) if x.status == "ok"}
    got = read_samples(cut, keys)
    assert got == whole and 0 < len(got) < len(keys)




def _rewrite_tar(path: Path, edit) -> None:
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:
        for m, data in members:
            if data is not None:
                data = edit(m.name, data)
                m.size = len(data)
            t.addfile(m, io.BytesIO(data) if data is not None else None)


@pytest.fixture(scope="module")
def injected(toy_pool, tmp_path_factory):
    """The toy pool with hostile alt-texts, json url and caption, scored and reported."""
    from datacomp_sieve.score import ScoreConfig, score_pool

    root = tmp_path_factory.mktemp("report_e2e")
    pool = root / "pool"
    shutil.copytree(toy_pool, pool)
    tar = pool / "shards" / "00000000.tar"
    with tarfile.open(tar) as t:
        keys = sorted({m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".jpg")})[:2]

    def edit(name, data):
        if name == f"{keys[0]}.txt":
            return SCRIPT_TEXT.encode()
        if name == f"{keys[1]}.txt":
            return ATTR_TEXT.encode()
        if name == f"{keys[0]}.json":
            return json.dumps({**json.loads(data), "url": URL_TEXT}).encode()
        return data

    _rewrite_tar(tar, edit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        score_pool(str(pool / "shards"), str(root / "store"),
                   ScoreConfig(captioner="label", device="cpu", batch_size=8, num_captions=3), progress=False)
    part = root / "store" / "00000001.parquet"
    t = pq.read_table(part)
    caps = t.column("captions").to_pylist()
    caps[0] = [CAPTION_TEXT] + caps[0][1:]
    t = t.set_column(t.schema.get_field_index("captions"), "captions", pa.array(caps, t.schema.field("captions").type))
    best = t.column("best_caption").to_pylist()
    best[0] = CAPTION_TEXT
    t = t.set_column(t.schema.get_field_index("best_caption"), "best_caption", pa.array(best, pa.string()))
    pq.write_table(t, part)
    out = root / "report"
    rc = cli.main(["report", "--scores_dir", str(root / "store"), "--shards_dir", str(pool / "shards"),
                   "--metadata_dir", str(pool / "metadata"), "--out", str(out), "--per_section", "100", "--quiet"])
    assert rc == 0
    return root, out, json.loads((out / "report.json").read_text())


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.notes, self._note = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._note = tag == "div" and dict(attrs).get("class") == "note"

    def handle_data(self, data):
        self.text.append(data)
        if self._note:
            self.notes.append(data)
            self._note = False


def test_shards_that_are_not_the_pool_s_are_said(injected, tmp_path, capsys):
    """--shards_dir with tars of the right names but not the pool's: the page shows no images, and
    the run says that none of the shown samples was found there."""
    root, _, _ = injected
    junk = tmp_path / "shards"
    junk.mkdir()
    for stem in ("00000000", "00000001", "00000002"):
        (junk / f"{stem}.tar").write_text("not a tar")
    assert cli.main(["report", "--scores_dir", str(root / "store"), "--shards_dir", str(junk),
                     "--out", str(tmp_path / "r"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "samples shown were not found in" in err and "are these the pool's shards?" in err


def test_untrusted_text_is_only_ever_text(injected):
    root, out, s = injected
    raw = (out / "index.html").read_text()
    assert "<script" not in raw.lower() and "onerror=" not in raw.replace("onerror=&quot;", "")
    p = _Page()
    p.feed(raw)
    assert not [t for t, _ in p.tags if t in ("script", "iframe", "object", "embed", "a", "form", "base")]
    assert not [(t, a) for t, a in p.tags for k in a if k.lower().startswith("on")]
    imgs = [a for t, a in p.tags if t == "img"]
    assert len({a["src"] for a in imgs}) == s["thumbnails"] > 50 and len(imgs) > s["thumbnails"]  # some in 2 sections
    for a in imgs:
        assert a["src"].startswith("thumbs/") and (out / a["src"]).is_file()
    text = "".join(p.text)
    for hostile in (SCRIPT_TEXT, ATTR_TEXT, URL_TEXT):
        assert hostile in text  # shown, as text
    assert "★ " + CAPTION_TEXT in text  # the best caption, marked
    csp = [a for t, a in p.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    # masked medium phrases are highlighted inside the escaped alt-texts
    assert "&lt;/script&gt; <mark>a photo of</mark> a cup" in raw
    assert "<mark>stock photo</mark> of a tabby cat" in raw


def test_toy_pool_counts_match_the_filter_and_the_manifest(injected, tmp_path):
    root, out, s = injected
    c = s["counts"]
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    assert c["pool"] == 84 and c["store_rows"] == manifest["rows"] == 78
    assert c["status"] == manifest["status"]
    assert s["clip_source"].startswith("the metadata's clip_l14")
    rc = cli.main(["filter", "--name", "sieve_clip", "--metadata_dir", str(root / "pool" / "metadata"),
                   "--scores_dir", str(root / "store"), "--save_path", str(tmp_path / "sub.npy"), "--quiet"])
    assert rc == 0 and len(np.load(tmp_path / "sub.npy")) == c["kept"]
    shown = {u for k, v in s["sections"].items() if k != "scatter" for u in v["uids"]}
    assert len(shown) == s["thumbnails"]  # every shown sample got its thumbnail from the tars
    page = (out / "index.html").read_text()
    p = _Page()
    p.feed(page)
    assert "STAND-IN" in p.notes[0]  # the stand-in captioner is said first
    assert "stand-in captioner, not BLIP" in page  # the manifest is in the page


def test_each_folder_s_footers_are_read_once_and_the_shards_listed_once(injected, tmp_path, footer_reads,
                                                                        monkeypatch):
    """A store of 12,800 files: its footers were read three times (terms, checks, lookup) and the
    shards folder (every _stats.json) listed twice."""
    import datacomp_sieve.shards as shards

    root, _, _ = injected
    listed = []
    real = shards.list_shards
    monkeypatch.setattr(shards, "list_shards", lambda d: listed.append(d) or real(d))
    store, meta = str(root / "store"), str(root / "pool" / "metadata")
    write_report(store, str(root / "pool" / "shards"), tmp_path / "r", metadata_dir=meta, progress=False)
    assert footer_reads[store] == 1 and footer_reads[meta] == 1
    assert len(listed) == 1


def test_lookup_reads_the_store_on_threads_and_finds_what_brute_force_finds(synth, tmp_path, monkeypatch):
    """Shown rows and status counts as a plain read of every file gives them (the first row of a
    uid wins; a file without a status column counts as unknown), the files read side by side as
    ``filter`` reads them, not one after another on the caller's thread."""
    import threading
    from collections import Counter

    from datacomp_sieve.metadata import ParquetFolder
    from datacomp_sieve.report import NO_STATUS, _lookup

    root, _ = synth
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "store", mixed)
    first = pq.read_table(mixed / "00000000.parquet")
    dup = first.column("uid")[7].as_py()  # a uid in two files: the first file's row is shown
    last = pq.read_table(mixed / "00000003.parquet").drop_columns(["status"])
    uids = last.column("uid").to_pylist()
    uids[0] = dup
    last = last.set_column(0, "uid", pa.array(uids, pa.string()))
    pq.write_table(last, mixed / "00000003.parquet", row_group_size=1500)
    on_main = []
    real = ParquetFolder._file
    monkeypatch.setattr(ParquetFolder, "_file", lambda self, path: on_main.append(
        threading.current_thread() is threading.main_thread()) or real(self, path))
    for store, with_status in ((root / "store", True), (mixed, False)):
        files = sorted(store.glob("*.parquet"))
        tables = [pq.read_table(f) for f in files]
        all_uids = [u for t in tables for u in t.column("uid").to_pylist()]
        wanted = {bytes.fromhex(u) for u in all_uids[::997]} | {bytes.fromhex(dup), b"\x01" * 16}
        expect, status = {}, Counter()
        for f, t in zip(files, tables):
            for r in t.select([c for c in ("uid", "key", "best_caption", "captions", "status", "error")
                               if c in t.column_names]).to_pylist():
                if bytes.fromhex(r["uid"]) in wanted:
                    expect.setdefault(bytes.fromhex(r["uid"]), {**r, "shard": f.stem})
                status[r.get("status", NO_STATUS)] += 1
        on_main.clear()
        rows, got_status, total = _lookup(ParquetFolder.open(str(store)), wanted, False)
        assert rows == expect and got_status == dict(status) and total == len(all_uids)
        assert (NO_STATUS in got_status) is not with_status
        groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
        assert on_main.count(False) >= groups  # every row group read on a reading thread


# ---------------------------------------------------------------------------------------------
# a real browser


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed with apt-get when missing (root), else the test is skipped."""
    exe = _find_chromium()
    if exe:
        return exe
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        pytest.skip("chromium is not installed and apt-get needs root (no sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "fonts-dejavu-core"]
    log = ""
    for step in (install, sudo + ["apt-get", "update", "-q"], install):
        r = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900)
        log = (r.stdout + r.stderr)[-500:]
        if step is install and r.returncode == 0:
            break
    exe = _find_chromium()
    if not exe:
        pytest.skip(f"could not install chromium with apt-get: {log}")
    return exe


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    commands are written to its fd 3, replies and events read from its fd 4, NUL-separated JSON)."""

    def __init__(self, exe: str, profile: Path):
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4
        child_w = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(out_w)

        def fds_3_and_4():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", "--no-default-browser-check",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1280,1024"]
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=fds_3_and_4, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(child_r)
        os.close(child_w)
        self.w, self.r, self.buf, self.last, self.events = cmd_w, out_r, b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            ready, _, _ = select_fd.select([self.r], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self.last += 1
        msg = {"id": self.last, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._message(deadline)
            if m.get("id") == self.last:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for m in self.events:
            if m.get("method") == event:
                return m
        while True:
            m = self._message(deadline)
            self.events.append(m)
            if m.get("method") == event:
                return m

    def errors(self) -> list:
        out = []
        for m in self.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"])
            elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(p)
            elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"])
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        os.close(self.w)
        os.close(self.r)


def test_report_in_headless_chromium(injected, chromium, tmp_path):
    _, out, s = injected
    n_images = (out / "index.html").read_text().count("<img ")
    b = Browser(chromium, tmp_path / "profile")
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            b.send(method, session=session)
        b.send("Page.navigate", {"url": (out / "index.html").as_uri()}, session=session)
        b.wait_for("Page.loadEventFired")
        probe = ("JSON.stringify({images: document.images.length,"
                 " rendered: Array.from(document.images).every(i => i.complete && i.naturalWidth > 0),"
                 " scripts: document.scripts.length, handlers: document.querySelectorAll('[onerror]').length,"
                 " pwned: typeof window.__pwned, title: document.title})")
        got = json.loads(b.send("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                session=session)["result"]["value"])
        size = b.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = b.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}},
            session=session)
        time.sleep(0.2)
        b.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending log events
        errors = b.errors()
    finally:
        b.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "screenshot.png").write_bytes(png)
    shutil.rmtree(ARTIFACTS / "page", ignore_errors=True)
    shutil.copytree(out, ARTIFACTS / "page")
    assert errors == [], errors
    assert got == {"images": n_images, "rendered": True, "scripts": 0, "handlers": 0,
                   "pwned": "undefined", "title": "datacomp-sieve report: what Sieve keeps and drops"}
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000 and im.width >= 1000 and im.height > 2000
    assert len(np.unique(np.asarray(im.convert("L").resize((64, 256))))) > 50  # not a blank page


# ---------------------------------------------------------------------------------------------
# the demo


def test_demo_refuses_bad_input_before_any_work(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--out", str(tmp_path / "notes.txt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file; give a new or empty folder" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert cli.main(["demo", "--out", str(tmp_path / "new"), "--captioner", "nonexist", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown captioner 'nonexist'" in err[0] and not (tmp_path / "new").exists()


def test_demo_subset_is_named_after_the_percentage_kept():
    """--fraction 0.29 keeps 29%: the file is sieve_29.npy (int(0.29 * 100) named it sieve_28.npy)."""
    from datacomp_sieve import demo

    names = {f: demo.subset_name("sieve", f) for f in (0.2, 0.29, 0.07, 0.57, 1.0, 0.005)}
    assert names == {0.2: "sieve_20.npy", 0.29: "sieve_29.npy", 0.07: "sieve_7.npy", 0.57: "sieve_57.npy",
                     1.0: "sieve_100.npy", 0.005: "sieve_0.5.npy"}


def test_demo_writes_the_report_and_says_what_it_used(tmp_path, monkeypatch, capsys):
    from datacomp_sieve.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = run_demo(str(tmp_path / "demo"), progress=False)
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0] == "datacomp-sieve demo" and "STAND-IN" in stdout[1]  # said first
    index = tmp_path / "demo" / "report" / "index.html"
    assert s["report"] == str(index) and index.is_file()
    assert any(line.startswith("report:  ") and str(index) in line for line in stdout)
    r = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert r["subset"] == s["subset"] and r["counts"]["kept"] == s["kept"]
    assert r["counts"]["scored"] == s["scored"] and r["thumbnails"] > 0
    p = _Page()
    p.feed(index.read_text())
    assert "demo" in p.notes[0] and "STAND-IN" in p.notes[1]  # the model choice tops the report
    assert any("CLIPScore" in n for n in p.notes)


# ---------------------------------------------------------------------------------------------
# where the kept set is cut, and why samples are missing


def test_a_subset_report_marks_where_the_subset_cuts_the_fused_score(synth, tmp_path):
    """With --subset (the README's command) the page had no threshold at all: now the lowest kept
    and the highest dropped fused scores are marked and it says whether the subset is a threshold on
    this fused score."""
    root, d = synth
    store = str(root / "store")
    assert cli.main(["filter", "--name", "sieve_clip", "--clip_from", "store", "--fraction", "0.2",
                     "--scores_dir", store, "--save_path", str(tmp_path / "sub.npy"), "--quiet"]) == 0
    ok, fused = brute_fused(d)
    desc = np.sort(fused)[::-1]
    thr = desc[int(ok.sum() * 0.2)]
    by_frac = write_report(store, None, tmp_path / "f", per_section=6, progress=False)
    s = write_report(store, None, tmp_path / "r", subset=str(tmp_path / "sub.npy"), per_section=6, progress=False)
    assert s["counts"]["kept"] == by_frac["counts"]["kept"]
    cut = s["cut"]
    assert cut["lowest_kept"] == pytest.approx(float(thr)) and cut["is_threshold"] is True
    assert cut["highest_dropped"] == pytest.approx(float(desc[desc < thr][0]))
    assert by_frac["cut"]["lowest_kept"] == pytest.approx(by_frac["threshold"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"lowest kept {thr:.4g}" in page  # marked on the fused histogram
    assert "a threshold on this fused score" in page and "not a threshold" not in page

    # a subset that is not a cut of this fused score (another filter's, say) is said to be one
    chosen = list(d["uid"][ok][::97])
    write_subset(tmp_path / "other.npy", keys_from_strings(chosen))
    s = write_report(store, None, tmp_path / "o", subset=str(tmp_path / "other.npy"), per_section=6, progress=False)
    f_of = dict(zip(d["uid"][ok], fused))
    lo, hi = min(f_of[u] for u in chosen), max(f for u, f in f_of.items() if u not in set(chosen))
    assert s["cut"] == pytest.approx({"lowest_kept": float(lo), "highest_dropped": float(hi), "is_threshold": False,
                                      "lowest_kept_sieve": None, "highest_dropped_sieve": None})
    page = (tmp_path / "o" / "index.html").read_text()
    assert "not a threshold on this fused score" in page
    assert f"lowest kept {lo:.4g}" in page and f"highest dropped {hi:.4g}" in page


def test_sieve_alone_marks_the_threshold_in_sieve_score_units(tmp_path):
    """With Sieve alone the fused score is Sieve min-max normalised: the page also says the cut in
    the Sieve score's own units (what the paper and a researcher speak in), on its histogram."""
    from synth_store import write_folder

    write_folder(str(tmp_path / "store"), rows=3000, files=2, seed=3)
    s = write_report(str(tmp_path / "store"), None, tmp_path / "r", per_section=5, progress=False)
    t = pq.read_table(sorted((tmp_path / "store").glob("*.parquet"))).column("sieve_score").to_numpy()
    kept = np.sort(t)[::-1][: s["counts"]["kept"]]
    assert s["cut"]["lowest_kept_sieve"] == float(kept[-1])
    assert s["cut"]["highest_dropped_sieve"] == float(np.sort(t)[::-1][s["counts"]["kept"]])
    page = (tmp_path / "r" / "index.html").read_text()
    assert f"Sieve score {kept[-1]:.4g}" in page  # in the sentence under the counts
    assert page.count(f"lowest kept {kept[-1]:.4g}") == 1  # marked on the Sieve histogram


def test_with_a_subset_each_score_alone_keeps_as_many_as_the_subset(synth, tmp_path):
    """The disagreement sets compare each score alone keeping the same number of samples as the
    kept set; with --subset it kept one more (n = int(N * kept / N) = kept, then n + 1 rows)."""
    from synth_store import write_folder

    store = str(tmp_path / "store")  # few rows, so neighbours fall in different histogram bins
    write_folder(store, rows=400, files=2, seed=5, columns=("sieve_score", "clip_score"), ties=False)
    assert cli.main(["filter", "--name", "sieve_clip", "--clip_from", "store", "--fraction", "0.2",
                     "--scores_dir", store, "--save_path", str(tmp_path / "sub.npy"), "--quiet"]) == 0
    by_frac = write_report(store, None, tmp_path / "f", per_section=6, progress=False)
    s = write_report(store, None, tmp_path / "r", subset=str(tmp_path / "sub.npy"), per_section=6, progress=False)
    assert s["counts"]["kept"] == by_frac["counts"]["kept"] == 81
    assert s["alone_thresholds"] == by_frac["alone_thresholds"]
    for k in ("clip_not_sieve", "sieve_not_clip"):
        assert s["sections"][k]["eligible"] == by_frac["sections"][k]["eligible"]


def test_a_kept_set_of_every_sample_shows_no_empty_disagreement_galleries(tmp_path):
    """A subset of every scored uid, or a fraction that keeps them all (n + 1 rows of n = int(N *
    fraction)): each score alone would keep everything, so there is nothing to disagree on; the
    page says so instead of two empty galleries, as it does for --fraction 1."""
    from synth_store import write_folder

    store = str(tmp_path / "store")
    write_folder(store, rows=400, files=2, seed=5, columns=("sieve_score", "clip_score"), ties=False)
    assert cli.main(["filter", "--name", "sieve_clip", "--clip_from", "store", "--fraction", "1.0",
                     "--scores_dir", store, "--save_path", str(tmp_path / "all.npy"), "--quiet"]) == 0
    for name, kw in (("subset", {"subset": str(tmp_path / "all.npy")}), ("one", {"fraction": 1.0}),
                     ("nearly", {"fraction": 0.999})):
        s = write_report(store, None, tmp_path / name, per_section=6, progress=False, **kw)
        page = (tmp_path / name / "index.html").read_text()
        assert s["counts"]["kept"] == 400 and "clip_not_sieve" not in s["sections"], name
        assert "Not shown: the kept set holds every scored sample, or none." in page
        assert "CLIPScore keeps, Sieve drops" not in page
    s = write_report(store, None, tmp_path / "most", fraction=0.99, per_section=6, progress=False)
    assert s["counts"]["kept"] < 400 and s["sections"]["clip_not_sieve"]["eligible"] >= 0


def test_download_failures_are_counted_by_reason_from_the_shards_stats(synth, tmp_path):
    """The metadata rows with no sample were one line, 'not downloaded', though img2dataset's
    _stats.json beside each tar says how many failed to download and to resize, and why."""
    root, _ = synth
    shards = tmp_path / "shards"
    shards.mkdir()
    stats = {
        "00000000": {"count": 100, "successes": 90, "failed_to_download": 8, "failed_to_resize": 2,
                     "status_dict": {"success": 90, "HTTP Error 404: Not Found": 5, "<b>timeout</b>": 3,
                                     "image is too small": 2}},
        "00000001": {"count": 50, "successes": 47, "failed_to_download": 3, "failed_to_resize": 0,
                     "status_dict": {"success": 47, "HTTP Error 404: Not Found": 3}},
        "00000002": None,  # no _stats.json: said, not guessed
    }
    for stem, st in stats.items():
        (shards / f"{stem}.tar").write_text("not a tar")
        if st is not None:
            (shards / f"{stem}_stats.json").write_text(json.dumps(st))
    s = write_report(str(root / "store"), str(shards), tmp_path / "r", per_section=2, progress=False)
    assert s["counts"]["downloads"] == {
        "shards": 3, "shards_with_stats": 2, "count": 150, "successes": 137, "failed_to_download": 11,
        "failed_to_resize": 2, "reasons": {"HTTP Error 404: Not Found": 8, "<b>timeout</b>": 3,
                                           "image is too small": 2}}
    page = (tmp_path / "r" / "index.html").read_text()
    p = _Page()
    p.feed(page)
    text = " ".join(" ".join(p.text).split())
    assert "failed to download (img2dataset) 11" in text and "failed to resize (img2dataset) 2" in text
    assert "HTTP Error 404: Not Found: 8" in text and "<b>timeout</b>: 3" in text  # escaped, shown as text
    assert "from the _stats.json of 2 of the 3 shards" in text
    # without shards, or shards without stats, there is nothing to say
    s = write_report(str(root / "store"), None, tmp_path / "r2", per_section=2, progress=False)
    assert s["counts"]["downloads"] is None


def test_the_galleries_explain_their_marks_and_sieve_alone_is_not_called_fused(tmp_path):
    """The yellow marks were explained only at the very bottom of a long page; with Sieve alone the
    page called the min-max normalised Sieve score 'fused' though nothing is fused; a web alt-text
    of thousands of characters made its card as tall as the screen many times over."""
    from synth_store import write_folder

    write_folder(str(tmp_path / "store"), rows=500, files=1, seed=4)
    write_report(str(tmp_path / "store"), None, tmp_path / "r", per_section=4, progress=False)
    page = (tmp_path / "r" / "index.html").read_text()
    legend = page.index('class="legend"')
    assert legend < page.index('class="gallery"')
    for words in ("<mark>", "masking removes", "★", "kept", "dropped"):
        assert words in page[legend: page.index("</div>", legend)], words
    assert "fused" not in page.replace("the fused score", "")  # nothing is fused: only said as such
    assert "Sieve score, min-max normalised" in page and "normalised 1.0000" in page
    # a long alt-text is shown whole, in a box of bounded height that scrolls
    from datacomp_sieve.report import _card

    row = {"text": "a photo of a dog " * 400, "captions": ["a dog"], "best_caption": "a dog"}
    card = _card(b"\x01" * 16, np.array([0.3, np.nan, 0.5, 1.0]), row, {}, "official", False)
    assert '<div class="alt">' in card and card.count("<mark>a photo of</mark>") == 400
    assert ".alt{" in page and "max-height" in page[page.index(".alt{"):page.index("}", page.index(".alt{"))]


def test_failed_samples_are_shown_by_status_with_examples(tmp_path):
    """The counts said 'failed: corrupt_image 200' and nothing more: which samples, and why? Now up
    to EXAMPLES of each failure status are listed with their uid, shard, key, error and, from the
    tars, their url and alt-text (a sample without a uid too)."""
    from datacomp_sieve.report import EXAMPLES

    rng = np.random.default_rng(1)
    store = tmp_path / "store"
    store.mkdir()
    kinds = {"corrupt_image": 7, "no_uid": 2, "not_an_image": 1}
    expect: dict = {}
    for i in range(2):
        n = 300
        uid = random_uids(rng, n).to_pylist()
        status = ["ok"] * n
        error = [None] * n
        at = iter(rng.permutation(n)[:10].tolist())
        for k, m in kinds.items():
            for _ in range(m // 2 + (i == 0) * (m % 2)):
                j = next(at)
                status[j], error[j] = k, f"<{k}> in file {i} row {j}"
                if k == "no_uid":
                    uid[j] = None
        bad = np.array(status) != "ok"
        pq.write_table(pa.table({
            "uid": pa.array(uid, pa.string()), "key": [f"{i:04d}{j:05d}" for j in range(n)],
            "sieve_score": pa.array(rng.random(n).astype(np.float32), mask=bad),
            "status": status, "error": error}), store / f"{i:08d}.parquet", row_group_size=64)
        for j in np.flatnonzero(bad):
            expect.setdefault(status[j], []).append(
                {"uid": uid[j], "shard": f"{i:08d}", "key": f"{i:04d}{j:05d}", "error": error[j]})
    s = write_report(str(store), None, tmp_path / "r", per_section=2, progress=False)
    assert EXAMPLES == 3
    assert s["failed_examples"] == {k: v[:EXAMPLES] for k, v in sorted(expect.items())}
    assert s["counts"]["failed"] == {"corrupt_image": 7, "no_uid": 2, "not_an_image": 1}
    page = (tmp_path / "r" / "index.html").read_text()
    p = _Page()
    p.feed(page)
    text = " ".join(" ".join(p.text).split())
    for k, v in expect.items():
        for e in v[:EXAMPLES]:
            assert e["error"] in text and e["key"] in text  # shown, escaped
    assert "<corrupt_image>" not in page and "&lt;corrupt_image&gt;" in page

    # with the shards, each example's url and alt-text, read from its tar
    shards = tmp_path / "shards"
    shards.mkdir()
    mine = [e for v in s["failed_examples"].values() for e in v if e["shard"] == "00000000"]
    with tarfile.open(shards / "00000000.tar", "w") as t:
        for e in mine:
            for ext, data in (("jpg", b"<html>not an image</html>"), ("txt", f"alt <b>{e['key']}</b>".encode()),
                              ("json", json.dumps({"uid": e["uid"], "url": f"http://x.invalid/{e['key']}"}).encode())):
                info = tarfile.TarInfo(f"{e['key']}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    s = write_report(str(store), str(shards), tmp_path / "r2", per_section=2, progress=False)
    got = [e for v in s["failed_examples"].values() for e in v]
    assert [(e.get("url"), e.get("text")) for e in got if e["shard"] == "00000000"] == [
        (f"http://x.invalid/{e['key']}", f"alt <b>{e['key']}</b>") for e in mine]
    assert all("url" not in e for e in got if e["shard"] == "00000001")  # not in the shards folder
    page = (tmp_path / "r2" / "index.html").read_text()
    assert f"alt &lt;b&gt;{mine[0]['key']}&lt;/b&gt;" in page and f"http://x.invalid/{mine[0]['key']}" in page


def test_a_card_says_when_the_alt_text_was_not_read_and_shows_an_ok_sample_s_note():
    """A card without its tar sample said 'alt-text: (none)', as if the sample had no alt-text;
    and the note an 'ok' sample carries (a non-UTF-8 alt-text decoded with U+FFFD) was not shown,
    though it explains the replacement characters in the alt-text."""
    from datacomp_sieve.report import _card

    vals = np.array([0.3, np.nan, 0.5, 0.0])
    card = _card(b"\x02" * 16, vals, {"best_caption": "a dog", "shard": "00000003", "key": "7"},
                 {"error": "sample 7 not found in 00000003.tar"}, "official", False)
    assert "(not read from the shards)" in card and "(none)" not in card
    card = _card(b"\x02" * 16, vals, {"text": None, "status": "ok", "error": "alt-text <not UTF-8>: replaced"},
                 {}, "official", False)
    assert "(none)" in card  # read, and without an alt-text: none indeed
    assert "note: alt-text &lt;not UTF-8&gt;: replaced" in card


def test_the_command_s_summary_line_counts_download_failures_too(synth, tmp_path, capsys):
    """It printed '0 failed' for a pool whose img2dataset run lost 6 of 84 URLs."""
    root, d = synth
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000000.tar").write_text("not a tar")
    (shards / "00000000_stats.json").write_text(json.dumps({"count": 90, "successes": 84, "failed_to_download": 4,
                                                            "failed_to_resize": 2}))
    assert cli.main(["report", "--scores_dir", str(root / "store"), "--shards_dir", str(shards),
                     "--out", str(tmp_path / "r"), "--per_section", "2", "--quiet"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    failed = int((d["status"] != "ok").sum())
    assert f"; {failed} failed to read or decode; 4 failed to download, 2 to resize (img2dataset);" in line


def test_shards_whose_stats_count_fewer_downloads_than_the_store_has_rows_are_said(synth, tmp_path):
    """The img2dataset counts of a shards folder that is not the pool's were shown as the pool's
    (84 URLs tried beside a store of 2,000,000 rows, with no word)."""
    root, d = synth
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000000.tar").write_text("not a tar")
    (shards / "00000000_stats.json").write_text(json.dumps({"count": 90, "successes": 84}))
    s = write_report(str(root / "store"), str(shards), tmp_path / "r", per_section=2, progress=False)
    note = (f"The score store has {len(d['uid']):,} rows but the shards' _stats.json count 84 downloaded "
            "samples: are these the pool's shards?")
    assert note in s["notes"]
    p = _Page()
    p.feed((tmp_path / "r" / "index.html").read_text())
    assert note in p.notes
