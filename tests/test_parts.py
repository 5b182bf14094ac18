"""Several jobs on one score store: ``score --part K/N`` (a job array), temporary files of live
writers, config.json and manifest.json written whole, the manifest counting what is there."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datacomp_sieve import cli
from datacomp_sieve.errors import UserError
from datacomp_sieve.score import ScoreConfig, ShardScorer, ShardsFailed, parse_part, part_of, score_pool
from datacomp_sieve.store import TMP_MAX_AGE_S, ScoreStore

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEMS = ["00000000", "00000001", "00000002"]
FLAGS = ["--captioner", "label", "--device", "cpu", "--batch_size", "8", "--num_captions", "2", "--quiet"]


def config():
    return ScoreConfig(captioner="label", device="cpu", batch_size=8, num_captions=2)


@pytest.fixture(scope="module")
def scorer():
    return ShardScorer(config())


@pytest.fixture(scope="module")
def reference(toy_pool, scorer, tmp_path_factory):
    """One run over the whole pool."""
    out = tmp_path_factory.mktemp("whole") / "store"
    score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer)
    return out


def assert_same_scores(ref, other):
    other = Path(other)
    assert sorted(p.stem for p in other.glob("*.parquet")) == STEMS
    for stem in STEMS:
        assert pq.read_table(Path(ref) / f"{stem}.parquet").equals(pq.read_table(other / f"{stem}.parquet")), stem
    assert not [p.name for p in other.iterdir() if p.name.startswith(".tmp-")]
    a, b = (json.loads((Path(s) / "manifest.json").read_text()) for s in (ref, other))
    for key in ("shards", "rows", "status", "tar", "truncated", "failed"):
        assert a[key] == b[key], key
    assert json.loads((Path(ref) / "config.json").read_text()) == json.loads((other / "config.json").read_text())


def test_the_parts_split_the_sorted_shards_once_each():
    shards = [f"{i:08d}" for i in (0, 1, 2, 3, 5, 8, 9)]  # gaps, as a pool with failed downloads has
    for n in range(1, 9):
        parts = [part_of(shards, k, n) for k in range(n)]
        assert sorted(s for p in parts for s in p) == shards
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert part_of(shards, 1, 3) == ["00000001", "00000005"]
    for k in range(3):  # shards added after the last one leave the others where they were
        assert part_of(shards + ["00000010", "00000011"], k, 3)[:len(part_of(shards, k, 3))] == part_of(shards, k, 3)
    assert parse_part(" 2/16 ") == (2, 16) and parse_part("0/1") == (0, 1)


def test_parts_run_one_after_another_make_the_whole_run_s_store(toy_pool, reference, scorer, tmp_path, caplog):
    out = tmp_path / "parts"
    caplog.set_level(logging.INFO, logger="datacomp_sieve")
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer, part="1/2")
    assert sorted(p.stem for p in out.glob("*.parquet")) == ["00000001"]
    assert m["shards"] == 1 and m["run"]["part"] == "1/2" and m["run"]["shards_scored"] == 1
    assert "part 1/2 is done: 1 of the pool's 3 shards are in" in caplog.text
    assert "the other parts' shards are still to come" in caplog.text
    caplog.clear()
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer, part="0/2")
    assert m["shards"] == 3 and m["run"]["shards_scored"] == 2  # the manifest counts every part's files
    assert "part 0/2 is done, and so is the store: all 3 shards are in" in caplog.text
    assert_same_scores(reference, out)
    again = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, part="1/2")
    assert again["run"]["shards_scored"] == 0 and again["shards"] == 3  # done: no model loaded


def test_two_jobs_started_together_each_with_its_part(toy_pool, reference, tmp_path):
    """A job array of two tasks: two real ``score`` processes on one new store at the same moment."""
    out = tmp_path / "array"
    jobs = [subprocess.Popen([sys.executable, "-m", "datacomp_sieve.cli", "score", "--shards_dir",
                              str(toy_pool / "shards"), "--scores_dir", str(out), *FLAGS, "--part", f"{k}/2"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
            for k in (0, 1)]
    results = [job.communicate(timeout=600) for job in jobs]
    for k, (job, (stdout, stderr)) in enumerate(zip(jobs, results)):
        assert job.returncode == 0, stderr
        assert f"part {k}/2 is done" in stderr
        assert f"{2 - k} of {2 - k} shard(s) to score (part {k}/2: {2 - k} of the pool's 3)" in stderr
    assert_same_scores(reference, out)


def test_the_manifest_keeps_another_part_s_failure_until_its_shard_is_scored(toy_pool, scorer, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "failing"
    real = ShardScorer.score

    def fail_first(self, shard, progress=None):
        if shard.stem == "00000000":
            raise ValueError("unreadable")
        return real(self, shard, progress)

    monkeypatch.setattr(ShardScorer, "score", fail_first)
    with pytest.raises(ShardsFailed, match=r"1 of 1 shard\(s\) of part 0/3 failed: 00000000 \(ValueError"):
        score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer, part="0/3")
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer, part="1/3")
    assert m["shards"] == 1 and m["failed"] == {"00000000": "ValueError: unreadable"}  # not tried here: kept
    monkeypatch.setattr(ShardScorer, "score", real)
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer, part="0/3")
    assert m["shards"] == 2 and m["failed"] == {}  # scored now: dropped
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, scorer=scorer, part="2/3")
    assert m["shards"] == 3 and m["rows"] == len(pq.read_table(sorted(out.glob("*.parquet"))))


@pytest.mark.parametrize("part, message", [
    ("3/3", "--part 3/3: parts are counted from 0, so K must be 0 to 2 (a job array numbered from 1"),
    ("7/1", "a task resubmitted alone has SLURM_ARRAY_TASK_COUNT=1: write N out"),
    ("-1/2", "--part -1/2: parts are counted from 0"),
    ("0/0", "--part 0/0: the number of parts must be at least 1"),
    ("1", "--part takes K/N (part K of N, K from 0 to N-1"),
    ("a/b", "--part takes K/N"),
    ("1/2/3", "--part takes K/N"),
    ("", "--part takes K/N"),
])
def test_bad_part_values_are_one_line_errors(toy_pool, tmp_path, capsys, part, message):
    rc = cli.main(["score", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(tmp_path / "s"), *FLAGS,
                   f"--part={part}"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("datacomp_sieve")]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_overwrite_is_refused_with_a_part(toy_pool, reference, tmp_path, capsys):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(reference, copy)
    rc = cli.main(["score", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(copy), *FLAGS,
                   "--part", "0/2", "--overwrite"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("datacomp_sieve")]
    assert rc == 2 and len(err) == 1 and "--overwrite deletes the whole store" in err[0], err
    assert sorted(p.stem for p in copy.glob("*.parquet")) == STEMS


def test_a_starting_job_leaves_the_temporary_files_of_live_writers(tmp_path):
    """Another job is writing a shard (its temporary file is new): a job opening the store leaves it;
    one left by a writer killed hours ago is removed."""
    out = tmp_path / "store"
    ScoreStore(str(out)).open_for({"config": {"seed": 0}})
    live, dead = out / ".tmp-00000001-0123abcd.parquet", out / ".tmp-00000002-4567ef01.parquet"
    live.write_bytes(b"being written")
    dead.write_bytes(b"left by a killed writer")
    old = time.time() - TMP_MAX_AGE_S - 60
    os.utime(dead, (old, old))
    ScoreStore(str(out)).open_for({"config": {"seed": 0}})
    assert live.exists() and not dead.exists()


def test_a_killed_config_writer_leaves_no_partial_config(tmp_path, monkeypatch):
    out = tmp_path / "store"
    real = json.dump

    def killed(obj, f, **kw):
        f.write('{"config": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        ScoreStore(str(out)).open_for({"config": {"seed": 0}})
    monkeypatch.setattr(json, "dump", real)
    assert ScoreStore(str(out)).config() is None and list(out.iterdir()) == []
    ScoreStore(str(out)).open_for({"config": {"seed": 0}})
    assert ScoreStore(str(out)).config() == {"config": {"seed": 0}}


def test_of_two_jobs_creating_a_store_with_other_settings_one_is_refused(tmp_path, monkeypatch):
    """Both find the store empty (their checks pass), then the other job's config.json appears
    before this one writes its own: it is kept, and this job is refused before it scores a shard."""
    out = tmp_path / "store"
    real = ScoreStore.clean_tmp

    def other_job_meanwhile(self, *a, **kw):
        monkeypatch.setattr(ScoreStore, "clean_tmp", real)
        ScoreStore(str(out)).open_for({"config": {"seed": 1}})
        return real(self, *a, **kw)

    monkeypatch.setattr(ScoreStore, "clean_tmp", other_job_meanwhile)
    with pytest.raises(UserError, match=r"other settings \(config.seed: 1 -> 0\)"):
        ScoreStore(str(out)).open_for({"config": {"seed": 0}})
    assert ScoreStore(str(out)).config() == {"config": {"seed": 1}}


def test_manifests_written_at_the_same_moment_are_each_whole(tmp_path):
    store = ScoreStore(str(tmp_path / "store"))
    store.open_for({"config": {"seed": 0}})
    errors = []

    def write(k):
        try:
            for i in range(100):
                store.write_manifest({"writer": k, "i": i, "pad": "x" * 20000})
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.manifest()["i"] == 99
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".tmp-")]
