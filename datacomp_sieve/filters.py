"""The filters by name: each turns options into a selection of uids.

One table (``FILTERS``) registers every name; the CLI only parses and dispatches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError
from .metadata import CLIP_COLUMNS, ParquetFolder
from .select import Selection, Term, select

SIEVE_COLUMN = "sieve_score"
STORE_CLIP_COLUMN = "clip_score"


@dataclass
class FilterOptions:
    metadata_dir: str | None = None
    scores_dir: str | None = None
    shards_dir: str | None = None
    fraction: float | None = None
    threshold: float | None = None
    arch: str = "l14"
    alpha: float | None = None
    weights: dict = field(default_factory=dict)
    clip_from: str = "metadata"
    tmp_dir: str | None = None
    progress: bool = True
    sink: object = None
    folders: dict = field(default_factory=dict, repr=False)  # opened by ``folder``, by (url, what)


def folder(opts: FilterOptions, url: str, what: str) -> ParquetFolder:
    """The folder at ``url``, opened once per run: a store's 12,800 footers are read once, not
    once per term or check."""
    if (url, what) not in opts.folders:
        opts.folders[url, what] = ParquetFolder.open(url, what)
    return opts.folders[url, what]


@dataclass
class Filter:
    run: Callable[[FilterOptions], Selection]
    help: str
    default_fraction: float | None = None
    needs_scores: bool = False


def _metadata(opts: FilterOptions) -> ParquetFolder:
    if not opts.metadata_dir:
        raise UserError("--metadata_dir is required: the pool's metadata folder of parquet files")
    return folder(opts, opts.metadata_dir, "metadata folder")


def _store(opts: FilterOptions) -> ParquetFolder:
    if not opts.scores_dir:
        raise UserError(
            "this filter needs Sieve scores: pass --scores_dir DIR (a score store written by "
            "`datacomp-sieve score`)"
        )
    return folder(opts, opts.scores_dir, "score store")


def _clip_term(opts: FilterOptions, weight: float) -> Term:
    if opts.clip_from == "store":
        store = _store(opts)
        store.require([STORE_CLIP_COLUMN], "score the pool with CLIPScore (--clip_model, with --shards_dir and "
                      "--overwrite for a store made without it), or take it from metadata that has it")
        return Term("clip", store, STORE_CLIP_COLUMN, weight)
    meta = _metadata(opts)
    column = CLIP_COLUMNS[opts.arch]
    meta.require(["uid", column], f"this is not a DataComp metadata folder, or it lacks --arch {opts.arch} scores")
    return Term("clip", meta, column, weight)


def _sieve_term(opts: FilterOptions, weight: float) -> Term:
    store = _store(opts)
    store.require(["uid", SIEVE_COLUMN], "is --scores_dir a store written by `datacomp-sieve score`?")
    return Term("sieve", store, SIEVE_COLUMN, weight)


def _named_term(opts: FilterOptions, name: str, weight: float) -> Term:
    """``sieve`` and ``clip`` are the usual scores; any other name is a column of the store or metadata."""
    if name == "sieve":
        return _sieve_term(opts, weight)
    if name == "clip":
        return _clip_term(opts, weight)
    for url in (opts.scores_dir, opts.metadata_dir):
        if url:
            f = folder(opts, url, "score store" if url == opts.scores_dir else "metadata folder")
            if name in f.schema_names():
                f.require(["uid", name])
                return Term(name, f, name, weight)
    raise UserError(f"--weights names {name!r}, which is neither sieve, clip, nor a column of the score store or metadata")


def _check_fraction(opts: FilterOptions, default: float | None) -> FilterOptions:
    if opts.fraction is not None and opts.threshold is not None:
        raise UserError("give either --fraction or --threshold, not both")
    if opts.fraction is None and opts.threshold is None:
        if default is None:
            raise UserError("give --fraction F (keep the top F of the pool) or --threshold T")
        opts.fraction = default
    if opts.fraction is not None and (math.isnan(opts.fraction) or not 0.0 < opts.fraction <= 1.0):
        raise UserError(f"--fraction must be in (0, 1], got {opts.fraction}")
    if opts.threshold is not None and math.isnan(opts.threshold):
        raise UserError("--threshold must be a number, got nan")
    return opts


def run_clip_score(opts: FilterOptions) -> Selection:
    check_options("clip_score", opts)
    term = _clip_term(FilterOptions(**{**opts.__dict__, "clip_from": "metadata"}), 1.0)
    # DataComp's convention: rows without a score count in N and sort last; no normalisation.
    return select([term], fraction=opts.fraction, threshold=opts.threshold, normalize=False,
                  count_missing=True, tmp_dir=opts.tmp_dir, progress=opts.progress, sink=opts.sink)


def run_no_filter(opts: FilterOptions) -> Selection:
    check_options("no_filter", opts)
    meta = _metadata(opts)
    meta.require(["uid"])
    from .uids import keys_from_arrow

    n = 0
    for b in meta.batches(["uid"]):
        opts.sink.add(keys_from_arrow(b.column(0), meta.what))
        n += len(b)
    return Selection(threshold=float("nan"), rows=n, scored=n, kept=n, ranked=n)


def _check_weights(weights: dict) -> None:
    total = sum(weights.values())
    if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-9):
        raise UserError(f"fusion weights must sum to 1, got {total:g} ({', '.join(f'{k}={w:g}' for k, w in weights.items())})")
    if any(w < 0 for w in weights.values()):
        raise UserError("fusion weights must not be negative")


def check_options(name: str, opts: FilterOptions) -> None:
    """The checks of the flags that need no data, made before any work: ``filter --shards_dir``
    scores the whole pool before selecting, so a wrong --fraction must not wait for that."""
    if name == "no_filter":
        if opts.fraction is not None or opts.threshold is not None:
            raise UserError("no_filter keeps every sample: drop --fraction/--threshold")
        return
    _check_fraction(opts, FILTERS[name].default_fraction)
    if name == "sieve_clip":
        if opts.weights and opts.alpha is not None:
            raise UserError("give either --alpha or --weights, not both")
        if opts.alpha is not None and not (0.0 <= opts.alpha <= 1.0):
            raise UserError(f"--alpha (the weight of CLIPScore) must be in [0, 1], got {opts.alpha}")
    if opts.weights:
        _check_weights(opts.weights)


def _fuse(opts: FilterOptions, terms: list[Term]) -> Selection:
    """The terms' weights are --weights (checked by ``check_options``) or 1 - alpha and alpha."""
    return select(terms, fraction=opts.fraction, threshold=opts.threshold, normalize=True,
                  count_missing=False, tmp_dir=opts.tmp_dir, progress=opts.progress, sink=opts.sink)


def run_sieve(opts: FilterOptions) -> Selection:
    check_options("sieve", opts)
    if opts.weights:
        return _fuse(opts, [_named_term(opts, k, w) for k, w in opts.weights.items()])
    return _fuse(opts, [_sieve_term(opts, 1.0)])


def run_sieve_clip(opts: FilterOptions) -> Selection:
    check_options("sieve_clip", opts)
    if opts.weights:
        return _fuse(opts, [_named_term(opts, k, w) for k, w in opts.weights.items()])
    alpha = 0.5 if opts.alpha is None else opts.alpha
    return _fuse(opts, [_sieve_term(opts, 1.0 - alpha), _clip_term(opts, alpha)])


FILTERS: dict[str, Filter] = {
    "no_filter": Filter(run_no_filter, "every uid of the metadata (DataComp's no_filter)."),
    "clip_score": Filter(
        run_clip_score,
        "top --fraction (or >= --threshold) by the metadata's precomputed CLIPScore column for --arch; "
        "byte-identical to DataComp's own clip_score baseline.",
    ),
    "sieve": Filter(
        run_sieve,
        "top --fraction (default 0.2) by the Sieve score of --scores_dir (min-max normalised as in the "
        "reference code).",
        default_fraction=0.2,
        needs_scores=True,
    ),
    "sieve_clip": Filter(
        run_sieve_clip,
        "Sieve fused with CLIPScore: (1-alpha)*sieve_norm + alpha*clip_norm, alpha 0.5, top 20%% "
        "(the paper's best filter).",
        default_fraction=0.2,
        needs_scores=True,
    ),
}
