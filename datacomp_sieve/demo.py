"""The one-command demo: toy pool -> Sieve scores -> uid subset -> HTML report of what was kept and dropped.

Uses BLIP and CLIP when their weights can be had (local cache or network) and otherwise the
offline label captioner (and Sieve alone when there is no CLIP), and says so first.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .errors import UserError

MARKER = "demo.json"


def _reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("DATACOMP_SIEVE_OFFLINE") == "1":
        return False
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # no network, DNS, refused, HTTP error: not reachable for the demo
        return False


def choose_models() -> tuple[str, str, list[str]]:
    """(captioner, toy-pool clip mode, notes): the paper's models when loadable, else stand-ins."""
    from .blip_checkpoint import BLIP_CHECKPOINTS, default_cache_dir

    notes = []
    info = BLIP_CHECKPOINTS["blip-base-14m"]
    cache = Path(default_cache_dir())
    cached = cache.exists() and any(cache.rglob(info.filename))
    if cached or _reachable(info.url):
        captioner = "blip-base-14m"
        notes.append("captioner: BLIP ViT-B/16 pretrained on 14M pairs (the paper's)")
    else:
        captioner = "label"
        os.environ["HF_HUB_OFFLINE"] = "1"  # no network: load bundled weights at once, no hub retries
        notes.append("captioner: BLIP weights cannot be loaded here (no cache, no network), so the OFFLINE "
                     "STAND-IN is used: an ImageNet classifier writing 'a photo of a {label}'; scores show "
                     "the pipeline, not BLIP's quality")
    from .clip import openai_checkpoint

    if openai_checkpoint("ViT-B-32") and openai_checkpoint("ViT-L-14"):
        clip = "openai"
        notes.append("CLIPScore: OpenAI ViT-L/14 (DataComp's column); filter: sieve_clip")
    else:
        clip = "none"
        notes.append("CLIPScore: no CLIP weights here, so the filter is Sieve alone")
    return captioner, clip, notes


def subset_name(name: str, fraction: float) -> str:
    """The subset's file name: the filter and the percentage kept (0.29 -> sieve_29.npy, 0.005 -> sieve_0.5.npy)."""
    return f"{name}_{fraction * 100:g}.npy"


def run_demo(out_dir: str, captioner: str | None = None, fraction: float = 0.2, progress: bool = True) -> dict:
    from .cli import baselines_main
    from .score import ScoreConfig, score_pool
    from .toy_pool import build_toy_pool, rows_by_uid

    if captioner:  # a name that cannot be a captioner fails now, not after the toy pool is built
        from .caption import captioner_builder

        captioner_builder(captioner)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new or empty folder")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"{out} exists and is not a demo folder; give a new or empty --out")
        shutil.rmtree(out)  # a previous demo: start again
    out.mkdir(parents=True, exist_ok=True)
    chosen, clip, notes = choose_models()
    if captioner:
        chosen = captioner
        notes[0] = f"captioner: {captioner} (asked for)" + (
            ": the OFFLINE STAND-IN (ImageNet labels as 'a photo of a {label}'), not BLIP" if captioner == "label" else "")
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    print("datacomp-sieve demo")
    for n in notes:
        print(f"  {n}")
    say("1/4 building the toy pool (img2dataset from a loopback server)")
    build_toy_pool(out / "pool", clip=clip, progress=False)
    say("2/4 scoring with Sieve")
    config = ScoreConfig(captioner=chosen, device="cpu" if chosen == "label" else None,
                         batch_size=8 if chosen == "label" else None)
    manifest = score_pool(str(out / "pool" / "shards"), str(out / "scores"), config, progress=progress)
    say("3/4 selecting")
    name = "sieve_clip" if clip != "none" else "sieve"
    subset = out / subset_name(name, fraction)
    args = ["--name", name, "--fraction", str(fraction), "--scores_dir", str(out / "scores"),
            "--metadata_dir", str(out / "pool" / "metadata"), "--save_path", str(subset), "--quiet"]
    if baselines_main(args) != 0:
        raise UserError("selection failed; see the message above")
    say("4/4 writing the report")
    from .report import write_report

    report = write_report(str(out / "scores"), str(out / "pool" / "shards"), out / "report",
                          metadata_dir=str(out / "pool" / "metadata"), subset=str(subset), fraction=fraction,
                          notes=["datacomp-sieve demo on the toy pool"] + notes, progress=progress)

    import numpy as np
    import pyarrow.parquet as pq

    from .uids import keys_from_strings, keys_to_pairs

    rows = pq.read_table(sorted((out / "scores").glob("*.parquet")),
                         columns=["uid", "sieve_score", "best_caption", "status"]).to_pylist()
    meta = rows_by_uid(out / "pool")
    kept = {tuple(map(int, p)) for p in np.load(subset)}
    scored = [r for r in rows if r["sieve_score"] is not None]
    pairs = keys_to_pairs(keys_from_strings([r["uid"] for r in scored]))
    for r, p in zip(scored, pairs):
        r["kept"] = tuple(map(int, p)) in kept
        r["text"] = meta[r["uid"]]["text"]
        r["category"] = meta[r["uid"]]["category"]
    scored.sort(key=lambda r: -r["sieve_score"])
    summary = {"out": str(out), "pool": str(out / "pool"), "scores": str(out / "scores"), "subset": str(subset),
               "filter": name, "captioner": chosen, "clip": clip, "scored": len(scored),
               "kept": len(kept), "status": manifest["status"], "report": report["index"]}
    (out / MARKER).write_text(json.dumps(summary, indent=1))

    def show(title, items):
        print(f"\n{title}")
        for r in items:
            print(f"  {r['sieve_score']:.3f}  {'kept   ' if r['kept'] else 'dropped'}  [{r['category']}] "
                  f"alt-text: {r['text'][:60]!r}  best caption: {r['best_caption']!r}")

    show("highest Sieve scores:", scored[:5])
    show("lowest Sieve scores:", scored[-5:])
    by_cat: dict = {}
    for r in scored:
        by_cat.setdefault(r["category"].split(":")[0], []).append(r["kept"])
    print("\nkept by kind of alt-text: " + ", ".join(
        f"{c} {sum(v)}/{len(v)}" for c, v in sorted(by_cat.items())))
    print(f"\npool:    {out / 'pool'} (metadata/, shards/)")
    print(f"scores:  {out / 'scores'} (one parquet per shard, manifest.json)")
    print(f"subset:  {subset} ({len(kept)} of {len(scored)} scored samples; DataComp's u8,u8 uid file)")
    print(f"report:  {report['index']} (open it in a browser, from disk: score histograms with the threshold, "
          f"galleries of kept, dropped and borderline samples with their captions and masked phrases, "
          f"counts and the run's models)")
    return summary
