"""Engines: a local Ray cluster and two worker processes give the in-process engine's store.

Faults are injected through the engines' ``scorer_factory``: a scorer that SIGKILLs its own
process in the middle of a chosen shard the first time (a marker file remembers it), and one that
raises on a chosen shard every time. The Ray cluster is started here (2 CPUs, no dashboard) and
shut down at the end; the store and the shards are given as ``file://`` URLs, as they would be on
a cluster (memory:// cannot be seen from other processes and is refused).
"""

import json
import logging
import os
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datacomp_sieve.cli import main
from datacomp_sieve.engines import ProcessEngine
from datacomp_sieve.errors import UserError
from datacomp_sieve.score import ScoreConfig, ShardScorer, ShardsFailed, score_pool
from datacomp_sieve.store import ScoreStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
STEMS = ["00000000", "00000001", "00000002"]


def config():
    return ScoreConfig(captioner="label", device="cpu", batch_size=8, num_captions=2)


class _KillMidShard:
    """Progress hook: after the first scored batch, the process kills itself (once per marker)."""

    def __init__(self, marker):
        self.marker = marker

    def update(self, n):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class KillOnceScorer(ShardScorer):
    def __init__(self, cfg, stem, marker):
        super().__init__(cfg)
        self.stem, self.marker = stem, marker

    def score(self, shard, progress=None):
        if shard.stem == self.stem:
            return super().score(shard, progress=_KillMidShard(self.marker))
        return super().score(shard, progress=progress)


class FailingScorer(ShardScorer):
    def __init__(self, cfg, stem):
        super().__init__(cfg)
        self.stem = stem

    def score(self, shard, progress=None):
        if shard.stem == self.stem:
            raise RuntimeError(f"boom on {shard.stem}")
        return super().score(shard, progress=progress)


class Factory:
    """Picklable scorer factory (workers import this module: it is on their PYTHONPATH)."""

    def __init__(self, cls, **kw):
        self.cls, self.kw = cls, kw

    def __call__(self, cfg):
        return self.cls(cfg, **self.kw)


@pytest.fixture(scope="module")
def reference(toy_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    score_pool(str(toy_pool / "shards"), str(out), config(), progress=False)
    return out


def assert_same_store(ref, other, stems=STEMS):
    other = Path(other)
    assert sorted(p.stem for p in other.glob("*.parquet")) == sorted(stems)
    for stem in stems:
        a, b = pq.read_table(Path(ref) / f"{stem}.parquet"), pq.read_table(other / f"{stem}.parquet")
        assert a.equals(b), stem
    uids = pq.read_table(sorted(other.glob("*.parquet"))).column("uid").to_pylist()
    assert len(uids) == len(set(uids))  # no row twice
    assert not [p for p in other.iterdir() if p.name.startswith(".tmp-")]


# -- local: in process, and one process per (fake) device -------------------------------------
def test_two_worker_processes_with_one_killed_mid_shard(toy_pool, reference, tmp_path):
    """Two worker processes on the CPU stand in for two GPUs: the dispatch, restart and retry are
    real; only the CUDA_VISIBLE_DEVICES pinning (skipped on the CPU) is not exercised."""
    out = tmp_path / "proc"
    marker = tmp_path / "killed"
    engine = ProcessEngine([0, 1], max_retries=2,
                           scorer_factory=Factory(KillOnceScorer, stem="00000001", marker=str(marker)))
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, engine=engine)
    assert marker.exists()  # a worker really died in the middle of 00000001
    assert m["run"]["respawned"] == 1 and list(m["run"]["retried"]) == ["00000001"]
    assert m["failed"] == {} and m["run"]["workers"] == 2
    assert_same_store(reference, out)
    assert m["rows"] == sum(pq.read_table(reference / f"{s}.parquet").num_rows for s in STEMS)


class DecodingScorer(ShardScorer):
    """What a GPU worker does: images decoded in processes of its own, the text half on a thread."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.decode_workers, self.overlap_text = 2, True


def test_a_workers_processes_fit_its_share_of_the_cores(monkeypatch):
    from types import SimpleNamespace

    from datacomp_sieve.engines import _decode_within
    from datacomp_sieve.score import gpu_processes, usable_cpus

    # the cores this process may use (a SLURM or container allocation), not the machine's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert usable_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cpus() == 64

    # one GPU's defaults: a text process per five cores (at most 3), decoding on the rest but two
    assert [gpu_processes(c) for c in (1, 2, 8, 10, 16, 64)] == [(1, 1), (1, 1), (1, 5), (2, 6), (3, 11), (3, 32)]
    # 8 GPUs on 96 cores: each worker's 12 (one for the worker itself)
    scorer = SimpleNamespace(text_workers=3, decode_workers=32)
    _decode_within(scorer, 12)
    assert (scorer.text_workers, scorer.decode_workers) == (2, 9)
    scorer = SimpleNamespace(text_workers=0, decode_workers=2)  # the CPU's: no text processes
    _decode_within(scorer, 1)
    assert (scorer.text_workers, scorer.decode_workers) == (0, 1)


def test_worker_processes_decode_images_in_processes_of_their_own(toy_pool, reference, tmp_path):
    out = tmp_path / "decoding"
    engine = ProcessEngine([0, 1], scorer_factory=Factory(DecodingScorer))
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False, engine=engine)
    assert m["failed"] == {} and m["run"]["workers"] == 2
    assert_same_store(reference, out)
    store = ScoreStore(str(out))
    # 1 core per worker here; crops through shared memory
    assert {store.shard_stats(s)["image_decoding"] for s in STEMS} == {"processes (1, shared memory)"}


def test_in_process_failure_is_reported_and_the_cli_exits_non_zero(toy_pool, reference, tmp_path, monkeypatch,
                                                                    capsys):
    real = ShardScorer.score

    def fail_one(self, shard, progress=None):
        if shard.stem == "00000000":
            raise ValueError("unreadable\nsecond line")
        return real(self, shard, progress)

    monkeypatch.setattr(ShardScorer, "score", fail_one)
    out = tmp_path / "cli"
    logger = logging.getLogger("datacomp_sieve")  # the CLI binds a handler to the captured stderr
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, attr, list(logger.handlers) if attr == "handlers" else getattr(logger, attr))
    rc = main(["score", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(out), "--captioner", "label",
               "--device", "cpu", "--batch_size", "8", "--num_captions", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert "1 of 3 shard(s) failed: 00000000 (ValueError: unreadable)" in err[-1]
    assert_same_store(reference, out, STEMS[1:])
    m = json.loads((out / "manifest.json").read_text())
    assert m["failed"] == {"00000000": "ValueError: unreadable"} and m["run"]["shards_scored"] == 2
    monkeypatch.setattr(ShardScorer, "score", real)
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False)  # the rerun retries it
    assert m["failed"] == {} and m["run"]["shards_skipped"] == 2
    assert_same_store(reference, out)


def test_the_in_process_bar_shows_shards_done_beside_images():
    """The README: the driver shows shards and samples done, rate and ETA; the in-process engine (the
    default with 0-1 GPU) said images only."""
    from types import SimpleNamespace

    from datacomp_sieve.engines import InProcessEngine

    class Scorer:
        def score(self, shard, progress=None):
            if shard.stem == "00000001":
                raise RuntimeError("boom")
            progress.update(10)
            return SimpleNamespace(table=None, stats={})

    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, []

        def update(self, n):
            self.n += n

        def set_postfix_str(self, s, refresh=True):
            self.postfix.append(s)

    bar, written = Bar(), []
    store = SimpleNamespace(write_shard=lambda stem, table, stats: written.append(stem))
    failed = InProcessEngine(scorer=Scorer()).run([SimpleNamespace(stem=s) for s in STEMS], store, bar)
    assert list(failed) == ["00000001"] and written == ["00000000", "00000002"] and bar.n == 20
    assert bar.postfix == ["shards 1/3", "shards 1/3", "shards 2/3"]


# -- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'datacomp-sieve[ray]')")
    path = os.pathsep.join([str(HERE), *[p for p in sys.path if p]])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")),
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def ray_engine(**kw):
    from datacomp_sieve.engines import RayEngine

    return RayEngine(address=None, cpus_per_worker=1, **kw)


def file_url(p):
    return "file://" + str(p)


def test_ray_two_workers_on_file_urls_match_the_local_engine(ray_cluster, toy_pool, reference, tmp_path):
    out = tmp_path / "ray"
    m = score_pool(file_url(toy_pool / "shards"), file_url(out), config(), progress=False, engine=ray_engine())
    assert m["run"]["engine"] == "ray" and m["run"]["workers"] == 2
    assert len(m["run"]["shards_by_worker"]) == 2  # both actors scored shards
    assert m["failed"] == {} and m["run"]["retried"] == {}
    assert_same_store(reference, out)
    # resume and the configuration check are the local engine's
    again = score_pool(file_url(toy_pool / "shards"), file_url(out), config(), progress=False, engine=ray_engine())
    assert again["run"]["shards_skipped"] == 3 and again["run"]["shards_scored"] == 0
    with pytest.raises(UserError, match="other settings"):
        score_pool(str(toy_pool / "shards"), str(out), ScoreConfig(**{**config().__dict__, "seed": 1}),
                   progress=False, engine=ray_engine())


def test_ray_runs_a_part_of_the_pool_and_the_parts_make_the_whole_store(ray_cluster, toy_pool, reference,
                                                                       tmp_path):
    out = tmp_path / "ray_parts"
    m = score_pool(file_url(toy_pool / "shards"), file_url(out), config(), progress=False, engine=ray_engine(),
                   part="0/2")
    assert sorted(p.stem for p in out.glob("*.parquet")) == ["00000000", "00000002"] and m["shards"] == 2
    m = score_pool(file_url(toy_pool / "shards"), file_url(out), config(), progress=False, engine=ray_engine(),
                   part="1/2")
    assert m["shards"] == 3 and m["run"]["shards_scored"] == 1 and m["run"]["engine"] == "ray"
    assert_same_store(reference, out)


def test_ray_worker_killed_mid_shard_is_retried_exactly_once(ray_cluster, toy_pool, reference, tmp_path):
    out = tmp_path / "ray_killed"
    marker = tmp_path / "killed"
    engine = ray_engine(max_retries=2, scorer_factory=Factory(KillOnceScorer, stem="00000002", marker=str(marker)))
    m = score_pool(file_url(toy_pool / "shards"), file_url(out), config(), progress=False, engine=engine)
    assert marker.exists()
    assert m["run"]["respawned"] == 1 and list(m["run"]["retried"]) == ["00000002"]
    assert "worker died" in m["run"]["retried"]["00000002"]
    assert m["failed"] == {}
    assert_same_store(reference, out)


def test_ray_shard_that_always_fails_is_reported_and_the_others_complete(ray_cluster, toy_pool, reference,
                                                                         tmp_path):
    out = tmp_path / "ray_failed"
    engine = ray_engine(max_retries=1, scorer_factory=Factory(FailingScorer, stem="00000001"))
    with pytest.raises(ShardsFailed, match=r"1 of 3 shard\(s\) failed: 00000001 \(RuntimeError: boom on 00000001\)"):
        score_pool(file_url(toy_pool / "shards"), file_url(out), config(), progress=False, engine=engine)
    m = json.loads((out / "manifest.json").read_text())
    assert m["failed"] == {"00000001": "RuntimeError: boom on 00000001"}
    assert m["run"]["retried"] == {"00000001": "RuntimeError: boom on 00000001"}  # tried twice in all
    assert_same_store(reference, out, ["00000000", "00000002"])


def test_ray_refuses_memory_urls(ray_cluster):
    with pytest.raises(UserError, match="memory://"):
        ray_engine().run([], ScoreStore("memory://sieve-store"), None)
