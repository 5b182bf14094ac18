"""The eval harness without training: native resharder contract, scale table, task list, summary,
experiments and compare, and the DataComp backend against a fake clone that records its calls."""

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from datacomp_sieve.cli import main
from datacomp_sieve.errors import UserError
from datacomp_sieve.harness import datacomp, evaluate, experiments, train
from datacomp_sieve.harness.reshard import reshard
from datacomp_sieve.toy_pool import rows_by_uid
from datacomp_sieve.uids import UID_DTYPE, uid_to_pair


def _subset(path, uids, sort=True):
    arr = np.array([uid_to_pair(u) for u in uids], dtype=UID_DTYPE)
    if sort:
        arr = np.sort(arr)
    np.save(path, arr)
    return str(path)


def _tar_uids(folder):
    import tarfile

    uids = []
    for tar in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    uids.append(json.loads(t.extractfile(m).read())["uid"])
    return uids


# --------------------------------------------------------------------------------------------
# native resharder


def test_reshard_writes_each_listed_uid_once_and_counts_the_missing(toy_pool, tmp_path):
    rows = rows_by_uid(toy_pool)
    ok = [u for u, r in rows.items() if r["status"] == "success" and not r["category"].startswith("broken")][:10]
    failed = [u for u, r in rows.items() if r["status"] != "success"][:3]
    subset = _subset(tmp_path / "s.npy", ok + failed + ok[:2])  # two listed twice
    meta = reshard(str(toy_pool / "shards"), subset, str(tmp_path / "out"), shard_size=4, progress=False)
    got = _tar_uids(tmp_path / "out")
    assert sorted(got) == sorted(ok)  # each once
    assert meta["output_count"] == 10 and meta["not_found"] == 3 and meta["subset_duplicates"] == 2
    assert meta["output_shard_count"] == 3
    out = tmp_path / "out"
    assert [json.loads((out / f"{i:08d}_stats.json").read_text())["successes"] for i in range(3)] == [4, 4, 2]
    assert (out / "sample_ids.npy").read_bytes() == Path(subset).read_bytes()
    assert train.find_shards(str(out)) == str(out / "{00000000..00000002}.tar")


def test_reshard_refuses_unsorted_subset_and_non_empty_output(toy_pool, tmp_path):
    rows = sorted(rows_by_uid(toy_pool))
    bad = _subset(tmp_path / "u.npy", [rows[5], rows[1]], sort=False)
    with pytest.raises(UserError, match="not sorted"):
        reshard(str(toy_pool / "shards"), bad, str(tmp_path / "o1"), progress=False)
    good = _subset(tmp_path / "g.npy", rows[:3])
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        reshard(str(toy_pool / "shards"), good, str(tmp_path / "o2"), progress=False)
    reshard(str(toy_pool / "shards"), good, str(tmp_path / "o2"), overwrite=True, progress=False)
    assert not (tmp_path / "o2" / "x").exists()


def test_reshard_refuses_an_output_folder_that_holds_its_input(toy_pool, tmp_path, capsys):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(toy_pool, pool)
    before = sorted(p.relative_to(pool) for p in pool.rglob("*"))
    subset = _subset(pool / "s.npy", sorted(rows_by_uid(pool))[:3])
    for out, what in ((pool, "contains --shards_dir"), (pool / "shards", "is --shards_dir"),
                      (pool / "shards" / ".." / "shards", "is --shards_dir")):
        assert main(["reshard", "--shards_dir", str(pool / "shards"), "--subset", subset, "--output_dir", str(out),
                     "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err
    (tmp_path / "sub").mkdir()
    in_out = _subset(tmp_path / "sub" / "s.npy", sorted(rows_by_uid(pool))[:3])
    with pytest.raises(UserError, match="contains --subset"):
        reshard(str(pool / "shards"), in_out, str(tmp_path / "sub"), overwrite=True, progress=False)
    assert (tmp_path / "sub" / "s.npy").is_file()
    assert sorted(p.relative_to(pool) for p in pool.rglob("*")) == sorted(before + [Path("s.npy")])


# --------------------------------------------------------------------------------------------
# scales, tasks, summary


def test_scales_are_datacomps_and_args_follow_its_train_py():
    assert train.SCALES["medium"] == dict(batch_size=4096, learning_rate=5e-4, train_num_samples=128_000_000,
                                          warmup=500, model="ViT-B-32", beta2=None)
    assert train.SCALES["xlarge"]["beta2"] == 0.95 and train.SCALES["large"]["model"] == "ViT-B-16"
    a = train.open_clip_args("medium", "D/{0..9}.tar", "OUT", "exp", num_gpus=8)
    assert a[a.index("--train-num-samples") + 1] == str(128_000_000 // 5)
    assert a[a.index("--batch-size") + 1] == "512" and a[a.index("--epochs") + 1] == "5"
    assert "--dataset-resampled" in a and "--save-most-recent" in a and "--beta2" not in a
    assert "--beta2" in train.open_clip_args("xlarge", "D", "O", "e")


def test_train_reuses_a_finished_run_only_with_the_same_settings(tmp_path, capsys):
    data, other = tmp_path / "d", tmp_path / "d2"
    for d in (data, other):
        d.mkdir()
        (d / "00000000.tar").write_bytes(b"")
    run = tmp_path / "runs" / "e1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "epoch_latest.pt").write_bytes(b"x")
    argv = train.open_clip_args("toy", train.find_shards(str(data)), str(tmp_path / "runs"), "e1", num_checkpoints=1,
                                precision="fp32", workers=0, log_every_n_steps=1)
    info = json.dumps({"scale": "toy", "checkpoint": str(run / "checkpoints" / "epoch_latest.pt"),
                       "data_dir": str(data), "open_clip_args": argv, "data_fingerprint": train.data_fingerprint(data)})
    (run / "info.json").write_text(info)
    base = ["train", "--output_dir", str(tmp_path / "runs"), "--exp_name", "e1"]
    assert main(base + ["--data_dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"data_dir: run {data}, now {other}" in err and "--exp_name" in err
    assert main(base + ["--data_dir", str(data), "--seed", "1"]) == 2
    assert "seed: run 0, now 1" in capsys.readouterr().err
    assert main(base + ["--data_dir", str(data)]) == 0
    io = capsys.readouterr()
    assert "its checkpoint is reused, nothing is trained" in io.err and "epoch_latest.pt" in io.out
    assert (run / "info.json").read_text() == info
    (data / "00000000.tar").write_bytes(b"resharded anew")  # same folder, other data
    assert main(base + ["--data_dir", str(data)]) == 2
    assert "data_dir contents: run " in capsys.readouterr().err


def test_train_resumes_an_unfinished_run_only_with_the_same_settings(tmp_path, capsys, monkeypatch):
    """A run stopped before it finished (no info.json) is resumed by open_clip from its last
    checkpoint: with the settings it started with, not with other data."""
    data, other = tmp_path / "d", tmp_path / "d2"
    for d in (data, other):
        d.mkdir()
        (d / "00000000.tar").write_bytes(b"")
    calls = []
    monkeypatch.setattr(train, "_run_open_clip", lambda argv, toy: calls.append(argv) or -1)  # stopped early
    base = ["train", "--output_dir", str(tmp_path / "runs"), "--exp_name", "e1"]
    assert main(base + ["--data_dir", str(data)]) == 2 and len(calls) == 1
    assert "training did not produce" in capsys.readouterr().err
    assert (tmp_path / "runs" / "e1" / train.STARTED).is_file()
    assert main(base + ["--data_dir", str(other)]) == 2 and len(calls) == 1
    assert f"holds an unfinished run with other settings (data_dir: run {data}, now {other})" in capsys.readouterr().err
    assert main(base + ["--data_dir", str(data)]) == 2 and len(calls) == 2  # the same settings: resumed


def test_task_list_matches_datacomp():
    assert len(evaluate.TASKS) == 40 and len(evaluate.SCORED) == 38
    groups = {g: [t.name for t in evaluate.TASKS if t.group == g] for g in evaluate.GROUPS}
    assert groups["ImageNet"] == ["ImageNet 1k"]
    assert len(groups["ImageNet dist. shifts"]) == 6 and len(groups["VTAB"]) == 13
    assert groups["Retrieval"] == ["Flickr", "MSCOCO", "WinoGAViL"]


def test_summary_over_all_38_and_over_tasks_present():
    lines = [{"dataset": t.name, "metrics": {"main_metric": 0.5 if t.group else 0.25}} for t in evaluate.SCORED]
    s = evaluate.summarize(lines)
    assert s["VTAB"] == {"value": 0.5, "n": 13, "of": 13} and s["Average"]["n"] == 38
    assert "Average over 38" in evaluate.format_summary(s)
    part = evaluate.summarize(lines[:3])
    assert part["Average"]["n"] == 3 and part["ImageNet"]["value"] is None
    text = evaluate.format_summary(part)
    assert "Average over the 3 tasks present" in text and "(2 of 13 tasks present)" in text


# --------------------------------------------------------------------------------------------
# native evaluate: results reused only when made from the same checkpoint and sets


@pytest.fixture(scope="module")
def toy_task_sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_tasks")
    evaluate.build_toy_tasks(str(d))
    return d


@pytest.fixture
def toy_eval(toy_task_sets, tmp_path, monkeypatch):
    """A training run (info.json, a checkpoint file), a copy of the toy tasks and the evaluate command;
    the model is not loaded and each task's evaluation is faked, its calls recorded."""
    import shutil

    sets, run = tmp_path / "evalsets", tmp_path / "run"
    shutil.copytree(toy_task_sets, sets)
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "epoch_latest.pt"
    ckpt.write_bytes(b"weights")
    (run / "info.json").write_text(json.dumps({"scale": "toy", "checkpoint": str(ckpt),
                                               "scale_config": {"model": "toy"}}))
    calls = []
    monkeypatch.setattr(evaluate, "load_model", lambda info, device: (None, None, None))
    monkeypatch.setattr(evaluate, "_evaluate_task",
                        lambda task, *a: calls.append(task.name) or {"acc1": 0.5, "mean_recall@1": 0.25})
    argv = ["evaluate", "--train_output_dir", str(run), "--data_dir", str(sets), "--tasks", "toy", "--quiet"]
    return run, sets, calls, argv


def test_evaluate_reuses_results_made_from_the_same_checkpoint_and_sets(toy_eval, capsys, monkeypatch):
    import shutil

    run, sets, calls, argv = toy_eval
    fake = evaluate._evaluate_task
    monkeypatch.setattr(evaluate, "_evaluate_task", lambda task, *a: fake(task) if not calls else 1 / 0)
    with pytest.raises(ZeroDivisionError):  # killed during the second task: the first one's record is kept
        evaluate.evaluate(str(run), str(sets), "toy", progress=False)
    assert list(json.loads((run / "eval_results.sources.json").read_text())) == ["Toy photos"]
    monkeypatch.setattr(evaluate, "_evaluate_task", fake)
    assert main(argv) == 0 and calls == ["Toy photos", "Toy photo captions"]
    lines = [json.loads(l) for l in (run / "eval_results.jsonl").read_text().splitlines()]
    assert [sorted(l) for l in lines] == [["dataset", "key", "metrics"]] * 2  # DataComp's format, nothing added
    capsys.readouterr()
    shutil.copytree(sets, run.parent / "copy")  # the same sets in another folder
    for data_dir in (sets, run.parent / "copy"):
        assert main(argv[:4] + [str(data_dir)] + argv[5:]) == 0 and len(calls) == 2
        err = capsys.readouterr().err
        assert f"2 task(s) taken from the existing {run / 'eval_results.jsonl'}" in err
        assert "made from this checkpoint" in err and "unknown" not in err


def test_evaluate_refuses_results_of_another_checkpoint(toy_eval, clone, capsys):
    import os

    run, sets, calls, argv = toy_eval
    assert main(argv) == 0 and len(calls) == 2
    results = (run / "eval_results.jsonl").read_text()
    ckpt = run / "checkpoints" / "epoch_latest.pt"
    ckpt.write_bytes(b"retrained")  # the run trained anew under the same folder
    os.utime(ckpt, (1e9, 1e9))
    capsys.readouterr()
    for backend in ([], ["--datacomp", str(clone), "--datacomp_python", sys.executable]):
        assert main(argv[:5] + backend if backend else argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "Toy photos, Toy photo captions from checkpoint" in err and "(7 bytes" in err and "(9 bytes" in err
        assert "delete it, or give another --output_dir" in err
    assert len(calls) == 2 and (run / "eval_results.jsonl").read_text() == results
    assert not (run.parent / "calls.jsonl").exists()  # DataComp's evaluate.py did not run either


def test_evaluate_refuses_results_of_other_evaluation_sets(toy_eval, capsys):
    import shutil

    run, sets, calls, argv = toy_eval
    assert main(argv) == 0 and len(calls) == 2
    other = run.parent / "other"
    shutil.copytree(sets, other)
    (other / "wds_toy-photos_test" / "classnames.txt").write_text("other\nclasses\n")
    capsys.readouterr()
    assert main(argv[:4] + [str(other)] + argv[5:]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"Toy photos from another evaluation set ({sets / 'wds_toy-photos_test'}, now {other}" in err
    assert "Toy photo captions" not in err and len(calls) == 2
    (sets / "wds_toy-photo_captions_test" / "test" / "0.tar").write_bytes(b"resharded")  # the same folder, new files
    assert main(argv) == 2
    assert f"Toy photo captions from another evaluation set ({sets / 'wds_toy-photo_captions_test'} has changed since)" \
        in capsys.readouterr().err and len(calls) == 2


def test_evaluate_results_with_no_record_are_reused_with_unknown_sources(toy_eval, capsys):
    run, sets, calls, argv = toy_eval
    line = {"key": "toy/photos", "dataset": "Toy photos", "metrics": {"acc1": 0.1, "main_metric": 0.1}}
    (run / "eval_results.jsonl").write_text(json.dumps(line) + "\n")  # as DataComp's evaluate.py writes it
    assert main(argv) == 0 and calls == ["Toy photo captions"]
    err = capsys.readouterr().err
    assert f"1 task(s) taken from the existing {run / 'eval_results.jsonl'}, not evaluated again" in err
    assert "made from an unknown checkpoint and evaluation sets" in err
    assert list(json.loads((run / "eval_results.sources.json").read_text())) == ["Toy photo captions"]


# --------------------------------------------------------------------------------------------
# experiments and compare


def test_every_paper_experiment_is_named_with_table1_numbers():
    assert set(experiments.EXPERIMENTS) == {"table1-medium", "table1-large", "table2", "table3", "table4",
                                            "table5", "figure4"}
    t1 = experiments.get_experiment("table1-medium")
    fused = experiments.find_row(t1, "sieve-clipscore-alpha-0-5-20")
    assert fused.filter == "sieve_clip" and fused.alpha == 0.5 and fused.fraction == 0.2
    assert fused.published == {"ImageNet": 30.3, "ImageNet dist. shifts": 25.4, "VTAB": 36.2, "Retrieval": 27.8,
                               "Average": 35.4}
    assert experiments.find_row(t1, "clipscore-l-14-30").fraction == 0.3
    assert experiments.find_row(experiments.get_experiment("table1-large"), "sieve-20").published["Average"] == 52.3
    t5 = experiments.get_experiment("table5")
    assert [r.num_captions for r in t5.rows if r.filter == "sieve"] == [1, 2, 4, 8]
    assert [r.published.get("Average") for r in t5.rows[4:]] == [None, 34.40, 35.15, 34.35]
    assert {r.captioner for r in experiments.get_experiment("table2").rows} == {"blip-base-14m", "blip-base-129m"}
    assert [r.fraction for r in experiments.get_experiment("figure4").rows] == [0.1, 0.15, 0.2, 0.25, 0.3]


def test_compare_prints_measured_published_and_difference(tmp_path, capsys):
    lines = [{"key": t.key, "dataset": t.name, "metrics": {"main_metric": 0.3}} for t in evaluate.SCORED]
    (tmp_path / "eval_results.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    assert main(["compare", str(tmp_path), "--experiment", "table1-medium", "--row", "sieve-20"]) == 0
    out = capsys.readouterr().out
    assert "Average" in out and "30.0" in out and "34.6" in out and "-4.6" in out
    assert main(["compare", str(tmp_path / "eval_results.jsonl")]) == 2
    assert "--experiment" in capsys.readouterr().err


def test_compare_says_toy_results_are_not_comparable_with_the_paper(tmp_path, capsys):
    toy = [{"key": t.key, "dataset": t.name, "metrics": {"main_metric": 0.3}} for t in evaluate.TOY_TASKS]
    (tmp_path / "eval_results.jsonl").write_text("\n".join(json.dumps(l) for l in toy))
    assert main(["compare", str(tmp_path), "--experiment", "table1-medium", "--row", "sieve-20"]) == 0
    out = capsys.readouterr().out
    assert "measured with the toy tasks: not comparable" in out
    assert "34.6" not in out and "+" not in out and "-4.6" not in out
    assert [l.split()[2:4] for l in out.splitlines() if l.strip().startswith("Average")] == [["n/a", "n/a"]]
    # real task names measured with a toy-scale model (the training run's info.json beside the results)
    real = [{"key": t.key, "dataset": t.name, "metrics": {"main_metric": 0.3}} for t in evaluate.SCORED]
    (tmp_path / "eval_results.jsonl").write_text("\n".join(json.dumps(l) for l in real))
    (tmp_path / "info.json").write_text(json.dumps({"scale": "toy"}))
    assert main(["compare", str(tmp_path / "eval_results.jsonl"), "--experiment", "table1-medium",
                 "--row", "sieve-20"]) == 0
    out = capsys.readouterr().out
    assert "measured with a toy-scale model: not comparable" in out and "34.6" not in out


# --------------------------------------------------------------------------------------------
# user mistakes: one line each, before any work


def test_harness_mistakes_are_one_line_errors(tmp_path, capsys):
    text, folder, run = tmp_path / "text.txt", tmp_path / "d", tmp_path / "run"
    text.write_text("x")
    folder.mkdir()
    (folder / "00000000.tar").write_bytes(b"")
    run.mkdir()
    (run / "info.json").write_text(json.dumps({"scale": "toy", "checkpoint": str(run / "missing.pt")}))
    (tmp_path / "rp1").mkdir()  # a reproduce --out folder, not OUT/EXPERIMENT
    train_ = ["train", "--data_dir", str(folder), "--output_dir", str(tmp_path / "runs"), "--exp_name", "e"]
    eval_ = ["evaluate", "--train_output_dir", str(run)]
    repro = ["reproduce", "table1-medium", "--pool", str(tmp_path), "--out", str(tmp_path / "r"), "--dry-run",
             "--eval_data_dir", str(folder)]
    cases = [
        (["train", "--data_dir", str(folder), "--output_dir", str(text), "--exp_name", "e"], "is a file, not a folder"),
        (train_ + ["--workers", "-1"], "--workers must be at least 0, got -1"),
        (train_ + ["--num_checkpoints", "0"], "--num_checkpoints must be at least 1, got 0"),
        (train_ + ["--accum_freq", "0"], "--accum_freq must be at least 1, got 0"),
        (train_ + ["--precision", "fp64"], "--precision fp64 is not one of open_clip's"),
        (eval_ + ["--toy_tasks"], "--toy_tasks needs --data_dir"),
        (eval_ + ["--toy_tasks", "--data_dir", str(text)], f"--data_dir {text} is a file"),
        (eval_ + ["--data_dir", str(folder), "--output_dir", str(text)], f"--output_dir {text} is a file"),
        (eval_ + ["--data_dir", str(folder), "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (repro + ["--samples_per_gpu_second", "0"], "--samples_per_gpu_second must be a positive number"),
        (repro + ["--samples_per_gpu_second", "-5"], "--samples_per_gpu_second must be a positive number"),
        (["compare", str(tmp_path / "rp1")], "give OUT/EXPERIMENT (e.g. reproduce/table1-medium)"),
        (["compare", str(tmp_path / "nonexist")], "does not exist"),
        (["reshard", "--shards_dir", str(folder), "--subset", str(tmp_path / "none.npy"), "--output_dir",
          str(tmp_path / "o")], "none.npy does not exist"),
        (["reshard", "--shards_dir", str(folder), "--subset", str(folder), "--output_dir", str(tmp_path / "o")],
         f"--subset {folder} is a folder; give the subset .npy file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r").exists()


def test_evaluate_leaves_no_root_handler_behind(tmp_path, monkeypatch):
    """open_clip logs with the root logging.info, which on a root logger without handlers installs one
    (basicConfig); left there, reproduce's next training printed every open_clip line twice
    ('INFO:root:...' and open_clip's own format)."""
    import logging

    from datacomp_sieve.harness import evaluate as ev

    run = tmp_path / "run"
    run.mkdir()
    (run / "c.pt").write_bytes(b"x")
    (run / "info.json").write_text(json.dumps({"scale": "toy", "checkpoint": str(run / "c.pt")}))
    (tmp_path / "sets").mkdir()
    added = logging.StreamHandler()

    def load_model(info, device):
        logging.getLogger().addHandler(added)  # what basicConfig does
        return None, None, None

    monkeypatch.setattr(ev, "load_model", load_model)
    ev.evaluate(str(run), str(tmp_path / "sets"), "toy", progress=False)
    assert added not in logging.getLogger().handlers


def test_native_dry_run_needs_no_evaluation_sets(tmp_path, capsys):
    assert main(["reproduce", "table1-medium", "--rows", "sieve-20", "--pool", str(tmp_path / "pool"),
                 "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "evaluate --train_output_dir" in out and "--data_dir EVAL_DATA_DIR" in out
    assert "--eval_data_dir is required to run" in out and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------
# DataComp backend with a fake clone

_STUB = textwrap.dedent('''
    import json, os, sys, pickle
    from pathlib import Path
    name = Path(sys.argv[0]).name
    with open(os.environ["FAKE_DC_LOG"], "a") as f:
        f.write(json.dumps({"script": name, "argv": sys.argv[1:], "cwd": os.getcwd()}) + "\\n")
    fail = os.environ.get("FAKE_DC_FAIL", "")
    if fail == "exit":
        print("Traceback: something broke", flush=True)
        sys.exit(3)
    a = sys.argv[1:]
    def opt(flag):
        return a[a.index(flag) + 1] if flag in a else None
    if fail == "missing":
        sys.exit(0)
    if name == "resharder.py":
        out = Path(opt("-o"))
        assert out.is_dir() and (not any(out.iterdir()) or "--overwrite" in a), "refusing to overwrite"
        (out / "meta.json").write_text(json.dumps({"output_count": 1, "output_shard_count": 1}))
    elif name == "train.py":
        run = Path(opt("--output_dir")) / opt("--exp_name")
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "epoch_latest.pt").write_bytes(b"x")
        (run / "info.pkl").write_bytes(pickle.dumps({"scale": opt("--scale")}))
        print("world size", os.environ.get("WORLD_SIZE"))
    elif name == "evaluate.py":
        out = Path(opt("--output_dir") or opt("--train_output_dir"))
        with open(out / "eval_results.jsonl", "a") as f:
            f.write(json.dumps({"key": "imagenet1k", "dataset": "ImageNet 1k", "metrics": {"main_metric": 0.25}}) + "\\n")
''')


@pytest.fixture
def clone(tmp_path, monkeypatch):
    d = tmp_path / "datacomp"
    d.mkdir()
    for s in datacomp.SCRIPTS:
        (d / s).write_text(_STUB)
    monkeypatch.setenv("FAKE_DC_LOG", str(tmp_path / "calls.jsonl"))
    return d


def _calls(tmp_path):
    return [json.loads(l) for l in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_datacomp_backend_runs_exact_commands_from_the_clone(clone, tmp_path, capsys):
    subset = _subset(tmp_path / "s.npy", ["0" * 31 + "1", "0" * 31 + "2"])
    out, runs = tmp_path / "resharded", tmp_path / "runs"
    dc = ["--datacomp", str(clone), "--datacomp_python", sys.executable]
    assert main(["reshard", "--shards_dir", str(tmp_path / "pool"), "--subset", subset, "--output_dir", str(out),
                 "--num_workers", "2"] + dc) == 0
    assert main(["train", "--data_dir", str(out), "--output_dir", str(runs), "--exp_name", "e1", "--scale", "small",
                 "--num_gpus", "1", "--seed", "3"] + dc) == 0
    assert main(["evaluate", "--train_output_dir", str(runs / "e1"), "--data_dir", str(tmp_path / "evalsets")] + dc) == 0
    calls = _calls(tmp_path)
    assert [c["script"] for c in calls] == ["resharder.py", "train.py", "evaluate.py"]
    assert all(c["cwd"] == str(clone) for c in calls)
    assert calls[0]["argv"] == ["-i", str(tmp_path / "pool"), "-o", str(out), "-s", subset, "-j", "2"]
    assert calls[1]["argv"] == ["--scale", "small", "--data_dir", str(out), "--output_dir", str(runs),
                                "--exp_name", "e1", "--seed", "3"]
    assert calls[2]["argv"] == ["--train_output_dir", str(runs / "e1"), "--data_dir", str(tmp_path / "evalsets")]
    io = capsys.readouterr()
    assert "world size 1" in io.err  # streamed from train.py, run by torchrun
    assert "ImageNet" in io.out and "25.0" in io.out and "Average over the 1 tasks present" in io.out


def test_datacomp_reshard_pitfalls_and_failures_are_one_line(clone, tmp_path, monkeypatch, capsys):
    subset = _subset(tmp_path / "s.npy", ["0" * 31 + "1"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.tar").write_text("x")
    dc = ["--datacomp", str(clone), "--datacomp_python", sys.executable]
    base = ["reshard", "--shards_dir", str(tmp_path), "--subset", subset, "--output_dir", str(out)] + dc
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err and not (tmp_path / "calls.jsonl").exists()
    assert main(base + ["--overwrite"]) == 0
    assert _calls(tmp_path)[-1]["argv"][-1] == "--overwrite"
    # the input pool is never the output: DataComp's resharder with --overwrite would empty it
    assert main(["reshard", "--shards_dir", str(out), "--subset", subset, "--output_dir", str(tmp_path)]
                + dc + ["--overwrite"]) == 2
    assert "contains --shards_dir" in capsys.readouterr().err and len(_calls(tmp_path)) == 1
    monkeypatch.setenv("FAKE_DC_FAIL", "missing")
    fresh = ["reshard", "--shards_dir", str(tmp_path), "--subset", subset, "--output_dir", str(tmp_path / "o2")] + dc
    assert main(fresh) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "did not write" in err and "meta.json" in err
    monkeypatch.setenv("FAKE_DC_FAIL", "exit")
    assert main(fresh) == 2
    assert "failed (exit code 3): Traceback: something broke" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["train", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path), "--exp_name", "x",
                 "--scale", "toy"] + dc) == 2
    assert "toy" in capsys.readouterr().err
    assert main(["reshard", "--shards_dir", "x", "--subset", subset, "--output_dir", "y",
                 "--datacomp", str(tmp_path)]) == 2
    assert "not a DataComp clone" in capsys.readouterr().err


def test_submit_always_passes_dataset_size_and_samples(clone, tmp_path, capsys):
    subset = _subset(tmp_path / "s.npy", ["0" * 31 + "1", "0" * 31 + "2", "0" * 31 + "3"])
    run = tmp_path / "run"
    rest = ["--samples", subset, "--method_name", "sieve", "--author", "A", "--email", "a@b.c", "--hf_username", "u",
            "--hf_repo_name", "r", "--datacomp", str(clone), "--datacomp_python", sys.executable]
    # checked before DataComp's evaluate.py evaluates anything
    assert main(["submit", "--train_output_dir", str(run)] + rest) == 2
    assert "has no info.pkl" in capsys.readouterr().err and not (tmp_path / "calls.jsonl").exists()
    run.mkdir()
    (run / "info.pkl").write_bytes(b"")
    args = ["submit", "--train_output_dir", str(run)] + rest
    assert main(args + ["--dataset-size", "-5"]) == 2
    assert "--dataset-size must be at least 1, got -5" in capsys.readouterr().err
    assert not (tmp_path / "calls.jsonl").exists()
    assert main(args) == 0
    argv = _calls(tmp_path)[-1]["argv"]
    assert argv[argv.index("--dataset-size") + 1] == "3" and argv[argv.index("--samples") + 1] == subset
    assert "--submit" in argv and argv[argv.index("--track") + 1] == "filtering"
    assert main(args + ["--dataset-size", "1234"]) == 0
    argv = _calls(tmp_path)[-1]["argv"]
    assert argv[argv.index("--dataset-size") + 1] == "1234"


def test_reproduce_dry_run_prints_commands_and_estimate(clone, tmp_path, capsys):
    assert main(["reproduce", "table1-medium", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "r"),
                 "--datacomp", str(clone), "--datacomp_python", sys.executable, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("resharder.py -i") == 4 and out.count("train.py --scale medium") == 4
    assert "--name sieve_clip" in out and "--alpha 0.5" in out and "--name clip_score" in out
    assert "Basic: not run" in out
    assert "~25,600,000 samples kept" in out and "GPU-hours" in out and "ASSUMED" in out
    # the two Sieve rows also say what scoring the pool costs, from the measured H200 rate
    assert out.count("Sieve scoring of the pool") == 2 and "~35 GPU-hours" in out
    assert not (tmp_path / "calls.jsonl").exists() and not (tmp_path / "r").exists()
    # another captioner: its scores go to a store named after it, never to the BLIP rows' store
    assert main(["reproduce", "table1-medium", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "r"),
                 "--datacomp", str(clone), "--datacomp_python", sys.executable, "--dry-run", "--captioner", "label"]) == 0
    out = capsys.readouterr().out
    assert out.count("sieve_scores/label-r8-all-MiniLM-L6-v2 ") == 2 and "sieve_scores/blip" not in out
