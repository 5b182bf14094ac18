"""Where the decoding step's time goes: per-step times by batch, then the step's operations by device time.

    python bench/decode_profile.py [--device cuda] [--model base] [--batches 256,512,1024] [--steps 8] [--variants]

On a GPU the engine's rate is bound by BLIP's sampling loop (bench/RESULTS.md, 2026-11-28: 0.118 s
of device time per batch of 256 images x 8 captions, where arithmetic and memory traffic account
for about a tenth of it). For each batch (images, 8 captions each) of the fixed-shape loop
(``--decoding graph``, random weights, seed 0) this prints one step's time replayed as a CUDA graph
and run eagerly, and the images/s of the whole loop at max_length (with ``--variants``, also for
each of the sampler's speed choices turned the other way, then which way's whole loop was
fastest against the defaults); then torch.profiler over
``--steps`` eager steps of the first batch: each operation's own device time, largest first, and
the totals by kind (matrix products, attention, sampling, the rest). On the CPU (as the tests run
it) every time is the CPU's and there is no graph.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: operation kinds, by the first pattern found in the operation's name
KINDS = (("attention", ("attention", "attn", "flash", "fmha")),
         ("cache and embeddings", ("index_copy", "index_select", "embedding")),
         ("matrix products", ("gemm", "mm", "linear", "matmul", "cutlass")),
         ("sampling", ("topk", "sort", "scan", "cumsum", "gather", "scatter", "argmax", "exponential", "where",
                       "masked_fill", "flip", "softmax")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, patterns in KINDS:
        if any(p in low for p in patterns):
            return kind
    return "the rest"


def _self_time(event, on_device: bool) -> float:
    """An averaged profiler event's own time in microseconds: on the device, that of the kernels the
    operation launched itself (not through the operations it called), or on the CPU."""
    if on_device:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


def _step_seconds(loop, run, device, n: int) -> float:
    """Seconds per call of ``run`` (steps from the first sampled position each time)."""
    from bench.score_speed import _sync

    for _ in range(2):
        loop.pos.fill_(loop.first)
        run()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        loop.pos.fill_(loop.first)  # every step at the same position: all stay in range
        run()
    _sync(device)
    return (time.perf_counter() - t) / n


def _profile(loop, emb, steps: int, top: int, dev) -> None:
    """torch.profiler over ``steps`` eager steps of ``loop``: its operations by own time, and by kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench.score_speed import _sync

    cuda = dev.type == "cuda"
    loop.load(emb)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            loop.pos.fill_(loop.first)
            loop.step()
        _sync(dev)
    # torch's operations (aten::...), each with the device time of the kernels it launched itself;
    # the kernels are listed as events of their own too, which would count that time twice
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and _self_time(e, cuda) > 0]
    events.sort(key=lambda e: _self_time(e, cuda), reverse=True)
    total = sum(_self_time(e, cuda) for e in events)
    print(f"\none eager step of batch {emb.shape[0]}, by operation ({steps} steps profiled; own "
          f"{'device' if cuda else 'CPU'} time per step, share of the step's {total / 1000 / steps:.2f} ms):")
    for e in events[:top]:
        t = _self_time(e, cuda)
        print(f"  {t / 1000 / steps:8.3f} ms {100 * t / total:5.1f}%  {e.count // steps:4d} calls  "
              f"[{kind_of(e.key)}] {e.key[:90]}")
    kinds: dict = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + _self_time(e, cuda)
    print("by kind: " + ", ".join(f"{k} {v / 1000 / steps:.3f} ms ({100 * v / total:.0f}%)"
                                  for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", choices=["tiny", "base"], default="base")
    p.add_argument("--batches", default="256,512,1024", help="images per batch, comma-separated (default 256,512,1024)")
    p.add_argument("--captions", type=int, default=8, help="captions per image (default 8)")
    p.add_argument("--steps", type=int, default=8, help="eager steps under the profiler (default 8)")
    p.add_argument("--repeats", type=int, default=20, help="steps timed per way and batch (default 20)")
    p.add_argument("--top", type=int, default=25, help="operations listed (default 25)")
    p.add_argument("--variants", action="store_true",
                   help="per batch, also the step with each of the sampler's speed choices the other way: "
                        "candidates first or not (sampling on the whole vocabulary in float32), the LM head padded "
                        "or not, a CUDA graph of every step of a batch or of one step, the decoder's attention as "
                        "torch's fused kernel or as matmul, softmax, matmul (the images' ViT keeps its own)")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches: give comma-separated numbers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.steps < 1 or args.repeats < 1 or args.captions < 1:
        p.error("--batches, --captions, --steps and --repeats must be at least 1")

    import torch

    from bench.score_speed import random_blip
    from datacomp_sieve.caption import BlipCaptioner

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here; use --device cpu")
    precision = "fp16" if cuda else "fp32"
    model, tok, size = random_blip(args.model, 0)
    cap = BlipCaptioner(model, tok, device=args.device, precision=precision, image_size=size, decoding="graph")
    s, r = cap.sampler, args.captions
    print(f"device: {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; torch {torch.__version__}; "
          f"{args.model} BLIP, {precision}, {r} captions per image, max_length {s.settings.max_length}")
    with torch.inference_mode():
        for b in batches:
            px = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev, cap.dtype)
            emb = cap.encode_images(px)
            # the sampler's speed choices: its defaults here, then each the other way
            first = cap.dtype != torch.float32  # FastBlipSampler's defaults (None) on this device
            multiple = 1 if dev.type == "cpu" else 64
            fused = dev.type != "cpu"
            ways = [(first, multiple, True, fused), (not first, multiple, True, fused),
                    (first, 65 - multiple, True, fused), (first, multiple, False, fused),
                    (first, multiple, True, not fused)]
            wholes = []
            for i, way in enumerate(ways if args.variants else ways[:1]):
                s.candidates_first, s.vocab_multiple, s.graph_whole_loop, s.fused_attention = way
                loop, whole, line = _time_loop(s, emb, r, dev, args.repeats)
                name = (f"candidates first {way[0]}, LM head {'padded to a multiple of 64' if way[1] > 1 else 'not padded'}, "
                        f"graph of {'every step' if way[2] else 'one step'}, decoder attention "
                        f"{'fused' if way[3] else 'matmul-softmax-matmul'}")
                print(f"batch {b} ({b * r} sequences), {'defaults' if i == 0 else 'one other way'}: {name}: {line}")
                wholes.append((whole, i, name))
                if b == batches[0] and i == 0:  # printed now: a later, larger batch may not finish in time
                    _profile(loop, emb, args.steps, args.top, dev)
            if len(wholes) > 1:
                best = min(wholes)
                print(f"batch {b}: fastest whole loop: {'the defaults' if best[1] == 0 else best[2]}, "
                      f"{best[0]:.3f} s against the defaults' {wholes[0][0]:.3f} s "
                      f"({100 * (best[0] / wholes[0][0] - 1):+.1f}%)")
            s.candidates_first = s.vocab_multiple = s.fused_attention = None
            s.graph_whole_loop = True
    return 0


def _time_loop(s, emb, r: int, dev, repeats: int):
    """(the loop, the whole loop's seconds, a line of figures): one step eagerly and as a CUDA
    graph, and the whole loop (the faster of two)."""
    from bench.score_speed import _sync
    from datacomp_sieve.caption import seeded

    b = emb.shape[0]
    s._loops.clear()
    with seeded(0, dev):
        s.generate(emb, r)  # allocation (and capture)
    whole = math.inf
    for seed in (1, 2):
        _sync(dev)
        t = time.perf_counter()
        with seeded(seed, dev):
            out = s.generate(emb, r)
        _sync(dev)
        whole = min(whole, time.perf_counter() - t)
    loop = next(iter(s._loops.values()))
    loop.load(emb)
    line = f"eager step {1000 * _step_seconds(loop, loop.step, dev, repeats):.2f} ms"
    if loop.graph is not None:  # a replay runs one step, or all of them
        replays = max(2, repeats // loop.replay_steps)  # about ``repeats`` steps in all
        step = _step_seconds(loop, loop.graph.replay, dev, replays) / loop.replay_steps
        line += f", CUDA graph step {1000 * step:.2f} ms"
    return loop, whole, (f"{line}; whole loop {whole:.3f} s for {out.shape[1] - loop.first} new tokens: "
                         f"{b / whole:.0f} images/s of decoding alone")


if __name__ == "__main__":
    sys.exit(main())
