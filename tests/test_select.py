"""Selection must equal, byte for byte, the in-memory methods of DataComp and the reference code."""

import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from baselines import in_memory  # noqa: E402
from synth_store import write_folder  # noqa: E402

from datacomp_sieve import select as select_mod  # noqa: E402
from datacomp_sieve.cli import baselines_main, main  # noqa: E402

L14 = "clip_l14_similarity_score"
B32 = "clip_b32_similarity_score"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Metadata (all rows, a few NaN clip scores) and a score store for ~90% of the rows."""
    root = tmp_path_factory.mktemp("pool")
    uids = write_folder(str(root / "metadata"), rows=5000, files=3, seed=1, columns=(L14, B32), missing=0.01)
    # the store covers a subset of the metadata uids (failed downloads have no score) in other files
    rng = np.random.default_rng(2)
    flat = pa.concat_arrays(uids)
    keep = np.sort(rng.choice(len(flat), size=4500, replace=False))
    kept = flat.take(pa.array(keep))
    store_uids = [kept.slice(0, 2000), kept.slice(2000)]
    write_folder(str(root / "store"), rows=4500, files=2, seed=3, columns=("sieve_score", "clip_score"),
                 missing=0.02, uids=store_uids)
    # a few store rows whose uid is not in the metadata
    write_folder(str(root / "store_extra"), rows=30, files=1, seed=4, columns=("sieve_score",))
    return root


def run(args):
    return baselines_main(args + ["--quiet"])


def same_bytes(a, b):
    return Path(a).read_bytes() == Path(b).read_bytes()


@pytest.mark.parametrize("arch,col", [("l14", L14), ("b32", B32)])
@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.3, 0.5, 0.98])
def test_clip_score_fraction_byte_identical_to_datacomp(pool, tmp_path, arch, col, fraction):
    out = tmp_path / "ours.npy"
    assert run(["--name", "clip_score", "--arch", arch, "--fraction", str(fraction),
                "--metadata_dir", str(pool / "metadata"), "--save_path", str(out)]) == 0
    in_memory.clip_score(str(pool / "metadata"), col, str(tmp_path / "ref.npy"), fraction=fraction)
    assert same_bytes(out, tmp_path / "ref.npy")
    arr = np.load(out)
    assert len(arr) > 0 and np.array_equal(np.unique(arr), arr)


def test_fraction_past_the_scored_rows_keeps_nothing_like_datacomp(pool, tmp_path):
    # 1% of clip scores are NaN: DataComp sorts them last, so fraction 0.995 lands on NaN.
    out = tmp_path / "ours.npy"
    assert run(["--name", "clip_score", "--fraction", "0.995", "--metadata_dir", str(pool / "metadata"),
                "--save_path", str(out)]) == 0
    assert len(np.load(out)) == 0


@pytest.mark.parametrize("threshold", ["0.3", "0.25", "0.3612"])
def test_clip_score_threshold_byte_identical(pool, tmp_path, threshold):
    out = tmp_path / "ours.npy"
    assert run(["--name", "clip_score", "--threshold", threshold, "--metadata_dir", str(pool / "metadata"),
                "--save_path", str(out)]) == 0
    in_memory.clip_score(str(pool / "metadata"), L14, str(tmp_path / "ref.npy"), threshold=float(threshold))
    assert same_bytes(out, tmp_path / "ref.npy")


def test_ties_at_the_threshold_are_all_kept(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    uids = ["%032x" % i for i in range(10)]
    scores = np.array([0.5, 0.4, 0.4, 0.4, 0.3, 0.2, 0.1, 0.0, -0.0, 0.9], np.float32)
    pq.write_table(pa.table({"uid": uids, L14: scores}), folder / "a.parquet")
    out = tmp_path / "o.npy"
    assert run(["--name", "clip_score", "--fraction", "0.25", "--metadata_dir", str(folder), "--save_path", str(out)]) == 0
    # n = 2 -> threshold 0.4 -> 0.9, 0.5 and the three 0.4s
    assert len(np.load(out)) == 5
    assert run(["--name", "clip_score", "--fraction", "0.85", "--metadata_dir", str(folder), "--save_path", str(out)]) == 0
    assert len(np.load(out)) == 10  # n = 8 -> threshold 0.0 (or -0.0): both zeros are kept


@pytest.mark.parametrize("extra,passes", [
    (["--fraction", "0.25"], ["1/4: statistics", "2/4: threshold", "3/4: threshold", "4/4: collect uids"]),
    (["--threshold", "0.3"], ["1/2: statistics", "2/2: collect uids"]),
])
def test_the_progress_bars_number_the_passes_in_order(tmp_path, monkeypatch, extra, passes):
    """Each pass over the scores is named 'pass k/n' in the order it runs (they were numbered from 1
    twice: statistics and the first threshold pass, then 'pass 3/4: collect uids' as the last one)."""
    folder = tmp_path / "m"
    folder.mkdir()
    pq.write_table(pa.table({"uid": ["%032x" % i for i in range(10)], L14: np.linspace(0, 1, 10, dtype=np.float32)}),
                   folder / "a.parquet")
    shown = []
    real = select_mod._progress
    monkeypatch.setattr(select_mod, "_progress",
                        lambda total, desc, enabled, **kw: shown.append(desc) or real(total, desc, False, **kw))
    assert run(["--name", "clip_score", "--metadata_dir", str(folder), "--save_path", str(tmp_path / "o.npy")]
               + extra) == 0
    assert shown == [f"pass {p}" for p in passes]


def test_the_join_bar_counts_partitions_not_rows(pool, tmp_path, monkeypatch):
    """The uid join's last bar goes over partitions ('0.00/1.00 rows' said it counted rows)."""
    units = {}
    real = select_mod._progress

    def record(total, desc, enabled, unit="rows"):
        units[desc.split(":")[0]] = unit
        return real(total, desc, False, unit=unit)

    monkeypatch.setattr(select_mod, "_progress", record)
    assert run(["--name", "sieve_clip", "--metadata_dir", str(pool / "metadata"), "--scores_dir", str(pool / "store"),
                "--save_path", str(tmp_path / "o.npy")]) == 0
    assert units["join partitions"] == "partitions" and units["partition score store"] == "rows"
    assert units["pass 4/4"] == "rows"


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 1.0])
def test_sieve_byte_identical_to_reference_fusion(pool, tmp_path, fraction):
    out = tmp_path / "ours.npy"
    assert run(["--name", "sieve", "--fraction", str(fraction), "--scores_dir", str(pool / "store"),
                "--save_path", str(out)]) == 0
    in_memory.fused(str(pool / "store"), ["sieve_score"], [1.0], str(tmp_path / "ref.npy"), fraction)
    assert same_bytes(out, tmp_path / "ref.npy")


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.7])
def test_sieve_clip_with_metadata_join_byte_identical(pool, tmp_path, monkeypatch, alpha):
    monkeypatch.setattr(select_mod, "PARTITION_ROWS", 300)  # several partitions
    out = tmp_path / "ours.npy"
    assert run(["--name", "sieve_clip", "--alpha", str(alpha), "--metadata_dir", str(pool / "metadata"),
                "--scores_dir", str(pool / "store"), "--save_path", str(out), "--tmp_dir", str(tmp_path)]) == 0
    in_memory.fused(str(pool / "store"), ["sieve_score", L14], [1 - alpha, alpha], str(tmp_path / "ref.npy"),
                    0.2, extra=(str(pool / "metadata"), [L14]))
    assert same_bytes(out, tmp_path / "ref.npy")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("datacomp-sieve-join")] == []


def test_sieve_clip_from_store_and_weights_form(pool, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert run(["--name", "sieve_clip", "--clip_from", "store", "--scores_dir", str(pool / "store"),
                "--save_path", str(a)]) == 0
    assert run(["--name", "sieve_clip", "--weights", "sieve_score=0.5", "clip_score=0.5",
                "--scores_dir", str(pool / "store"), "--save_path", str(b)]) == 0
    in_memory.fused(str(pool / "store"), ["sieve_score", "clip_score"], [0.5, 0.5], str(tmp_path / "ref.npy"), 0.2)
    assert same_bytes(a, tmp_path / "ref.npy") and same_bytes(b, tmp_path / "ref.npy")


def test_missing_scores_are_excluded_and_counted(pool, tmp_path, caplog, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(pool / "store", store)
    shutil.copy(pool / "store_extra" / "00000000.parquet", store / "extra.parquet")
    out = tmp_path / "o.npy"
    assert run(["--name", "sieve_clip", "--metadata_dir", str(pool / "metadata"),
                "--scores_dir", str(store), "--save_path", str(out)]) == 0
    assert "30 row(s) of score store have no matching uid" in caplog.text
    assert "row(s) of metadata folder have no matching uid" in caplog.text
    assert "row(s) have no sieve score" in caplog.text
    in_memory.fused(str(pool / "store"), ["sieve_score", L14], [0.5, 0.5], str(tmp_path / "ref.npy"),
                    0.2, extra=(str(pool / "metadata"), [L14]))
    assert same_bytes(out, tmp_path / "ref.npy")
    # a store from another pool: nothing joins, and the user is told so in one line
    code, err = _err(capsys, ["--name", "sieve_clip", "--metadata_dir", str(pool / "metadata"),
                              "--scores_dir", str(pool / "store_extra"), "--save_path", str(out)])
    assert code == 2 and len(err) == 1 and "same pool" in err[0], err


def test_fsspec_memory_metadata(pool, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in sorted((pool / "metadata").glob("*.parquet")):
        fs.pipe(f"/meta/{p.name}", p.read_bytes())
    out = tmp_path / "o.npy"
    assert run(["--name", "clip_score", "--fraction", "0.3", "--metadata_dir", "memory://meta", "--save_path", str(out)]) == 0
    in_memory.clip_score(str(pool / "metadata"), L14, str(tmp_path / "ref.npy"), fraction=0.3)
    assert same_bytes(out, tmp_path / "ref.npy")


def test_no_filter_lists_every_uid(pool, tmp_path):
    out = tmp_path / "o.npy"
    assert main(["filter", "--name", "no_filter", "--metadata_dir", str(pool / "metadata"), "--save_path", str(out), "--quiet"]) == 0
    assert len(np.load(out)) == 5000


def test_float64_scores_select_exactly(tmp_path):
    write_folder(str(tmp_path / "s"), rows=3000, files=2, seed=9, columns=("sieve_score",), dtype=np.float64)
    out = tmp_path / "o.npy"
    assert run(["--name", "sieve", "--fraction", "0.2", "--scores_dir", str(tmp_path / "s"), "--save_path", str(out)]) == 0
    in_memory.fused(str(tmp_path / "s"), ["sieve_score"], [1.0], str(tmp_path / "ref.npy"), 0.2)
    assert same_bytes(out, tmp_path / "ref.npy")


def _err(capsys, args):
    """(exit code, stderr lines of this run that are not log records)."""
    capsys.readouterr()
    code = run(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("datacomp_sieve")]
    return code, err


@pytest.mark.parametrize("extra,message", [
    (["--fraction", "0.2", "--threshold", "0.3"], "not both"),
    ([], "give --fraction"),
    (["--fraction", "0"], "must be in (0, 1]"),
    (["--fraction", "1.5"], "must be in (0, 1]"),
    (["--fraction", "nan"], "must be in (0, 1]"),
    # flags of the Sieve names are refused, not ignored
    (["--fraction", "0.2", "--weights", "clip=1"], "are for the Sieve names"),
    (["--fraction", "0.2", "--clip_from", "store"], "are for the Sieve names"),
])
def test_clip_score_flag_errors_are_one_line(pool, tmp_path, capsys, extra, message):
    code, err = _err(capsys, ["--name", "clip_score", "--metadata_dir", str(pool / "metadata"),
                              "--save_path", str(tmp_path / "o.npy")] + extra)
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("extra,message", [
    (["--alpha", "1.5"], "must be in [0, 1]"),
    (["--weights", "sieve=0.6", "clip=0.6"], "must sum to 1"),
    (["--weights", "sieve"], "key=weight"),
    (["--weights", "sieve=0.5", "nonexistent=0.5"], "neither sieve, clip"),
])
def test_fusion_flag_errors_are_one_line(pool, tmp_path, capsys, extra, message):
    code, err = _err(capsys, ["--name", "sieve_clip", "--metadata_dir", str(pool / "metadata"),
                              "--scores_dir", str(pool / "store"), "--save_path", str(tmp_path / "o.npy")] + extra)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_folder_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noparquet").mkdir()
    (tmp_path / "noparquet" / "x.txt").write_text("x")
    for folder, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "is empty"),
                            (tmp_path / "noparquet", "no .parquet files")]:
        code, err = _err(capsys, ["--name", "clip_score", "--fraction", "0.1", "--metadata_dir", str(folder),
                                  "--save_path", str(tmp_path / "o.npy")])
        assert code == 2 and len(err) == 1 and message in err[0], err
    code, err = _err(capsys, ["--name", "sieve", "--save_path", str(tmp_path / "o.npy")])
    assert code == 2 and "--scores_dir" in err[0]


def test_other_names_are_one_line(tmp_path, capsys):
    for name, message in [("basic_filter", "use DataComp's baselines.py for it"),
                          ("laion2b", "use DataComp's baselines.py"), ("text_based", "use DataComp's baselines.py"),
                          ("siev", "unknown --name 'siev'; one of no_filter, clip_score, sieve, sieve_clip")]:
        code, err = _err(capsys, ["--name", name, "--save_path", str(tmp_path / "o.npy")])
        assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("name,extra,message", [
    ("sieve", ["--fraction", "1.5"], "must be in (0, 1]"),
    ("sieve", ["--fraction", "0.2", "--threshold", "0.3"], "not both"),
    ("sieve_clip", ["--alpha", "1.5"], "must be in [0, 1]"),
    ("sieve_clip", ["--alpha", "0.5", "--weights", "sieve=0.5", "clip=0.5"], "not both"),
    ("sieve_clip", ["--weights", "sieve=0.6", "clip=0.6"], "must sum to 1"),
    ("sieve", ["--weights", "sieve=1.5", "clip=-0.5"], "must not be negative"),
])
def test_flag_errors_come_before_scoring_the_pool(pool, tmp_path, capsys, monkeypatch, name, extra, message):
    """With --shards_dir the store is completed (the whole pool scored, the first time) before the
    selection: a wrong --fraction, --alpha or --weights is refused first, not after hours of scoring."""
    from datacomp_sieve import cli

    monkeypatch.setattr(cli, "_complete_store", lambda *a, **k: pytest.fail("scored before checking the flags"))
    (tmp_path / "shards").mkdir()
    code, err = _err(capsys, ["--name", name, "--metadata_dir", str(pool / "metadata"), "--shards_dir",
                              str(tmp_path / "shards"), "--scores_dir", str(tmp_path / "store"),
                              "--save_path", str(tmp_path / "o.npy")] + extra)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_save_path_errors_come_before_the_selection(pool, tmp_path, capsys, monkeypatch):
    """A --save_path that cannot be written is refused before the selection runs, in one line."""
    from datacomp_sieve import filters

    monkeypatch.setattr(filters, "select", lambda *a, **k: pytest.fail("selected before checking --save_path"))
    (tmp_path / "file.txt").write_text("x")
    for save, message in [("", "is empty"), (str(tmp_path / "file.txt" / "o.npy"), "is a file, not a folder"),
                          (str(tmp_path / "file.txt" / "deeper" / "o.npy"), "is a file, not a folder")]:
        code, err = _err(capsys, ["--name", "clip_score", "--fraction", "0.1", "--metadata_dir",
                                  str(pool / "metadata"), "--save_path", save])
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_score_column_errors_are_one_line(tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    pq.write_table(pa.table({"uid": ["%032x" % i for i in range(4)], "text": ["a"] * 4}), m / "a.parquet")
    code, err = _err(capsys, ["--name", "clip_score", "--fraction", "0.5", "--metadata_dir", str(m), "--save_path", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "no column clip_l14_similarity_score" in err[0]
    pq.write_table(pa.table({"uid": ["%032x" % i for i in range(4)],
                             L14: pa.array([None] * 4, pa.float32())}), m / "a.parquet")
    code, err = _err(capsys, ["--name", "clip_score", "--fraction", "0.5", "--metadata_dir", str(m), "--save_path", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "every value is missing or NaN" in err[0]
    s = tmp_path / "s"
    s.mkdir()
    pq.write_table(pa.table({"uid": ["%032x" % i for i in range(4)], "sieve_score": np.full(4, 0.5, np.float32)}), s / "a.parquet")
    code, err = _err(capsys, ["--name", "sieve", "--scores_dir", str(s), "--save_path", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "is constant" in err[0]


def test_help_explains_every_name_and_flag(capsys):
    with pytest.raises(SystemExit) as e:
        baselines_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ["no_filter", "clip_score", "sieve_clip", "--metadata_dir", "--save_path", "--fraction",
                 "--threshold", "--arch", "--num_workers", "--scores_dir", "--shards_dir", "--alpha", "--weights"]:
        assert word in out


def test_help_gives_the_scoring_batch_size_default_that_scoring_uses(capsys):
    """filter's --batch_size (scoring through --shards_dir) defaults as score's does: 16 on the CPU, 256 on GPUs."""
    from datacomp_sieve.score import GPU_BATCH_SIZE

    with pytest.raises(SystemExit):
        baselines_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default 16 on the CPU, as the reference; {GPU_BATCH_SIZE} on GPUs)" in out


def test_root_baselines_py_runs_as_a_script(pool, tmp_path):
    import subprocess

    out = tmp_path / "o.npy"
    r = subprocess.run([sys.executable, str(ROOT / "baselines.py"), "--name", "clip_score", "--arch", "l14",
                        "--fraction", "0.3", "--metadata_dir", str(pool / "metadata"), "--save_path", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stderr and out.exists()


def test_rows_without_uid_are_left_out_and_counted(pool, tmp_path, caplog):
    s = tmp_path / "s"
    s.mkdir()
    uids = ["%032x" % i for i in range(6)] + [None, None]
    pq.write_table(pa.table({"uid": pa.array(uids, pa.string()),
                             "sieve_score": np.linspace(0, 1, 8).astype(np.float32)}), s / "a.parquet")
    out = tmp_path / "o.npy"
    assert run(["--name", "sieve", "--fraction", "1.0", "--scores_dir", str(s), "--save_path", str(out)]) == 0
    assert len(np.load(out)) == 6 and "2 row(s) without a uid" in caplog.text


# ---------------------------------------------------------------------------------------------
# Reading folders of many files (a score store has one file per shard)


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    uid = pa.array(["%032x" % v for v in rng.integers(0, 2**62, n)])
    return {"uid": uid, "sieve_score": pa.array(rng.random(n).astype(np.float32)),
            "clip_score": pa.array(rng.normal(0.3, 0.05, n).astype(np.float32))}


def _write_split(folder, table, sizes, row_group_size=None):
    """``table``'s rows in consecutive files of the given sizes (0 makes an empty file; a pair is
    rows and row group size)."""
    folder.mkdir()
    start = 0
    for i, n in enumerate(sizes):
        n, group = n if isinstance(n, tuple) else (n, row_group_size or max(1, n))
        pq.write_table(table.slice(start, n), folder / f"{i:08d}.parquet", row_group_size=group)
        start += n
    assert start == table.num_rows


def test_folder_batches_keep_the_rows_in_order_and_join_small_files(tmp_path):
    from datacomp_sieve.metadata import ParquetFolder

    table = pa.table(_rows(4000, 5))
    # empty, tiny, row groups too big to read ahead (streamed), several row groups, tiny again
    sizes = [0, 3, 700, 5, (1200, 100), 2000, 92]
    _write_split(tmp_path / "f", table, sizes)
    folder = ParquetFolder.open(str(tmp_path / "f"))
    got = list(folder.batches(["uid", "clip_score"], batch_rows=256))
    assert pa.concat_tables(got).column("uid").to_pylist() == table.column("uid").to_pylist()
    assert pa.concat_tables(got).column("clip_score").equals(table.column("clip_score"))
    assert all(len(t) <= 256 for t in got)
    ends = np.cumsum([len(t) for t in got])
    bounds = np.cumsum([n[0] if isinstance(n, tuple) else n for n in sizes])
    assert any(lo < b < hi for lo, hi in zip(ends - [len(t) for t in got], ends) for b in bounds)  # joined


def test_a_store_of_many_small_files_selects_as_one_file(tmp_path):
    table = pa.table(_rows(30000, 6))
    _write_split(tmp_path / "one", table, [30000])
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 400, 200)
    sizes[-1] = 30000 - sizes[:-1].sum()
    _write_split(tmp_path / "many", table, sizes.tolist(), row_group_size=97)
    outs = []
    for name in ("one", "many"):
        assert run(["--name", "sieve_clip", "--clip_from", "store", "--fraction", "0.3", "--scores_dir",
                    str(tmp_path / name), "--save_path", str(tmp_path / f"{name}.npy")]) == 0
        outs.append(tmp_path / f"{name}.npy")
    assert len(np.load(outs[0])) >= 9000 and same_bytes(*outs)


def test_a_folder_s_footers_are_read_once(tmp_path, monkeypatch):
    from datacomp_sieve.metadata import ParquetFolder

    _write_split(tmp_path / "f", pa.table(_rows(100, 8)), [10] * 10)
    opened = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda source, **kw: opened.append(source) or real(source, **kw))
    folder = ParquetFolder.open(str(tmp_path / "f"))
    assert folder.num_rows() == 100 and "uid" in folder.schema_names()
    folder.require(["uid", "clip_score"])
    assert folder.has_values("sieve_score") and not folder.has_values("absent")
    assert len(opened) == 10 == len(set(opened))


def test_a_damaged_file_is_one_line_and_an_abandoned_read_leaves_no_thread(tmp_path):
    import threading

    from datacomp_sieve.errors import UserError
    from datacomp_sieve.metadata import ParquetFolder

    table = pa.table(_rows(3000, 9))
    _write_split(tmp_path / "f", table, [1000, 1000, 1000])
    folder = ParquetFolder.open(str(tmp_path / "f"))
    before = set(threading.enumerate())
    for _ in folder.batches(["uid"], batch_rows=100):
        break
    assert set(threading.enumerate()) <= before
    bad = tmp_path / "f" / "00000001.parquet"
    data = bytearray(bad.read_bytes())
    data[100:20000] = bytes(19900)  # the pages, not the footer
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="cannot read .*00000001.parquet"):
        for _ in ParquetFolder.open(str(tmp_path / "f")).batches(["uid", "sieve_score"], batch_rows=100):
            pass
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize("shared_high_half", [False, True])
def test_join_with_duplicate_uids_byte_identical(tmp_path, monkeypatch, capsys, shared_high_half):
    """Duplicated uids (the first row of each is used) in both sources; uids whose first 16 hex
    characters are all the same order on their second half."""
    monkeypatch.setattr(select_mod, "PARTITION_ROWS", 700)  # several partitions
    rng = np.random.default_rng(11)
    prefix = "0123456789abcdef" if shared_high_half else None
    uids = np.array([(prefix or "%016x" % rng.integers(0, 2**63)) + "%016x" % rng.integers(0, 2**63)
                     for _ in range(3000)])
    meta_idx = np.concatenate([np.arange(3000), rng.choice(3000, 50)])  # 50 repeated rows
    store_idx = np.concatenate([rng.choice(3000, 2500, replace=False), rng.choice(3000, 30)])
    rng.shuffle(store_idx)
    (tmp_path / "m").mkdir()
    (tmp_path / "s").mkdir()
    for i, part in enumerate(np.array_split(meta_idx, 3)):
        pq.write_table(pa.table({"uid": uids[part], L14: rng.normal(0.3, 0.05, len(part)).astype(np.float32)}),
                       tmp_path / "m" / f"{i}.parquet")
    for i, part in enumerate(np.array_split(store_idx, 4)):
        pq.write_table(pa.table({"uid": uids[part], "sieve_score": rng.random(len(part)).astype(np.float32)}),
                       tmp_path / "s" / f"{i}.parquet")
    out = tmp_path / "ours.npy"
    assert run(["--name", "sieve_clip", "--alpha", "0.5", "--metadata_dir", str(tmp_path / "m"), "--scores_dir",
                str(tmp_path / "s"), "--save_path", str(out), "--tmp_dir", str(tmp_path)]) == 0
    in_memory.fused(str(tmp_path / "s"), ["sieve_score", L14], [0.5, 0.5], str(tmp_path / "ref.npy"), 0.2,
                    extra=(str(tmp_path / "m"), [L14]))
    assert same_bytes(out, tmp_path / "ref.npy")
    assert "duplicate uid(s) in score store were counted once" in capsys.readouterr().err


def test_has_values_reads_the_column_s_own_statistics_after_a_nested_column(tmp_path):
    from datacomp_sieve.metadata import ParquetFolder

    (tmp_path / "f").mkdir()
    pq.write_table(pa.table({"uid": ["%032x" % i for i in range(4)], "pairs": [[{"a": 1, "b": 2}]] * 4,
                             L14: pa.array([None] * 4, pa.float32())}), tmp_path / "f" / "a.parquet")
    folder = ParquetFolder.open(str(tmp_path / "f"))
    assert not folder.has_values(L14) and folder.has_values("pairs") and folder.has_values("uid")


class _NoCredentialsError(Exception):
    pass


class _Unreachable:
    """A filesystem whose server cannot be reached, as s3fs without credentials."""

    def invalidate_cache(self, path=None):
        pass

    def exists(self, path):
        raise _NoCredentialsError("Unable to locate credentials")

    isdir = exists


@pytest.mark.parametrize("command", [
    ["filter", "--name", "sieve", "--scores_dir", "s3://b/store"],
    ["filter", "--name", "clip_score", "--fraction", "0.3", "--metadata_dir", "s3://b/metadata"],
    ["score", "--shards_dir", "s3://b/shards", "--scores_dir", "s3://b/store", "--captioner", "label"],
    ["score", "--shards_dir", "LOCAL", "--scores_dir", "s3://b/store", "--captioner", "label"],
    ["pool-info", "--shards_dir", "LOCAL", "--scores_dir", "s3://b/store"],
])
def test_an_object_store_out_of_reach_is_one_line(tmp_path, capsys, monkeypatch, command):
    """No credentials (or a wrong endpoint): one line naming the folder, the client's reason and where
    credentials come from, not the client library's traceback."""
    import fsspec

    real = fsspec.core.url_to_fs
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: (_Unreachable(), url.split("://", 1)[1])
                        if str(url).startswith("s3://") else real(url, **kw))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000000.tar").write_bytes(b"")
    command = [str(tmp_path / "shards") if a == "LOCAL" else a for a in command]
    if command[0] == "filter":
        command += ["--save_path", str(tmp_path / "o.npy"), "--quiet"]
    capsys.readouterr()
    code = main(command)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("datacomp_sieve")]
    assert code == 2 and len(err) == 1, err
    assert "cannot reach" in err[0] and "Unable to locate credentials" in err[0] and "AWS_ACCESS_KEY_ID" in err[0]


def test_clip_score_says_its_percentage_of_n_counting_rows_without_a_score(tmp_path, capsys):
    meta = tmp_path / "metadata"
    write_folder(str(meta), rows=2000, files=2, seed=7, columns=("clip_l14_similarity_score",), missing=0.1)
    assert main(["filter", "--name", "clip_score", "--fraction", "0.3", "--metadata_dir", str(meta),
                 "--save_path", str(tmp_path / "s.npy")]) == 0
    kept = len(np.load(tmp_path / "s.npy"))
    err = capsys.readouterr().err
    m = re.search(r"kept (\d+) of 2000 rows \(([\d.]+)%; (\d+) have a score, the others count in N", err)
    assert m, err
    assert int(m.group(1)) == kept >= int(2000 * 0.3) + 1 and m.group(2) == f"{100 * kept / 2000:.2f}"
    assert 1700 < int(m.group(3)) < 1900


def test_no_filter_says_it_kept_every_row(pool, tmp_path, capsys):
    """no_filter keeps all N rows: the kept line says so (it said 'kept 5000 of 0 rows (0.00%; 5000 have a
    score, the others count in N ...)' once the line gave the percentage of N)."""
    assert main(["filter", "--name", "no_filter", "--metadata_dir", str(pool / "metadata"),
                 "--save_path", str(tmp_path / "o.npy"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "kept 5000 of 5000 scored samples (100.00%)" in err, err
