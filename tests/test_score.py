"""The scoring engine on the toy pool: store layout, statuses, ranking, determinism, resume, and
several jobs sharing one store (``score --part``)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datacomp_sieve import cli
from datacomp_sieve.errors import UserError
from datacomp_sieve.score import ScoreConfig, ShardScorer, ShardsFailed, parse_part, part_of, score_pool
from datacomp_sieve.store import TMP_MAX_AGE_S, ScoreStore
from datacomp_sieve.toy_pool import rows_by_uid

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def label_config(**kw):
    return ScoreConfig(**{"captioner": "label", "device": "cpu", "batch_size": 8, **kw})


@pytest.fixture(scope="module")
def scorer():
    return ShardScorer(label_config())


@pytest.fixture(scope="module")
def store(toy_pool, scorer, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "store"
    score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer)
    return out


def read(store_dir):
    return pq.read_table(sorted(Path(store_dir).glob("*.parquet"))).to_pylist()


def test_one_file_per_shard_and_every_tar_sample_has_a_row(toy_pool, store):
    tars = sorted(p.stem for p in (toy_pool / "shards").glob("*.tar"))
    assert sorted(p.stem for p in Path(store).glob("*.parquet")) == tars
    rows = read(store)
    downloaded = sum(json.loads(p.read_text())["successes"] for p in (toy_pool / "shards").glob("*_stats.json"))
    assert len(rows) == downloaded
    assert len({r["uid"] for r in rows}) == len(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows)  # img2dataset wrote only images it could re-encode
    for r in ok:
        assert 0.0 <= r["sieve_score"] <= 1.0 + 1e-6 and r["sieve_mean"] <= r["sieve_score"] + 1e-6
        assert len(r["captions"]) == 8 and r["best_caption"] in r["captions"]
        assert all(c.startswith("a photo of a ") for c in r["captions"])


def test_manifest_reconciles_counts(store):
    m = json.loads((Path(store) / "manifest.json").read_text())
    rows = read(store)
    assert m["rows"] == len(rows) == sum(m["status"].values())
    assert m["config"]["captioner"] == "label" and "stand-in" in m["models"]["captioner"]
    assert m["run"]["versions"]["torch"]
    assert m["tar"]["samples"] == len(rows)


def test_label_captioner_ranks_aligned_text_above_misaligned(toy_pool, store):
    meta = rows_by_uid(toy_pool)
    by_photo = {}
    for r in read(store):
        info = meta[r["uid"]]
        by_photo.setdefault(info["photo"], {}).setdefault(info["category"], []).append(r["sieve_score"])
    # The stand-in can only say ImageNet class names: a tray of coins and a deep-field sky have no
    # class of their own ("wall clock", "planetarium"), so nothing is expected of it there.
    no_imagenet_subject = {"coins", "hubble_deep_field"}
    losers = []
    for photo, cats in by_photo.items():
        if "aligned" in cats and "misaligned" in cats and photo not in no_imagenet_subject:
            if not max(cats["aligned"]) > max(cats["misaligned"]):
                losers.append(photo)
    assert len(by_photo) - len(no_imagenet_subject) >= 15
    assert losers == []
    aligned = np.mean([v for c in by_photo.values() for v in c.get("aligned", [])])
    misaligned = np.mean([v for c in by_photo.values() for v in c.get("misaligned", [])])
    assert aligned > misaligned + 0.1  # over all photos, coins and sky included


def test_same_seed_same_scores_and_config_guard(toy_pool, store, scorer, tmp_path):
    again = tmp_path / "again"
    score_pool(str(toy_pool / "shards"), str(again), label_config(), progress=False, scorer=scorer)
    for a, b in zip(sorted(Path(store).glob("*.parquet")), sorted(again.glob("*.parquet"))):
        assert pq.read_table(a).equals(pq.read_table(b))
    with pytest.raises(UserError, match=r"other settings \(config.num_captions: 8 -> 4\)"):
        score_pool(str(toy_pool / "shards"), str(again), label_config(num_captions=4), progress=False)


def test_the_text_batch_size_changes_scores_by_rounding_only(toy_pool, store, scorer, tmp_path):
    """--text_batch_size: the encoder's forwards take that many sentences; the store records it
    (a store made without it, as before the setting existed, still resumes at the default); the
    scores equal the default's to float32 rounding, the captions exactly."""
    assert scorer.text.batch_size == 256
    out = tmp_path / "small"
    cfg = label_config(text_batch_size=5)
    small = ShardScorer(cfg)
    assert small.text.batch_size == 5
    m = score_pool(str(toy_pool / "shards"), str(out), cfg, progress=False, scorer=small)
    assert m["config"]["text_batch_size"] == 5
    assert label_config(text_batch_size=256).resolved().text_batch_size is None  # the default, given
    a, b = read(store), read(out)
    assert [r["captions"] for r in a] == [r["captions"] for r in b] and len(a) > 20
    assert np.allclose([r["sieve_score"] for r in a], [r["sieve_score"] for r in b], atol=1e-5)
    config = json.loads((Path(store) / "config.json").read_text())
    assert config["config"]["text_batch_size"] is None
    del config["config"]["text_batch_size"]
    old = tmp_path / "old"
    shutil.copytree(store, old)
    (old / "config.json").write_text(json.dumps(config))
    m = score_pool(str(toy_pool / "shards"), str(old), label_config(), progress=False, scorer=scorer)
    assert m["rows"] == len(a)


def test_score_flag_errors_are_one_line(toy_pool, tmp_path, capsys):
    (tmp_path / "fake.pth").write_text("a text file, not a checkpoint")
    (tmp_path / "file").write_text("x")
    base = ["score", "--shards_dir", str(toy_pool / "shards"), "--quiet"]
    for extra, message in [
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cpu", "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--device", "cpu", "--text_batch_size", "0"], "--text_batch_size must be at least 1, got 0"),
        (["--device", "cpu", "--max_retries", "-1"], "--max_retries must be 0 or more, got -1"),
        (["--device", "cpu", "--captioner", str(tmp_path / "fake.pth")], "is not a readable torch checkpoint"),
        (["--scores_dir", str(tmp_path / "file")], "is a file, not a folder"),
    ]:
        extra = extra if "--scores_dir" in extra else extra + ["--scores_dir", str(tmp_path / "s")]
        assert cli.main(base + extra) == 2, extra
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("datacomp_sieve")
               and "Loading weights" not in line]
        assert len(err) == 1 and message in err[0], (extra, err)


def test_a_folder_that_is_not_a_store_is_never_written_or_deleted(toy_pool, tmp_path):
    """--scores_dir given the pool's metadata (or any folder with files and no config.json): refused
    before any model loads, with --overwrite too, and nothing in it is touched."""
    import shutil

    meta = tmp_path / "metadata"
    shutil.copytree(toy_pool / "metadata", meta)
    before = sorted((p.name, p.stat().st_size) for p in meta.iterdir())
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is not a score store"):
            score_pool(str(toy_pool / "shards"), str(meta), label_config(), overwrite=overwrite, progress=False)
    assert sorted((p.name, p.stat().st_size) for p in meta.iterdir()) == before


def test_a_shard_whose_tar_changed_is_scored_again(toy_pool, store, tmp_path, monkeypatch, caplog):
    """Resume trusts a score file only for the tar it was made from: a tar cut short (then downloaded
    again), or an unreadable score file, is scored again; a finished store loads no model."""
    import shutil

    from datacomp_sieve.engines import InProcessEngine

    shards, copy = tmp_path / "shards", tmp_path / "store"
    shutil.copytree(toy_pool / "shards", shards)
    shutil.copytree(store, copy)
    whole = (shards / "00000001.tar").read_bytes()
    (shards / "00000001.tar").write_bytes(whole[: len(whole) // 2])
    (copy / "00000002.parquet").write_bytes(b"not parquet")
    m = score_pool(str(shards), str(copy), label_config(), progress=False)
    assert m["run"]["shards_skipped"] == 1 and m["run"]["shards_scored"] == 2
    assert "shard 00000001 changed since it was scored" in caplog.text
    assert "score file of shard 00000002 cannot be read" in caplog.text
    # samples after the cut are lost (whether one is left "truncated" depends on where the cut falls)
    assert list(m["truncated"]) == ["00000001"] and m["rows"] < len(read(store))
    (shards / "00000001.tar").write_bytes(whole)  # downloaded again
    m = score_pool(str(shards), str(copy), label_config(), progress=False)
    assert m["run"]["shards_scored"] == 1 and m["truncated"] == {}
    for a, b in zip(sorted(Path(store).glob("*.parquet")), sorted(copy.glob("*.parquet"))):
        assert pq.read_table(a).equals(pq.read_table(b))

    def no_models(self, cfg, n_shards=None):
        raise AssertionError("models loaded for a finished store")

    monkeypatch.setattr(InProcessEngine, "start", no_models)
    assert score_pool(str(shards), str(copy), label_config(), progress=False)["rows"] == m["rows"]


def test_resume_after_a_killed_run_gives_the_same_store(toy_pool, store, tmp_path):
    """Kill a real scoring process after its first shard; the rerun completes the store exactly."""
    out = tmp_path / "killed"
    code = f"""
import os, signal
os.environ["HF_HUB_OFFLINE"] = "1"
from datacomp_sieve.score import ScoreConfig, score_pool
from datacomp_sieve.store import ScoreStore
real = ScoreStore.write_shard
def write_then_die(self, stem, table, stats):
    real(self, stem, table, stats)
    os.kill(os.getpid(), signal.SIGKILL)
ScoreStore.write_shard = write_then_die
score_pool({str(toy_pool / 'shards')!r}, {str(out)!r}, ScoreConfig(captioner="label", device="cpu", batch_size=8), progress=False)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == -9
    assert len(list(out.glob("*.parquet"))) == 1
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False)
    assert m["run"]["shards_skipped"] == 1
    for a, b in zip(sorted(Path(store).glob("*.parquet")), sorted(out.glob("*.parquet"))):
        assert pq.read_table(a).equals(pq.read_table(b))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_score_cli_then_sieve_selection(toy_pool, store, tmp_path):
    from datacomp_sieve.cli import baselines_main

    out = tmp_path / "sieve.npy"
    assert baselines_main(["--name", "sieve", "--scores_dir", str(store), "--save_path", str(out), "--quiet"]) == 0
    n = len(read(store))
    assert len(np.load(out)) >= int(n * 0.2) + 1  # n+1 plus ties (medium-phrase twins tie after masking)
    sys.path.insert(0, str(ROOT))
    from baselines import in_memory

    in_memory.fused(str(store), ["sieve_score"], [1.0], str(tmp_path / "ref.npy"), 0.2)
    assert out.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    out2 = tmp_path / "sieve_clip.npy"
    assert baselines_main(["--name", "sieve_clip", "--metadata_dir", str(toy_pool / "metadata"), "--scores_dir",
                           str(store), "--save_path", str(out2), "--quiet"]) == 0
    assert 0 < len(np.load(out2)) <= n


def test_clip_scores_in_the_store_and_fusion_from_it(toy_pool, tmp_path):
    store = tmp_path / "with_clip"
    score_pool(str(toy_pool / "shards"), str(store),
               label_config(clip_model="ViT-B-32", clip_pretrained="tiny", num_captions=2), progress=False)
    rows = read(store)
    assert all(r["clip_score"] is not None and -1 <= r["clip_score"] <= 1 for r in rows)
    m = json.loads((store / "manifest.json").read_text())
    assert "not meaningful" in m["models"]["clip"]
    from datacomp_sieve.cli import baselines_main

    out = tmp_path / "o.npy"
    assert baselines_main(["--name", "sieve_clip", "--clip_from", "store", "--scores_dir", str(store),
                           "--save_path", str(out), "--quiet"]) == 0
    sys.path.insert(0, str(ROOT))
    from baselines import in_memory

    in_memory.fused(str(store), ["sieve_score", "clip_score"], [0.5, 0.5], str(tmp_path / "ref.npy"), 0.2)
    assert out.read_bytes() == (tmp_path / "ref.npy").read_bytes()


def test_baselines_scores_first_when_the_store_is_incomplete(toy_pool, tmp_path):
    """--shards_dir: a missing store is scored (with the given settings) before selecting."""
    code = [sys.executable, str(ROOT / "baselines.py"), "--name", "sieve", "--shards_dir", str(toy_pool / "shards"),
            "--scores_dir", str(tmp_path / "store"), "--captioner", "label", "--device", "cpu",
            "--num_captions", "2", "--save_path", str(tmp_path / "o.npy"), "--quiet"]
    r = subprocess.run(code, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "3 shard(s) to score" in r.stderr
    assert len(list((tmp_path / "store").glob("*.parquet"))) == 3 and (tmp_path / "o.npy").exists()
    r = subprocess.run(code, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "to score" not in r.stderr  # complete: straight to selection


def test_sieve_clip_computes_clip_when_the_metadata_lacks_it(toy_pool_noclip, tmp_path):
    code = [sys.executable, str(ROOT / "baselines.py"), "--name", "sieve_clip", "--shards_dir",
            str(toy_pool_noclip / "shards"), "--metadata_dir", str(toy_pool_noclip / "metadata"),
            "--scores_dir", str(tmp_path / "store"), "--captioner", "label", "--device", "cpu", "--num_captions", "2",
            "--clip_pretrained", "tiny", "--save_path", str(tmp_path / "o.npy"), "--quiet"]
    r = subprocess.run(code, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "the metadata has no clip_l14_similarity_score values" in r.stderr
    assert all(row["clip_score"] is not None for row in read(tmp_path / "store"))
    assert len(np.load(tmp_path / "o.npy")) > 0


def test_tiny_blip_through_the_engine_is_deterministic(toy_pool, tmp_path, monkeypatch):
    cfg = ScoreConfig(captioner="tiny", device="cpu", num_captions=3, batch_size=16)
    a = score_pool(str(toy_pool / "shards"), str(tmp_path / "a"), cfg, progress=False)
    score_pool(str(toy_pool / "shards"), str(tmp_path / "b"), cfg, progress=False)
    assert a["status"] == {"ok": a["rows"]}
    for x, y in zip(sorted((tmp_path / "a").glob("*.parquet")), sorted((tmp_path / "b").glob("*.parquet"))):
        assert pq.read_table(x).equals(pq.read_table(y))
    rows = read(tmp_path / "a")
    assert all(len(r["captions"]) == 3 for r in rows)
    # another seed samples other captions
    score_pool(str(toy_pool / "shards"), str(tmp_path / "c"), ScoreConfig(**{**cfg.__dict__, "seed": 1}), progress=False)
    assert [r["captions"] for r in read(tmp_path / "c")] != [r["captions"] for r in rows]
    # what a GPU run does changes nothing: decoding ahead in threads; decoding in processes
    # (uint8 crops normalised afterwards), each batch captioned on a thread of its own, its text
    # half on threads, masking and tokenising in processes of their own
    threaded = ShardScorer(cfg)
    threaded.decode_threads = 3
    score_pool(str(toy_pool / "shards"), str(tmp_path / "d"), cfg, progress=False, scorer=threaded)
    from datacomp_sieve import shards as shards_mod

    extents, iter_samples = [], shards_mod.iter_samples

    def spied(shard, **kw):  # whether each image went to the decoding processes as an offset in the tar
        for sample in iter_samples(shard, **kw):
            extents.append(isinstance(sample.image, shards_mod.ImageExtent))
            yield sample

    monkeypatch.setattr(shards_mod, "iter_samples", spied)
    in_processes = ShardScorer(cfg)
    in_processes.decode_workers, in_processes.overlap_text, in_processes.text_workers = 2, True, 2
    in_processes.overlap_captioning = True  # batches captioned on a thread while the next is read
    assert in_processes._in_processes() and not in_processes._text_model_there()  # they tokenise only
    score_pool(str(toy_pool / "shards"), str(tmp_path / "p"), cfg, progress=False, scorer=in_processes)
    assert in_processes._pool is not None  # a scorer handed in keeps its processes for the next run
    in_processes.close()
    assert len(extents) == a["rows"] and all(extents)  # the processes read the images from the tars
    assert in_processes._decoding_there  # and the text processes turned token rows into captions
    # the text processes running their own copy of the text encoder as well; this process
    # reading the images and sending their bytes
    in_processes.text_model_in_workers, in_processes.image_extents = True, False
    assert in_processes._text_model_there()
    extents.clear()
    score_pool(str(toy_pool / "shards"), str(tmp_path / "m"), cfg, progress=False, scorer=in_processes)
    in_processes.close()
    assert len(extents) == a["rows"] and not any(extents) and not in_processes._decoding_there
    for other in ("d", "p", "m"):
        for x, y in zip(sorted((tmp_path / "a").glob("*.parquet")), sorted((tmp_path / other).glob("*.parquet"))):
            assert pq.read_table(x).equals(pq.read_table(y))
    # the reference decoding: same store layout and statuses, its own (deterministic) captions
    ref = ScoreConfig(**{**cfg.__dict__, "decoding": "reference"})
    m = score_pool(str(toy_pool / "shards"), str(tmp_path / "e"), ref, progress=False)
    assert m["status"] == a["status"] and m["config"]["decoding"] == "reference"
    assert all(len(r["captions"]) == 3 for r in read(tmp_path / "e"))


def test_decoding_defaults_per_device_and_the_graph_decoding_on_the_cpu(toy_pool, tmp_path):
    """GPUs sample with the fixed-shape loop (replayed as a CUDA graph) unless told otherwise, the
    CPU with the growing one; ``graph`` runs on the CPU too (fixed shapes, no graph) and is
    deterministic; its draws differ from ``fast``'s once captions end (tests/test_decoding.py), so a
    store made with one decoding is not resumed with the other."""
    assert ScoreConfig(device="cuda").resolved(has_gpu=True).decoding == "graph"
    assert ScoreConfig(device="cpu").resolved(has_gpu=True).decoding == "fast"
    assert ScoreConfig(device="cuda", decoding="fast").resolved(has_gpu=True).decoding == "fast"
    with pytest.raises(UserError, match="^--decoding must be one of fast, graph, reference, got eager$"):
        ScoreConfig(device="cpu", decoding="eager").resolved()
    cfg = ScoreConfig(captioner="tiny", device="cpu", num_captions=3, batch_size=16, decoding="graph")
    scorer = ShardScorer(cfg)
    assert scorer.captioner.sampler.cuda_graphs and scorer.captioner.identity()["decoding"] == "graph"
    m = score_pool(str(toy_pool / "shards"), str(tmp_path / "g"), cfg, progress=False, scorer=scorer)
    score_pool(str(toy_pool / "shards"), str(tmp_path / "g2"), cfg, progress=False)
    assert m["config"]["decoding"] == "graph" and m["status"] == {"ok": m["rows"]}
    for x, y in zip(sorted((tmp_path / "g").glob("*.parquet")), sorted((tmp_path / "g2").glob("*.parquet"))):
        assert pq.read_table(x).equals(pq.read_table(y))
    fast = ScoreConfig(**{**cfg.__dict__, "decoding": "fast"})
    with pytest.raises(UserError, match=r"other settings \(config.decoding: 'graph' -> 'fast'\)"):
        score_pool(str(toy_pool / "shards"), str(tmp_path / "g"), fast, progress=False)


def test_the_processes_a_scorer_starts_have_one_thread_each(monkeypatch):
    """Decoding and text processes are many: one thread each, whatever the environment gives the
    scoring process (a Ray actor's says its cores); the scoring process's own is left alone."""
    import torch

    from datacomp_sieve.score import _spawn_pool

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    pool = _spawn_pool(1)
    try:
        assert pool.submit(os.getenv, "OMP_NUM_THREADS").result(timeout=120) == "1"
        assert pool.submit(torch.get_num_threads).result(timeout=120) == 1
    finally:
        pool.shutdown()
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_torch_threads_while_scoring(toy_pool, tmp_path):
    """``torch_threads`` (one on GPUs) holds while a shard is scored and is undone afterwards."""
    import torch

    from datacomp_sieve.shards import list_shards

    scorer = ShardScorer(label_config())
    assert scorer.torch_threads is None  # the CPU's models want every core
    seen, score = [], scorer._score

    def spied(shard, progress):
        seen.append(torch.get_num_threads())
        return score(shard, progress)

    before = torch.get_num_threads()
    scorer._score, scorer.torch_threads = spied, before + 1  # other than now, whatever the machine
    scorer.score(list_shards(str(toy_pool / "shards"))[0])
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_filter_refuses_a_store_made_otherwise_than_its_scoring_flags(toy_pool, store, tmp_path, capsys):
    """baselines.py with --shards_dir: the scoring flags say which store the selection needs; a
    store made with another captioner is refused (also when it is complete), one made as the
    flags say is used (nothing to score: no model loads)."""
    from datacomp_sieve.cli import baselines_main

    base = ["--name", "sieve", "--scores_dir", str(store), "--shards_dir", str(toy_pool / "shards"), "--quiet"]
    assert baselines_main(base + ["--save_path", str(tmp_path / "a.npy"), "--captioner", "blip-base-14m"]) == 2
    err = capsys.readouterr().err
    assert "other settings than the scoring flags give (captioner: 'label' -> 'blip-base-14m')" in err
    assert not (tmp_path / "a.npy").exists()
    assert baselines_main(base + ["--save_path", str(tmp_path / "b.npy"), "--captioner", "label",
                                  "--batch_size", "8"]) == 0
    assert len(np.load(tmp_path / "b.npy")) > 0


def test_a_store_missing_score_files_is_said_when_selecting(store, tmp_path, capsys):
    import shutil

    from datacomp_sieve.cli import baselines_main

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / "00000001.parquet").unlink()
    assert baselines_main(["--name", "sieve", "--scores_dir", str(copy), "--save_path", str(tmp_path / "o.npy"),
                           "--quiet"]) == 0
    assert "has 2 score files but its manifest counts 3 scored shards" in capsys.readouterr().err


def test_a_local_store_s_statistics_are_read_without_a_python_file(store, monkeypatch):
    """Resume reads every score file's statistics: pyarrow reads a local file itself (a Python file
    object in between doubled the cost: 2.1 s for 12,800 files)."""
    from fsspec.implementations.local import LocalFileSystem

    opened = []
    real = LocalFileSystem._open
    monkeypatch.setattr(LocalFileSystem, "_open", lambda self, path, *a, **kw: opened.append(path) or
                        real(self, path, *a, **kw))
    s = ScoreStore(str(store))
    stems = sorted(s.completed())
    stats = s.stats_of(stems)
    assert [stats[k]["shard"] for k in stems] == stems and all(stats[k]["rows"] > 0 for k in stems)
    assert not [p for p in opened if p.endswith(".parquet")]


def test_a_selection_reads_each_folder_s_footers_once(toy_pool, store, tmp_path, footer_reads):
    """Each term and check opened its own folder, reading every footer again (the store's twice for
    --weights sieve=.. sieve_mean=..; the metadata's twice for sieve_clip)."""
    from datacomp_sieve.cli import baselines_main

    meta = str(toy_pool / "metadata")
    assert baselines_main(["--name", "sieve", "--weights", "sieve=0.5", "sieve_mean=0.5", "--scores_dir", str(store),
                           "--save_path", str(tmp_path / "a.npy"), "--quiet"]) == 0
    assert footer_reads == {str(store): 1}
    assert baselines_main(["--name", "sieve_clip", "--scores_dir", str(store), "--metadata_dir", meta,
                           "--save_path", str(tmp_path / "b.npy"), "--quiet"]) == 0
    assert footer_reads == {str(store): 2, meta: 1}


def test_overwrite_replaces_a_store_made_with_other_settings(toy_pool, store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    m = score_pool(str(toy_pool / "shards"), str(copy), label_config(num_captions=2), overwrite=True, progress=False)
    assert m["config"]["num_captions"] == 2 and m["run"]["shards_skipped"] == 0
    assert all(len(r["captions"]) == 2 for r in read(copy))


def test_a_daemon_process_keeps_the_text_half_to_itself(toy_pool, store, tmp_path, monkeypatch):
    """A daemon process may not start processes: with text processes asked for, the text half
    runs on its threads instead, and the rows are the same."""
    import multiprocessing

    scorer = ShardScorer(label_config())
    scorer.text_workers = 2
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    score_pool(str(toy_pool / "shards"), str(tmp_path / "d"), label_config(), progress=False, scorer=scorer)
    assert scorer._text_pool is None
    ours, theirs = sorted(store.glob("*.parquet")), sorted((tmp_path / "d").glob("*.parquet"))
    assert len(ours) == len(theirs) > 0
    for x, y in zip(ours, theirs):
        assert pq.read_table(x).equals(pq.read_table(y))


@pytest.mark.parametrize("which", ["_text_pool", "_pool"])
def test_a_dead_worker_process_fails_one_shard_and_the_rerun_completes(toy_pool, store, tmp_path, which):
    """A text or image-decoding process killed between shards: the next shard fails with one
    line, its pool starts again for the shards after it, and a rerun fills the gap; the store is
    the in-line one."""
    import shutil

    scorer = ShardScorer(label_config())
    scorer.decode_workers, scorer.text_workers, scorer.overlap_text = 1, 1, True
    out = str(tmp_path / "s")
    score_pool(str(toy_pool / "shards"), out, label_config(), progress=False, scorer=scorer)
    shutil.rmtree(out)
    for proc in list(getattr(scorer, which)._processes.values()):
        proc.kill()
        proc.join()
    with pytest.raises(ShardsFailed) as err:
        score_pool(str(toy_pool / "shards"), out, label_config(), progress=False, scorer=scorer)
    what = "a text" if which == "_text_pool" else "an image-decoding"
    failed = err.value.manifest["failed"]
    assert list(failed.values()) == [f"RuntimeError: {what} process died (a crash in a library?); the shard is "
                                     "not written, rerun to retry it"]
    assert err.value.manifest["rows"] > 0  # the shards after it were scored
    assert which == "_pool" or scorer._pool is not None  # a dead text process leaves the decoding ones alone
    score_pool(str(toy_pool / "shards"), out, label_config(), progress=False, scorer=scorer)
    scorer.close()
    ours, theirs = sorted(store.glob("*.parquet")), sorted((tmp_path / "s").glob("*.parquet"))
    assert len(ours) == len(theirs) > 1
    for x, y in zip(ours, theirs):
        assert pq.read_table(x).equals(pq.read_table(y))


@pytest.mark.parametrize("overlap", [False, True], ids=["in line", "captioning thread"])
def test_gpu_out_of_memory_says_which_flag_fixes_it(toy_pool, tmp_path, monkeypatch, overlap):
    """A GPU that runs out of memory fails each shard with one line naming the batch and the flag
    to lower (simulated: the captioner raises torch's out-of-memory error), also where batches are
    captioned on a thread of their own."""
    import torch

    scorer = ShardScorer(label_config())
    scorer.overlap_captioning = overlap

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 15.77 GiB of which 1.2 GiB is free.\nmore lines")

    monkeypatch.setattr(scorer.captioner, "start_captions", oom)
    with pytest.raises(ShardsFailed) as err:
        score_pool(str(toy_pool / "shards"), str(tmp_path / "s"), label_config(), progress=False, scorer=scorer)
    failed = err.value.manifest["failed"]
    assert failed and all(msg == "RuntimeError: GPU out of memory (CUDA out of memory. Tried to allocate 2.00 GiB) "
                          "with batches of 8 images x 8 captions on cpu: rerun with a smaller --batch_size, e.g. 4"
                          for msg in failed.values())
    assert "\n" not in str(err.value) and "--batch_size" in str(err.value)


def test_crops_through_shared_memory_or_pipes_give_the_same_rows(toy_pool, store, tmp_path, monkeypatch, caplog):
    """Images decoded in processes send their crops back through shared memory, through the pipes
    when there is no room (a full ring, a small /dev/shm), or both within one batch; a shard that
    fails half-way leaves nothing behind for the next. The rows are the in-line ones every time."""
    import os as os_mod

    from datacomp_sieve.score import _CropRing

    def run(name, scorer=None, **attrs):
        scorer = scorer or ShardScorer(label_config())
        scorer.decode_workers = 2
        for k, v in attrs.items():
            setattr(scorer, k, v)
        score_pool(str(toy_pool / "shards"), str(tmp_path / name), label_config(), progress=False, scorer=scorer)
        return scorer

    ring = run("ring")
    assert ring._ring is not None and sorted(ring._ring.free) == list(range(ring._ring.shape[0]))  # all given back
    ring.close()
    assert ring._ring is None
    run("pipes", shared_memory=False).close()
    # whole decoded images in the ring, resized and cropped in this process (as on a GPU)
    whole = run("whole", resize_on_device=True)
    assert whole._whole and whole._ring.shape[1:] == (512, 512, 3)
    assert sorted(whole._ring.free) == list(range(whole._ring.shape[0]))
    whole.close()
    # chunks of 3 samples, every other one through the pipes: batches mix whole images in the ring
    # and crops through the pipes; the first batch fails
    import datacomp_sieve.score as score_mod

    take, taken = _CropRing.take, []
    monkeypatch.setattr(score_mod, "_CHUNK", 3)
    monkeypatch.setattr(_CropRing, "take", lambda self, n: taken.append(n) or (take(self, n) if len(taken) % 2 else None))
    both = ShardScorer(label_config())
    both.resize_on_device = True  # whole images in the ring, crops through the pipes
    start, calls = both.captioner.start_captions, []

    def fails_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return start(*a, **kw)

    both.captioner.start_captions = fails_once
    with pytest.raises(ShardsFailed):
        run("both", both)
    run("both", both)
    assert sorted(both._ring.free) == list(range(both._ring.shape[0]))  # none lost with the failed shard
    both.close()
    # /dev/shm with room for 40 crops (twice over): a ring of 40, the rest through the pipes
    monkeypatch.setattr(score_mod, "_CHUNK", 16)
    monkeypatch.setattr(_CropRing, "take", take)
    blocks = 2 * 40 * 224 * 224 * 3 // 4096 + 1
    some = os_mod.statvfs_result((4096, 4096, 10**6, blocks, blocks, 100, 10, 10, 0, 255))
    monkeypatch.setattr(os_mod, "statvfs", lambda path: some)
    with caplog.at_level(logging.INFO, logger="datacomp_sieve.score"):
        some_shm = run("some_shm")
    assert some_shm._ring.shape[0] == 40 and "shared memory for 40 of 56 decoded images" in caplog.text
    some_shm.close()
    # /dev/shm too small for a ring: one log line, crops through the pipes
    small = os_mod.statvfs_result((4096, 4096, 100, 10, 10, 100, 10, 10, 0, 255))
    monkeypatch.setattr(os_mod, "statvfs", lambda path: small)
    with caplog.at_level(logging.INFO, logger="datacomp_sieve.score"):
        small_shm = run("small_shm")
    assert small_shm._ring is None and "not shared memory (/dev/shm: 0 MB free" in caplog.text
    small_shm.close()
    for name in ("ring", "pipes", "whole", "both", "some_shm", "small_shm"):
        for x, y in zip(sorted(store.glob("*.parquet")), sorted((tmp_path / name).glob("*.parquet")), strict=True):
            assert pq.read_table(x).equals(pq.read_table(y)), (name, x.name)


# -- several jobs on one store: score --part K/N (a job array) -----------------------------------
STEMS = ["00000000", "00000001", "00000002"]
PART_FLAGS = ["--captioner", "label", "--device", "cpu", "--batch_size", "8", "--quiet"]  # label_config()


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


def test_the_parts_split_the_shards_once_each_by_their_number():
    from types import SimpleNamespace

    def stems(part):
        return [s.stem for s in part]

    numbers = (0, 1, 2, 3, 5, 8, 9, 10)  # gaps, as a pool with failed downloads has
    shards = [SimpleNamespace(stem=f"{i:08d}") for i in numbers]
    for n in range(1, 10):
        parts = [part_of(shards, k, n) for k in range(n)]
        assert sorted(s for p in parts for s in stems(p)) == stems(shards)
        whole = [part_of([SimpleNamespace(stem=f"{i:08d}") for i in range(40)], k, n) for k in range(n)]
        assert max(map(len, whole)) - min(map(len, whole)) <= 1  # consecutive shards: even parts
    assert stems(part_of(shards, 1, 3)) == ["00000001", "00000010"]
    # a job that lists the folder while shards are still arriving puts each shard it sees in the same part
    seen = shards[:2] + shards[4:]
    for k in range(3):
        assert stems(part_of(seen, k, 3)) == [s for s in stems(part_of(shards, k, 3)) if s in stems(seen)]
    assert parse_part(" 2/16 ") == (2, 16) and parse_part("0/1") == (0, 1)
    for bad in ("1_0/32", "\u0661/2", "1/2/3"):
        with pytest.raises(UserError, match="--part takes K/N"):
            parse_part(bad)


def test_parts_run_one_after_another_make_the_whole_run_s_store(toy_pool, store, scorer, tmp_path, caplog):
    out = tmp_path / "parts"
    caplog.set_level(logging.INFO, logger="datacomp_sieve")
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer, part="1/2")
    assert sorted(p.stem for p in out.glob("*.parquet")) == ["00000001"]
    assert m["shards"] == 1 and m["run"]["part"] == "1/2" and m["run"]["shards_scored"] == 1
    assert "part 1/2 is done: 1 of the pool's 3 shards are in" in caplog.text
    assert "the other parts' shards are still to come" in caplog.text
    assert "has 1 score files of the pool's 3 shards: the other 2 are not scored yet" in ScoreStore(str(out)).gaps()
    caplog.clear()
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer, part="0/2")
    assert m["shards"] == 3 and m["run"]["shards_scored"] == 2  # the manifest counts every part's files
    assert "part 0/2 is done, and so is the store: all 3 shards are in" in caplog.text
    assert ScoreStore(str(out)).gaps() is None
    assert_same_scores(store, out)
    again = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, part="1/2")
    assert again["run"]["shards_scored"] == 0 and again["shards"] == 3  # done: no model loaded


def test_two_jobs_started_together_each_with_its_part(toy_pool, store, tmp_path):
    """A job array of two tasks: two real ``score`` processes on one new store at the same moment."""
    out = tmp_path / "array"
    jobs = [subprocess.Popen([sys.executable, "-m", "datacomp_sieve.cli", "score", "--shards_dir",
                              str(toy_pool / "shards"), "--scores_dir", str(out), *PART_FLAGS, "--part", f"{k}/2"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
            for k in (0, 1)]
    results = [job.communicate(timeout=600) for job in jobs]
    for k, (job, (stdout, stderr)) in enumerate(zip(jobs, results)):
        assert job.returncode == 0, stderr
        assert f"part {k}/2 is done" in stderr
        assert f"{2 - k} of {2 - k} shard(s) to score (part {k}/2: {2 - k} of the pool's 3)" in stderr
    assert_same_scores(store, out)


def test_the_manifest_keeps_another_part_s_failure_until_its_shard_is_scored(toy_pool, scorer, tmp_path,
                                                                             monkeypatch, capsys):
    out = tmp_path / "failing"

    def info():  # what pool-info says of the store
        capsys.readouterr()
        assert cli.main(["pool-info", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(out)]) == 0
        return capsys.readouterr().out

    real = ShardScorer.score

    def fail_first(self, shard, progress=None):
        if shard.stem == "00000000":
            raise ValueError("unreadable")
        return real(self, shard, progress)

    monkeypatch.setattr(ShardScorer, "score", fail_first)
    with pytest.raises(ShardsFailed, match=r"1 of 1 shard\(s\) of part 0/3 failed: 00000000 \(ValueError"):
        score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer, part="0/3")
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer, part="1/3")
    assert m["shards"] == 1 and m["failed"] == {"00000000": "ValueError: unreadable"}  # not tried here: kept
    said = info()
    assert f"scored shards:            1 of 3 in {out} ({m['rows']} samples: {m['rows']} ok)" in said
    assert "shards to score:          00000000, 00000002\n" in said
    assert "parts to rerun:           --part 0/3, 2/3 (" in said
    assert "failed earlier:           00000000: ValueError: unreadable\n" in said
    monkeypatch.setattr(ShardScorer, "score", real)
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer, part="0/3")
    assert m["shards"] == 2 and m["failed"] == {}  # scored now: dropped
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer, part="2/3")
    assert m["shards"] == 3 and m["rows"] == len(pq.read_table(sorted(out.glob("*.parquet"))))
    said = info()
    assert said.startswith("scored shards:            3 of 3") and "to score" not in said and "rerun" not in said


def test_a_shard_this_run_failed_that_an_overlapping_job_scored_counts_as_scored(toy_pool, store, scorer, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "overlap"
    real = ShardScorer.score

    def fail_but_scored_elsewhere(self, shard, progress=None):
        result = real(self, shard, progress)
        if shard.stem == "00000001":  # another job writes the shard while this one fails it
            ScoreStore(str(out)).write_shard(shard.stem, result.table, result.stats)
            raise RuntimeError("CUDA error: device lost")
        return result

    monkeypatch.setattr(ShardScorer, "score", fail_but_scored_elsewhere)
    with pytest.raises(ShardsFailed) as e:
        score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer)
    whole = json.loads((Path(store) / "manifest.json").read_text())
    m = e.value.manifest
    assert (m["shards"], m["rows"], m["failed"]) == (3, whole["rows"], {})
    assert json.loads((out / "manifest.json").read_text())["shards"] == 3


def test_an_unreadable_manifest_is_written_anew(toy_pool, store, scorer, tmp_path, capsys):
    out = tmp_path / "garbled"
    score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer)
    (out / "manifest.json").write_text('{"shards": 3, "fail')
    assert cli.main(["pool-info", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(out)]) == 0
    assert "scored shards:            3 of 3" in capsys.readouterr().out
    (out / "00000002.parquet").unlink()
    m = score_pool(str(toy_pool / "shards"), str(out), label_config(), progress=False, scorer=scorer)
    assert m["shards"] == 3 and m["run"]["shards_scored"] == 1
    assert json.loads((out / "manifest.json").read_text())["rows"] == m["rows"]


def test_pool_info_on_a_store_says_one_line_for_a_wrong_folder(toy_pool, store, capsys):
    shards = str(toy_pool / "shards")
    for args, message in ((["--shards_dir", shards], "pool-info needs --metadata_dir"),
                          (["--shards_dir", shards, "--scores_dir", str(toy_pool / "nothere")], "does not exist"),
                          (["--shards_dir", shards, "--scores_dir", str(toy_pool / "metadata")],
                           "is not a score store (no config.json)")):
        assert cli.main(["pool-info", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


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
    rc = cli.main(["score", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(tmp_path / "s"), *PART_FLAGS,
                   f"--part={part}"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("datacomp_sieve")]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_overwrite_is_refused_with_a_part(toy_pool, store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    rc = cli.main(["score", "--shards_dir", str(toy_pool / "shards"), "--scores_dir", str(copy), *PART_FLAGS,
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
    from fsspec.implementations.local import LocalFileSystem

    out = tmp_path / "store"

    def killed(self, path, value, **kw):  # the writer dies with half the bytes written
        with open(path, "wb") as f:
            f.write(value[: len(value) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(LocalFileSystem, "pipe_file", killed, raising=False)
        with pytest.raises(KeyboardInterrupt):
            ScoreStore(str(out)).open_for({"config": {"seed": 0}})
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
    s = ScoreStore(str(tmp_path / "s"))
    s.open_for({"config": {"seed": 0}})
    errors = []

    def write(k):
        try:
            for i in range(100):
                s.write_manifest({"writer": k, "i": i, "pad": "x" * 20000})
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and s.manifest()["i"] == 99
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp-")]
