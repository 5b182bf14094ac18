"""What the text half costs the captioning loop when it runs beside it: on a thread (one GIL) or in
a process of its own.

    python bench/gil_cost.py [--rounds 10]

On a GPU both halves are mostly host work: the captioning loop launches a few hundred small
kernels per token from Python, the text half decodes, masks, tokenises and runs
sentence-transformers. This times the tiny BLIP's sampling loop (16 images x 8 captions per
call, one torch thread) alone, then while the text half (all-MiniLM-L6-v2 without its six layers,
so host work only, on 256 alt-texts with 8 captions each) runs without pause on a thread of the
same process, then in another process. The machine needs a core for each.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORDS = "a cat dog on the table with red blue man woman sitting near tree car street".split()


def _text_half():
    """A function running one text half (256 images) per call, host work only."""
    from bench.text_host_cost import host_only_encoder
    from datacomp_sieve.text import sieve_scores

    enc = host_only_encoder()
    rng = random.Random(0)
    alts = [" ".join(rng.choices(WORDS, k=10)) for _ in range(256)]
    caps = [[" ".join(rng.choices(WORDS, k=8)) for _ in range(8)] for _ in range(256)]
    return lambda: sieve_scores(enc, alts, caps)


def _text_process(ready, stop):
    run = _text_half()
    ready.set()
    while not stop.is_set():
        run()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="sampling calls timed per setting (default 10)")
    args = p.parse_args(argv)
    import torch

    from datacomp_sieve.caption import build_captioner

    torch.set_num_threads(1)
    cap = build_captioner("tiny", device="cpu")
    with torch.inference_mode():
        emb = cap.encode_images(torch.randn(16, 3, cap.preprocess.size, cap.preprocess.size,
                                            generator=torch.Generator().manual_seed(0)))

    def sampling() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(args.rounds):
                cap.sampler.generate(emb, 8)
        return time.perf_counter() - t

    sampling()  # warm-up
    alone = sampling()
    run = _text_half()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            run()

    th = threading.Thread(target=loop)
    th.start()
    time.sleep(0.5)
    threaded = sampling()
    stop.set()
    th.join()
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_text_process, args=(ready, stop))
    proc.start()
    ready.wait()
    time.sleep(0.5)
    processed = sampling()
    stop.set()
    proc.join()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"tiny BLIP sampling, {args.rounds} calls of 16 images x 8 captions: alone {alone:.2f} s, beside the "
          f"text half on a thread {threaded:.2f} s ({threaded / alone:.2f}x), beside it in a process "
          f"{processed:.2f} s ({processed / alone:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
