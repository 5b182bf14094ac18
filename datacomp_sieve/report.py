"""The inspection report: what Sieve keeps and drops, as one static HTML folder.

``write_report(scores_dir, shards_dir, out)`` writes ``out/index.html`` (plots as inline SVG,
no script, no network) with ``out/thumbs/*.jpg`` beside it, and ``out/report.json`` (the
numbers). It opens from disk in any browser.

Memory stays flat whatever the pool's size: the scores are streamed a batch at a time through
the same tables, fusion and exact threshold as ``filter`` (``select.py``), and what is shown is
sampled while streaming:

- histograms: fixed bins (``FINE_BINS`` over each score's range) accumulated per batch;
- galleries: per-section bounded top-k sets (the best kept, the worst dropped, the kept and
  dropped nearest the threshold), and uniform samples without replacement (random priorities,
  the k smallest kept: reservoir sampling) for the disagreement sets and the scatter plot;
- then only the shown rows are looked up in the store (its uid column, read as ``filter`` reads
  scores, then the row groups that hold them) and only their members are read from the tars
  (``shards.read_samples``) for thumbnails and alt-texts.

"Kept" is membership in ``subset`` when given (DataComp's u8,u8 file), else the top ``fraction``
by the fused score with DataComp's threshold convention (``select.select``, exact). The fused
score is the filter's: ``sieve_clip`` (``(1 - alpha) * sieve_norm + alpha * clip_norm``) when a
CLIPScore is found (the metadata's column for ``arch``, else the store's ``clip_score``), else
``sieve`` alone. The disagreement sets compare what each score alone would keep at the same
fraction; those two thresholds come from the histograms (within 1/``FINE_BINS`` of the range).

Alt-texts, captions and json fields are untrusted web text: every one is escaped with
``html.escape(quote=True)``, control characters are shown as symbols, no attribute or URL is
built from them, and a Content-Security-Policy forbids every script.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

FINE_BINS = 1 << 14
PLOT_BINS = 64
PER_SECTION = 24
SCATTER_POINTS = 2000
THUMB_PX = 160
EXAMPLES = 3  # failed samples listed per failure status
REASONS = 12  # download failure reasons listed on the page (all are in report.json)
MARKER = "report.json"
NO_STATUS = "unknown (the store has no status column)"
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

# scores carried with every shown row: sieve, clip, fused, kept (1/0)
_S, _C, _F, _K = range(4)


def esc(value) -> str:
    """Untrusted text -> safe HTML text: escaped, control characters shown as symbols."""
    s = "" if value is None else str(value)
    s = s.translate(_CONTROL)
    return html.escape(s, quote=True)


_CONTROL = {c: 0x2400 + c for c in range(32) if c not in (9, 10)}
_CONTROL[127] = 0x2421


# ---------------------------------------------------------------------------------------------
# streaming statistics


class _TopK:
    """The ``k`` eligible rows with the largest priority seen so far, with their scores and keys.

    With random priorities this is a uniform sample without replacement (reservoir sampling).
    """

    def __init__(self, k: int):
        from .uids import KEY_DTYPE

        self.k = k
        self.seen = 0
        self.prio = np.empty(0)
        self.keys = np.empty(0, KEY_DTYPE)
        self.vals = np.empty((0, 4))

    def offer(self, prio: np.ndarray, eligible: np.ndarray, keys, vals: np.ndarray) -> None:
        idx = np.flatnonzero(eligible)
        self.seen += len(idx)
        if not len(idx) or not self.k:
            return
        if len(idx) > self.k:
            idx = np.sort(idx[np.argpartition(-prio[idx], self.k - 1)[: self.k]])
        if len(self.prio) == self.k and prio[idx].max() <= self.prio.min():
            return
        take = np.zeros(len(prio), bool)
        take[idx] = True
        self.prio = np.concatenate([self.prio, prio[idx]])
        self.keys = np.concatenate([self.keys, keys.take(take)])
        self.vals = np.concatenate([self.vals, vals[idx]])
        if len(self.prio) > self.k:
            keep = np.argsort(-self.prio, kind="stable")[: self.k]
            self.prio, self.keys, self.vals = self.prio[keep], self.keys[keep], self.vals[keep]

    def rows(self) -> list[tuple[bytes, np.ndarray]]:
        order = np.argsort(-self.prio, kind="stable")
        return [(bytes(self.keys[i]), self.vals[i]) for i in order]


def _bins(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = (values.astype(np.float64) - lo) * (FINE_BINS / (hi - lo))
    return np.clip(np.floor(np.nan_to_num(x, nan=0.0)), 0, FINE_BINS - 1).astype(np.int64)


def _top_bin(hist: np.ndarray, n: int) -> int:
    """The bin holding position ``n`` (0-based) of the values sorted in descending order."""
    from_top = np.cumsum(hist[::-1])
    return len(hist) - 1 - int(np.searchsorted(from_top, n + 1))


@dataclass
class _Score:
    """One plotted score: its range and fine histograms (all rows, kept rows)."""

    name: str
    lo: float
    hi: float
    all: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    kept: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    alone_bin: int | None = None  # the bin from which this score alone would keep the fraction

    def add(self, values: np.ndarray, kept: np.ndarray) -> np.ndarray:
        b = _bins(values, self.lo, self.hi)
        self.all += np.bincount(b, minlength=FINE_BINS)
        self.kept += np.bincount(b[kept], minlength=FINE_BINS)
        return b

    def edge(self, b: int) -> float:
        return self.lo + (self.hi - self.lo) * b / FINE_BINS


class _NoSink:
    """select() wants somewhere to put the kept uids; the report only counts them."""

    def add(self, keys) -> None:
        pass


def _valid_uids(keys) -> np.ndarray | None:
    """Rows whose uid is missing cannot be shown (a FolderTable drops them when taking keys)."""
    arrow = getattr(keys, "arrow", None)
    if arrow is None or not arrow.null_count:
        return None
    return arrow.is_valid().to_numpy(zero_copy_only=False)


class _Kept:
    """Membership in a DataComp subset file, by binary search in the (sorted) memmap."""

    def __init__(self, path):
        from .uids import read_subset, sorted_duplicates

        self.path = str(path)
        self.pairs = read_subset(path)
        self.unique = len(self.pairs) - sorted_duplicates(self.pairs, f"subset {path}")

    def __call__(self, keys) -> np.ndarray:
        from .uids import keys_to_pairs

        pairs = keys_to_pairs(keys)
        if not len(self.pairs):
            return np.zeros(len(pairs), bool)
        pos = np.minimum(np.searchsorted(self.pairs, pairs), len(self.pairs) - 1)
        found = self.pairs[pos]
        return (found["f0"] == pairs["f0"]) & (found["f1"] == pairs["f1"])


# ---------------------------------------------------------------------------------------------
# the passes


def _terms(opts, alpha: float):
    """The filter's terms: sieve_clip when a CLIPScore exists (metadata first), else sieve.
    The folders are opened once, in ``opts`` (``filters.folder``)."""
    from .filters import STORE_CLIP_COLUMN, _clip_term, _sieve_term, folder
    from .metadata import CLIP_COLUMNS

    scores_dir, metadata_dir, arch = opts.scores_dir, opts.metadata_dir, opts.arch
    store = folder(opts, scores_dir, "score store")
    source = None
    if metadata_dir:
        meta = folder(opts, metadata_dir, "metadata folder")
        if CLIP_COLUMNS[arch] in meta.schema_names() and meta.has_values(CLIP_COLUMNS[arch]):
            source = f"the metadata's {CLIP_COLUMNS[arch]} (joined on uid)"
    if source is None and STORE_CLIP_COLUMN in store.schema_names() and store.has_values(STORE_CLIP_COLUMN):
        opts.clip_from = "store"
        source = f"the score store's {STORE_CLIP_COLUMN}"
    if source is None:
        return [_sieve_term(opts, 1.0)], None
    return [_sieve_term(opts, 1.0 - alpha), _clip_term(opts, alpha)], source


def _stream(table, fusion, kept_of, thr, sections, rng, progress, desc) -> int:
    """One pass: histograms and the fused-score sections (or, second pass, the disagreements)."""
    from .select import _progress

    bar = _progress(table.rows, desc, progress)
    counted = 0
    for keys, cols, n in table.batches(with_keys=True):
        ok = fusion.valid(cols)
        good = _valid_uids(keys)
        if good is not None:
            ok &= good
        fused = fusion(cols)
        f = fused.astype(np.float64)
        vals = np.full((n, 4), np.nan)
        vals[:, _S] = cols[0]
        if len(cols) > 1:
            vals[:, _C] = cols[1]
        vals[:, _F] = f
        if kept_of is not None:
            kept = np.zeros(n, bool)
            if ok.any():
                kept[ok] = kept_of(keys.take(ok))
        else:
            with np.errstate(invalid="ignore"):
                kept = ok & (fused >= fused.dtype.type(thr)) if thr is not None else ok.copy()
        vals[:, _K] = kept
        counted += int(kept.sum())
        sections(keys, cols, f, ok, kept, vals, rng)
        bar.update(n)
    bar.close()
    return counted


def _lookup(store, wanted: set[bytes], progress: bool, failed: dict | None = None) -> tuple[dict, dict, int]:
    """Store rows of the wanted uids (with their shard), status counts, and the store's rows.

    ``store``: the store's ``ParquetFolder``; uids and statuses are read as ``filter`` reads
    scores (``batches``: footers read once, files on threads); then the few files holding a
    wanted uid are read for its captions. ``failed``: when given (and every file has a status
    column), filled with status -> the first ``EXAMPLES`` rows of that failure status in read
    order, each {uid, shard, key, error} (uid None for a sample without one).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from .select import _progress
    from .uids import KEY_DTYPE, keys_from_arrow

    footers = store.footers()
    want = np.sort(np.array(sorted(wanted), dtype=KEY_DTYPE)) if wanted else np.empty(0, KEY_DTYPE)
    units = store.row_groups()  # in the order batches() reads them
    ends = np.cumsum([n for _, _, n in units], dtype=np.int64)
    with_status = all("status" in f.names for f in footers)
    status: dict = {}
    hits = []  # row numbers (over the whole store, in read order) of wanted uids
    picks: dict = {}  # failure status -> row numbers of its first examples
    total = 0
    bar = _progress(store.num_rows(), "look up shown rows", progress)
    for t in store.batches(["uid", "status"] if with_status else ["uid"]):
        if with_status:
            st = t.column("status").combine_chunks()
            for item in pc.value_counts(st.fill_null("(none)")).to_pylist():
                v = item["values"]
                status[v] = status.get(v, 0) + item["counts"]
                need = EXAMPLES - len(picks.get(v, ()))
                if failed is not None and v not in ("ok", "(none)") and need > 0:
                    at = pc.indices_nonzero(pc.fill_null(pc.equal(st, v), False)).to_numpy()[:need]
                    picks.setdefault(v, []).extend((total + at).tolist())
        uid = t.column("uid").combine_chunks()
        if len(want) and len(uid):
            where = np.flatnonzero(uid.is_valid().to_numpy(zero_copy_only=False))
            keys = keys_from_arrow(uid.filter(uid.is_valid()), store.what)
            pos = np.minimum(np.searchsorted(want, keys), len(want) - 1)
            hits.append(total + where[want[pos] == keys])
        total += t.num_rows
        bar.update(t.num_rows)
    bar.close()
    if not with_status:  # files without a status column count as unknown
        for path, f in zip(store.paths, footers):
            if "status" in f.names:
                column = store._file(path).read(columns=["status"], use_threads=False).column("status")
                for item in pc.value_counts(column.combine_chunks().fill_null("(none)")).to_pylist():
                    status[item["values"]] = status.get(item["values"], 0) + item["counts"]
            else:
                status[NO_STATUS] = status.get(NO_STATUS, 0) + sum(f.groups)
    def rows_at(at, columns):
        """(row number, shard, row) for the given ascending row numbers of the store, each file's row
        group read once for the ``columns`` it has."""
        unit_of = np.searchsorted(ends, at, side="right")
        for u in np.unique(unit_of):
            i, g, n = units[u]
            path = store.paths[i]
            mine = at[unit_of == u]
            cols = [c for c in columns if c in footers[i].names]
            part = store._file(path).read_row_group(g, columns=cols).take(pa.array(mine - (ends[u] - n)))
            stem = path.rsplit("/", 1)[-1][: -len(".parquet")]
            yield from zip(mine.tolist(), [stem] * len(mine), part.to_pylist())

    rows: dict = {}
    hits = np.concatenate(hits) if hits else np.empty(0, np.int64)
    for _, stem, r in rows_at(hits, ("uid", "key", "best_caption", "captions", "status", "error")):
        rows.setdefault(bytes.fromhex(r["uid"]), {**r, "shard": stem})
    if picks:
        at = np.array(sorted(p for v in picks.values() for p in v), np.int64)
        found = {p: {"uid": r.get("uid"), "shard": stem, "key": r.get("key"), "error": r.get("error")}
                 for p, stem, r in rows_at(at, ("uid", "key", "error"))}
        failed.update({v: [found[p] for p in picks[v]] for v in sorted(picks)})
    return rows, status, total


def _thumbnails(shards_dir: str | None, shards: list | None, rows: dict, out: Path, progress: bool) -> dict:
    """uid -> {file, width, height} or {error}; alt-text and json into ``rows``. Reads only shown
    members. ``shards``: ``list_shards(shards_dir)``, listed once by the caller."""
    from tqdm.auto import tqdm

    from .shards import decode_image, read_samples

    by_stem: dict = {}
    for uid, r in rows.items():
        if r.get("key") is not None:
            by_stem.setdefault(r["shard"], {})[r["key"]] = uid
    thumbs: dict = {}
    if shards_dir is None:
        return thumbs
    shards = {s.stem: s for s in shards}
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    lost = 0  # shown samples the shards folder does not hold
    for stem in tqdm(sorted(by_stem), desc="thumbnails", unit="shard", disable=not progress, leave=False):
        keys = by_stem[stem]
        if stem not in shards:
            for uid in keys.values():
                thumbs[uid] = {"error": f"shard {stem}.tar is not in the shards folder"}
            lost += len(keys)
            continue
        try:
            samples = read_samples(shards[stem], keys)
        except OSError as e:
            samples = {}
            log.warning("cannot read shard %s: %s", stem, e)
        for key, uid in keys.items():
            s = samples.get(key)
            if s is None:
                thumbs[uid] = {"error": f"sample {key} not found in {stem}.tar"}
                lost += 1
                continue
            rows[uid]["text"] = s.text
            rows[uid]["json"] = s.json
            try:
                im = decode_image(s.image or b"")
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
            except Exception as e:  # noqa: BLE001 - any unreadable image is shown as such
                thumbs[uid] = {"error": f"image not readable: {e}"}
                continue
            name = f"thumbs/{uid.hex()}.jpg"
            (out / name).write_bytes(buf.getvalue())
            thumbs[uid] = {"file": name, "width": im.width, "height": im.height}
    if lost:  # the page shows them without images; say why here too
        log.warning("%d of the %d samples shown were not found in %s%s", lost, len(thumbs), shards_dir,
                    ": are these the pool's shards?" if lost == len(thumbs) else "")
    return thumbs


def _failed_texts(shards: list | None, failed: dict) -> None:
    """The url (from the json) and alt-text of the failed examples, from their tars when there."""
    from .shards import read_samples

    by_stem: dict = {}
    for examples in failed.values():
        for e in examples:
            if e["key"] is not None:
                by_stem.setdefault(e["shard"], []).append(e)
    have = {s.stem: s for s in shards or ()}
    for stem, examples in sorted(by_stem.items()):
        if stem not in have:
            continue
        try:
            samples = read_samples(have[stem], {e["key"] for e in examples})
        except OSError as err:
            log.warning("cannot read shard %s: %s", stem, err)
            continue
        for e in examples:
            sample = samples.get(e["key"])
            if sample is not None:
                j = sample.json if isinstance(sample.json, dict) else {}
                e["url"], e["text"] = j.get("url"), sample.text


# ---------------------------------------------------------------------------------------------
# the report


def write_report(scores_dir: str, shards_dir: str | None, out, *, metadata_dir: str | None = None,
                 subset: str | None = None, fraction: float = 0.2, alpha: float = 0.5, arch: str = "l14",
                 per_section: int = PER_SECTION, scatter_points: int = SCATTER_POINTS, seed: int = 0,
                 notes: list | None = None, tmp_dir: str | None = None, progress: bool = True) -> dict:
    """Write the HTML report into the folder ``out``; returns its summary (also in report.json).

    ``notes``: lines shown first (e.g. which models the demo could use). ``shards_dir`` None:
    galleries without thumbnails or alt-texts.
    """
    from .filters import FilterOptions, folder
    from .select import Fusion, open_table, select
    from .store import ScoreStore

    t0 = time.time()
    if not 0.0 < fraction <= 1.0 or math.isnan(fraction):
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha (the weight of CLIPScore) must be in [0, 1], got {alpha}")
    if per_section < 1:
        raise UserError(f"--per_section must be at least 1, got {per_section}")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(f"--out {out} exists and is not a report folder; give a new or empty folder")
    opts = FilterOptions(metadata_dir=metadata_dir, scores_dir=scores_dir, arch=arch)
    terms, clip_source = _terms(opts, alpha)
    shards = None
    if shards_dir is not None:
        from .shards import list_shards

        shards = list_shards(shards_dir)  # listed once, now: a wrong folder fails early, with one line
    kept_of = _Kept(subset) if subset else None
    has_clip = clip_source is not None
    store_obj = ScoreStore(scores_dir)
    manifest = store_obj.manifest() or store_obj.config() or {}
    gap = store_obj.gaps()
    if gap:
        log.warning("%s", gap)
    config = manifest.get("config") or {}

    table = open_table(terms, tmp_dir, progress)
    try:
        if kept_of is None:
            sel = select(terms, fraction=fraction, normalize=True, sink=_NoSink(), progress=progress, table=table)
            thr = None if sel.threshold != sel.threshold else sel.threshold
        else:
            # only the statistics are needed (scored rows, min/max): a threshold that keeps nothing
            sel = select(terms, threshold=math.inf, normalize=True, sink=_NoSink(), progress=progress, table=table)
            thr = None
        fusion = Fusion(terms, normalize=True)
        for i, t in enumerate(terms):
            fusion.min[i], fusion.max[i] = sel.minmax[t.name]
        scores = {"sieve": _Score("Sieve score", *sel.minmax["sieve"]), "fused": _Score(
            "fused score" if has_clip else "Sieve score, min-max normalised (the filter's)", 0.0, 1.0)}
        if has_clip:
            scores["clip"] = _Score("CLIPScore", *sel.minmax["clip"])
        # where the kept set is cut: the lowest kept and highest dropped fused (and Sieve) scores, exact
        edge = {"kept_f": math.inf, "drop_f": -math.inf, "kept_s": math.inf, "drop_s": -math.inf}
        half = (per_section + 1) // 2
        sec = {"kept_top": _TopK(per_section), "dropped_bottom": _TopK(per_section),
               "border_kept": _TopK(half), "border_dropped": _TopK(per_section - half),
               "scatter": _TopK(scatter_points)}

        def first(keys, cols, f, ok, kept, vals, rng):
            scores["sieve"].add(cols[0][ok], kept[ok])
            scores["fused"].add(f[ok], kept[ok])
            if has_clip:
                scores["clip"].add(cols[1][ok], kept[ok])
            drop = ok & ~kept
            if kept.any():
                edge["kept_f"] = min(edge["kept_f"], float(f[kept].min()))
                edge["kept_s"] = min(edge["kept_s"], float(np.min(cols[0][kept])))
            if drop.any():
                edge["drop_f"] = max(edge["drop_f"], float(f[drop].max()))
                edge["drop_s"] = max(edge["drop_s"], float(np.max(cols[0][drop])))
            sec["kept_top"].offer(f, kept, keys, vals)
            sec["dropped_bottom"].offer(-f, drop, keys, vals)
            sec["border_kept"].offer(-f, kept, keys, vals)
            sec["border_dropped"].offer(f, drop, keys, vals)
            sec["scatter"].offer(rng.random(len(f)), ok, keys, vals)

        rng = np.random.default_rng(seed)
        kept_n = _stream(table, fusion, kept_of, thr, first, rng, progress, "report: histograms")
        scored = sel.scored
        frac = fraction if kept_of is None else kept_n / scored
        absent = 0 if kept_of is None else kept_of.unique - kept_n
        if absent:
            log.warning("%d of the subset's %d uids are not among the %d scored samples of %s", absent,
                        kept_of.unique, scored, scores_dir)
        # each score alone keeps as many rows as the kept set: DataComp's n (n + 1 rows, plus ties)
        n_alone = int(scored * frac) if kept_of is None else kept_n - 1
        if has_clip and 0 <= n_alone < scored - 1:  # each alone keeps some but not all
            for s in (scores["sieve"], scores["clip"]):
                s.alone_bin = _top_bin(s.all, n_alone)
            sec["clip_not_sieve"] = _TopK(per_section)
            sec["sieve_not_clip"] = _TopK(per_section)

            def second(keys, cols, f, ok, kept, vals, rng):
                s_keep = _bins(cols[0], scores["sieve"].lo, scores["sieve"].hi) >= scores["sieve"].alone_bin
                c_keep = _bins(cols[1], scores["clip"].lo, scores["clip"].hi) >= scores["clip"].alone_bin
                prio = rng.random(len(f))
                sec["clip_not_sieve"].offer(prio, ok & c_keep & ~s_keep, keys, vals)
                sec["sieve_not_clip"].offer(prio, ok & s_keep & ~c_keep, keys, vals)

            _stream(table, fusion, kept_of, thr, second, rng, progress, "report: disagreements")
        table_rows = table.rows
    finally:
        table.close()

    wanted = set()
    for name, s in sec.items():
        if name != "scatter":
            wanted.update(k for k, _ in s.rows())
    failed: dict = {}
    rows, status, store_rows = _lookup(folder(opts, scores_dir, "score store"), wanted, progress, failed)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        thumbs = _thumbnails(shards_dir, shards, rows, tmp, progress)
        _failed_texts(shards, failed)
        pool_rows = folder(opts, metadata_dir, "metadata folder").num_rows() if metadata_dir else None
        downloads = _downloads(shards)
        masking = config.get("masking", "official")
        summary = {
            "out": str(out), "index": str(out / "index.html"),
            "scores_dir": str(scores_dir), "shards_dir": shards_dir, "metadata_dir": metadata_dir,
            "filter": "sieve_clip" if has_clip else "sieve", "alpha": alpha if has_clip else None,
            "clip_source": clip_source, "subset": subset,
            "selection": (f"uids in {subset}" if subset else
                          f"top {fraction:g} by {'fused' if has_clip else 'Sieve'} score (DataComp's convention: n = int(N * {fraction:g}), "
                          f"keep every score >= the n-th largest)"),
            "threshold": thr, "fraction": frac,
            "cut": _cut(edge, has_clip),
            "alone_thresholds": ({k: scores[k].edge(scores[k].alone_bin) for k in ("sieve", "clip")}
                                 if "clip_not_sieve" in sec else None),
            "counts": {"pool": pool_rows, "store_rows": store_rows, "compared": table_rows, "scored": scored,
                       "kept": kept_n, "status": dict(sorted(status.items())),
                       "failed": {k: v for k, v in sorted(status.items()) if k not in ("ok", NO_STATUS)},
                       "subset_uids": len(kept_of.pairs) if kept_of is not None else None,
                       "downloads": downloads},
            "failed_examples": failed,
            "sections": {k: {"eligible": s.seen, "shown": len(s.prio),
                             **({} if k == "scatter" else {"uids": [u.hex() for u, _ in s.rows()]})}
                         for k, s in sec.items()},
            "thumbnails": sum(1 for t in thumbs.values() if "file" in t),
            "notes": list(notes or []) + _automatic_notes(config, clip_source, terms, models=notes is None) + (
                [f"{absent:,} of the subset's {kept_of.unique:,} uids are not among the scored samples here (a "
                 f"subset of another pool, or shards not scored yet): kept counts only those that are."]
                if absent else []) + ([gap[0].upper() + gap[1:] + "."] if gap else []) + _shards_mismatch(
                downloads, store_rows),
            "selection_notes": list(sel.notes),
            "masking": masking,
            "captioner": config.get("captioner"),
        }
        page = _page(summary, scores, sec, rows, thumbs, manifest, masking)
        (tmp / "index.html").write_text(page, encoding="utf-8", errors="replace")
        summary["seconds"] = round(time.time() - t0, 2)
        (tmp / MARKER).write_text(json.dumps(summary, indent=1, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _downloads(shards: list | None) -> dict | None:
    """What img2dataset says of the pool's URLs, summed over the shards' ``_stats.json``: tried,
    downloaded, failed to download, failed to resize, and the failures by reason (its
    ``status_dict``, most frequent first). None without shards or without any stats file."""
    have = [s.stats for s in shards or () if isinstance(s.stats, dict)]
    if not have:
        return None
    out = {"shards": len(shards), "shards_with_stats": len(have)}
    for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
        out[k] = sum(v for v in (st.get(k) for st in have) if isinstance(v, int) and not isinstance(v, bool))
    reasons: dict = {}
    for st in have:
        d = st.get("status_dict")
        for reason, n in (d.items() if isinstance(d, dict) else ()):
            if reason != "success" and isinstance(n, int) and not isinstance(n, bool):
                reasons[str(reason)] = reasons.get(str(reason), 0) + n
    out["reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def _shards_mismatch(downloads: dict | None, store_rows: int) -> list[str]:
    """A store holds at most the samples its shards hold: more rows than every shard's stats count
    as downloaded means the shards (and their counts on this page) are another pool's."""
    if not downloads or downloads["shards_with_stats"] < downloads["shards"] or store_rows <= downloads["successes"]:
        return []
    return [f"The score store has {store_rows:,} rows but the shards' _stats.json count {downloads['successes']:,} "
            "downloaded samples: are these the pool's shards?"]


def _cut(edge: dict, has_clip: bool) -> dict:
    """The lowest kept and highest dropped fused scores (None when nothing is kept or dropped), and
    whether the kept set is a threshold on the fused score (every kept above every dropped; ties
    split between kept and dropped are not a threshold). With Sieve alone the fused score is Sieve
    min-max normalised, so the same two rows are given in Sieve score units too."""
    def num(x):
        return None if math.isinf(x) else x

    lo, hi = num(edge["kept_f"]), num(edge["drop_f"])
    return {"lowest_kept": lo, "highest_dropped": hi, "is_threshold": lo is None or hi is None or lo > hi,
            "lowest_kept_sieve": None if has_clip else num(edge["kept_s"]),
            "highest_dropped_sieve": None if has_clip else num(edge["drop_s"])}


def _automatic_notes(config: dict, clip_source: str | None, terms, models: bool = True) -> list[str]:
    """What the page must say first: a stand-in captioner, no CLIPScore (``models``: unless the
    caller's notes already say which models ran), and how the score is fused."""
    notes = []
    if models and config.get("captioner") in ("label", "tiny"):
        what = ("the OFFLINE STAND-IN captioner (an ImageNet classifier writing 'a photo of a {label}'), not BLIP"
                if config["captioner"] == "label" else "a tiny random BLIP (meaningless captions, for tests)")
        notes.append(f"Captions come from {what}: the scores show the pipeline, not the paper's quality.")
    if clip_source is None and models:
        notes.append("No CLIPScore was found (neither in the metadata nor in the score store): the filter is Sieve "
                     "alone; CLIPScore plots and the disagreement sets are left out.")
    elif clip_source is not None:
        notes.append(f"CLIPScore: {clip_source}; fused = {terms[0].weight:g} * sieve_norm + "
                     f"{terms[1].weight:g} * clip_norm.")
    return notes


# ---------------------------------------------------------------------------------------------
# HTML


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
.note{background:#fff4d6;border:1px solid #e0b84c;padding:.5em .8em;margin:.3em 0}
table.counts td,table.counts th{padding:.15em .8em;text-align:left;border-bottom:1px solid #eee}
table.failed td{max-width:28em;overflow-wrap:anywhere;vertical-align:top;font-size:13px}
.plots{display:flex;flex-wrap:wrap;gap:1em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:4px;padding:.5em;font-size:13px;overflow-wrap:anywhere}
.card.kept{border-left:5px solid #2a9d3a} .card.dropped{border-left:5px solid #c0392b}
.thumb{display:block;margin:0 auto .4em;max-width:160px;max-height:160px}
.noimg{height:60px;background:#eee;color:#666;display:flex;align-items:center;justify-content:center;font-size:11px}
.alt{max-height:9.5em;overflow-y:auto} .legend{margin:1em 0;font-size:13px;color:#444}
mark{background:#ffd54f} .best{font-weight:bold} .muted{color:#777;font-size:11px}
ul.caps{margin:.2em 0;padding-left:1.2em} .line{border-top:2px dashed #c0392b;margin:.6em 0;color:#c0392b}
pre{background:#f6f6f6;padding:.6em;overflow:auto;max-height:30em;font-size:12px}
"""


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _highlight(text: str | None, masking: str) -> str:
    """The text, escaped, with the spans the masker removes in <mark>."""
    from .mask import get_masker

    if text is None:
        return '<span class="muted">(none)</span>'
    if text == "":
        return '<span class="muted">(empty)</span>'
    out, last = [], 0
    for a, b in get_masker(masking).spans(text):
        out.append(esc(text[last:a]))
        out.append(f"<mark>{esc(text[a:b])}</mark>")
        last = b
    out.append(esc(text[last:]))
    return "".join(out)


def _card(uid: bytes, vals: np.ndarray, row: dict, thumb: dict, masking: str, has_clip: bool) -> str:
    kept = bool(vals[_K])
    parts = [f'<div class="card {"kept" if kept else "dropped"}">']
    if thumb.get("file"):
        parts.append(f'<img class="thumb" src="{esc(thumb["file"])}" width="{int(thumb["width"])}" '
                     f'height="{int(thumb["height"])}" alt="">')
    else:
        parts.append(f'<div class="noimg">{esc(thumb.get("error", "no thumbnail (no --shards_dir)"))}</div>')
    if has_clip:
        scores = f"fused {_fmt(vals[_F])} · Sieve {_fmt(vals[_S])} · CLIP {_fmt(vals[_C])}"
    else:  # Sieve alone: the filter's score is Sieve min-max normalised; nothing is fused
        scores = f"Sieve {_fmt(vals[_S])} · normalised {_fmt(vals[_F])}"
    parts.append(f"<div><b>{'kept' if kept else 'dropped'}</b> · {scores}</div>")
    alt = (_highlight(row["text"], masking) if "text" in row  # set when its tar sample was read
           else '<span class="muted">(not read from the shards)</span>')
    parts.append(f"<div class=\"alt\"><b>alt-text:</b> {alt}</div>")
    caps = row.get("captions") or []
    best = row.get("best_caption")
    if caps:
        items, marked = [], False
        for c in caps:
            is_best = not marked and c == best
            marked = marked or is_best
            items.append(f'<li{" class=best" if is_best else ""}>{"★ " if is_best else ""}'
                         f"{_highlight(c, masking)}</li>")
        parts.append(f'<div><b>captions</b> (★ best):<ul class="caps">{"".join(items)}</ul></div>')
    elif best is not None:
        parts.append(f"<div><b>best caption:</b> {_highlight(best, masking)}</div>")
    meta = [f"uid {uid.hex()}"]
    if row.get("shard") is not None:
        meta.append(f"shard {esc(row['shard'])} key {esc(row.get('key'))}")
    if row.get("status") not in (None, "ok"):
        meta.append(f"status {esc(row['status'])}: {esc(row.get('error'))}")
    elif row.get("error"):  # an ok sample's note, e.g. its alt-text was not UTF-8
        meta.append(f"note: {esc(row['error'])}")
    j = row.get("json")
    if isinstance(j, dict) and j.get("url") is not None:
        meta.append(f"url {esc(j.get('url'))}")
    parts.append(f'<div class="muted">{"<br>".join(meta)}</div></div>')
    return "".join(parts)


def _gallery(items, rows, thumbs, masking, has_clip, line_after: int | None = None, line: str = "") -> str:
    cards = []
    for i, (uid, vals) in enumerate(items):
        cards.append(_card(uid, vals, rows.get(uid, {}), thumbs.get(uid, {}), masking, has_clip))
    if line_after is not None:
        head = '<div class="gallery">' + "".join(cards[:line_after]) + "</div>"
        tail = '<div class="gallery">' + "".join(cards[line_after:]) + "</div>"
        return f'{head}<div class="line">{esc(line)}</div>{tail}'
    return '<div class="gallery">' + "".join(cards) + "</div>"


def _hist_svg(s: _Score, marks: list[tuple[float, str]], w: int = 420, h: int = 220) -> str:
    group = FINE_BINS // PLOT_BINS
    allc = s.all.reshape(PLOT_BINS, group).sum(1)
    keptc = s.kept.reshape(PLOT_BINS, group).sum(1)
    top = max(1, int(allc.max()))
    x0, y0, pw, ph = 45, 20, w - 60, h - 45
    bw = pw / PLOT_BINS
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
           f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="13">{esc(s.name)}</text>']
    for i in range(PLOT_BINS):
        for count, color in ((allc[i], "#c9c9c9"), (keptc[i], "#2a9d3a")):
            if count:
                bh = ph * count / top
                out.append(f'<rect x="{x0 + i * bw:.2f}" y="{y0 + ph - bh:.2f}" width="{max(bw - 0.5, 0.5):.2f}" '
                           f'height="{bh:.2f}" fill="{color}"/>')
    out.append(f'<line x1="{x0}" y1="{y0 + ph}" x2="{x0 + pw}" y2="{y0 + ph}" stroke="#333"/>')
    for k in range(5):
        v = s.lo + (s.hi - s.lo) * k / 4
        x = x0 + pw * k / 4
        out.append(f'<text x="{x:.1f}" y="{y0 + ph + 14}" text-anchor="middle" font-size="10">{v:.3g}</text>')
    out.append(f'<text x="{x0 - 4}" y="{y0 + 8}" text-anchor="end" font-size="10">{top}</text>')
    out.append(f'<text x="{x0 - 4}" y="{y0 + ph}" text-anchor="end" font-size="10">0</text>')
    for i, (value, label) in enumerate(marks):
        x = x0 + pw * min(max((value - s.lo) / (s.hi - s.lo), 0.0), 1.0)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + ph}" stroke="#c0392b" '
                   f'stroke-dasharray="4,3"/>')
        right = x > x0 + pw * 0.6
        out.append(f'<text x="{x - 3 if right else x + 3:.1f}" y="{y0 + 10 + 12 * i}" text-anchor="{"end" if right else "start"}" '
                   f'font-size="10" fill="#c0392b">{esc(label)}</text>')
    out.append(f'<text x="{x0}" y="{h - 4}" font-size="10" fill="#555">grey: all scored; green: kept</text>')
    out.append("</svg>")
    return "".join(out)


def _cut_marks(thr, lowest_kept, highest_dropped, is_threshold: bool) -> list:
    """The marks of a histogram: the filter's threshold, else where the kept set starts (and, when it
    is not a threshold, where the dropped set ends)."""
    if thr is not None:
        return [(thr, f"threshold {thr:.4g}")]
    marks = [] if lowest_kept is None else [(lowest_kept, f"lowest kept {lowest_kept:.4g}")]
    if not is_threshold and highest_dropped is not None:
        marks.append((highest_dropped, f"highest dropped {highest_dropped:.4g}"))
    return marks


def _scatter_svg(points: list, sieve: _Score, clip: _Score, w: int = 420, h: int = 420) -> str:
    x0, y0, pw, ph = 50, 20, w - 70, h - 60

    def px(v, s):
        return min(max((v - s.lo) / (s.hi - s.lo), 0.0), 1.0)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
           f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="13">Sieve vs CLIPScore</text>',
           f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for _, vals in points:
        x = x0 + pw * px(vals[_S], sieve)
        y = y0 + ph * (1 - px(vals[_C], clip))
        color = "#2a9d3a" if vals[_K] else "#c0392b"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{color}" fill-opacity="0.55"/>')
    if sieve.alone_bin is not None:
        x = x0 + pw * px(sieve.edge(sieve.alone_bin), sieve)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + ph}" stroke="#555" stroke-dasharray="4,3"/>')
    if clip.alone_bin is not None:
        y = y0 + ph * (1 - px(clip.edge(clip.alone_bin), clip))
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#555" stroke-dasharray="4,3"/>')
    for k in range(5):
        vx = sieve.lo + (sieve.hi - sieve.lo) * k / 4
        vy = clip.lo + (clip.hi - clip.lo) * k / 4
        out.append(f'<text x="{x0 + pw * k / 4:.1f}" y="{y0 + ph + 14}" text-anchor="middle" font-size="10">{vx:.3g}</text>')
        out.append(f'<text x="{x0 - 4}" y="{y0 + ph * (1 - k / 4) + 3:.1f}" text-anchor="end" font-size="10">{vy:.3g}</text>')
    out.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph + 30}" text-anchor="middle" font-size="11">Sieve score</text>')
    out.append(f'<text x="12" y="{y0 + ph / 2}" font-size="11" transform="rotate(-90 12 {y0 + ph / 2})" '
               f'text-anchor="middle">CLIPScore</text>')
    out.append(f'<text x="{x0}" y="{h - 4}" font-size="10" fill="#555">green: kept; red: dropped; dashed: each '
               f'score alone</text></svg>')
    return "".join(out)


def _n(x) -> str:
    return "–" if x is None else f"{x:,}"


def _page(summary: dict, scores: dict, sec: dict, rows: dict, thumbs: dict, manifest: dict, masking: str) -> str:
    c = summary["counts"]
    has_clip = "clip" in scores
    thr = summary["threshold"]
    title = "datacomp-sieve report: what Sieve keeps and drops"
    body = [f"<h1>{esc(title)}</h1>",
            '<div class="muted">' + " · ".join(f"{what} {esc(summary[key])}" for what, key in (
                ("score store", "scores_dir"), ("shards", "shards_dir"), ("metadata", "metadata_dir"))
                if summary[key]) + "</div>"]
    for n in summary["notes"]:
        body.append(f'<div class="note">{esc(n)}</div>')

    # counts
    pct = 100.0 * c["kept"] / c["scored"] if c["scored"] else 0.0
    trs = []
    if c["pool"] is not None:
        trs.append(("pool (metadata rows)", _n(c["pool"])))
        trs.append(("metadata rows with no stored sample (metadata rows minus store rows)",
                    _n(max(c["pool"] - c["store_rows"], 0))))
    dl = c.get("downloads")
    if dl:
        trs.append(("URLs tried (img2dataset)", _n(dl["count"])))
        trs.append(("downloaded (img2dataset)", _n(dl["successes"])))
        trs.append(("failed to download (img2dataset)", _n(dl["failed_to_download"])))
        trs.append(("failed to resize (img2dataset)", _n(dl["failed_to_resize"])))
    trs.append(("downloaded samples (store rows)", _n(c["store_rows"])))
    for k, v in c["failed"].items():
        trs.append((f"failed: {k}", _n(v)))
    trs.append(("scored (every score present)", _n(c["scored"])))
    trs.append(("kept", f"{_n(c['kept'])} ({pct:.2f}% of scored)"))
    if c["subset_uids"] is not None:
        trs.append(("uids in the subset file", _n(c["subset_uids"])))
    body.append("<h2>Counts</h2><table class=counts>"
                + "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td></tr>" for a, b in trs) + "</table>")
    if dl:
        reasons = list(dl["reasons"].items())
        shown = "".join(f"<li>{esc(r)}: {_n(n)}</li>" for r, n in reasons[:REASONS])
        if len(reasons) > REASONS:
            shown += (f"<li>{len(reasons) - REASONS:,} other reasons: "
                      f"{_n(sum(n for _, n in reasons[REASONS:]))} (all in report.json)</li>")
        body.append(f'<details><summary class="muted">img2dataset counts from the _stats.json of '
                    f'{dl["shards_with_stats"]:,} of the {dl["shards"]:,} shards; failures by reason '
                    f'({len(reasons):,})</summary><ul class="muted">{shown}</ul></details>')
    cut = summary["cut"]
    score = "fused" if has_clip else "normalised Sieve"  # what the filter thresholds
    if summary["failed_examples"]:
        cells = []
        for st, examples in summary["failed_examples"].items():
            for e in examples:
                cells.append("".join(f"<td>{x}</td>" for x in (
                    esc(st), esc(e["uid"]) if e["uid"] is not None else '<span class="muted">(none)</span>',
                    f'{esc(e["shard"])} / {esc(e["key"])}', esc(e["error"]), esc(e.get("url")),
                    esc(e.get("text")))))
        body.append(f'<details><summary class="muted">Failed samples: the first {EXAMPLES} of each failure '
                    f'status</summary><table class="counts failed"><tr><th>status</th><th>uid</th><th>shard / key'
                    f'</th><th>error</th><th>url</th><th>alt-text</th></tr>'
                    + "".join(f"<tr>{c}</tr>" for c in cells) + "</table></details>")
    how = esc(summary["selection"])
    if thr is not None:
        how += f"; {score} threshold {thr:.6g}"
        if cut["lowest_kept_sieve"] is not None:
            how += f" (Sieve score {cut['lowest_kept_sieve']:.6g}: the lowest kept)"
    body.append(f"<p>Filter <b>{esc(summary['filter'])}</b>; kept = {how}.</p>")
    if thr is None and cut["lowest_kept"] is not None and cut["highest_dropped"] is not None:
        lo, hi = cut["lowest_kept"], cut["highest_dropped"]
        raw = (f" (Sieve score {cut['lowest_kept_sieve']:.6g} and {cut['highest_dropped_sieve']:.6g})"
               if cut["lowest_kept_sieve"] is not None else "")
        if cut["is_threshold"]:
            what = (f"The subset is a threshold on this {score} score: every kept sample scores at least {lo:.6g} "
                    f"and every dropped one at most {hi:.6g}{raw}.")
        else:
            what = (f"The subset is <b>not a threshold on this {score} score</b>: the lowest kept sample scores "
                    f"{lo:.6g} and the highest dropped {hi:.6g}{raw}, so some dropped samples score above kept "
                    f"ones (a subset made by another filter, --alpha or CLIPScore column?).")
        body.append(f"<p>{what}</p>")
    for n in summary["selection_notes"]:
        body.append(f'<div class="muted">{esc(n)}</div>')

    # plots
    alone = summary["alone_thresholds"] or {}
    frac = summary["fraction"]
    plots = [_hist_svg(scores["fused"], _cut_marks(thr, cut["lowest_kept"], cut["highest_dropped"], cut["is_threshold"])),
             _hist_svg(scores["sieve"], [(alone["sieve"], f"Sieve alone ≈{alone['sieve']:.4g}")] if alone else
                       _cut_marks(None, cut["lowest_kept_sieve"], cut["highest_dropped_sieve"], cut["is_threshold"]))]
    if has_clip:
        plots.append(_hist_svg(scores["clip"], [(alone["clip"], f"CLIP alone ≈{alone['clip']:.4g}")] if alone else []))
        plots.append(_scatter_svg(sec["scatter"].rows(), scores["sieve"], scores["clip"]))
    body.append("<h2>Scores</h2>")
    body.append(f'<div class="plots">{"".join(plots)}</div>')
    extra = (f" The dashed lines on the Sieve and CLIPScore plots are where each score alone would keep the same "
             f"fraction ({frac:.3g}), from {FINE_BINS:,}-bin histograms.") if alone else ""
    scat = (f" Scatter: {len(sec['scatter'].prio):,} of {sec['scatter'].seen:,} scored samples, a uniform "
            f"random sample.") if has_clip else ""
    body.append(f'<p class="muted">Histograms count every scored sample.{extra}{scat}</p>')

    def head(name, title, how):
        s = sec[name]
        return f"<h2>{esc(title)}</h2><p class=muted>{esc(how.format(shown=len(s.prio), of=s.seen))}</p>"

    g = dict(rows=rows, thumbs=thumbs, masking=masking, has_clip=has_clip)
    body.append('<div class="legend">Each card: its thumbnail, <b>kept</b> (green edge) or <b>dropped</b> (red '
                f'edge), its scores, the alt-text and the captions; <mark>marked</mark>: the medium phrases the '
                f'{esc(masking)} masking removes before the texts are encoded; ★ the best caption (the one '
                f'whose similarity to the alt-text is the Sieve score). Galleries are ordered by the {score} score.</div>')
    body.append(head("kept_top", "Top kept", "The {shown:,} highest " + score + " scores of the {of:,} kept."))
    body.append(_gallery(sec["kept_top"].rows(), **g))
    bk, bd = sec["border_kept"], sec["border_dropped"]
    border = list(reversed(bk.rows())) + bd.rows()
    body.append(f"<h2>Borderline</h2><p class=muted>{len(bk.prio):,} lowest-scoring kept and {len(bd.prio):,} "
                f"highest-scoring dropped samples, by {score} score.</p>")
    if thr is not None:
        line = f"the threshold ({thr:.6g})"
    elif cut["is_threshold"]:
        line = "the cut: kept above, dropped below"
    else:
        line = (f"kept above, dropped below: NOT a threshold on this {score} score (the lowest kept score below "
                "the highest dropped)")
    body.append(_gallery(border, **g, line_after=len(bk.prio), line=line))
    body.append(head("dropped_bottom", "Bottom dropped", "The {shown:,} lowest " + score + " scores of the {of:,} dropped."))
    body.append(_gallery(sec["dropped_bottom"].rows(), **g))
    if "clip_not_sieve" in sec:
        body.append(head("clip_not_sieve", "CLIPScore keeps, Sieve drops",
                         "{shown:,} sampled uniformly from the {of:,} samples that CLIPScore alone would keep and "
                         "Sieve alone would drop (each keeping the same fraction)."))
        body.append(_gallery(sec["clip_not_sieve"].rows(), **g))
        body.append(head("sieve_not_clip", "Sieve keeps, CLIPScore drops",
                         "{shown:,} sampled uniformly from the {of:,} samples that Sieve alone would keep and "
                         "CLIPScore alone would drop."))
        body.append(_gallery(sec["sieve_not_clip"].rows(), **g))
    elif has_clip:
        body.append("<h2>Disagreements</h2><p class=muted>Not shown: the kept set holds every scored sample, or none.</p>")

    # the run
    text = json.dumps(manifest, indent=1, sort_keys=True, default=str, ensure_ascii=False)
    if len(text) > 50_000:
        text = text[:50_000] + "\n... (truncated)"
    cfg = manifest.get("config") or {}
    run = manifest.get("run") or {}
    facts = [("captioner", manifest.get("captioner") or cfg.get("captioner")),
             ("text encoder", (manifest.get("models") or {}).get("text_encoder") or cfg.get("text_encoder")),
             ("captions per image", cfg.get("num_captions")), ("masking", cfg.get("masking")),
             ("CLIP model in the store", cfg.get("clip_model")), ("precision", cfg.get("precision")),
             ("seed", cfg.get("seed")),
             ("versions", ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items()) or None)]
    body.append("<h2>The run</h2><table class=counts>"
                + "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td></tr>" for a, b in facts if b is not None)
                + "</table>")
    body.append(f"<details><summary>manifest.json</summary><pre>{esc(text)}</pre></details>")
    body.append(f'<p class="muted">Masked medium phrases ({esc(masking)} masking) are <mark>highlighted</mark>. '
                f"Written by datacomp-sieve report.</p>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
