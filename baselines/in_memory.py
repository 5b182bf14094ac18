"""Selection as DataComp and the Sieve reference code do it: whole columns in memory, np.sort.

Independent of ``datacomp_sieve.select`` on purpose (pandas, Python uid parsing): it is the
oracle in tests and the comparison in benchmarks.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd


def _files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.parquet")))


def _load(folder: str, columns: list[str]) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p, columns=columns) for p in _files(folder)], ignore_index=True)


def _to_pairs(uids) -> np.ndarray:
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))


def _save(uids: np.ndarray, save_path: str) -> None:
    uids.sort()
    np.save(save_path, uids)


def clip_score(metadata_dir: str, column: str, save_path: str, fraction=None, threshold=None) -> float:
    """DataComp's clip_score baseline: threshold from the whole column, keep ``>=``."""
    if threshold is None:
        values = _load(metadata_dir, [column])[column].values
        n = int(len(values) * fraction)
        threshold = -np.sort(-values)[n]
    parts = []
    for p in _files(metadata_dir):
        df = pd.read_parquet(p, columns=["uid", column])
        parts.append(_to_pairs(df[df[column] >= threshold]["uid"].values))
    _save(np.concatenate(parts), save_path)
    return threshold


def _fuse(df: pd.DataFrame, columns: list[str], weights: list[float], lo: dict, hi: dict) -> pd.Series:
    total = None
    for c, w in zip(columns, weights):
        term = w * ((df[c] - lo[c]) / (hi[c] - lo[c]))
        total = term if total is None else total + term
    return total


def fused(folder: str, columns: list[str], weights: list[float], save_path: str, fraction: float,
          extra: tuple[str, list[str]] | None = None) -> float:
    """The Sieve reference fusion: min-max normalise each column, weighted sum, top fraction.

    As the reference code: load the score columns of the whole pool (no uids), normalise, sort,
    take the threshold; then read each file's uids and keep those ``>=`` it. Rows lacking a
    score are left out of N. ``extra`` = (folder, columns) joins more columns from another
    folder on uid (inner join), which needs the uids of the whole pool in memory.
    """
    if extra is None:
        df = _load(folder, columns).dropna()
    else:
        df = _load(folder, ["uid"] + [c for c in columns if c not in extra[1]])
        df = df.merge(_load(extra[0], ["uid"] + extra[1]), on="uid", how="inner")
        df = df.dropna(subset=columns).drop_duplicates("uid")
    lo = {c: df[c].min() for c in columns}
    hi = {c: df[c].max() for c in columns}
    values = _fuse(df, columns, weights, lo, hi).values
    n = int(len(values) * fraction)
    threshold = values.min() if n >= len(values) else -np.sort(-values)[n]
    if extra is not None:
        uids = _to_pairs(df["uid"].values[values >= threshold])
    else:
        del df, values
        parts = []
        for p in _files(folder):
            part = pd.read_parquet(p, columns=["uid"] + columns).dropna()
            parts.append(_to_pairs(part["uid"].values[_fuse(part, columns, weights, lo, hi).values >= threshold]))
        uids = np.unique(np.concatenate(parts))
    _save(uids, save_path)
    return threshold
