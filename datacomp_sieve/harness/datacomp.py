"""The DataComp backend: DataComp's own scripts, run from a user's clone with DataComp's interpreter.

DataComp is not pip-installable and pins an old stack (torch 1.13, open-clip-torch 2.16.1,
webdataset 0.2.31: its resharder fails on webdataset 0.2.111 with ``AttributeError: ... Pipe``),
so its scripts run as subprocesses of ``--datacomp_python`` (the python of DataComp's own
environment), from the clone's folder, with DataComp's exact flags:

    python resharder.py -i SHARDS -o OUT -s SUBSET.npy [-j N] [--overwrite]
    python -m torch.distributed.run --nproc_per_node N train.py --scale S --data_dir D \\
        --output_dir O --exp_name E [--seed 0 ...]          (what ``torchrun`` runs)
    python evaluate.py --train_output_dir O/E [--data_dir EVAL] [--batch_size 64]
    python evaluate.py --track filtering --train_output_dir O/E --samples SUBSET.npy \\
        --dataset-size N --submit --method_name ... --author ... --email ... \\
        --hf_username ... --hf_repo_name ...

Logs stream through as they come; a non-zero exit or a missing output (``meta.json``,
``checkpoints/epoch_latest.pt``, ``eval_results.jsonl``) is a one-line ``UserError``. Pitfalls
handled: the resharder's output folder must exist and be empty (created here; a non-empty one
is refused unless ``--overwrite``, which is passed on); a submission without ``--dataset-size``
records a wrong size (DataComp issue #62) and one without ``--samples`` crashes, so both are
always passed (the size is the subset's uid count unless given).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

SCRIPTS = ("resharder.py", "train.py", "evaluate.py")

# Pool sizes (metadata rows) and bytes per downloaded sample (SPEC.md section 2: small 12.8M
# samples in 450 GB of tars, medium 128M in 4.5 TB, large 1.28B in 45 TB: about 35 kB each).
POOL_SAMPLES = {"debug": 128_000, "small": 12_800_000, "medium": 128_000_000, "large": 1_280_000_000,
                "xlarge": 12_800_000_000}
BYTES_PER_SAMPLE = 450e9 / 12.8e6
# Assumed training throughput per GPU (samples/s, A100-class, mixed precision), by model. An
# order-of-magnitude assumption of this tool, not a measurement: override it with
# --samples_per_gpu_second when you know your hardware's.
THROUGHPUT = {"ViT-B-32": 1500.0, "ViT-B-16": 600.0, "ViT-L-14": 200.0}
THROUGHPUT_NOTE = ("GPU-hours = the scale's samples seen / an ASSUMED training throughput per GPU "
                   "(ViT-B-32 1,500, ViT-B-16 600, ViT-L-14 200 samples/s: this tool's order-of-magnitude "
                   "guess for A100-class GPUs with amp, not a measurement; set --samples_per_gpu_second); "
                   "data size = fraction kept x the scale's pool (DataComp: small 12.8M, medium 128M, large "
                   "1.28B samples) x 35 kB per sample (DataComp's tars: 450 GB per 12.8M), before failed downloads")


def check_clone(datacomp: str) -> Path:
    d = Path(datacomp).expanduser().resolve()
    if not d.is_dir():
        raise UserError(f"--datacomp {datacomp} is not a folder: give your clone of github.com/mlfoundations/datacomp")
    missing = [s for s in SCRIPTS if not (d / s).is_file()]
    if missing:
        raise UserError(f"--datacomp {d} is not a DataComp clone: it lacks {', '.join(missing)}")
    return d


def check_python(python: str | None) -> str:
    if not python:
        return sys.executable
    p = Path(python).expanduser()
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise UserError(f"--datacomp_python {python} is not an executable: give the python of DataComp's "
                        "environment (e.g. ~/miniconda3/envs/datacomp/bin/python)")
    return str(p)


def _abs(p) -> str:
    return str(Path(p).expanduser().resolve())


def reshard_command(python: str, shards_dir: str, output_dir: str, subset: str, num_workers: int | None = None,
                    overwrite: bool = False) -> list[str]:
    cmd = [python, "resharder.py", "-i", _abs(shards_dir), "-o", _abs(output_dir), "-s", _abs(subset)]
    if num_workers:
        cmd += ["-j", str(num_workers)]
    if overwrite:
        cmd.append("--overwrite")
    return cmd


def train_command(python: str, data_dir: str, output_dir: str, exp_name: str, scale: str, num_gpus: int = 1,
                  seed: int | None = None, precision: str | None = None, workers: int | None = None,
                  accum_freq: int | None = None, num_checkpoints: int | None = None) -> list[str]:
    from .train import DATACOMP_SCALES

    if scale not in DATACOMP_SCALES:
        raise UserError(f"DataComp's train.py has the scales {', '.join(DATACOMP_SCALES)}; "
                        f"{scale!r} is this tool's own: run it without --datacomp")
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(num_gpus), "train.py",
           "--scale", scale, "--data_dir", _abs(data_dir), "--output_dir", _abs(output_dir), "--exp_name", exp_name]
    for flag, value in (("--seed", seed), ("--precision", precision), ("--workers", workers),
                        ("--accum_freq", accum_freq), ("--num_checkpoints", num_checkpoints)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def evaluate_command(python: str, train_output: str, data_dir: str | None = None, batch_size: int | None = None,
                     output_dir: str | None = None) -> list[str]:
    cmd = [python, "evaluate.py", "--train_output_dir", _abs(train_output)]
    if data_dir:
        cmd += ["--data_dir", _abs(data_dir)]
    if batch_size:
        cmd += ["--batch_size", str(batch_size)]
    if output_dir:
        cmd += ["--output_dir", _abs(output_dir)]
    return cmd


def subset_size(samples: str) -> int:
    """Uids in the subset file(s) (``::``-separated, DataComp's convention)."""
    from ..uids import read_subset

    return sum(len(read_subset(p)) for p in samples.split("::") if p.endswith(".npy"))


def submit_command(python: str, train_output: str, samples: str, dataset_size: int | None, method_name: str,
                   author: str, email: str, hf_username: str, hf_repo_name: str, track: str = "filtering",
                   writeup: str | None = None, upload_checkpoint: bool = False, data_dir: str | None = None) -> list[str]:
    missing = [f for f, v in (("--method_name", method_name), ("--author", author), ("--email", email),
                              ("--hf_username", hf_username), ("--hf_repo_name", hf_repo_name)) if not v]
    if missing:
        raise UserError(f"a submission needs {', '.join(missing)}")
    if not (Path(train_output) / "info.pkl").is_file():
        # checked here: DataComp's evaluate.py reads it first thing and fails with a traceback
        raise UserError(f"--train_output_dir {train_output} has no info.pkl: give the OUTPUT_DIR/EXP_NAME of a "
                        "training run")
    if not samples:
        raise UserError("a submission needs --samples (the subset .npy): DataComp's evaluate.py crashes without it")
    for p in samples.split("::"):
        if not os.path.isfile(p):
            raise UserError(f"--samples {p} does not exist")
    if dataset_size is None:
        dataset_size = subset_size(samples)
        if not dataset_size:
            raise UserError("--dataset-size is needed (the number of samples trained on); none could be counted "
                            "from --samples")
        log.info("--dataset-size %d (the uids in --samples)", dataset_size)
    cmd = [python, "evaluate.py", "--track", track, "--train_output_dir", _abs(train_output),
           "--samples", "::".join(_abs(p) for p in samples.split("::")), "--dataset-size", str(dataset_size),
           "--submit", "--method_name", method_name, "--author", author, "--email", email,
           "--hf_username", hf_username, "--hf_repo_name", hf_repo_name]
    if writeup:
        cmd += ["--writeup", writeup]
    if upload_checkpoint:
        cmd.append("--upload_checkpoint")
    if data_dir:
        cmd += ["--data_dir", _abs(data_dir)]
    return cmd


def show(cmd: list[str], cwd: Path) -> str:
    return f"(cd {shlex.quote(str(cwd))} && {shlex.join(cmd)})"


def run(step: str, cmd: list[str], cwd: Path, expect: list[Path] = (), log_file: Path | None = None) -> None:
    """Run one DataComp script from the clone, streaming its output; check exit code and outputs."""
    log.info("%s: %s", step, show(cmd, cwd))
    tail: deque = deque(maxlen=5)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, bufsize=1)
    except OSError as e:
        raise UserError(f"{step}: cannot start {cmd[0]}: {e}") from None
    sink = open(log_file, "a") if log_file else None
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            if sink:
                sink.write(line)
            if line.strip():
                tail.append(line.strip())
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    finally:
        if sink:
            sink.close()
    if rc != 0:
        last = tail[-1] if tail else "no output"
        raise UserError(f"{step} failed (exit code {rc}): {last}")
    for path in expect:
        if not Path(path).exists():
            raise UserError(f"{step} exited 0 but did not write {path}; see its log above")


# --------------------------------------------------------------------------------------------
# the steps


def prepare_reshard_output(output_dir: str, overwrite: bool) -> None:
    """DataComp's resharder needs the folder to exist and be empty (or --overwrite)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} is not empty: DataComp's resharder refuses it; give an empty "
                        "folder, or pass --overwrite (its contents are deleted)")


def reshard(clone: Path, python: str, shards_dir: str, subset: str, output_dir: str, num_workers: int | None = None,
            overwrite: bool = False) -> Path:
    from .reshard import check_output_is_not_input

    check_output_is_not_input(output_dir, shards_dir, subset)
    prepare_reshard_output(output_dir, overwrite)
    cmd = reshard_command(python, shards_dir, output_dir, subset, num_workers, overwrite)
    run("resharder.py", cmd, clone, expect=[Path(output_dir) / "meta.json"])
    return Path(output_dir) / "meta.json"


def train(clone: Path, python: str, data_dir: str, output_dir: str, exp_name: str, scale: str, **kw) -> Path:
    cmd = train_command(python, data_dir, output_dir, exp_name, scale, **kw)
    ckpt = Path(output_dir) / exp_name / "checkpoints" / "epoch_latest.pt"
    run("train.py", cmd, clone, expect=[ckpt, Path(output_dir) / exp_name / "info.pkl"])
    return ckpt


def evaluate(clone: Path, python: str, train_output: str, data_dir: str | None = None, batch_size: int | None = None,
             output_dir: str | None = None) -> Path:
    cmd = evaluate_command(python, train_output, data_dir, batch_size, output_dir)
    results = Path(output_dir or train_output) / "eval_results.jsonl"
    run("evaluate.py", cmd, clone, expect=[results])
    return results


def submit(clone: Path, python: str, train_output: str, **kw) -> None:
    cmd = submit_command(python, train_output, **kw)
    run("evaluate.py --submit", cmd, clone, expect=[Path(train_output) / "eval_results.jsonl"])


def estimate(scale: str, fraction: float | None, samples_per_gpu_second: float | None = None) -> dict:
    """Data size of a subset and GPU-hours of a training run at a scale (see ``THROUGHPUT_NOTE``)."""
    from .train import scale_config

    c = scale_config(scale)
    rate = samples_per_gpu_second or THROUGHPUT.get(c["model"])
    kept = int(POOL_SAMPLES.get(scale, 0) * (fraction if fraction is not None else 1.0))
    return {"scale": scale, "model": c["model"], "samples_kept": kept, "data_bytes": kept * BYTES_PER_SAMPLE,
            "samples_seen": c["train_num_samples"],
            "gpu_hours": c["train_num_samples"] / rate / 3600 if rate else None, "samples_per_gpu_second": rate}


#: Sieve scoring throughput measured on one H200 (bench/RESULTS.md, 2026-11-28: BLIP-base size with
#: random weights, every caption at max length, 8 captions, fp16, batch 256, CUDA-graph decoding,
#: one CPU thread per process); an H100 has the same arithmetic rate
SCORING_IMAGES_PER_GPU_SECOND = 1024.0


def scoring_estimate(scale: str) -> str:
    """A line on the GPU-hours of scoring a scale's pool with Sieve (once per scoring setting)."""
    images = POOL_SAMPLES.get(scale, 0)
    hours = images / SCORING_IMAGES_PER_GPU_SECOND / 3600
    return (f"Sieve scoring of the pool (once per scoring setting, shared by the rows that use it): up to "
            f"{images:,} images (fewer: failed downloads) at {SCORING_IMAGES_PER_GPU_SECOND:,.0f} images/s per "
            f"GPU (measured on an H200, bench/RESULTS.md): ~{hours:,.0f} GPU-hours")


def format_estimate(e: dict) -> str:
    tb = e["data_bytes"] / 1e12
    size = f"{tb:.2f} TB" if tb >= 0.1 else f"{e['data_bytes'] / 1e9:.1f} GB"
    gpu = "unknown" if e["gpu_hours"] is None else f"{e['gpu_hours']:,.0f} GPU-hours"
    return (f"~{e['samples_kept']:,} samples kept, ~{size} of shards; training {e['model']} on "
            f"{e['samples_seen']:,} samples seen: ~{gpu} at {e['samples_per_gpu_second']:,.0f} samples/s/GPU (assumed)")
