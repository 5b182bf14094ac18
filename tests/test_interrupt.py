"""A scoring run stopped as jobs are stopped: Ctrl-C (SIGINT to the terminal's process group), SIGTERM
(to the whole job, as Slurm does at its time limit, or to the main process, as ``docker stop`` and
``kill PID`` do), SIGKILL (of the main process, or of all of them).

Each test starts ``datacomp-sieve score`` in a session of its own, with images decoded in processes
through the shared-memory ring and a text process (a GPU's settings, switched on on the CPU), waits
for the first score file, sends the signal, and checks what is left: the exit status and the
message, processes of the session, the ring in /dev/shm, temporary files; then a rerun resumes.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datacomp_sieve.score import ScoreConfig, ShardScorer, _remove_dead_rings, _ring_prefix, score_pool

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: the child: the CLI with decoding and text processes on (in this process, or in a ProcessEngine
#: worker with ``procs``, as with several GPUs)
CHILD = """
import sys
from datacomp_sieve import cli, engines
from test_interrupt import DecodingScorer
if sys.argv[1] == "procs":
    engines.local_engine = lambda config, **kw: engines.ProcessEngine([0], scorer_factory=DecodingScorer)
else:
    engines.local_engine = lambda config, **kw: engines.InProcessEngine(scorer_factory=DecodingScorer)
sys.exit(cli.main(sys.argv[2:]))
"""


class DecodingScorer(ShardScorer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.decode_workers, self.text_workers, self.overlap_text = 2, 1, True


def config():
    return ScoreConfig(captioner="label", device="cpu", batch_size=8, num_captions=2)


@pytest.fixture(scope="module")
def reference(toy_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    score_pool(str(toy_pool / "shards"), str(out), config(), progress=False)
    return out


def start(toy_pool, out, how="in process", extra=()):
    cmd = [sys.executable, "-c", CHILD, "procs" if how == "procs" else "-", "score", "--shards_dir",
           str(toy_pool / "shards"), "--scores_dir", str(out), "--captioner", "label", "--device", "cpu",
           "--batch_size", "8", "--num_captions", "2", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    """A job a script starts in the background (CI's, ``cmd &``) inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt; the run started here takes Ctrl-C as a terminal's job does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_a_shard(p, out, timeout=60):
    t = time.time()
    while not list(Path(out).glob("0*.parquet")):
        assert p.poll() is None, p.communicate()
        assert time.time() - t < timeout, "no shard scored in time"
        time.sleep(0.05)


def session(sid: int) -> list:
    """The processes of session ``sid`` (``start_new_session``: the child's pid)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d))
    return out


def rings_of(pid: int) -> list:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{_ring_prefix()}{pid}-")]


def wait_until(what, timeout=20):
    t = time.time()
    while not what():
        assert time.time() - t < timeout
        time.sleep(0.2)


def assert_resumes(toy_pool, reference, out):
    m = score_pool(str(toy_pool / "shards"), str(out), config(), progress=False)
    assert m["run"]["shards_skipped"] >= 1 and m["failed"] == {}
    assert sorted(p.name for p in Path(out).glob("*.parquet")) == sorted(p.name for p in reference.glob("*.parquet"))
    for a in reference.glob("*.parquet"):
        assert pq.read_table(a).equals(pq.read_table(Path(out) / a.name)), a.name
    assert not [p for p in Path(out).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("sig, group, status, rerun", [
    ("SIGINT", True, 130, True),  # Ctrl-C in a terminal
    ("SIGTERM", True, 143, False),  # Slurm's time limit or preemption: every process of the job
    ("SIGTERM", False, 143, False),  # docker stop, kill PID: the main process only
], ids=["ctrl-c", "sigterm-to-the-job", "sigterm-to-the-main-process"])
def test_an_interrupted_run_says_how_to_resume_in_one_line_and_leaves_nothing(toy_pool, reference, tmp_path, sig,
                                                                              group, status, rerun):
    out = tmp_path / "store"
    p = start(toy_pool, out)
    wait_for_a_shard(p, out)
    (os.killpg if group else os.kill)(p.pid, getattr(signal, sig))
    _, err = p.communicate(timeout=30)
    assert p.returncode == status, err
    last = err.strip().splitlines()[-1]
    name = "Ctrl-C (SIGINT)" if sig == "SIGINT" else "SIGTERM"
    assert last.startswith(f"datacomp-sieve: interrupted by {name}: ") and "of the 3 shard(s) are scored in" in last
    assert "rerun the same command" in last
    assert "Traceback" not in err and "leaked" not in err  # no worker's traceback, no resource tracker's warning
    wait_until(lambda: not session(p.pid))  # the decoding and text processes are gone too
    assert not rings_of(p.pid)  # and their shared memory
    assert (out / "config.json").exists() and not (out / "manifest.json").exists()  # the last finished run's, none yet
    assert not [f for f in out.iterdir() if f.name.startswith(".tmp-")]
    if rerun:
        assert_resumes(toy_pool, reference, out)


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "every-process"])
def test_a_killed_run_leaves_no_processes_and_its_shared_memory_goes(toy_pool, tmp_path, group):
    """SIGKILL: the main process cannot clean up. Its children notice it is gone and end (with them
    the resource tracker, which frees the ring); killed with them, the ring stays in /dev/shm until the
    next run on the machine removes it."""
    out = tmp_path / "store"
    p = start(toy_pool, out)
    wait_for_a_shard(p, out)
    assert rings_of(p.pid)
    (os.killpg if group else os.kill)(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    wait_until(lambda: not session(p.pid))
    if group:
        assert rings_of(p.pid)  # nobody was left to free it
        _remove_dead_rings()  # what the next run does before it makes its own
        # the pools' semaphores (32 bytes each) stay too; joblib, once imported, names them after the pid
        for name in os.listdir("/dev/shm"):
            if name.startswith(f"sem.loky-{p.pid}-"):
                os.unlink(f"/dev/shm/{name}")
    wait_until(lambda: not rings_of(p.pid))


def test_ctrl_c_with_a_worker_process_per_device(toy_pool, tmp_path):
    """--engine local on a machine with several GPUs (a CPU worker here), each worker with its own
    decoding and text processes: Ctrl-C stops them all at once, without a traceback from any."""
    out = tmp_path / "store"
    p = start(toy_pool, out, how="procs")
    wait_for_a_shard(p, out, timeout=90)
    t = time.time()
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert time.time() - t < 20  # the shards in progress are not waited for
    assert err.strip().splitlines()[-1].startswith("datacomp-sieve: interrupted by Ctrl-C (SIGINT): ")
    assert "Traceback" not in err
    wait_until(lambda: not session(p.pid))
    assert not [f for f in out.iterdir() if f.name.startswith(".tmp-")]


def test_sigterm_with_ray(toy_pool, tmp_path):
    """ray.init sets a SIGTERM handler of its own (sys.exit): the run's is kept, and Ray's
    interruption of a wait is still said as SIGTERM."""
    pytest.importorskip("ray")
    out = tmp_path / "store"
    p = start(toy_pool, out, extra=("--engine", "ray", "--address", "local"))
    wait_for_a_shard(p, out, timeout=120)
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("datacomp-sieve: interrupted by SIGTERM: ")


def test_the_cli_leaves_sigterm_as_it_found_it(toy_pool, tmp_path, capsys):
    from datacomp_sieve.cli import main

    before = signal.getsignal(signal.SIGTERM)
    main(["pool-info", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(tmp_path / "none")])
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_command_that_runs_another_is_interrupted_with_the_signal_s_status(tmp_path, capsys, monkeypatch):
    """demo (and reproduce) run filter/score through the CLI's entry within their own command: stopped
    there, the run exits 143 with the one 'interrupted' line (it exited 2, adding 'error: selection
    failed; see the message above' under it)."""
    from datacomp_sieve import cli, demo, score, toy_pool
    from datacomp_sieve.stopping import Terminated

    monkeypatch.setattr(demo, "choose_models", lambda: ("label", "none", ["captioner: label"]))
    monkeypatch.setattr(toy_pool, "build_toy_pool", lambda *a, **k: None)
    monkeypatch.setattr(score, "score_pool", lambda *a, **k: {})

    def stopped(args):
        raise Terminated()

    monkeypatch.setattr(cli, "run_filter", stopped)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--captioner", "label", "--quiet"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "datacomp-sieve: interrupted by SIGTERM", err
    assert not [line for line in err if "interrupted" in line or "error" in line][:-1], err


def test_an_interrupted_overwrite_run_says_to_resume_without_overwrite(toy_pool, reference, tmp_path):
    """--overwrite deletes the store before scoring: stopped after that, rerunning 'the same command'
    (as the message said) deleted the shards it had finished; it now says to rerun without --overwrite,
    which resumes. Stopped while the models load, nothing was deleted, and the same command is right."""

    class StopsAtTheSecondShard(ShardScorer):
        def score(self, shard, progress=None):
            if shard.stem != "00000000":
                raise KeyboardInterrupt
            return super().score(shard, progress=progress)

    out = tmp_path / "store"
    score_pool(str(toy_pool / "shards"), str(out), ScoreConfig(captioner="label", device="cpu", batch_size=8,
                                                               num_captions=3), progress=False)
    with pytest.raises(KeyboardInterrupt) as e:
        score_pool(str(toy_pool / "shards"), str(out), config(), overwrite=True, progress=False,
                   scorer=StopsAtTheSecondShard(config()))
    msg = str(e.value)
    assert msg.startswith("1 of the 3 shard(s) are scored in") and "rerun it without --overwrite" in msg, msg
    assert "the same command" not in msg
    assert_resumes(toy_pool, reference, out)

    class StopsWhileLoading(ShardScorer):
        def describe(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as e:
        score_pool(str(toy_pool / "shards"), str(out), ScoreConfig(captioner="label", device="cpu", batch_size=8,
                                                                   num_captions=3),
                   overwrite=True, progress=False, scorer=StopsWhileLoading(config()))
    assert str(e.value) == f"{out} is as it was (nothing deleted or scored yet); rerun the same command"
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(p.name for p in reference.glob("*.parquet"))
