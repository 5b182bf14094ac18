"""Engines: who runs the shards. ``score_pool`` keeps the store, resume and manifest logic.

An engine resolves the configuration, loads the models (``start``, which returns their
description for the store's identity), runs a list of shards that the store lacks (``run``,
which writes each shard through ``ScoreStore.write_shard`` and returns ``{stem: error}`` for the
shards that failed), and says what it did (``info``). Resume and the configuration check happen
in ``score_pool`` before any engine runs a shard, so every engine resumes the same way.

- ``InProcessEngine``: the models in this process, one shard after another.
- ``ProcessEngine``: one worker process per device (``--engine local`` with 2 or more GPUs).
- ``RayEngine``: one actor per GPU (or per ``cpus_per_worker`` CPUs) on a Ray cluster.

A worker writes its shard's file itself (temporary name, then rename), so a worker killed
mid-shard leaves no score file (at most a temporary one, removed by a later run once it is hours
old), and the shard is given to another worker (or a fresh one).
A shard is tried at most ``1 + max_retries`` times; one that never succeeds is reported, and the
others are completed.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import traceback
from dataclasses import asdict

from .errors import UserError, error_line, first_line
from .metadata import protocols

log = logging.getLogger(__name__)


def _scorer_factory(factory):
    if factory is not None:
        return factory
    from .score import ShardScorer

    return ShardScorer


def _absolute(url: str) -> str:
    """Local paths are made absolute: workers need not share the driver's working directory."""
    return url if "://" in url else os.path.abspath(url)


class _Ledger:
    """Attempts, failures and the progress bar, shared by the engines that dispatch shards."""

    def __init__(self, shards, store, bar, max_retries: int):
        self.queue = collections.deque(shards)
        self.store = store
        self.bar = bar
        self.max_retries = max_retries
        self.attempts: dict = collections.Counter()
        self.failed: dict = {}
        self.retried: dict = {}
        self.done = 0
        self.total = len(shards)
        self.by_worker: dict = collections.Counter()

    def next(self):
        return self.queue.popleft() if self.queue else None

    def finished(self, shard, rows: int, worker) -> None:
        self.done += 1
        self.by_worker[str(worker)] += 1
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"shards {self.done}/{self.total}", refresh=True)

    def failure(self, shard, error: str) -> None:
        """One failed attempt: retry the shard, or give up on it after ``1 + max_retries`` tries."""
        self.attempts[shard.stem] += 1
        if self.store.done(shard.stem):  # written, then the worker died before it could say so
            log.info("shard %s was written before its worker failed (%s)", shard.stem, error)
            self.finished(shard, self.store.shard_stats(shard.stem).get("rows", 0), "recovered")
            return
        if self.attempts[shard.stem] > self.max_retries:
            log.error("shard %s failed %d time(s), giving up: %s", shard.stem, self.attempts[shard.stem], error)
            self.failed[shard.stem] = error
        else:
            log.warning("shard %s failed (%s); retrying (attempt %d of %d)", shard.stem, error,
                        self.attempts[shard.stem] + 1, self.max_retries + 1)
            self.retried[shard.stem] = error
            self.queue.append(shard)

    def give_up(self, reason: str) -> None:
        while self.queue:
            self.failed[self.queue.popleft().stem] = reason

    def info(self) -> dict:
        return {"retried": dict(self.retried), "shards_by_worker": dict(self.by_worker)}


# -- in-process --------------------------------------------------------------------------------
class InProcessEngine:
    """The models in this process, one shard after another (a shard that raises is reported)."""

    name = "local"

    def __init__(self, scorer=None, scorer_factory=None):
        self.scorer = scorer
        self.owns_scorer = scorer is None  # a scorer handed in stays open for its owner's next run
        self.factory = _scorer_factory(scorer_factory)
        self._info: dict = {}

    def resolve(self, config):
        return config.resolved()

    def start(self, cfg, n_shards: int | None = None) -> dict:
        if self.scorer is None:
            self.scorer = self.factory(cfg)
        return self.scorer.describe()

    def run(self, shards, store, bar) -> dict:
        failed = {}
        for i, shard in enumerate(shards, 1):
            try:
                result = self.scorer.score(shard, progress=bar)
                store.write_shard(shard.stem, result.table, result.stats)
            except Exception as e:  # noqa: BLE001 - one shard's failure must not lose the others
                log.error("shard %s failed: %s", shard.stem, error_line(e))
                log.debug("%s", traceback.format_exc())
                failed[shard.stem] = error_line(e)
            if bar is not None:  # shards done beside the images, as the other engines' bars show
                bar.set_postfix_str(f"shards {i - len(failed)}/{len(shards)}", refresh=True)
        self._info = {"workers": 1}
        return failed

    def info(self) -> dict:
        return {"engine": self.name, **self._info}

    def close(self) -> None:
        if self.owns_scorer and self.scorer is not None and hasattr(self.scorer, "close"):
            self.scorer.close()


# -- one process per device --------------------------------------------------------------------
def _decode_within(scorer, cpus: int) -> None:
    """A worker's text and image-decoding processes fit its share of the cores (one left for the
    worker): at most ``score.text_share`` text processes, the decoding processes on the rest."""
    from .score import text_share

    text = getattr(scorer, "text_workers", 0)
    if text:
        scorer.text_workers = text = min(text, text_share(cpus))
    if getattr(scorer, "decode_workers", 0):
        scorer.decode_workers = min(scorer.decode_workers, max(1, cpus - 1 - text))


def _process_worker(conn, device, cfg_dict, factory, pin_cuda: bool, threads: int) -> None:
    """A ``ProcessEngine`` worker: Ctrl-C is the driver's, SIGTERM (from the driver, a scheduler, or
    once the driver is gone: ``stopping.as_child``) stops its decoding and text processes and frees
    their shared memory before it exits (143, without a traceback)."""
    import signal
    import sys

    from .stopping import Terminated, as_child, raise_terminated

    as_child()
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        _serve(conn, device, cfg_dict, factory, pin_cuda, threads)
    except Terminated:
        sys.exit(128 + signal.SIGTERM)


def _serve(conn, device, cfg_dict, factory, pin_cuda: bool, threads: int) -> None:
    """A ``ProcessEngine`` worker's work: pin its GPU before torch starts, load once, score many shards."""
    if pin_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)  # "cuda" is now this process's GPU
    import torch

    torch.set_num_threads(threads)  # the machine's cores shared between the workers
    from .score import ScoreConfig
    from .store import ScoreStore

    try:
        scorer = factory(ScoreConfig(**cfg_dict))
        _decode_within(scorer, threads)
        conn.send(("ready", scorer.describe(), os.getpid()))
    except Exception as e:  # noqa: BLE001
        conn.send(("init_error", error_line(e), os.getpid()))
        return
    stores: dict = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the driver is gone
                msg = None
            if msg is None:
                return
            shard, store_url = msg
            try:
                result = scorer.score(shard)
                store = stores.setdefault(store_url, ScoreStore(store_url))
                store.write_shard(shard.stem, result.table, result.stats)
                conn.send(("done", shard.stem, result.table.num_rows))
            except Exception as e:  # noqa: BLE001
                conn.send(("error", shard.stem, error_line(e)))
    finally:  # told to stop, or stopped (SIGTERM): its processes and shared memory go too
        if hasattr(scorer, "close"):
            scorer.close()


class ProcessEngine:
    """One worker process per device on this machine; the driver hands out one shard at a time.

    ``devices`` are CUDA device indices; each worker sets ``CUDA_VISIBLE_DEVICES`` to its own
    before importing torch when the configuration runs on CUDA (on the CPU the indices only name
    the workers, which is how the tests exercise the dispatch).
    """

    name = "local"

    def __init__(self, devices, max_retries: int = 3, scorer_factory=None, max_respawns: int | None = None):
        self.devices = list(devices)
        self.max_retries = max_retries
        self.factory = _scorer_factory(scorer_factory)
        self.max_respawns = max_respawns if max_respawns is not None else max(1, max_retries) * len(self.devices)
        self.workers: dict = {}  # device -> (process, conn)
        self.respawns = 0
        self._info: dict = {}

    def resolve(self, config):
        return config.resolved()

    def _spawn(self, device):
        import multiprocessing as mp

        from .score import usable_cpus

        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA
        parent, child = ctx.Pipe()
        # not a daemon: a worker starts image-decoding processes of its own (daemons may not have
        # children); it ends when the driver says so or its pipe closes, and close() joins it
        p = ctx.Process(target=_process_worker, daemon=False, name=f"sieve-worker-{device}",
                        args=(child, device, asdict(self.cfg), self.factory, self.cfg.device.startswith("cuda"),
                              max(1, usable_cpus() // len(self.devices))))
        p.start()
        child.close()
        self.workers[device] = (p, parent)
        return p, parent

    def _wait_ready(self, device) -> dict:
        p, conn = self.workers[device]
        try:
            kind, payload, _pid = conn.recv()
        except EOFError:
            p.join(5)
            raise UserError(f"scoring worker for device {device} died while loading the models "
                            f"(exit code {p.exitcode})") from None
        if kind != "ready":
            raise UserError(f"scoring worker for device {device} could not load the models: {payload}")
        return payload

    def start(self, cfg, n_shards: int | None = None) -> dict:
        self.cfg = cfg
        if n_shards is not None:
            self.devices = self.devices[: max(1, n_shards)]
        for d in self.devices:
            self._spawn(d)
        try:
            descriptions = [self._wait_ready(d) for d in self.devices]
        except BaseException:
            self.close()
            raise
        return descriptions[0]

    def run(self, shards, store, bar) -> dict:
        ledger = _Ledger(shards, store, bar, self.max_retries)
        store_url = _absolute(store.url)
        busy: dict = {}  # device -> shard
        try:
            self._dispatch(ledger, store_url, busy)
        except BaseException:  # interrupted: the shards in progress are given up now, not waited for
            for d in busy:
                if d in self.workers:
                    self.workers[d][0].terminate()
            raise
        self._info = {"workers": len(self.devices), "devices": self.devices, "respawned": self.respawns,
                      **ledger.info()}
        return ledger.failed

    def _dispatch(self, ledger, store_url: str, busy: dict) -> None:
        """Hand out the shards until none is left or in progress (``busy``: device -> its shard)."""
        from multiprocessing.connection import wait

        while ledger.queue or busy:
            for d in list(self.workers):
                if d not in busy and ledger.queue:
                    p, conn = self.workers[d]
                    try:
                        if not p.is_alive():
                            raise BrokenPipeError
                        conn.send((ledger.queue[0], store_url))
                    except (BrokenPipeError, OSError):  # died while idle: no shard lost, replace it
                        self._replace(d)
                        continue
                    busy[d] = ledger.next()
            if not busy:
                if not self.workers:  # shards left but no worker
                    ledger.give_up("no scoring worker left")
                    break
                continue  # a replaced worker takes the next shard
            waitables = {}
            for d in busy:
                p, conn = self.workers[d]
                waitables[conn] = d
                waitables[p.sentinel] = d
            for ready in wait(list(waitables)):
                d = waitables[ready]
                if d not in busy:
                    continue  # already handled through the other handle
                p, conn = self.workers[d]
                try:
                    msg = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    msg = None
                if msg is None and p.is_alive():
                    continue
                shard = busy.pop(d)
                if msg is not None and msg[0] == "done":
                    ledger.finished(shard, msg[2], d)
                elif msg is not None and msg[0] == "error":
                    ledger.failure(shard, msg[2])
                else:  # the process died mid-shard
                    p.join(5)
                    ledger.failure(shard, f"worker process for device {d} died (exit code {p.exitcode})")
                    self._replace(d)

    def _replace(self, d) -> None:
        self.workers.pop(d, None)
        if self.respawns >= self.max_respawns:
            log.error("worker for device %s died and the respawn limit (%d) is reached", d, self.max_respawns)
            return
        self.respawns += 1
        self._spawn(d)
        try:
            self._wait_ready(d)
        except UserError as e:
            log.error("%s", e)
            self.workers.pop(d, None)

    def info(self) -> dict:
        return {"engine": self.name, **self._info}

    def close(self) -> None:
        for p, conn in self.workers.values():
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.time() + 10  # for all of them: a scheduler's SIGKILL follows its SIGTERM in ~30 s
        for p, _ in self.workers.values():
            p.join(max(0.0, deadline - time.time()))
            if p.is_alive():
                p.terminate()  # its processes and shared memory are freed (``_process_worker``)
        for p, _ in self.workers.values():
            p.join(5)
            if p.is_alive():
                p.kill()
        self.workers.clear()


def local_engine(config, scorer=None, max_retries: int = 3, scorer_factory=None):
    """``--engine local``: one process per visible GPU, or the in-process loop with 0-1 GPUs."""
    cfg = config.resolved()
    n = 0
    if scorer is None and cfg.device == "cuda":  # "cuda:1" names one GPU: stay in process
        import torch

        n = torch.cuda.device_count()
    if n >= 2:
        log.info("--engine local: one worker process per GPU (%d)", n)
        return ProcessEngine(range(n), max_retries=max_retries, scorer_factory=scorer_factory)
    return InProcessEngine(scorer, scorer_factory=scorer_factory)


# -- Ray ---------------------------------------------------------------------------------------
class _RayWorker:
    """A Ray actor: builds its scorer (models) once, then scores and writes many shards."""

    def __init__(self, cfg_dict, factory, threads):
        import torch

        from .score import ScoreConfig

        if threads:
            torch.set_num_threads(int(threads))
        self.scorer = factory(ScoreConfig(**cfg_dict))
        if threads:
            _decode_within(self.scorer, int(threads))
        self.stores: dict = {}

    def describe(self):
        return self.scorer.describe()

    def pid(self):
        return os.getpid()

    def score(self, shard, store_url):
        from .store import ScoreStore

        result = self.scorer.score(shard)
        store = self.stores.setdefault(store_url, ScoreStore(store_url))
        store.write_shard(shard.stem, result.table, result.stats)
        return result.table.num_rows


class RayEngine:
    """Shard-level tasks on a Ray cluster: one actor per ``gpus_per_worker`` GPUs (or CPUs)."""

    name = "ray"

    def __init__(self, address: str | None = "auto", gpus_per_worker: float = 1, cpus_per_worker: float = 1,
                 max_retries: int = 3, num_workers: int | None = None, scorer_factory=None,
                 max_respawns: int | None = None):
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UserError("--engine ray needs Ray: pip install 'datacomp-sieve[ray]'")
        if gpus_per_worker <= 0 or cpus_per_worker <= 0:
            raise UserError("--gpus_per_worker and --cpus_per_worker must be positive")
        if max_retries < 0:
            raise UserError("--max_retries must be 0 or more")
        self.address = address
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.max_retries = max_retries
        self.num_workers = num_workers
        self.factory = _scorer_factory(scorer_factory)
        self.max_respawns = max_respawns
        self.actors: list = []
        self.respawns = 0
        self._owns_ray = False
        self._info: dict = {}

    def _init(self):
        import ray

        from .stopping import keeping_sigterm

        if not ray.is_initialized():
            address = None if self.address in (None, "", "local") else self.address
            try:
                with keeping_sigterm():  # ray.init's handler exits at once; the CLI's unwinds (stopping.py)
                    ray.init(address=address, include_dashboard=False, log_to_driver=True)
            except (ConnectionError, ValueError) as e:  # ValueError: an address Ray cannot parse
                raise UserError(f"cannot reach the Ray cluster at --address {self.address} (auto, local or "
                                f"HOST:PORT): {first_line(e)}") from None
            self._owns_ray = True
        return ray

    def resolve(self, config):
        """The device is the workers', not the driver's: a CPU head node may drive GPU workers."""
        ray = self._init()
        self.cluster = ray.cluster_resources()
        return config.resolved(has_gpu=float(self.cluster.get("GPU", 0)) > 0, where="the Ray cluster has")

    def _workers_wanted(self, cfg) -> tuple[int, dict]:
        gpus = float(self.cluster.get("GPU", 0))
        cpus = float(self.cluster.get("CPU", 0))
        if cfg.device.startswith("cuda"):
            n = int(gpus // self.gpus_per_worker)
            opts = {"num_gpus": self.gpus_per_worker, "num_cpus": self.cpus_per_worker}
        else:
            n = int(cpus // self.cpus_per_worker)
            opts = {"num_cpus": self.cpus_per_worker}
        if self.num_workers:
            n = min(n, self.num_workers) if n else self.num_workers
        if n < 1:
            raise UserError(f"the Ray cluster ({int(cpus)} CPUs, {int(gpus)} GPUs) has room for no worker of "
                            f"{self.gpus_per_worker} GPU(s) / {self.cpus_per_worker} CPU(s)")
        return n, opts

    def _new_actor(self):
        return self._actor_cls.remote(asdict(self.cfg), self.factory, int(self.cpus_per_worker))

    def start(self, cfg, n_shards: int | None = None) -> dict:
        ray = self._init()
        self.cfg = cfg
        n, opts = self._workers_wanted(cfg)
        if n_shards is not None:
            n = max(1, min(n, n_shards))
        if self.max_respawns is None:
            self.max_respawns = max(1, self.max_retries) * n
        self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **opts)(_RayWorker)
        log.info("--engine ray: %d worker(s) of %s on %s", n, opts, self.cluster)
        self.actors = [self._new_actor() for _ in range(n)]
        try:
            descriptions = ray.get([a.describe.remote() for a in self.actors])
        except Exception as e:  # noqa: BLE001
            self.close()
            cause = getattr(e, "cause", None) or e
            raise UserError(f"Ray workers could not load the models: {error_line(cause)}") from None
        return descriptions[0]

    def run(self, shards, store, bar) -> dict:
        import ray
        from ray.exceptions import RayError, RayTaskError

        for what, fs in [("--scores_dir", store.fs)] + [("--shards_dir", s.fs) for s in shards[:1] if s.fs]:
            if "memory" in protocols(fs):
                raise UserError(f"{what} is on memory://, which lives in one process; Ray workers cannot see it "
                                f"(use a shared path, file://, s3:// or gs://)")
        ledger = _Ledger(shards, store, bar, self.max_retries)
        store_url = _absolute(store.url)
        idle = list(range(len(self.actors)))
        inflight: dict = {}  # ref -> (slot, shard)
        while ledger.queue or inflight:
            while idle and ledger.queue:
                slot = idle.pop()
                shard = ledger.next()
                inflight[self.actors[slot].score.remote(shard, store_url)] = (slot, shard)
            if not inflight:
                ledger.give_up("no Ray worker left")
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, shard = inflight.pop(ref)
                try:
                    rows = ray.get(ref)
                except RayTaskError as e:  # the shard raised; the actor is fine
                    ledger.failure(shard, error_line(getattr(e, "cause", None) or e))
                    idle.append(slot)
                except RayError as e:  # the worker process (or its node) died mid-shard
                    ledger.failure(shard, f"worker died ({error_line(e)})")
                    if self._replace(slot):
                        idle.append(slot)
                else:
                    ledger.finished(shard, rows, slot)
                    idle.append(slot)
        self._info = {"workers": len(self.actors), "respawned": self.respawns,
                      "resources_per_worker": {k: v for k, v in self._actor_opts().items()}, **ledger.info()}
        return ledger.failed

    def _actor_opts(self) -> dict:
        return ({"GPU": self.gpus_per_worker, "CPU": self.cpus_per_worker} if self.cfg.device.startswith("cuda")
                else {"CPU": self.cpus_per_worker})

    def _replace(self, slot) -> bool:
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.respawns >= self.max_respawns:
            log.error("a Ray worker died and the respawn limit (%d) is reached", self.max_respawns)
            return False
        self.respawns += 1
        self.actors[slot] = self._new_actor()
        return True

    def info(self) -> dict:
        return {"engine": self.name, "address": self.address, **self._info}

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def build_engine(name: str, config, *, scorer=None, address: str | None = "auto", gpus_per_worker: float = 1,
                 cpus_per_worker: float = 1, max_retries: int = 3, scorer_factory=None):
    """The engine a ``--engine`` name asks for."""
    if max_retries < 0:
        raise UserError(f"--max_retries must be 0 or more, got {max_retries}")
    if name == "local":
        return local_engine(config, scorer=scorer, max_retries=max_retries, scorer_factory=scorer_factory)
    if name == "ray":
        return RayEngine(address=address, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                         max_retries=max_retries, scorer_factory=scorer_factory)
    raise UserError(f"--engine must be local or ray, got {name}")
