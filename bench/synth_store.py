"""Synthetic score stores and metadata folders of any size, written a file at a time.

Values look like real ones (Sieve cosines in [0, 1], CLIPScore cosines around 0.3, some missing,
some ties) so selection is exercised as on a real pool.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def random_uids(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    chars = np.empty((n, 32), np.uint8)
    chars[:, 0::2] = HEX[raw >> 4]
    chars[:, 1::2] = HEX[raw & 15]
    return pa.array(chars.view("S32").reshape(-1)).cast(pa.string())


def write_folder(folder: str, rows: int, files: int = 4, seed: int = 0, columns=("sieve_score",),
                 missing: float = 0.0, ties: bool = True, dtype=np.float32, uids: list | None = None, keep_uids: bool = True) -> list:
    """Write ``files`` parquet files with uid + the given float columns; returns each file's uid array."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    per = -(-rows // files)
    for i in range(files):
        n = min(per, rows - i * per)
        if n <= 0:
            break
        uid = uids[i] if uids is not None else random_uids(rng, n)
        n = len(uid)
        table = {"uid": uid}
        for c in columns:
            if "clip" in c:
                v = rng.normal(0.3, 0.05, n)
            else:
                v = rng.beta(2.0, 3.0, n)
            if ties:
                v[: n // 10] = np.round(v[: n // 10], 2)
            v = v.astype(dtype)
            mask = rng.random(n) < missing if missing else None
            table[c] = pa.array(v, mask=mask)
        pq.write_table(pa.table(table), os.path.join(folder, f"{i:08d}.parquet"), row_group_size=1 << 20)
        if keep_uids:
            out.append(uid)
    return out
