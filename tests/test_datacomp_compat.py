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
