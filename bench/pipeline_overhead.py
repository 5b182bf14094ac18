"""The scoring engine's own cost per image, models left out: what the main thread spends reading
tar shards, handing images to the decoding processes and taking the crops back, normalising,
masking, filling the table.

    python bench/pipeline_overhead.py [--images 2048] [--decode_workers 1] [--pipes] [--resize_on_device]
        [--read_images_here] [--text_workers N] [--device_ms MS --overlap_captioning 0|1]

The captioner returns a fixed caption list and the text encoder constant vectors, so the models
cost nothing; images are decoded in processes as on a GPU. Prints the main thread's CPU time per
image (``time.thread_time``), the ceiling this engine's bookkeeping puts on images per second
whatever the GPU, the CPU time of the whole process (its other threads share the GIL), the time
reading the tar shard alone takes, and the wall time (on a machine with few cores, the decoding
processes set it). ``--pipes``: the crops come back pickled through the pipes instead of through
shared memory (``score._CropRing``), for comparison. ``--read_images_here``: this process reads
the images' bytes and pickles them to the decoding processes, instead of sending their offsets in
the tar (``shards.ImageExtent``), for comparison. ``--text_workers N``: masking and
tokenising go to N text processes as on a GPU, and what this process spends on the text half
(handing captions over, taking tokens back, the cosines) is counted in its figures.
``--device_ms MS``: the captioner stands in for a device busy MS ms per batch (it waits with the
GIL released), to see how much of this process's work overlaps the device's
(``--overlap_captioning``).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class _ConstantText:
    description, source = "constant vectors", None
    splits, batch_size = True, 256  # text processes (--text_workers) tokenise with the real encoder

    def encode(self, texts):
        import numpy as np

        return np.full((len(texts), 4), 0.5, dtype=np.float32)

    def embed(self, batches, order):
        return self.encode(order)


def _fixed_captions(pixels, num_captions, generator=None, seed=None, device_s=0.0):
    for _ in range(20 if device_s else 0):  # a sampling loop's per-step waits on a device, the GIL released
        time.sleep(device_s / 20)
    n = pixels.shape[0]
    return lambda: [["a cat sitting on a wooden table"] * num_captions for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--decode_workers", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--pipes", action="store_true",
                   help="crops come back through the pipes, not shared memory (for comparison)")
    p.add_argument("--read_images_here", action="store_true",
                   help="this process reads the images' bytes and sends them to the decoding processes, instead "
                        "of their offsets in the tar (for comparison)")
    p.add_argument("--image_size", type=int, default=224,
                   help="crop size of the preprocessing (224: the reference BLIP's; the captioner is a stand-in)")
    p.add_argument("--text_workers", type=int, default=0,
                   help="text processes masking and tokenising (with the real text encoder's tokenizer; the stand-in "
                        "captioner gives captions, not token rows), as "
                        "ShardScorer.text_workers; the forward stays a constant here")
    p.add_argument("--device_ms", type=float, default=0.0,
                   help="a stand-in device: the captioner waits this many ms per batch (in 20 steps, the "
                        "GIL released, as the sampling loop waits on a GPU)")
    p.add_argument("--overlap_captioning", type=int, choices=(0, 1), default=None,
                   help="1: each batch is captioned on a thread of its own while the next is read (the GPU "
                        "default), 0: not (the CPU default)")
    p.add_argument("--resize_on_device", action="store_true",
                   help="decoding processes send whole images, resized and cropped in this process "
                        "(here on the CPU: as on a GPU, without the GPU)")
    args = p.parse_args(argv)

    from bench.score_speed import ThreadCpu, build_shards
    from datacomp_sieve.caption import ImageTransform
    from datacomp_sieve.score import ScoreConfig, ShardScorer
    from datacomp_sieve.shards import iter_samples, list_shards

    work = tempfile.mkdtemp(prefix="pipeline_overhead_")
    build_shards(os.path.join(work, "shards"), args.images, args.images)
    shard = list_shards(os.path.join(work, "shards"))[0]
    scorer = ShardScorer(ScoreConfig(captioner="tiny", device="cpu", batch_size=args.batch_size))
    scorer.text = _ConstantText()
    scorer.captioner.preprocess = ImageTransform(args.image_size)
    scorer.captioner.start_captions = functools.partial(_fixed_captions, device_s=args.device_ms / 1000)
    if args.overlap_captioning is not None:
        scorer.overlap_captioning = bool(args.overlap_captioning)
    scorer.decode_workers = args.decode_workers
    scorer.shared_memory = not args.pipes
    scorer.image_extents = not args.read_images_here
    scorer.resize_on_device = args.resize_on_device
    scorer.text_workers = args.text_workers
    try:
        scorer.score(shard)  # the decoding processes start
        threads = ThreadCpu()
        wall, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
        result = scorer.score(shard)
        wall, cpu, proc = time.perf_counter() - wall, time.thread_time() - cpu, time.process_time() - proc
        roles = threads.stop()
        tar = time.perf_counter()
        read = sum(1 for _ in iter_samples(shard))
        tar = time.perf_counter() - tar
    finally:
        scorer.close()
        shutil.rmtree(work, ignore_errors=True)
    n = result.table.num_rows
    per = 1000 * cpu / n
    print(f"{n} images, {args.decode_workers} decoding process(es), batch {args.batch_size}, {os.cpu_count()} cores, "
          f"a stand-in device {args.device_ms:.0f} ms per batch, captioning thread {scorer.overlap_captioning}: "
          f"wall {wall:.2f} s ({n / wall:.0f} img/s), stages {result.stats['timings']}")
    print(f"decoding processes: {1000 * result.stats['decoding_processes_cpu_s'] / n:.2f} ms CPU per image "
          "(JPEG decode, resize, crop)")
    print("this process's threads, CPU ms per image: " + ", ".join(f"{k} {1000 * v / n:.3f}" for k, v in roles.items()))
    print(f"main thread CPU {cpu:.2f} s = {per:.3f} ms/image: this engine's bookkeeping allows at most "
          f"{1000 / per:.0f} images/s; the whole process (the thread taking the crops back from the decoding "
          f"processes included) {1000 * proc / n:.3f} ms/image; of the main thread's share, reading the tar "
          f"shard alone (shards.iter_samples) {1000 * tar / read:.3f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
