"""Selection at pool scale: wall time and peak memory, out-of-core engine vs in-memory method.

    python bench/select_scale.py --rows 12800000 128000000 --work_dir /tmp/select-bench

For each size it writes a synthetic score store (uid, sieve_score, clip_score; 1M rows per file,
or ``--rows_per_file 10000`` for the layout ``score`` writes: one file per 10,000-sample shard),
then runs, each in its own process, sieve_clip fusion (alpha 0.5) + top-20% selection + sorted
uid file with (a) this tool's engine and (b) the in-memory method of DataComp / the reference
code (baselines/in_memory.py), and reports wall time, peak RSS, and whether the two .npy files
are byte-identical. Peak RSS is the child's ru_maxrss (os.wait4).

``--join`` measures the default path instead: the CLIPScore comes from a metadata folder (uid and
clip_l14_similarity_score, 1M rows per file, 0.1% missing) joined on uid with a store of
sieve_score for 90% of those uids (failed downloads have no score), in the store's own files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

ENGINE = """
import sys
from datacomp_sieve.cli import baselines_main
sys.exit(baselines_main(["--name", "sieve_clip", "--clip_from", "store", "--fraction", "0.2",
                         "--scores_dir", sys.argv[1], "--save_path", sys.argv[2], "--quiet"]))
"""

IN_MEMORY = """
import sys
sys.path.insert(0, sys.argv[3])
from baselines import in_memory
in_memory.fused(sys.argv[1], ["sieve_score", "clip_score"], [0.5, 0.5], sys.argv[2], 0.2)
"""

ENGINE_JOIN = """
import sys
from datacomp_sieve.cli import baselines_main
root = sys.argv[1]
sys.exit(baselines_main(["--name", "sieve_clip", "--alpha", "0.5", "--fraction", "0.2", "--metadata_dir",
                         root + "/metadata", "--scores_dir", root + "/scores", "--save_path", sys.argv[2],
                         "--tmp_dir", root, "--quiet"]))
"""

IN_MEMORY_JOIN = """
import sys
sys.path.insert(0, sys.argv[3])
from baselines import in_memory
root, l14 = sys.argv[1], "clip_l14_similarity_score"
in_memory.fused(root + "/scores", ["sieve_score", l14], [0.5, 0.5], sys.argv[2], 0.2, extra=(root + "/metadata", [l14]))
"""


GENERATE = """
import sys
sys.path.insert(0, sys.argv[3])
from synth_store import write_folder
rows, per_file = int(sys.argv[2]), int(sys.argv[4])
write_folder(sys.argv[1], rows=rows, files=max(1, rows // per_file), seed=rows % 997,
             columns=("sieve_score", "clip_score"), missing=0.001, keep_uids=False)
"""

GENERATE_JOIN = """
import os, sys
sys.path.insert(0, sys.argv[3])
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from synth_store import random_uids
root, rows, per_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
rng = np.random.default_rng(rows % 997)
os.makedirs(root + "/metadata", exist_ok=True); os.makedirs(root + "/scores", exist_ok=True)
store_file = 0
for c in range(-(-rows // 1_000_000)):
    n = min(1_000_000, rows - c * 1_000_000)
    uid = random_uids(rng, n)
    clip = rng.normal(0.3, 0.05, n).astype(np.float32)
    pq.write_table(pa.table({"uid": uid, "clip_l14_similarity_score": pa.array(clip, mask=rng.random(n) < 0.001)}),
                   f"{root}/metadata/{c:08d}.parquet")
    for lo in range(0, n, per_file):
        part = uid.slice(lo, min(per_file, n - lo))
        part = part.filter(pa.array(rng.random(len(part)) < 0.9))
        v = rng.beta(2.0, 3.0, len(part))
        v[: len(part) // 10] = np.round(v[: len(part) // 10], 2)
        pq.write_table(pa.table({"uid": part, "sieve_score": v.astype(np.float32)}),
                       f"{root}/scores/{store_file:08d}.parquet")
        store_file += 1
"""


def measure(code: str, *args: str, limit_gb: float | None = None) -> tuple[float, float, int]:
    """Run code in a child process: wall seconds, peak RSS in MiB, exit status.

    The parent stays small, so the child's ru_maxrss (which starts from the parent's size at
    fork) measures the child's own memory.
    """
    def cap():
        if limit_gb:
            import resource

            size = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, preexec_fn=cap)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.time() - t0, usage.ru_maxrss / 1024.0, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[12_800_000, 128_000_000])
    ap.add_argument("--work_dir", default="/tmp/datacomp-sieve-select-bench")
    ap.add_argument("--methods", nargs="+", default=["engine", "in_memory"], choices=["engine", "in_memory"])
    ap.add_argument("--rows_per_file", type=int, default=1_000_000,
                    help="rows in each file of the synthetic store (10000: one file per DataComp shard, "
                         "as the score store has)")
    ap.add_argument("--join", action="store_true",
                    help="CLIPScore from a metadata folder joined on uid (the default path) instead of the store")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stores for later runs")
    ap.add_argument("--memory_limit_gb", type=float, default=18.0,
                    help="address-space cap for each method's process, so that running out of memory "
                         "fails that process cleanly instead of waking the kernel's OOM killer")
    args = ap.parse_args()

    import numpy as np

    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    rows_out = []
    for rows in args.rows:
        store = Path(args.work_dir) / ((f"store_{rows}" if args.rows_per_file == 1_000_000
                                         else f"store_{rows}_per{args.rows_per_file}") + ("_join" if args.join else ""))
        if not (store / "DONE").exists():
            t0 = time.time()
            wall, _, status = measure(GENERATE_JOIN if args.join else GENERATE, str(store), str(rows), str(ROOT / "bench"),
                                     str(args.rows_per_file))
            if status:
                raise SystemExit(f"writing the synthetic store failed (status {status})")
            (store / "DONE").write_text("")
            print(f"wrote synthetic store of {rows:,} rows in {time.time() - t0:.0f}s", flush=True)
        outs = {}
        for method in args.methods:
            out = Path(args.work_dir) / f"{method}_{rows}.npy"
            code = {(False, "engine"): ENGINE, (False, "in_memory"): IN_MEMORY,
                    (True, "engine"): ENGINE_JOIN, (True, "in_memory"): IN_MEMORY_JOIN}[args.join, method]
            out.unlink(missing_ok=True)
            wall, rss, status = measure(code, str(store), str(out), str(ROOT), limit_gb=args.memory_limit_gb)
            if status:
                why = (f"failed: out of memory under the {args.memory_limit_gb:g} GiB cap" if status in (256, 9)
                       else f"failed with wait status {status}")
                rows_out.append((rows, method, wall, rss, why))
                print(f"{rows:>13,}  {method:<10} FAILED after {wall:.1f} s ({why}), peak RSS {rss:.0f} MiB", flush=True)
                continue
            outs[method] = out
            rows_out.append((rows, method, wall, rss, f"kept {len(np.load(out, mmap_mode='r')):,}"))
            print(f"{rows:>13,}  {method:<10} {wall:8.1f} s  peak RSS {rss:8.0f} MiB  {rows_out[-1][4]}", flush=True)
        if len(outs) == 2:
            same = outs["engine"].read_bytes() == outs["in_memory"].read_bytes()
            print(f"{rows:>13,}  outputs byte-identical: {same}", flush=True)
        if not args.keep:
            import shutil

            shutil.rmtree(store)
    print("\n| rows | method | wall (s) | peak RSS (MiB) | result |\n|---|---|---|---|---|")
    for rows, method, wall, rss, result in rows_out:
        print(f"| {rows:,} | {method} | {wall:.1f} | {rss:.0f} | {result} |")


if __name__ == "__main__":
    main()
