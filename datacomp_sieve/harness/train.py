"""Native training: open_clip_train's main with DataComp's scale hyper-parameters.

``SCALES`` is DataComp's scale table (scale_configs.py, not to be changed: results are only
comparable with these) plus ``toy``: a tiny ViT (``clip.TINY["ViT-B-32"]``, 64 px) that trains on
2 CPU cores in about a minute, for CI and trying the loop. ``open_clip_args`` builds the same
arguments DataComp's train.py passes to open_clip's main (``--train-num-samples`` is the scale's
samples seen divided by ``num_checkpoints``, one epoch per checkpoint, ``--dataset-resampled``,
``--save-most-recent``, ``--resume latest``, per-GPU batch = batch / (GPUs x accum_freq)).
A finished run (``info.json`` beside its checkpoint) is reused when asked for again with the same
scale, data folder (and shards in it) and settings, and refused with others (resuming it would
train nothing); an unfinished one (``started.json``, written before training) is resumed with the
same settings and refused with others.

Outputs, as DataComp's: ``OUTPUT_DIR/EXP_NAME/checkpoints/epoch_latest.pt`` and ``info.pkl``
(scale, checkpoint, scale_config, data_dir, read by DataComp's evaluate.py), plus ``info.json``
(the same, readable without pickle, with the toy model's config file when there is one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

# DataComp's scale_configs.py, and the toy scale (native backend only).
SCALES = {
    "debug": dict(batch_size=1024, learning_rate=1e-4, train_num_samples=128_000, warmup=500,
                  model="ViT-B-32", beta2=None),
    "small": dict(batch_size=4096, learning_rate=5e-4, train_num_samples=12_800_000, warmup=500,
                  model="ViT-B-32", beta2=None),
    "medium": dict(batch_size=4096, learning_rate=5e-4, train_num_samples=128_000_000, warmup=500,
                   model="ViT-B-32", beta2=None),
    "large": dict(batch_size=8192, learning_rate=5e-4, train_num_samples=1_280_000_000, warmup=500,
                  model="ViT-B-16", beta2=None),
    "xlarge": dict(batch_size=90112, learning_rate=1e-3, train_num_samples=12_800_000_000, warmup=10000,
                   model="ViT-L-14", beta2=0.95),
    "toy": dict(batch_size=16, learning_rate=1e-3, train_num_samples=640, warmup=4,
                model="datacomp-sieve-toy", beta2=None),
}
DATACOMP_SCALES = ("debug", "small", "medium", "large", "xlarge")
# open_clip_train's --precision choices, checked here so that a typo is not met by open_clip's whole usage text
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")
TOY_MODEL = "datacomp-sieve-toy"


def scale_config(scale: str) -> dict:
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}: one of {', '.join(SCALES)}")
    return dict(SCALES[scale])


def toy_model_config() -> dict:
    """open_clip's ViT-B-32 config with the tiny tower overrides of ``clip.TINY``."""
    import open_clip

    from ..clip import TINY

    cfg = open_clip.get_model_config("ViT-B-32")
    for key, value in TINY["ViT-B-32"].items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def register_model(config_file: str | None) -> None:
    """Make a model config file (the toy model's) known to open_clip, by its file stem."""
    if config_file:
        import open_clip

        open_clip.add_model_config(config_file)


def find_shards(data_dir: str) -> str:
    """The ``{first..last}.tar`` brace pattern of a resharded folder (from meta.json, else listed)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a folder")
    meta = d / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        n, fmt = int(m["output_shard_count"]), m.get("output_shard_format", "{:08d}.tar")
        if n < 1:
            raise UserError(f"--data_dir {data_dir}: meta.json says no shard was written (an empty subset?)")
        first, last = fmt.format(0)[: -len(".tar")], fmt.format(n - 1)[: -len(".tar")]
        return str(d / f"{{{first}..{last}}}.tar") if n > 1 else str(d / fmt.format(0))
    tars = sorted(p.name for p in d.glob("*.tar") if p.stem.isdigit())
    if not tars:
        raise UserError(f"--data_dir {data_dir} has no .tar shards; reshard a subset into it first")
    if len(tars) == 1:
        return str(d / tars[0])
    width = len(tars[0]) - len(".tar")
    return str(d / f"{{{0:0{width}d}..{int(tars[-1][:-4]):0{width}d}}}.tar")


def open_clip_args(scale: str, data: str, output_dir: str, exp_name: str, *, num_gpus: int = 1,
                   num_checkpoints: int = 5, seed: int = 0, precision: str = "amp", workers: int = 4,
                   accum_freq: int = 1, log_every_n_steps: int = 100) -> list[str]:
    """open_clip_train.main arguments, as DataComp's train.py builds them for ``scale``."""
    c = scale_config(scale)
    if num_checkpoints < 1:
        raise UserError(f"--num_checkpoints must be at least 1, got {num_checkpoints}")
    per_gpu = c["batch_size"] // (num_gpus * accum_freq)
    if per_gpu < 1:
        raise UserError(f"batch {c['batch_size']} cannot be split over {num_gpus} GPU(s) x accum_freq {accum_freq}")
    args = ["--save-frequency", "0", "--ddp-static-graph", "--local-loss", "--gather-with-grad",
            "--grad-checkpointing", "--train-data", data,
            "--train-num-samples", str(c["train_num_samples"] // num_checkpoints),
            "--warmup", str(c["warmup"]), "--dataset-type", "webdataset", "--precision", precision,
            "--workers", str(workers), "--model", c["model"], "--batch-size", str(per_gpu),
            "--epochs", str(num_checkpoints), "--lr", str(c["learning_rate"]), "--logs", str(output_dir),
            "--name", exp_name, "--seed", str(seed), "--accum-freq", str(accum_freq),
            "--log-every-n-steps", str(log_every_n_steps), "--save-most-recent", "--resume", "latest",
            "--dataset-resampled"]
    if c["beta2"] is not None:
        args += ["--beta2", str(c["beta2"])]
    return args


def train(data_dir: str, output_dir: str, exp_name: str, scale: str = "toy", *, num_checkpoints: int | None = None,
          seed: int = 0, precision: str | None = None, workers: int | None = None, accum_freq: int = 1) -> dict:
    """Train in this process with open_clip_train; returns the info written beside the checkpoint.

    ``toy`` defaults: fp32, 0 data-loader workers, one checkpoint, open_clip's sample shuffle
    buffer set to 1 sample (shards are still drawn by open_clip's seeded resampler) so that the
    same seed gives the same model. Other scales default to DataComp's settings (amp, 4 workers,
    5 checkpoints) on however many GPUs this process sees (one: use torchrun through the
    DataComp backend for several).
    """
    import torch

    c = scale_config(scale)
    toy = scale == "toy"
    if not toy and not torch.cuda.is_available():
        raise UserError(f"scale {scale} trains ViT models on {c['train_num_samples']:,} samples: it needs GPUs; "
                        "use --scale toy on a CPU")
    data = find_shards(data_dir)
    run_dir = Path(output_dir) / exp_name
    config_file = str(run_dir / f"{TOY_MODEL}.json") if toy else None
    argv = open_clip_args(scale, data, output_dir, exp_name,
                          num_checkpoints=num_checkpoints or (1 if toy else 5), seed=seed,
                          precision=precision or ("fp32" if toy else "amp"),
                          workers=workers if workers is not None else (0 if toy else 4),
                          accum_freq=accum_freq, log_every_n_steps=1 if toy else 100)
    checkpoint = run_dir / "checkpoints" / "epoch_latest.pt"
    fingerprint = data_fingerprint(data_dir)
    # open_clip's --resume latest continues whatever checkpoint is there, whatever the data: a finished
    # run (info.json) would train nothing, an unfinished one (STARTED, written before training) would
    # go on with other data; either is used only with the same settings
    finished = (run_dir / "info.json").is_file() and checkpoint.is_file()
    record = run_dir / ("info.json" if finished else STARTED)
    if record.is_file():
        done = json.loads(record.read_text())
        old = run_settings(done["scale"], done["data_dir"], done.get("open_clip_args", []), done.get("cwd"))
        new = run_settings(scale, data_dir, argv)
        if done.get("data_fingerprint"):  # the same folder resharded anew holds other data
            old["data_dir contents"] = done["data_fingerprint"]
            new["data_dir contents"] = fingerprint
        changed = [f"{k}: run {old.get(k)}, now {v}" for k, v in new.items() if old.get(k) != v]
        if changed:
            raise UserError(f"{run_dir} holds {'a finished' if finished else 'an unfinished'} run with other settings "
                            f"({'; '.join(changed)}); give another --exp_name, or delete that folder to train it anew")
        if finished:
            log.warning("%s holds a finished run with these settings: its checkpoint is reused, nothing is trained "
                        "(give another --exp_name, or delete that folder, to train again)", run_dir)
            return {**done, "checkpoint": str(checkpoint)}
        log.info("%s holds an unfinished run with these settings: open_clip resumes it from its last checkpoint", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = {"scale": scale, "data_dir": str(data_dir), "open_clip_args": argv, "cwd": os.getcwd(),
               "data_fingerprint": fingerprint}
    (run_dir / STARTED).write_text(json.dumps(started, indent=1))
    if toy:
        Path(config_file).write_text(json.dumps(toy_model_config(), indent=1))
        register_model(config_file)
    log.info("open_clip_train.main %s", " ".join(argv))
    result = _run_open_clip(argv, toy)
    if result == -1 or not checkpoint.is_file():
        raise UserError(f"training did not produce {checkpoint}; see open_clip's log {run_dir / 'out.log'}")
    info = {**started, "checkpoint": str(checkpoint), "scale_config": c, "model_config_file": config_file}
    with open(run_dir / "info.pkl", "wb") as f:  # what DataComp's evaluate.py reads
        pickle.dump({k: info[k] for k in ("scale", "checkpoint", "scale_config", "data_dir")}, f)
    (run_dir / "info.json").write_text(json.dumps(info, indent=1))
    return info


#: the settings of a run, written before open_clip starts (info.json is written when it has finished)
STARTED = "started.json"

# open_clip flags that carry the user's training settings, by the name of this tool's flag
_SETTING_FLAGS = {"--epochs": "num_checkpoints", "--seed": "seed", "--precision": "precision", "--workers": "workers",
                  "--accum-freq": "accum_freq"}


def run_settings(scale: str, data_dir: str, argv: list[str], cwd: str | None = None) -> dict:
    """What makes two training runs the same: scale, data folder (resolved) and the settings in ``argv``."""
    out = {"scale": scale, "data_dir": os.path.realpath(Path(cwd or os.getcwd()) / data_dir)}
    out.update({name: argv[argv.index(flag) + 1] for flag, name in _SETTING_FLAGS.items() if flag in argv})
    return out


def data_fingerprint(data_dir: str) -> str:
    """A short hash of the shards' names and sizes and of sample_ids.npy: a folder resharded anew changes it."""
    import hashlib

    h = hashlib.sha1()
    for p in sorted(Path(data_dir).glob("*.tar")):
        h.update(f"{p.name} {p.stat().st_size}\n".encode())
    ids = Path(data_dir) / "sample_ids.npy"
    if ids.is_file():
        h.update(ids.read_bytes())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def root_handlers_kept():
    """Handlers that libraries add to the root logger meanwhile are removed afterwards: open_clip's
    setup_logging adds one, and open_clip's ``logging.info`` on a root logger without handlers runs
    ``basicConfig``. A later step in the same process (``reproduce`` runs every step in one) would
    otherwise print each record once per handler."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()


def _run_open_clip(argv: list[str], toy: bool) -> int | None:
    """open_clip_train.main(argv), with the root logger's handlers and (for toy) the shuffle buffer restored."""
    import open_clip_train.data as ocd
    from open_clip_train.main import main

    root = logging.getLogger()
    level = root.level
    # open_clip's setup_logging sets every logger that exists to INFO (torch's too: their records then
    # print at exit); each gets its level back
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    saved = (ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL)
    if toy:
        ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL = 1, 1
    try:
        with root_handlers_kept():
            return main(argv)
    finally:
        ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL = saved
        root.setLevel(level)
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))


def load_info(train_output: str) -> dict:
    """A training run's info (``info.json``, or DataComp's ``info.pkl``'s fields)."""
    d = Path(train_output)
    if (d / "info.json").is_file():
        return json.loads((d / "info.json").read_text())
    if (d / "info.pkl").is_file():
        with open(d / "info.pkl", "rb") as f:
            return pickle.load(f)  # noqa: S301 - DataComp's own format; the user's training output
    ckpt = d / "checkpoints" / "epoch_latest.pt"
    raise UserError(f"{d} has no info.json or info.pkl: is it a training output folder (OUTPUT_DIR/EXP_NAME)?"
                    + (f" ({ckpt} exists)" if ckpt.exists() else ""))

