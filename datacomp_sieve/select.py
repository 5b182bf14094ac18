"""Fusion and threshold selection over a whole pool, out of core.

The pool is never held in memory. Scores are streamed from parquet a batch at a time, in a few
passes:

1. statistics: rows, rows with every score, min/max of each score (for min-max normalisation);
2. the exact k-th largest fused score, by radix selection on the float's bit pattern: one
   histogram pass per 16 bits (two for float32), each holding 65,536 counters;
3. the uids whose fused score is ``>=`` that threshold.

Scores in different folders (a score store and the metadata) are joined on uid first: both are
partitioned on disk by the uid's leading bits, and each partition is joined in memory.

Arithmetic follows the reference code exactly: normalisation and the weighted sum happen in the
scores' own dtype (float32 for DataComp's columns and the score store), in the same order of
operations, so thresholds and ties match it bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UserError
from .metadata import ParquetFolder
from .uids import KEY_DTYPE, halves, key_order, keys_from_arrow, matches

log = logging.getLogger(__name__)

BATCH_ROWS = 1 << 20
PARTITION_ROWS = 4_000_000


@dataclass
class Term:
    """One score in a fusion: a column of a parquet folder and its weight."""

    name: str
    folder: ParquetFolder
    column: str
    weight: float = 1.0


@dataclass
class Selection:
    threshold: float
    rows: int
    scored: int
    kept: int
    ranked: int  # N, the rows the fraction is of: the scored ones, or every row with count_missing
    lacking: dict = field(default_factory=dict)
    minmax: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _progress(total: int, desc: str, enabled: bool, unit: str = "rows"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, leave=False)


def _as_float(column, name: str) -> np.ndarray:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_floating(t):
        out = column.to_numpy(zero_copy_only=False)
        return out if out.dtype != np.float16 else out.astype(np.float32)
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    raise UserError(f"score column {name} has type {t}, expected numbers")


# ---------------------------------------------------------------------------------------------
# Tables: where the rows come from


class FolderTable:
    """Every term reads the same folder: no join needed."""

    def __init__(self, terms: list[Term], batch_rows: int = BATCH_ROWS):
        self.folder = terms[0].folder
        self.columns = [t.column for t in terms]
        self.names = [t.name for t in terms]
        self.batch_rows = batch_rows
        self.rows = self.folder.num_rows()
        self.lacking: dict = {}
        self.notes: list = []
        self.null_uids = 0

    def batches(self, with_keys: bool) -> Iterator[tuple[np.ndarray | None, list[np.ndarray], object]]:
        cols = (["uid"] if with_keys else []) + list(dict.fromkeys(self.columns))
        for b in self.folder.batches(cols, self.batch_rows):
            scores = [_as_float(b.column(b.schema.get_field_index(c)), c) for c in self.columns]
            keys = None
            if with_keys:
                keys = _LazyKeys(b.column(0), self.folder.what, self)
            yield keys, scores, len(b)

    def close(self) -> None:
        pass


class _LazyKeys:
    """Parse uids only for the rows that are kept: most of the pool is dropped."""

    def __init__(self, arrow_uids, what: str, table):
        self.arrow = arrow_uids
        self.what = what
        self.table = table

    def take(self, mask: np.ndarray) -> np.ndarray:
        import pyarrow as pa

        kept = self.arrow.filter(pa.array(mask))
        if kept.null_count:
            self.table.null_uids += kept.null_count
            kept = kept.drop_null()
        return keys_from_arrow(kept, self.what)


class _ArrayKeys:
    def __init__(self, keys: np.ndarray):
        self.keys = keys

    def take(self, mask: np.ndarray) -> np.ndarray:
        return self.keys[mask]


class JoinedTable:
    """Terms from several folders, inner-joined on uid through on-disk partitions."""

    def __init__(self, terms: list[Term], tmp_dir: str | None, progress: bool, batch_rows: int = BATCH_ROWS):
        self.names = [t.name for t in terms]
        self.notes: list = []
        self.lacking: dict = {}
        self.null_uids = 0
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(terms):
            groups.setdefault(t.folder.url, []).append(i)
        self.dir = tempfile.mkdtemp(prefix="datacomp-sieve-join-", dir=tmp_dir)
        try:
            self._build(terms, groups, progress, batch_rows)
        except BaseException:
            self.close()
            raise

    def _build(self, terms, groups, progress, batch_rows):
        sources = []
        for url, idx in groups.items():
            folder = terms[idx[0]].folder
            sources.append((folder, [terms[i].column for i in idx], idx, folder.num_rows()))
        biggest = max(s[3] for s in sources)
        bits = max(0, min(8, math.ceil(math.log2(max(1, biggest / PARTITION_ROWS)))))
        self.parts = 1 << bits
        dtypes = [None] * len(sources)
        for si, (folder, columns, idx, rows) in enumerate(sources):
            files = {}
            bar = _progress(rows, f"partition {folder.what}", progress)
            for b in folder.batches(["uid"] + columns, batch_rows):
                if b.column(0).null_count:
                    self.null_uids += b.column(0).null_count
                    b = b.filter(b.column(0).is_valid())
                keys = keys_from_arrow(b.column(0), folder.what)
                vals = [_as_float(b.column(j + 1), c) for j, c in enumerate(columns)]
                if dtypes[si] is None:
                    dtypes[si] = np.dtype([("k", KEY_DTYPE)] + [(f"s{j}", v.dtype) for j, v in enumerate(vals)])
                part = keys.view(np.uint8).reshape(-1, 16)[:, 0] >> (8 - bits) if bits else np.zeros(len(keys), np.uint8)
                order = np.argsort(part, kind="stable")
                part = part[order]
                rec = np.empty(len(keys), dtypes[si])  # in partition order, a column at a time
                rec["k"] = keys[order]
                for j, v in enumerate(vals):
                    rec[f"s{j}"] = v.astype(dtypes[si][f"s{j}"], copy=False)[order]
                bounds = np.searchsorted(part, np.arange(self.parts + 1))
                for p in range(self.parts):
                    lo, hi = bounds[p], bounds[p + 1]
                    if hi > lo:
                        if p not in files:
                            files[p] = open(self._path(si, p), "wb")
                        rec[lo:hi].tofile(files[p])
                bar.update(len(b))
            bar.close()
            for f in files.values():
                f.close()
        joined = 0
        dups = [0] * len(sources)
        only = [0] * len(sources)
        bar = _progress(self.parts, "join partitions", progress, unit="partitions")
        self.score_dtypes = [None] * len(terms)
        for si, (_, _, idx, _) in enumerate(sources):
            for j, ti in enumerate(idx):
                self.score_dtypes[ti] = dtypes[si][f"s{j}"] if dtypes[si] is not None else np.dtype(np.float64)
        out_dtype = np.dtype([("k", KEY_DTYPE)] + [(f"t{i}", d) for i, d in enumerate(self.score_dtypes)])
        self.out_dtype = out_dtype
        for p in range(self.parts):
            recs = []
            for si in range(len(sources)):
                path = self._path(si, p)
                r = np.fromfile(path, dtype=dtypes[si]) if dtypes[si] is not None and os.path.exists(path) else None
                if r is None:
                    r = np.empty(0, dtypes[si] or np.dtype([("k", KEY_DTYPE)]))
                else:
                    os.unlink(path)
                hi, lo = halves(r["k"])
                order = key_order(hi, lo)
                hi, lo = hi[order], lo[order]
                if len(order) > 1:
                    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
                    if same.any():
                        dups[si] += int(same.sum())
                        keep = np.concatenate([[True], ~same])
                        order, hi, lo = order[keep], hi[keep], lo[keep]
                recs.append((r, order, hi, lo))
            sel = [np.arange(len(recs[0][1]))]  # positions in each source's order of the uids in all so far
            for _, _, hi, lo in recs[1:]:
                ia, ib = matches((recs[0][2][sel[0]], recs[0][3][sel[0]]), (hi, lo))
                sel = [s[ia] for s in sel] + [ib]
            out = np.empty(len(sel[0]), out_dtype)
            out["k"] = recs[0][0]["k"][recs[0][1][sel[0]]]
            for si, (_, _, idx, _) in enumerate(sources):
                r, order = recs[si][:2]
                rows = order[sel[si]]
                only[si] += len(order) - len(out)
                for j, ti in enumerate(idx):
                    out[f"t{ti}"] = r[f"s{j}"][rows]
            out.tofile(self._joined(p))
            joined += len(out)
            bar.update(1)
        bar.close()
        self.joined = joined
        self.rows = joined
        if joined == 0:
            what = " and ".join(s[0].what for s in sources)
            raise UserError(f"no uid is in both the {what}: are they from the same pool?")
        for si, (folder, _, idx, rows) in enumerate(sources):
            if dups[si]:
                self.notes.append(f"{dups[si]} duplicate uid(s) in {folder.what} were counted once")
            if only[si]:
                names = "/".join(terms[i].name for i in idx)
                self.lacking[f"{folder.what} rows without a match"] = only[si]
                self.notes.append(
                    f"{only[si]} row(s) of {folder.what} have no matching uid in the other source(s) "
                    f"and are left out (no {'/'.join(n for n in self.names if n not in names) or 'other'} score)"
                )

    def _path(self, si: int, p: int) -> str:
        return os.path.join(self.dir, f"src{si}-{p:03d}.bin")

    def _joined(self, p: int) -> str:
        return os.path.join(self.dir, f"joined-{p:03d}.bin")

    def batches(self, with_keys: bool):
        for p in range(self.parts):
            rec = np.fromfile(self._joined(p), dtype=self.out_dtype)
            for s in range(0, len(rec), BATCH_ROWS):
                chunk = rec[s : s + BATCH_ROWS]
                scores = [np.ascontiguousarray(chunk[f"t{i}"]) for i in range(len(self.names))]
                keys = _ArrayKeys(np.ascontiguousarray(chunk["k"])) if with_keys else None
                yield keys, scores, len(chunk)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def open_table(terms: list[Term], tmp_dir: str | None = None, progress: bool = True):
    if len({t.folder.url for t in terms}) == 1:
        return FolderTable(terms)
    return JoinedTable(terms, tmp_dir, progress)


# ---------------------------------------------------------------------------------------------
# Order statistics


def _sort_key(values: np.ndarray) -> np.ndarray:
    """Unsigned integers whose order is the floats' order (NaN excluded beforehand)."""
    if values.dtype == np.float32:
        bits = values.view(np.uint32)
        sign = np.uint32(0x80000000)
    else:
        bits = values.astype(np.float64, copy=False).view(np.uint64)
        sign = np.uint64(0x8000000000000000)
    return np.where(bits & sign, ~bits, bits | sign)


def _key_to_value(key: int, dtype: np.dtype) -> float:
    if dtype == np.float32:
        sign = 0x80000000
        bits = key ^ sign if key & sign else (~key) & 0xFFFFFFFF
        return np.array([bits], np.uint32).view(np.float32)[0]
    sign = 0x8000000000000000
    bits = key ^ sign if key & sign else (~key) & 0xFFFFFFFFFFFFFFFF
    return np.array([bits], np.uint64).view(np.float64)[0]


class Fusion:
    """The fused score of a batch: ``sum_i w_i * (s_i - min_i) / (max_i - min_i)``."""

    def __init__(self, terms: list[Term], normalize: bool):
        self.terms = terms
        self.normalize = normalize
        self.min: list = [None] * len(terms)
        self.max: list = [None] * len(terms)

    def valid(self, scores: list[np.ndarray]) -> np.ndarray:
        ok = ~np.isnan(scores[0])
        for s in scores[1:]:
            ok &= ~np.isnan(s)
        return ok

    def observe(self, scores: list[np.ndarray], ok: np.ndarray) -> None:
        for i, s in enumerate(scores):
            v = s[ok]
            if len(v):
                lo, hi = v.min(), v.max()
                self.min[i] = lo if self.min[i] is None else min(self.min[i], lo)
                self.max[i] = hi if self.max[i] is None else max(self.max[i], hi)

    def check(self) -> None:
        if not self.normalize:
            return
        for i, t in enumerate(self.terms):
            if self.min[i] == self.max[i]:
                raise UserError(
                    f"score {t.name} ({t.column}) is constant ({self.min[i]}) over the pool, so it cannot "
                    f"be min-max normalised; drop it from the fusion or check how it was computed"
                )

    def __call__(self, scores: list[np.ndarray]) -> np.ndarray:
        if not self.normalize and len(scores) == 1 and self.terms[0].weight == 1.0:
            return scores[0]
        fused = None
        for i, (t, s) in enumerate(zip(self.terms, scores)):
            x = s
            if self.normalize:
                lo, hi = self.min[i], self.max[i]
                x = (x - lo) / (hi - lo)
            x = t.weight * x
            fused = x if fused is None else fused + x
        return fused


def select(
    terms: list[Term],
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    normalize: bool = True,
    count_missing: bool = False,
    tmp_dir: str | None = None,
    progress: bool = True,
    sink=None,
    table=None,
) -> Selection:
    """Keep the rows whose fused score is at least a threshold, given or derived from a fraction.

    With a fraction, ``n = int(N * fraction)`` and the threshold is the fused score at position n
    of the scores sorted in descending order (DataComp's convention; fraction 1.0 keeps all).
    ``count_missing=True`` counts rows lacking a score in N as DataComp's clip_score baseline
    does (they sort last); otherwise N is the number of rows that have every score. The kept
    uids go to ``sink.add(keys)`` (a ``uids.SubsetWriter``). ``table``: an ``open_table(terms)``
    to reuse for further passes (the caller closes it); by default one is opened and closed here.
    """
    if (fraction is None) == (threshold is None):
        raise UserError("give exactly one of --fraction and --threshold")
    own = table is None
    table = open_table(terms, tmp_dir, progress) if own else table
    try:
        return _select(table, terms, fraction, threshold, normalize, count_missing, progress, sink)
    finally:
        if own:
            table.close()


def _select(table, terms, fraction, threshold, normalize, count_missing, progress, sink) -> Selection:
    fusion = Fusion(terms, normalize)
    rows = table.rows
    npass = 4 if fraction is not None else 2
    step = 1

    # pass 1: counts and ranges
    scored = 0
    total = 0
    lacking = {t.name: 0 for t in terms}
    dtype = None
    bar = _progress(rows, f"pass {step}/{npass}: statistics", progress)
    for _, scores, n in table.batches(with_keys=False):
        ok = fusion.valid(scores)
        for t, s in zip(terms, scores):
            lacking[t.name] += int(np.isnan(s).sum())
        scored += int(ok.sum())
        total += n
        fusion.observe(scores, ok)
        bar.update(n)
    bar.close()
    step += 1
    if scored == 0:
        names = ", ".join(f"{t.name} ({t.column})" for t in terms)
        raise UserError(f"no row has a score for {names}: every value is missing or NaN; check the score columns")
    fusion.check()
    notes = list(table.notes)
    for name, k in lacking.items():
        if k:
            notes.append(f"{k} row(s) have no {name} score: counted in N and ranked last, as DataComp does"
                         if count_missing else f"{k} row(s) have no {name} score and are left out")

    # the threshold
    if fraction is not None:
        N = total if count_missing else scored
        n = int(N * fraction)
        if n >= N:
            thr = None  # keep every scored row
            step += 2
        elif n >= scored:
            thr = float("nan")
            step += 2
            notes.append(
                f"the fraction reaches rows without a score (n={n} >= {scored} scored of {N}): "
                "nothing is kept, as in DataComp's baselines.py"
            )
        else:
            thr = _kth_largest(table, fusion, n, scored, progress, step, npass)
            step += 2
    else:
        thr = threshold

    # final pass: the uids
    kept = 0
    bar = _progress(rows, f"pass {step}/{npass}: collect uids", progress)
    for keys, scores, n in table.batches(with_keys=True):
        ok = fusion.valid(scores)
        f = fusion(scores)
        dtype = f.dtype
        if thr is None:
            mask = ok
        else:
            with np.errstate(invalid="ignore"):
                mask = ok & (f >= f.dtype.type(thr))
        if mask.any():
            sink.add(keys.take(mask))
            kept += int(mask.sum())
        bar.update(n)
    bar.close()
    if table.null_uids:
        notes.append(f"{table.null_uids} row(s) without a uid were left out")
    if thr is None:
        thr_value = float("nan")
    else:
        thr_value = float(np.asarray(thr, dtype=dtype or np.float64))
    minmax = {t.name: (None if fusion.min[i] is None else float(fusion.min[i]),
                       None if fusion.max[i] is None else float(fusion.max[i])) for i, t in enumerate(terms)}
    return Selection(threshold=thr_value, rows=rows, scored=scored, kept=kept,
                     ranked=total if count_missing else scored, lacking={**lacking, **table.lacking}, minmax=minmax, notes=notes)


def _kth_largest(table, fusion, n: int, scored: int, progress: bool, step: int, npass: int) -> float:
    """The value at position n (0-based) of the valid fused scores sorted in descending order."""
    m = scored - 1 - n  # the same element, counted from the smallest
    prefix = 0
    dtype = None
    width = None
    shift = None
    passes = 0
    while True:
        hist = np.zeros(1 << 16, np.int64)
        bar = _progress(table.rows, f"pass {step}/{npass}: threshold", progress)
        for _, scores, n_rows in table.batches(with_keys=False):
            ok = fusion.valid(scores)
            f = fusion(scores)[ok]
            if dtype is None:
                dtype = f.dtype if f.dtype in (np.float32, np.float64) else np.dtype(np.float64)
                width = 32 if dtype == np.float32 else 64
                shift = width - 16
            key = _sort_key(f.astype(dtype, copy=False))
            if shift + 16 < width:
                key = key[(key >> np.array(shift + 16, key.dtype)) == prefix]
            digit = (key >> np.array(shift, key.dtype)) & np.array(0xFFFF, key.dtype)
            hist += np.bincount(digit.astype(np.int64), minlength=1 << 16)
            bar.update(n_rows)
        bar.close()
        passes += 1
        step = min(step + 1, npass - 1)
        cum = np.cumsum(hist)
        d = int(np.searchsorted(cum, m, side="right"))
        m -= int(cum[d - 1]) if d else 0
        prefix = (prefix << 16) | d
        if shift == 0:
            return _key_to_value(prefix, dtype)
        shift -= 16
