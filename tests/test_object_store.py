"""The pool, the score store and every command on S3, through a loopback S3 server (moto).

The toy pool is uploaded to a bucket; ``score``, resume, ``filter``, ``pool-info`` and ``report``
then run on ``s3://`` URLs exactly as a user runs them, with the endpoint and credentials given
the usual AWS way (environment variables), and their outputs are compared with the same
commands on local copies.
"""

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "pool-bucket"
SCORE = ["--captioner", "label", "--device", "cpu", "--batch_size", "8", "--quiet"]


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server for this module; yields the ``s3fs`` filesystem that talks to it.

    The endpoint and credentials are set in the environment only while the module runs, and the
    cached s3fs instances (which hold the endpoint) are dropped before and after.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    quiet = logging.getLogger("werkzeug")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
            quiet.setLevel(level)


@pytest.fixture
def elsewhere(s3):
    """Another client of the same bucket, with listings of its own: another process or machine."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def pool(s3, toy_pool):
    """The toy pool uploaded to ``s3://BUCKET/pool/``, scored into ``s3://BUCKET/pool/sieve_scores``
    by ``datacomp-sieve score``; yields the pool's URL."""
    from datacomp_sieve.cli import main

    s3.put(str(toy_pool / "metadata"), f"{BUCKET}/pool/metadata", recursive=True)
    s3.put(str(toy_pool / "shards"), f"{BUCKET}/pool/shards", recursive=True)
    url = f"s3://{BUCKET}/pool"
    assert main(["score", "--shards_dir", f"{url}/shards", "--scores_dir", f"{url}/sieve_scores", *SCORE]) == 0
    return url


def test_the_score_store_on_s3_has_a_file_per_shard_and_resumes(pool, s3, toy_pool):
    from datacomp_sieve.score import ScoreConfig, score_pool

    stems = sorted(p.stem for p in (toy_pool / "shards").glob("*.tar"))
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/pool/sieve_scores", detail=False))
    assert names == sorted([f"{s}.parquet" for s in stems] + ["config.json", "manifest.json"])
    m = json.loads(s3.cat(f"{BUCKET}/pool/sieve_scores/manifest.json"))
    assert m["shards"] == len(stems) and m["rows"] == m["status"]["ok"] > 0
    again = score_pool(f"{pool}/shards", f"{pool}/sieve_scores",
                       ScoreConfig(captioner="label", device="cpu", batch_size=8), progress=False)
    assert again["run"] == {"shards_scored": 0, "shards_skipped": len(stems), "shards_failed": 0}


@pytest.mark.parametrize("name", ["sieve", "sieve_clip"])
def test_filter_from_s3_writes_the_same_bytes_as_from_local_copies(pool, s3, toy_pool, tmp_path, name):
    from datacomp_sieve.cli import main

    local = tmp_path / "sieve_scores"
    s3.get(f"{BUCKET}/pool/sieve_scores", str(local), recursive=True)
    runs = {}
    for where, meta, store in (("s3", f"{pool}/metadata", f"{pool}/sieve_scores"),
                               ("local", str(toy_pool / "metadata"), str(local))):
        out = tmp_path / f"{where}.npy"
        assert main(["filter", "--name", name, "--metadata_dir", meta, "--scores_dir", store,
                     "--save_path", str(out), "--quiet"]) == 0
        runs[where] = out.read_bytes()
    assert runs["s3"] == runs["local"] and len(np.load(tmp_path / "s3.npy")) > 0


def test_baselines_with_s3_shards_finds_the_store_beside_them(pool, tmp_path, monkeypatch, capsys):
    """Without --scores_dir the store is the pool's sieve_scores, on S3 too (not a local folder
    named after the URL)."""
    from datacomp_sieve.cli import baselines_main

    monkeypatch.chdir(tmp_path)
    for args in (["--shards_dir", f"{pool}/shards", *SCORE[:-1]], ["--scores_dir", f"{pool}/sieve_scores"]):
        assert baselines_main(["--name", "sieve", "--save_path", f"{args[0][2:]}.npy", *args, "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores_dir.npy", "shards_dir.npy"]
    assert (tmp_path / "scores_dir.npy").read_bytes() == (tmp_path / "shards_dir.npy").read_bytes()
    assert baselines_main(["--name", "sieve", "--save_path", "x.npy", "--shards_dir", f"s3://{BUCKET}"]) == 2
    assert "give --scores_dir" in capsys.readouterr().err


def test_pool_info_on_s3_says_what_it_says_on_the_local_pool(pool, toy_pool, capsys):
    from datacomp_sieve.cli import main

    assert main(["pool-info", "--metadata_dir", f"{pool}/metadata", "--shards_dir", f"{pool}/shards"]) == 0
    remote = capsys.readouterr().out
    assert main(["pool-info", "--metadata_dir", str(toy_pool / "metadata"),
                 "--shards_dir", str(toy_pool / "shards")]) == 0
    assert remote == capsys.readouterr().out and "downloaded samples" in remote


def test_report_reads_the_store_the_shards_and_the_metadata_from_s3(pool, tmp_path, capsys):
    from datacomp_sieve.cli import main

    out = tmp_path / "report"
    assert main(["report", "--scores_dir", f"{pool}/sieve_scores", "--shards_dir", f"{pool}/shards",
                 "--metadata_dir", f"{pool}/metadata", "--out", str(out), "--per_section", "4", "--quiet"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["counts"]["scored"] > 0 and summary["counts"]["kept"] > 0
    assert list((out / "thumbs").iterdir())


def test_a_failed_write_leaves_no_object_on_s3(pool, s3, monkeypatch):
    from datacomp_sieve.store import ScoreStore

    store = ScoreStore(f"{pool}/sieve_scores")
    stem = sorted(store.completed())[0]
    table = store.read_shard(stem)
    before = sorted(s3.ls(f"{BUCKET}/pool/sieve_scores", detail=False))

    def broken(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise OSError("disk gone")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk gone"):
        store.write_shard("99999999", table, {})
    assert sorted(s3.ls(f"{BUCKET}/pool/sieve_scores", detail=False)) == before
    assert "99999999" not in store.completed() and not store.done("99999999")


@pytest.mark.parametrize("when", ["upload", "rename"])
def test_a_writer_killed_on_s3_leaves_no_partial_score_file(pool, s3, when):
    """SIGKILL in the middle of the upload, and between the copy and the delete that make S3's
    rename: the store never holds a partial file under a shard's name."""
    from datacomp_sieve.metadata import ParquetFolder
    from datacomp_sieve.store import ScoreStore

    url = f"{pool}/killed_{when}"
    s3.copy(f"{BUCKET}/pool/sieve_scores", url[len("s3://"):], recursive=True)
    stem = sorted(ScoreStore(url).completed())[0]
    whole = s3.cat(f"{url}/{stem}.parquet")
    s3.rm(f"{url}/{stem}.parquet")
    code = f"""
import io, json, os, signal
import pyarrow.parquet as pq
from datacomp_sieve.store import ScoreStore
store = ScoreStore({url!r})
table = pq.read_table(io.BytesIO({whole!r}))
stats = json.loads(table.schema.metadata[b"datacomp_sieve"])
def die(*a, **kw):
    os.kill(os.getpid(), signal.SIGKILL)
if {when!r} == "upload":
    real = pq.write_table
    def half(table, where, **kw):
        real(table, where, **kw)
        die()
    pq.write_table = half
else:
    store.fs.rm = die
store.write_shard({stem!r}, table, stats)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    store = ScoreStore(url)
    names = [p.rsplit("/", 1)[-1] for p in s3.ls(url[len("s3://"):], detail=False, refresh=True)]
    if when == "upload":  # nothing was committed
        assert f"{stem}.parquet" not in names and not [n for n in names if n.startswith(".tmp-")]
    else:  # the copy is whole; the temporary object is left until a cleanup finds it old enough
        assert pq.read_table(io.BytesIO(s3.cat(f"{url}/{stem}.parquet"))).equals(pq.read_table(io.BytesIO(whole)))
        assert len([n for n in names if n.startswith(".tmp-")]) == 1
        assert stem in store.completed() and all(".tmp-" not in p for p in ParquetFolder.open(url).paths)
        store.clean_tmp()  # seconds old: it could be a live writer's
        assert len([p for p in s3.ls(url[len("s3://"):], detail=False, refresh=True) if ".tmp-" in p]) == 1
        store.clean_tmp(max_age_s=0)
        assert not [p for p in s3.ls(url[len("s3://"):], detail=False) if ".tmp-" in p]


def test_overwrite_on_s3_by_worker_processes_replaces_the_store(pool, s3):
    """``--overwrite`` of a store made with other settings, its shards written by a worker process
    (which finds the endpoint and credentials in the environment it inherits); the driver counts
    what the worker wrote."""
    from datacomp_sieve.engines import ProcessEngine
    from datacomp_sieve.score import ScoreConfig, score_pool

    full = json.loads(s3.cat(f"{BUCKET}/pool/sieve_scores/manifest.json"))
    s3.copy(f"{BUCKET}/pool/sieve_scores", f"{BUCKET}/pool/other_store", recursive=True)
    m = score_pool(f"{pool}/shards", f"{pool}/other_store",
                   ScoreConfig(captioner="label", device="cpu", batch_size=8, num_captions=2), overwrite=True,
                   progress=False, engine=ProcessEngine([0]))
    assert m["config"]["num_captions"] == 2 and m["run"]["shards_skipped"] == 0 and m["run"]["workers"] == 1
    assert (m["shards"], m["rows"], m["status"]) == (full["shards"], full["rows"], full["status"])
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/pool/other_store", detail=False))
    assert names == sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/pool/sieve_scores", detail=False))
    rows = pq.read_table([f"{BUCKET}/pool/other_store/{n}" for n in names if n.endswith(".parquet")],
                         filesystem=s3).to_pylist()
    assert len(rows) == full["rows"] and all(len(r["captions"]) == 2 for r in rows)


def test_a_store_listed_earlier_shows_the_files_written_since_by_another_process(pool, s3, elsewhere, tmp_path,
                                                                                 capsys):
    """s3fs keeps the listings it made: a resumed run and a selection after another process (a
    worker, another machine) wrote score files must see them, not the listing made before."""
    from datacomp_sieve.cli import main
    from datacomp_sieve.score import ScoreConfig, score_pool

    src, dst = f"{BUCKET}/pool/sieve_scores", f"{BUCKET}/pool/growing"
    s3.copy(src, dst, recursive=True)
    last = sorted(p for p in s3.ls(dst, detail=False) if p.endswith(".parquet"))[-1]
    s3.rm(last)

    def select(store):
        out = tmp_path / "subset.npy"
        assert main(["filter", "--name", "sieve", "--scores_dir", f"s3://{store}", "--save_path", str(out),
                     "--quiet"]) == 0
        return out.read_bytes()

    partial = select(dst)  # lists the store: 2 of 3 score files
    capsys.readouterr()
    elsewhere.copy(f"{src}/{last.rsplit('/', 1)[-1]}", last)
    assert select(dst) == select(src) != partial
    assert "missing" not in capsys.readouterr().err  # the store's own count of its files is fresh too
    m = score_pool(f"{pool}/shards", f"s3://{dst}", ScoreConfig(captioner="label", device="cpu", batch_size=8),
                   progress=False)
    assert (m["run"]["shards_scored"], m["run"]["shards_skipped"]) == (0, 3)


def test_a_shards_folder_listed_earlier_shows_the_shards_downloaded_since(pool, s3, elsewhere, toy_pool, capsys):
    from datacomp_sieve.cli import main

    src, dst = f"{BUCKET}/pool/shards", f"{BUCKET}/pool/downloading"
    stems = sorted(p.stem for p in (toy_pool / "shards").glob("*.tar"))
    s3.copy(src, dst, recursive=True)
    late = [p for p in s3.ls(dst, detail=False) if p.rsplit("/", 1)[-1].startswith(stems[-1])]
    s3.rm(late)

    def info(shards):
        assert main(["pool-info", "--metadata_dir", f"{pool}/metadata", "--shards_dir", f"s3://{shards}"]) == 0
        return capsys.readouterr().out

    partial = info(dst)
    for p in late:
        elsewhere.copy(f"{src}/{p.rsplit('/', 1)[-1]}", p)
    assert info(dst) == info(src) != partial


def test_a_store_made_elsewhere_after_its_parent_was_listed_is_still_refused(pool, s3, elsewhere):
    """The settings guard must see a store another machine made after this process listed the
    folder above it (a cached listing says the store is not there)."""
    from datacomp_sieve.errors import UserError
    from datacomp_sieve.score import ScoreConfig, score_pool

    s3.pipe(f"{BUCKET}/stores/README", b"score stores")
    s3.ls(f"{BUCKET}/stores")
    elsewhere.copy(f"{BUCKET}/pool/sieve_scores", f"{BUCKET}/stores/made_elsewhere", recursive=True)
    with pytest.raises(UserError, match="other settings"):
        score_pool(f"{pool}/shards", f"s3://{BUCKET}/stores/made_elsewhere",
                   ScoreConfig(captioner="label", device="cpu", batch_size=8, num_captions=2), progress=False)


def test_parts_of_a_job_array_on_s3_make_the_whole_store(pool, s3, toy_pool, capsys):
    from datacomp_sieve.cli import main

    stems = sorted(p.stem for p in (toy_pool / "shards").glob("*.tar"))
    parts = f"s3://{BUCKET}/parts"
    for k in range(2):
        assert main(["score", "--shards_dir", f"{pool}/shards", "--scores_dir", parts, "--part", f"{k}/2",
                     *SCORE]) == 0
        capsys.readouterr()
        assert main(["pool-info", "--shards_dir", f"{pool}/shards", "--scores_dir", parts]) == 0
        said = capsys.readouterr().out
        done = [s for s in stems if int(s) % 2 <= k]
        assert f"scored shards:            {len(done)} of {len(stems)} in {parts}" in said
        assert ("parts to rerun:           --part 1/2 (" in said) == (k == 0)
    m = json.loads(s3.cat(f"{BUCKET}/parts/manifest.json"))
    whole = json.loads(s3.cat(f"{BUCKET}/pool/sieve_scores/manifest.json"))
    assert m["shards"] == m["pool_shards"] == len(stems) and m["failed"] == {}
    assert (m["rows"], m["status"]) == (whole["rows"], whole["status"])
    for stem in stems:
        a = pq.read_table(io.BytesIO(s3.cat(f"{BUCKET}/parts/{stem}.parquet")))
        b = pq.read_table(io.BytesIO(s3.cat(f"{BUCKET}/pool/sieve_scores/{stem}.parquet")))
        assert a.select(["uid", "sieve_score", "captions"]).equals(b.select(["uid", "sieve_score", "captions"]))
    assert [n for n in s3.ls(f"{BUCKET}/parts", detail=False) if n.rsplit("/", 1)[-1].startswith(".tmp-")] == []


def test_of_two_jobs_creating_a_store_on_s3_with_other_settings_one_is_refused(s3, monkeypatch):
    """Both find the store absent, then the other job's config.json appears before this one writes
    its own: S3's conditional write keeps it, and this job is refused before it scores a shard."""
    from datacomp_sieve.errors import UserError
    from datacomp_sieve.store import ScoreStore

    url = f"s3://{BUCKET}/racing_store"
    real = ScoreStore.clean_tmp

    def other_job_meanwhile(self, *a, **kw):
        monkeypatch.setattr(ScoreStore, "clean_tmp", real)
        ScoreStore(url).open_for({"config": {"seed": 1}})
        return real(self, *a, **kw)

    monkeypatch.setattr(ScoreStore, "clean_tmp", other_job_meanwhile)
    with pytest.raises(UserError, match=r"other settings \(config.seed: 1 -> 0\)"):
        ScoreStore(url).open_for({"config": {"seed": 0}})
    assert ScoreStore(url).config() == {"config": {"seed": 1}}
    assert not [p for p in s3.ls(f"{BUCKET}/racing_store", detail=False, refresh=True) if ".tmp-" in p]
