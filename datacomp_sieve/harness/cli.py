"""``datacomp-sieve reshard|train|evaluate|reproduce|compare|submit``: parsing and dispatch.

Without ``--datacomp`` the native backend runs; with it, DataComp's own scripts (``datacomp.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("datacomp_sieve")

_RAW = argparse.RawDescriptionHelpFormatter


def _backend_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("DataComp backend (a clone of github.com/mlfoundations/datacomp)")
    g.add_argument("--datacomp", metavar="DIR", required=required,
                   help="your DataComp clone: its scripts run from that folder with their exact flags "
                        "(without it, the native backend runs)" + ("" if not required else "; required here"))
    g.add_argument("--datacomp_python", metavar="PATH",
                   help="the python of DataComp's own environment (it pins torch 1.13, open-clip-torch 2.16.1, "
                        "webdataset 0.2.31; its resharder fails with newer webdataset). Default: this python")


def _clone(args):
    from . import datacomp

    if not getattr(args, "datacomp", None):
        return None, None
    return datacomp.check_clone(args.datacomp), datacomp.check_python(args.datacomp_python)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# --------------------------------------------------------------------------------------------
# reshard / train / evaluate / submit


def run_reshard(args) -> int:
    from . import datacomp

    clone, python = _clone(args)
    if not os.path.isfile(args.subset):
        raise UserError(f"--subset {args.subset} " + ("is a folder; give the subset .npy file (e.g. from `filter`)"
                                                      if os.path.isdir(args.subset) else "does not exist"))
    if clone:
        datacomp.reshard(clone, python, args.shards_dir, args.subset, args.output_dir, args.num_workers, args.overwrite)
        meta = json.loads((Path(args.output_dir) / "meta.json").read_text())
    else:
        from .reshard import reshard

        meta = reshard(args.shards_dir, args.subset, args.output_dir, args.shard_size, args.overwrite, _progress(args))
    print(f"resharded into {args.output_dir}: {meta.get('output_count')} samples in "
          f"{meta.get('output_shard_count')} shard(s)"
          + (f"; {meta['not_found']} subset uids not in the shards" if meta.get("not_found") else ""))
    return 0


def _not_a_file(flag: str, path: str | None) -> None:
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")


def _at_least(flag: str, value, least) -> None:
    """Refuse a count or rate below ``least`` (a 0 would otherwise be taken as 'not given')."""
    if value is not None and not value >= least:
        raise UserError(f"{flag} must be at least {least}, got {value}")


def _train_kwargs(args) -> dict:
    return dict(seed=args.seed, precision=args.precision, workers=args.workers, accum_freq=args.accum_freq,
                num_checkpoints=args.num_checkpoints)


def run_train(args) -> int:
    from . import datacomp
    from .train import PRECISIONS

    clone, python = _clone(args)
    _not_a_file("--output_dir", args.output_dir)
    _not_a_file("--output_dir/--exp_name", os.path.join(args.output_dir, args.exp_name))
    if args.precision is not None and args.precision not in PRECISIONS:
        raise UserError(f"--precision {args.precision} is not one of open_clip's: {', '.join(PRECISIONS)}")
    for flag, value, least in (("--num_gpus", args.num_gpus, 1), ("--workers", args.workers, 0),
                               ("--accum_freq", args.accum_freq, 1), ("--num_checkpoints", args.num_checkpoints, 1)):
        _at_least(flag, value, least)
    if clone:
        ckpt = datacomp.train(clone, python, args.data_dir, args.output_dir, args.exp_name, args.scale,
                              num_gpus=args.num_gpus, **_train_kwargs(args))
    else:
        from .train import train

        kw = _train_kwargs(args)
        kw["accum_freq"] = kw["accum_freq"] or 1
        ckpt = train(args.data_dir, args.output_dir, args.exp_name, args.scale, **kw)["checkpoint"]
    print(f"checkpoint: {ckpt}")
    return 0


def _refuse_stale(train_output: str, output_dir: str | None = None, data_dir: str | None = None) -> None:
    """DataComp's evaluate.py reuses every line of eval_results.jsonl: refuse, before it runs, lines that
    this tool recorded as made from another checkpoint or other evaluation sets."""
    from .evaluate import TASKS, TOY_TASKS, checkpoint_source, read_results, read_sources, split_reused
    from .train import load_info

    path = Path(output_dir or train_output) / "eval_results.jsonl"
    try:
        checkpoint = str(load_info(train_output)["checkpoint"])
    except Exception:  # noqa: BLE001 - no readable info.pkl: DataComp's evaluate.py says so
        return
    if path.is_file() and os.path.isfile(checkpoint):
        done = {r["dataset"] for r in read_results(path)}
        split_reused(path, read_sources(path, done), [t for t in TASKS + TOY_TASKS if t.name in done],
                     checkpoint_source(checkpoint), data_dir)


def run_evaluate(args) -> int:
    from . import datacomp
    from .evaluate import build_toy_tasks, evaluate, format_summary, read_results, summarize

    clone, python = _clone(args)
    _not_a_file("--output_dir", args.output_dir)
    _at_least("--batch_size", args.batch_size, 1)
    if args.toy_tasks:
        if clone:
            raise UserError("--toy_tasks are for the native evaluator; DataComp's evaluate.py runs its 40 tasks")
        if not args.data_dir:
            raise UserError("--toy_tasks needs --data_dir: the folder the toy tasks are written into")
        build_toy_tasks(args.data_dir)
        args.tasks = "toy"
    if clone:
        _refuse_stale(args.train_output_dir, args.output_dir, args.data_dir)
        path = datacomp.evaluate(clone, python, args.train_output_dir, args.data_dir, args.batch_size, args.output_dir)
    else:
        if not args.data_dir:
            raise UserError("--data_dir is required without --datacomp: the evaluation sets (DataComp's "
                            "download_evalsets.py output), or an empty folder with --toy_tasks")
        path = evaluate(args.train_output_dir, args.data_dir, args.tasks, args.output_dir, args.batch_size or 64,
                        progress=_progress(args))["path"]
    print(format_summary(summarize(read_results(path))))
    print(f"results: {path}")
    return 0


def run_submit(args) -> int:
    from . import datacomp

    clone, python = _clone(args)
    _at_least("--dataset-size", args.dataset_size, 1)
    _refuse_stale(args.train_output_dir, data_dir=args.data_dir)
    datacomp.submit(clone, python, args.train_output_dir, samples=args.samples, dataset_size=args.dataset_size,
                    method_name=args.method_name, author=args.author, email=args.email,
                    hf_username=args.hf_username, hf_repo_name=args.hf_repo_name, track=args.track,
                    writeup=args.writeup, upload_checkpoint=args.upload_checkpoint, data_dir=args.data_dir)
    return 0


# --------------------------------------------------------------------------------------------
# reproduce / compare


def _row_commands(row, args, clone, python, scale: str, row_dir: Path) -> list[tuple[str, list[str], str]]:
    """(step, command, cwd) for one row; commands are what --dry-run prints."""
    from . import datacomp

    subset = row_dir / "subset.npy"
    shards = row_dir / "shards"
    train_out = row_dir / "train"
    if args.captioner and row.uses_sieve:  # its score store is named after the captioner that made it
        row = dataclasses.replace(row, captioner=args.captioner)
    scores = Path(args.pool) / "sieve_scores" / row.scores_key() if row.uses_sieve else None
    me = [sys.executable, "-m", "datacomp_sieve.cli"]
    filter_args = row.filter_args(args.pool, str(subset), str(scores) if scores else None)
    steps = [("filter", me + ["filter"] + filter_args, os.getcwd())]
    if clone:
        steps += [
            ("reshard", datacomp.reshard_command(python, f"{args.pool}/shards", str(shards), str(subset),
                                                 overwrite=args.overwrite), str(clone)),
            ("train", datacomp.train_command(python, str(shards), str(train_out), row.slug, scale,
                                             num_gpus=args.num_gpus), str(clone)),
            ("evaluate", datacomp.evaluate_command(python, str(train_out / row.slug), args.eval_data_dir), str(clone)),
        ]
    else:
        steps += [
            ("reshard", me + ["reshard", "--shards_dir", f"{args.pool}/shards", "--subset", str(subset),
                              "--output_dir", str(shards)] + (["--overwrite"] if args.overwrite else []), os.getcwd()),
            ("train", me + ["train", "--data_dir", str(shards), "--output_dir", str(train_out), "--exp_name", row.slug,
                            "--scale", scale], os.getcwd()),
            ("evaluate", me + ["evaluate", "--train_output_dir", str(train_out / row.slug), "--data_dir",
                               args.eval_data_dir or "EVAL_DATA_DIR", "--tasks", args.tasks], os.getcwd()),
        ]
    return steps


def run_reproduce(args) -> int:
    from . import datacomp
    from .evaluate import read_results, summarize
    from .experiments import compare_rows, format_compare, get_experiment, not_comparable

    exp = get_experiment(args.experiment)
    scale = args.scale or exp.scale
    clone, python = _clone(args)
    rows = [r for r in exp.rows if not args.rows or r.label in args.rows or r.slug in args.rows]
    if args.rows and not rows:
        raise UserError(f"no row of {exp.name} matches --rows {' '.join(args.rows)}: "
                        + ", ".join(r.slug for r in exp.rows))
    if not args.pool:
        raise UserError("--pool DIR is required: the pool folder with metadata/ and shards/")
    _at_least("--num_gpus", args.num_gpus, 1)
    if args.samples_per_gpu_second is not None and not 0 < args.samples_per_gpu_second < float("inf"):
        raise UserError(f"--samples_per_gpu_second must be a positive number, got {args.samples_per_gpu_second}")
    args.pool = os.path.abspath(args.pool)
    if args.eval_data_dir:
        args.eval_data_dir = os.path.abspath(args.eval_data_dir)
    if not args.dry_run and not os.path.isdir(os.path.join(args.pool, "metadata")):
        raise UserError(f"--pool {args.pool} has no metadata/ folder")
    if not clone and not args.eval_data_dir and not args.dry_run:
        raise UserError("--eval_data_dir is required without --datacomp (the evaluation sets; for the toy "
                        "tasks, any folder with --tasks toy)")
    out = Path(args.out).resolve() / exp.name
    print(f"{exp.title}: {len(rows)} row(s) at scale {scale}, backend {'DataComp ' + str(clone) if clone else 'native'}")
    for row in rows:
        if row.not_runnable:
            print(f"\n# {row.label}: not run ({row.not_runnable})")
            continue
        row_dir = out / row.slug
        steps = _row_commands(row, args, clone, python, scale, row_dir)
        if args.dry_run:
            print(f"\n# {row.label}" + (f"  [{row.note}]" if row.note else ""))
            for step, cmd, cwd in steps:
                print(f"(cd {shlex.quote(cwd)} && {shlex.join(cmd)})")
            if scale in datacomp.POOL_SAMPLES:
                print("# estimate: " + datacomp.format_estimate(
                    datacomp.estimate(scale, row.fraction, args.samples_per_gpu_second)))
                if row.uses_sieve:
                    print("# estimate: " + datacomp.scoring_estimate(scale))
            continue
        row_dir.mkdir(parents=True, exist_ok=True)
        if args.tasks == "toy" and not clone:
            from .evaluate import build_toy_tasks

            build_toy_tasks(args.eval_data_dir)
        for step, cmd, cwd in steps:
            if step == "reshard" and clone:
                from .reshard import check_output_is_not_input

                check_output_is_not_input(row_dir / "shards", f"{args.pool}/shards")
                datacomp.prepare_reshard_output(str(row_dir / "shards"), args.overwrite)
            if step == "evaluate" and clone:
                _refuse_stale(str(row_dir / "train" / row.slug), data_dir=args.eval_data_dir)
            if step == "filter" or not clone:
                from ..cli import main

                log.info("%s: %s", row.label, shlex.join(cmd[3:]))
                if main(cmd[3:]) != 0:
                    raise UserError(f"{row.label}: the {step} step failed; see the message above")
            else:
                expect = {"reshard": [row_dir / "shards" / "meta.json"],
                          "train": [row_dir / "train" / row.slug / "checkpoints" / "epoch_latest.pt"],
                          "evaluate": [row_dir / "train" / row.slug / "eval_results.jsonl"]}[step]
                datacomp.run(step, cmd, Path(cwd), expect=expect, log_file=row_dir / f"{step}.log")
        lines = read_results(row_dir / "train" / row.slug / "eval_results.jsonl")
        print(format_compare(f"\n{row.label}", compare_rows(summarize(lines), row.published),
                             not_comparable(lines, scale)))
    if args.dry_run and not clone and not args.eval_data_dir:
        print("\n# EVAL_DATA_DIR: the evaluation sets; --eval_data_dir is required to run")
    if args.dry_run and scale in datacomp.POOL_SAMPLES:
        print(f"\n# {datacomp.THROUGHPUT_NOTE}")
    return 0


def _compare_one(title: str, results: Path, row) -> str:
    from .evaluate import read_results, summarize
    from .experiments import compare_rows, format_compare, not_comparable
    from .train import load_info

    lines = read_results(results)
    try:  # the training run beside the results says its scale (toy: not comparable)
        scale = load_info(str(results if results.is_dir() else results.parent)).get("scale")
    except UserError:
        scale = None
    return format_compare(title, compare_rows(summarize(lines), row.published), not_comparable(lines, scale))


def run_compare(args) -> int:
    from .experiments import EXPERIMENTS, find_row, get_experiment

    target = Path(args.results)
    if not target.exists():
        raise UserError(f"{target} does not exist: give a reproduce output folder (OUT/EXPERIMENT, e.g. "
                        "reproduce/table1-medium), or an eval_results.jsonl with --experiment and --row")
    if target.is_dir() and not (target / "eval_results.jsonl").exists():  # a reproduce output folder
        if not args.experiment and target.name not in EXPERIMENTS:
            raise UserError(f"{target} is not a reproduce output folder: give OUT/EXPERIMENT (e.g. "
                            "reproduce/table1-medium), or an eval_results.jsonl with --experiment and --row")
        exp = get_experiment(args.experiment or target.name)
        found = 0
        for row in exp.rows:
            results = target / row.slug / "train" / row.slug / "eval_results.jsonl"
            if results.is_file():
                found += 1
                print(_compare_one(f"{exp.name}: {row.label}", results, row))
        if not found:
            raise UserError(f"{target} holds no results of {exp.name} (expected ROW/train/ROW/eval_results.jsonl)")
        return 0
    if not args.experiment or not args.row:
        raise UserError("give --experiment and --row to compare one results file with the paper")
    row = find_row(get_experiment(args.experiment), args.row)
    print(_compare_one(f"{args.experiment}: {row.label}", target, row))
    return 0


# --------------------------------------------------------------------------------------------
# parsers


def add_parsers(sub) -> None:
    from . import datacomp
    from .evaluate import TASK_LISTS
    from .experiments import EXPERIMENTS
    from .train import PRECISIONS, SCALES

    r = sub.add_parser("reshard", help="write a uid subset's samples to new shards (DataComp's resharder)",
                       formatter_class=_RAW, description=(
                           "Reshard: the samples of --shards_dir whose uid is in --subset go to --output_dir as "
                           "{:08d}.tar shards, with sample_ids.npy and meta.json. Native: every listed uid that is "
                           "found is written once; uids not found (failed downloads) are counted. With --datacomp, "
                           "DataComp's resharder.py runs."))
    r.add_argument("--shards_dir", required=True, help="the pool's shards folder ({:08d}.tar + _stats.json)")
    r.add_argument("--subset", required=True, help="DataComp's sorted u8,u8 uid file (.npy), e.g. from `filter`")
    r.add_argument("--output_dir", required=True, help="created if missing; must be empty unless --overwrite")
    r.add_argument("--overwrite", action="store_true", help="delete what --output_dir holds first")
    r.add_argument("--shard_size", type=int, default=10000, help="samples per output shard (default 10000)")
    r.add_argument("--num_workers", type=int, help="DataComp backend: resharder workers (-j)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    _backend_args(r)
    r.set_defaults(func=run_reshard)

    scales = ", ".join(f"{k}: {v['model']}, batch {v['batch_size']}, {v['train_num_samples']:,} samples seen"
                       for k, v in SCALES.items())
    t = sub.add_parser("train", help="train CLIP on resharded data with DataComp's scale settings",
                       formatter_class=_RAW, description=(
                           "Train with open_clip's training main and DataComp's fixed hyper-parameters per scale "
                           f"({scales}). toy is a tiny model for CPUs (native only). Output: "
                           "OUTPUT_DIR/EXP_NAME/checkpoints/epoch_latest.pt and info.pkl. With --datacomp, "
                           "DataComp's train.py runs under torchrun."))
    t.add_argument("--data_dir", required=True, help="resharded shards (a reshard output folder)")
    t.add_argument("--output_dir", required=True, help="training output root")
    t.add_argument("--exp_name", required=True, help="run name: OUTPUT_DIR/EXP_NAME")
    t.add_argument("--scale", choices=list(SCALES), default="toy", help="DataComp scale, or toy (default toy)")
    t.add_argument("--num_gpus", type=int, default=1, help="DataComp backend: torchrun --nproc_per_node (default 1)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default 0, as DataComp's)")
    t.add_argument("--precision", default=None,
                   help=f"one of {', '.join(PRECISIONS)} (default: DataComp's amp, toy's fp32)")
    t.add_argument("--workers", type=int, default=None, help="data-loader workers (DataComp 4, toy 0)")
    t.add_argument("--accum_freq", type=int, default=None, help="gradient accumulation (default 1)")
    t.add_argument("--num_checkpoints", type=int, default=None, help="epochs/checkpoints (DataComp 5, toy 1)")
    _backend_args(t)
    t.set_defaults(func=run_train)

    e = sub.add_parser("evaluate", help="zero-shot evaluation and the summary in DataComp's groups",
                       formatter_class=_RAW, description=(
                           "Evaluate a training run (OUTPUT_DIR/EXP_NAME) and print ImageNet, ImageNet dist. shifts, "
                           "VTAB, Retrieval and the Average (over 38, or over the tasks present, said so). Native: "
                           "clip_benchmark over DataComp's downloaded evaluation sets (--data_dir), or the toy tasks "
                           "(--toy_tasks). With --datacomp, DataComp's evaluate.py runs all 40 tasks."))
    e.add_argument("--train_output_dir", required=True, help="OUTPUT_DIR/EXP_NAME of a training run")
    e.add_argument("--data_dir", help="evaluation sets (DataComp's download_evalsets.py layout)")
    e.add_argument("--tasks", choices=list(TASK_LISTS), default="datacomp", help="task list (default datacomp)")
    e.add_argument("--toy_tasks", action="store_true", help="write the toy tasks into --data_dir and evaluate on them")
    e.add_argument("--output_dir", help="where eval_results.jsonl goes (default --train_output_dir)")
    e.add_argument("--batch_size", type=int, default=None, help="default 64")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _backend_args(e)
    e.set_defaults(func=run_evaluate)

    names = "\n".join(f"  {k}: {v.title} ({len(v.rows)} rows)" for k, v in EXPERIMENTS.items())
    p = sub.add_parser("reproduce", help="run one of the paper's experiments: filter, reshard, train, evaluate",
                       formatter_class=argparse.RawTextHelpFormatter,
                       description="Run an experiment of the paper by name, row by row: filter -> reshard -> train "
                                   "-> evaluate, then measured vs published.\nexperiments:\n" + names,
                       epilog="--dry-run estimates: " + datacomp.THROUGHPUT_NOTE)
    p.add_argument("experiment", choices=list(EXPERIMENTS), metavar="EXPERIMENT", help="experiment name (above)")
    p.add_argument("--pool", help="the pool folder: metadata/, shards/ (score stores go to sieve_scores/)")
    p.add_argument("--out", default="reproduce", help="output root (default ./reproduce): OUT/EXPERIMENT/ROW/")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows (labels or slugs)")
    p.add_argument("--scale", choices=list(SCALES), help="override the experiment's scale (e.g. toy for a trial)")
    p.add_argument("--captioner", help="override the rows' captioner (e.g. label for an offline trial; not the paper's)")
    p.add_argument("--eval_data_dir", help="evaluation sets (native backend: required; DataComp: its --data_dir)")
    p.add_argument("--tasks", choices=list(TASK_LISTS), default="datacomp",
                   help="native task list (default datacomp)")
    p.add_argument("--num_gpus", type=int, default=8, help="DataComp backend: GPUs for torchrun (default 8)")
    p.add_argument("--overwrite", action="store_true", help="reshard into non-empty folders")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print every command and an estimate of data size and GPU-hours; run nothing")
    p.add_argument("--samples_per_gpu_second", type=float, help="training throughput for the GPU-hour estimate")
    _backend_args(p)
    p.set_defaults(func=run_reproduce)

    c = sub.add_parser("compare", help="measured results next to the paper's published numbers",
                       description="Print measured vs published per DataComp group, with the difference. RESULTS: "
                                   "an eval_results.jsonl (with --experiment and --row) or a reproduce output folder "
                                   "(OUT/EXPERIMENT).")
    c.add_argument("results", metavar="RESULTS",
                   help="a reproduce output folder (OUT/EXPERIMENT, e.g. reproduce/table1-medium), or an "
                        "eval_results.jsonl (or the training run folder that holds it)")
    c.add_argument("--experiment", choices=list(EXPERIMENTS),
                   help="the experiment to compare with (default: the folder's name, for OUT/EXPERIMENT)")
    c.add_argument("--row", help="row label or slug, e.g. sieve-20 (with one results file)")
    c.set_defaults(func=run_compare)

    s = sub.add_parser("submit", help="submit to DataComp's leaderboard through DataComp's evaluate.py",
                       description="Runs DataComp's evaluate.py --submit with --samples and --dataset-size always "
                                   "passed (leaving them out crashes or records a wrong size, DataComp #62). "
                                   "Needs --datacomp.")
    s.add_argument("--train_output_dir", required=True,
                   help="OUTPUT_DIR/EXP_NAME of the training run (with DataComp's info.pkl)")
    s.add_argument("--samples", required=True, help="the subset .npy trained on ('::' joins several files)")
    s.add_argument("--dataset-size", "--dataset_size", dest="dataset_size", type=int,
                   help="samples in the training set (default: the uids in --samples)")
    s.add_argument("--method_name", required=True, help="the method's name on the leaderboard")
    s.add_argument("--author", required=True, help="author name(s) shown on the leaderboard")
    s.add_argument("--email", required=True, help="contact email")
    s.add_argument("--hf_username", required=True, help="Hugging Face user the results are uploaded under")
    s.add_argument("--hf_repo_name", required=True, help="Hugging Face repository the results are uploaded to")
    s.add_argument("--track", choices=["filtering", "byod"], default="filtering",
                   help="DataComp track (default filtering)")
    s.add_argument("--writeup", help="a link to a write-up of the method")
    s.add_argument("--upload_checkpoint", action="store_true", help="also upload the trained checkpoint")
    s.add_argument("--data_dir", help="downloaded evaluation sets")
    _backend_args(s, required=True)
    s.set_defaults(func=run_submit)
