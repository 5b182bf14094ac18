"""Against DataComp's own code, when a clone of it is at hand (DATACOMP_DIR=/path/to/datacomp).

DataComp is not pip-installable and its baselines module imports fasttext, gcld3 and nltk at
import time; those are not needed by the clip_score path, so they are stubbed here.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATACOMP = os.environ.get("DATACOMP_DIR")

pytestmark = pytest.mark.skipif(not DATACOMP, reason="set DATACOMP_DIR to a clone of DataComp")


@pytest.fixture(scope="module")
def datacomp_clip_score():
    stubs = {n: types.ModuleType(n) for n in ["fasttext", "gcld3", "nltk", "nltk.corpus"]}
    stubs["fasttext"].FastText = types.SimpleNamespace(eprint=None)
    stubs["nltk.corpus"].wordnet = None
    saved = {n: sys.modules.get(n) for n in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, DATACOMP)
    try:
        import importlib

        mod = importlib.import_module("baselines.apply_filter")
        yield mod.load_uids_with_clip_score
    finally:
        sys.path.remove(DATACOMP)
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.mark.parametrize("arch", ["l14", "b32"])
@pytest.mark.parametrize("fraction,threshold", [(0.3, None), (0.1, None), (None, 0.3)])
def test_byte_identical_to_datacomp_baselines(tmp_path, datacomp_clip_score, arch, fraction, threshold):
    sys.path.insert(0, str(ROOT / "bench"))
    from synth_store import write_folder

    meta = tmp_path / "metadata"
    write_folder(str(meta), rows=50000, files=4, seed=5,
                 columns=("clip_l14_similarity_score", "clip_b32_similarity_score"), missing=0.002)
    uids = datacomp_clip_score(str(meta), arch, threshold, fraction, 2)
    uids.sort()
    np.save(tmp_path / "datacomp.npy", uids)
    args = [sys.executable, str(ROOT / "baselines.py"), "--name", "clip_score", "--arch", arch,
            "--metadata_dir", str(meta), "--save_path", str(tmp_path / "ours.npy"), "--quiet"]
    args += ["--fraction", str(fraction)] if fraction else ["--threshold", str(threshold)]
    subprocess.run(args, check=True, capture_output=True)
    assert (tmp_path / "ours.npy").read_bytes() == (tmp_path / "datacomp.npy").read_bytes()


@pytest.mark.skipif(not os.environ.get("DATACOMP_PYTHON"),
                    reason="set DATACOMP_PYTHON to the interpreter of DataComp's own environment")
def test_datacomp_resharder_accepts_our_subset(toy_pool, tmp_path):
    import json

    subset = tmp_path / "subset.npy"
    args = [sys.executable, str(ROOT / "baselines.py"), "--name", "clip_score", "--fraction", "0.5",
            "--metadata_dir", str(toy_pool / "metadata"), "--save_path", str(subset), "--quiet"]
    subprocess.run(args, check=True, capture_output=True)
    out = tmp_path / "resharded"
    out.mkdir()
    r = subprocess.run([os.environ["DATACOMP_PYTHON"], "resharder.py", "-i", str(toy_pool / "shards"),
                        "-o", str(out), "-s", str(subset)], cwd=DATACOMP, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    import pyarrow.parquet as pq

    from datacomp_sieve.uids import keys_from_strings, keys_to_pairs

    downloaded = set()
    for p in sorted((toy_pool / "shards").glob("*.parquet")):
        t = pq.read_table(p, columns=["uid", "status"]).to_pydict()
        downloaded |= {u for u, s in zip(t["uid"], t["status"]) if s == "success"}
    ours = {tuple(map(int, x)) for x in np.load(subset)}
    expected = ours & {tuple(map(int, x)) for x in keys_to_pairs(keys_from_strings(sorted(downloaded)))}
    # every listed uid that was downloaded comes out exactly once
    assert meta["output_count"] == len(expected) > 0
    assert np.array_equal(np.load(out / "sample_ids.npy"), np.load(subset))
