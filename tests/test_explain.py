"""explain: one image, several alt-texts, the same numbers the scoring engine stores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datacomp_sieve.shards import iter_samples, list_shards

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "datacomp_sieve.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def toy_sample(toy_pool, tmp_path_factory):
    shard = list_shards(str(toy_pool / "shards"))[0]
    s = next(x for x in iter_samples(shard) if x.status == "ok")
    path = tmp_path_factory.mktemp("explain") / f"{s.key}.jpg"
    path.write_bytes(s.image)
    return s, path


def test_explain_json_matches_the_engine(toy_pool, toy_sample, tmp_path):
    from datacomp_sieve.score import ScoreConfig, score_pool

    s, path = toy_sample
    other = "a grey brick wall"
    r = run_cli("explain", "--image", str(path), "--text", s.text, "--text", other, "--captioner", "label",
                "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"captions", "masked_captions", "results"}
    assert len(out["captions"]) == 8 and len(out["results"]) == 2
    first = out["results"][0]
    assert set(first) == {"text", "masked_text", "similarities", "sieve_score", "clip_score", "best_caption"}
    assert first["clip_score"] is None and len(first["similarities"]) == 8
    assert first["sieve_score"] == pytest.approx(max(first["similarities"]), abs=1e-5)
    # the stored score of the same sample, from the engine
    store = tmp_path / "store"
    score_pool(str(toy_pool / "shards"), str(store), ScoreConfig(captioner="label", device="cpu"), progress=False)
    import pyarrow.parquet as pq

    row = [x for x in pq.read_table(store / f"{list_shards(str(toy_pool / 'shards'))[0].stem}.parquet").to_pylist()
           if x["uid"] == s.uid][0]
    assert first["sieve_score"] == pytest.approx(row["sieve_score"], abs=1e-5)
    assert out["captions"] == row["captions"]


def test_explain_text_output_and_clip(toy_sample):
    _, path = toy_sample
    r = run_cli("explain", "--image", str(path), "--text", "a photo of a cat", "--captioner", "label",
                "--device", "cpu", "--num_captions", "3", "--clip_model", "ViT-B-32", "--clip_pretrained", "tiny")
    assert r.returncode == 0, r.stderr
    assert "stand-in" in r.stdout and "Sieve score:" in r.stdout and "CLIPScore: " in r.stdout
    assert "' a cat'" in r.stdout  # the masked alt-text, quirks included (leading space kept)


def test_explain_user_errors(tmp_path):
    r = run_cli("explain", "--image", str(tmp_path / "missing.jpg"), "--text", "x", "--captioner", "label")
    assert r.returncode == 2 and r.stderr.strip().endswith("image not found: " + str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>")
    r = run_cli("explain", "--image", str(bad), "--text", "x", "--captioner", "label")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot use" in r.stderr
    r = run_cli("explain", "--image", str(tmp_path), "--text", "x", "--captioner", "label")
    assert r.returncode == 2 and r.stderr.strip().endswith(f"--image {tmp_path} is a folder; give one image file")
