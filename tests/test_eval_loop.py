"""The whole loop on the toy pool, through the CLI, native backend (what CI runs):
toy pool -> Sieve scores (label captioner) -> sieve_clip selection (CLIPScore from the toy pool's
tiny random CLIP: meaningless values, the wiring is what is tested) -> native reshard -> toy
training -> toy evaluation -> summary table; real outputs are checked at each step."""

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datacomp_sieve.cli import main
from datacomp_sieve.toy_pool import rows_by_uid
from datacomp_sieve.uids import pair_to_uid


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")


def test_toy_loop_filter_reshard_train_evaluate(toy_pool, tmp_path, capsys):
    import open_clip
    import torch

    pool_rows = rows_by_uid(toy_pool)
    manifest = json.loads((toy_pool / "pool_manifest.json").read_text())
    assert "tiny" in manifest["clip"]["mode"]  # CLIPScore columns from a tiny random CLIP, labelled so

    # 1. score and select: Sieve fused with the metadata's (tiny-CLIP) CLIPScore, top 50%
    scores, subset = tmp_path / "scores", tmp_path / "subset.npy"
    assert main(["filter", "--name", "sieve_clip", "--fraction", "0.5", "--metadata_dir", str(toy_pool / "metadata"),
                 "--scores_dir", str(scores), "--shards_dir", str(toy_pool / "shards"), "--captioner", "label",
                 "--device", "cpu", "--save_path", str(subset), "--quiet"]) == 0
    kept = [pair_to_uid(hi, lo) for hi, lo in np.load(subset)]
    assert 15 < len(kept) < 60 and kept == sorted(kept) and len(set(kept)) == len(kept)

    # 2. native reshard: every kept uid that was downloaded, once
    shards = tmp_path / "shards"
    assert main(["reshard", "--shards_dir", str(toy_pool / "shards"), "--subset", str(subset),
                 "--output_dir", str(shards), "--shard_size", "8", "--quiet"]) == 0
    written = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            names = t.getnames()
            written += [json.loads(t.extractfile(n).read())["uid"] for n in names if n.endswith(".json")]
            assert all(n.split(".", 1)[1] in ("jpg", "txt", "json") for n in names)
    downloaded = {u for u in kept if pool_rows[u]["status"] == "success"}
    meta = json.loads((shards / "meta.json").read_text())
    assert sorted(written) == sorted(downloaded) and meta["output_count"] == len(written)
    assert meta["not_found"] == len(kept) - len(downloaded) - sum(meta["unusable"].values())

    # 3. toy training
    runs = tmp_path / "runs"
    loggers = logging.root.manager.loggerDict
    levels = {n: lg.level for n, lg in loggers.items() if isinstance(lg, logging.Logger)}
    assert main(["train", "--data_dir", str(shards), "--output_dir", str(runs), "--exp_name", "sieve_clip",
                 "--scale", "toy"]) == 0
    # open_clip's logging setup (every logger to INFO: torch's print at exit) is undone
    assert {n: lg.level for n, lg in loggers.items() if isinstance(lg, logging.Logger) and n in levels} == levels
    run = runs / "sieve_clip"
    ckpt = run / "checkpoints" / "epoch_latest.pt"
    info = json.loads((run / "info.json").read_text())
    assert info["checkpoint"] == str(ckpt) and (run / "info.pkl").is_file()
    open_clip.add_model_config(info["model_config_file"])
    model = open_clip.create_model("datacomp-sieve-toy", pretrained=str(ckpt))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and sum(p.numel() for p in model.parameters()) > 0

    # 4. toy evaluation and the summary
    capsys.readouterr()
    assert main(["evaluate", "--train_output_dir", str(run), "--data_dir", str(tmp_path / "evalsets"),
                 "--toy_tasks", "--quiet"]) == 0
    io = capsys.readouterr()
    out = io.out
    lines = [json.loads(l) for l in (run / "eval_results.jsonl").read_text().splitlines()]
    assert [l["dataset"] for l in lines] == ["Toy photos", "Toy photo captions"]
    for l in lines:
        assert 0.0 <= l["metrics"]["main_metric"] <= 1.0
    assert 0 <= lines[0]["metrics"]["acc5"] <= 1 and "image_retrieval_recall@1" in lines[1]["metrics"]
    assert "Average over the 2 tasks present" in out and "Retrieval" in out and "(1 of 3 tasks present)" in out
    assert "taken from the existing" not in io.err

    # 5. evaluating again reuses the results file, and says so (here with no evaluation sets at all)
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--train_output_dir", str(run), "--data_dir", str(tmp_path / "empty"),
                 "--tasks", "toy", "--quiet"]) == 0
    assert f"2 task(s) taken from the existing {run / 'eval_results.jsonl'}" in capsys.readouterr().err


def test_reproduce_runs_a_row_natively_on_the_toy_scale(toy_pool, tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "table1-medium", "--rows", "no-filtering", "--pool", str(toy_pool), "--out", str(out),
                 "--scale", "toy", "--tasks", "toy", "--eval_data_dir", str(tmp_path / "evalsets")]) == 0
    text = capsys.readouterr().out
    row = out / "table1-medium" / "no-filtering"
    assert (row / "train" / "no-filtering" / "checkpoints" / "epoch_latest.pt").is_file()
    # toy tasks at the toy scale: the paper's numbers are not set next to them as if comparable
    assert "No filtering" in text and "25.8" not in text
    assert "measured with the toy tasks and a toy-scale model: not comparable" in text
    assert main(["compare", str(out / "table1-medium")]) == 0
    text = capsys.readouterr().out
    assert "table1-medium: No filtering" in text and "the toy tasks and a toy-scale model: not comparable" in text
    assert Path(row / "subset.npy").is_file()
