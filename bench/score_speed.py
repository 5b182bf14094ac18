"""Scoring throughput: this project's engine vs a reference-style Sieve pipeline, same images.

    python bench/score_speed.py --device cpu|cuda --model tiny|base --images N
        [--batch_size B] [--num_captions 8] [--work_dir DIR] [--captioner PATH] [--seed 0]
        [--rounds K] [--reference_first] [--warmup_images 16]

Both pipelines score the same N images end to end (webdataset tar shards in, score files out),
in one process, one after the other, with the same captioning weights:

- ``fast``: this project's engine, ``score_pool`` with a ``ShardScorer`` and the engine's defaults
  for the device (fp16 on CUDA, fp32 on the CPU; batch 16 unless ``--batch_size``). Its store
  goes to ``WORK/fast``; the per-stage timings (read, caption, text, clip) come from the store's
  shard statistics. The CPU seconds of this process's threads during a run are printed by role
  (``ThreadCpu``: the main thread, the captioning thread, the text threads, the pools' helper
  threads, and "native" ones such as torch's); for Python threads, a sum close to the wall time
  means the GIL was the limit.
- ``reference``: written here the way the reference Sieve code works (facebookresearch/SIEVE
  ``webdataset_inference.py`` then ``sentence_similarity_inference.py``): fp32, batch 16, images
  read and decoded one by one in the main loop by a webdataset pipeline (``pilrgb`` decode, the
  CLIP validation transform, ``batched(16)``), captions by Hugging Face's generic
  ``BlipForConditionalGeneration.generate`` with the reference settings (prompt "a picture of ",
  nucleus sampling top_p 0.9, 8 return sequences, repetition_penalty 1.1, max_length 20,
  min_length 5; top_k 50, which transformers 4.30 applied by default in the reference's
  environment), captions written to a parquet file; then a second pass reads that file, masks
  alt-texts and captions with the reference's phrase list and embeds them with all-MiniLM-L6-v2
  (256 samples per encode call, as the reference's default), writing the scores to
  ``WORK/reference``.

Without ``--captioner`` the BLIP weights are random (seeded): ``tiny`` is ``build_tiny_blip``
(2 layers, hidden 32, 64 px), ``base`` a randomly initialised ``BlipForConditionalGeneration``
of BLIP-base size (``blip_checkpoint.blip_base_config()``, ViT-B/16 at 224 px, 12-layer decoder).
Random weights almost never sample [SEP], so nearly every caption runs to max_length: the
worst case for decoding (real captions often stop earlier). The script measures and prints the
share of sequences that reached max_length.

Models are loaded, and both pipelines warmed up on one full batch (16 images), before anything is timed;
only scoring is timed. The input shards are made from real photos that ship in installed
packages (scikit-image, scikit-learn, matplotlib), cycled to N samples, resized and re-encoded
as img2dataset would (largest side 512 if bigger, JPEG quality 95), in img2dataset's layout.
With ``--rounds K`` both pipelines are timed K times, the order alternating between rounds, and the
rates are the medians (stage times the means): on a shared machine a single run can be off by 20%
either way. The 1-minute load average at the start and end of timing is printed for that reason.
The last line printed is ``fast F img/s, reference R img/s, ratio X`` (X = F / R).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# --------------------------------------------------------------------------------------------
# Input shards from packaged photos

# (source, alt-text). Alt-texts written for this benchmark; some carry "medium phrases" so the
# masking has work to do in both pipelines.
PHOTOS = (
    ("skimage:astronaut", "an astronaut in an orange suit in front of a flag"),
    ("skimage:chelsea", "a photo of a tabby cat looking at the camera"),
    ("skimage:coffee", "a cup of coffee on a red saucer"),
    ("skimage:rocket", "stock photo rocket on the launch pad at dusk"),
    ("skimage:stereo_motorcycle", "a red motorcycle parked in a workshop"),
    ("skimage:camera", "black and white image of a man with a camera on a tripod"),
    ("skimage:coins", "old silver coins on a dark background"),
    ("skimage:moon", "the cratered surface of the moon"),
    ("skimage:page", "a scanned page of printed text"),
    ("skimage:hubble_deep_field", "hubble deep field galaxies in space"),
    ("skimage:immunohistochemistry", "a photo of stained tissue under a microscope"),
    ("skimage:colorwheel", "a colour wheel"),
    ("sklearn:china.jpg", "a pagoda by a lake among trees"),
    ("sklearn:flower.jpg", "a pink dahlia flower close up"),
    ("matplotlib:grace_hopper.jpg", "portrait of Grace Hopper in navy uniform"),
)


def _jpeg(source: str, max_side: int = 512) -> tuple[bytes, int, int, int, int]:
    """JPEG bytes as img2dataset writes them (keep_ratio_largest, resize only if bigger, q95)."""
    from PIL import Image

    from datacomp_sieve.toy_pool import photo_array

    im = Image.fromarray(photo_array(source)).convert("RGB")
    ow, oh = im.size
    if max(ow, oh) > max_side:
        scale = max_side / max(ow, oh)
        im = im.resize((max(1, round(ow * scale)), max(1, round(oh * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue(), im.size[0], im.size[1], ow, oh


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member as img2dataset's tars have it (webdataset's writer): a float mtime, so in
    tarfile's pax format a pax header that sets the time comes before it."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1795806804.25
    tar.addfile(info, io.BytesIO(data))


def build_shards(out_dir: str, n: int, per_shard: int, tag: str = "bench") -> int:
    """``n`` samples cycled over PHOTOS in ``{:08d}.tar`` + ``_stats.json`` shards; returns shards."""
    os.makedirs(out_dir, exist_ok=True)
    encoded = {}
    n_shards = 0
    for s, start in enumerate(range(0, n, per_shard)):
        stop = min(n, start + per_shard)
        with tarfile.open(os.path.join(out_dir, f"{s:08d}.tar"), "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(start, stop):
                source, text = PHOTOS[i % len(PHOTOS)]
                if source not in encoded:
                    encoded[source] = _jpeg(source)
                data, w, h, ow, oh = encoded[source]
                key = f"{s:05d}{i - start:04d}"
                uid = hashlib.md5(f"{tag}:{i}".encode()).hexdigest()
                meta = {"uid": uid, "url": f"http://{tag}.invalid/{i}.jpg", "caption": text, "key": key,
                        "status": "success", "error_message": None, "width": w, "height": h,
                        "original_width": ow, "original_height": oh, "exif": "{}",
                        "sha256": hashlib.sha256(data).hexdigest()}
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                _add(tar, f"{key}.txt", text.encode())
        count = stop - start
        with open(os.path.join(out_dir, f"{s:08d}_stats.json"), "w") as f:
            json.dump({"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}, f)
        n_shards += 1
    return n_shards


# --------------------------------------------------------------------------------------------
# Models


def random_blip(size: str, seed: int):
    """(model, tokenizer, image size): randomly initialised BLIP of the given size, seeded."""
    import torch
    from transformers import BlipForConditionalGeneration

    from datacomp_sieve.blip_checkpoint import blip_base_config
    from datacomp_sieve.caption import build_blip_tokenizer, build_tiny_blip

    if size == "tiny":
        model, tok = build_tiny_blip(seed)
        return model, tok, model.config.vision_config.image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_base_config()).eval()
    return model, build_blip_tokenizer(), 224


def checkpoint_blip(path: str):
    """(model, tokenizer, image size) for ``--captioner PATH`` (original BLIP file or transformers folder)."""
    if os.path.isdir(path):
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(path).eval()
        return model, AutoTokenizer.from_pretrained(path), model.config.vision_config.image_size
    from datacomp_sieve.blip_checkpoint import load_blip_model
    from datacomp_sieve.caption import build_blip_tokenizer

    model, _ = load_blip_model(path, image_size=224)
    return model.eval(), build_blip_tokenizer(), 224


def register_random_captioner(name: str, model, tok, image_size: int, size: str, seed: int) -> None:
    """Make the random model available to ``ShardScorer`` by name (a copy: the engine casts it)."""
    from datacomp_sieve import caption

    def build(device=None, precision=None, weights=None, cache_dir=None, max_sequences_per_call=None,
              progress=True, decoding="fast"):
        return caption.BlipCaptioner(
            copy.deepcopy(model), tok, name=name,
            description=f"randomly initialised BLIP-{size} (seed {seed}) for benchmarks: captions are noise",
            device=device, precision=precision or "fp32", image_size=image_size,
            max_sequences_per_call=max_sequences_per_call, weights_info={"random_init_seed": seed},
            decoding=decoding,
        )

    caption.CAPTIONERS[name] = build


# --------------------------------------------------------------------------------------------
# The reference-style pipeline

PROMPT = "a picture of "
#: the reference's masking list, in its order (SPEC.md section 1)
MEDIUM_PHRASES = ("an image of", "a photo of", "stock photo", "photo stock", "a photo", "an image", "image", "photo")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReferencePipeline:
    """Captions first (webdataset loader in the main loop, HF ``generate``), similarity afterwards."""

    def __init__(self, model, tok, image_size: int, device: str, num_captions: int, batch_size: int = 16,
                 text_batch: int = 256):
        import torch
        from torchvision import transforms as T

        from datacomp_sieve.models import load_text_encoder

        self.device = torch.device(device)
        self.model = model.to(self.device, torch.float32).eval()  # fp32, no autocast
        self.tok = tok
        self.r, self.batch_size, self.text_batch = num_captions, batch_size, text_batch
        # open_clip's validation transform (shorter side, bicubic; centre crop; CLIP normalisation)
        self.transform = T.Compose([
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ])
        self.sentence_model, _ = load_text_encoder(None, device=str(self.device))
        self.sentence_model.float().eval()  # fp32, as the reference
        self.patterns = [re.compile(p, re.IGNORECASE) for p in MEDIUM_PHRASES]
        self.prompt_ids = tok(PROMPT, return_tensors="pt").input_ids  # [CLS] a picture of [SEP]
        self.max_length_hits = 0
        self.sequences = 0
        self.new_tokens = 0  # generated tokens, [SEP] included (the prompt is 4)

    def _loader(self, shards_dir: str):
        import webdataset as wds

        urls = sorted(glob.glob(os.path.join(shards_dir, "*.tar")))
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.decode("pilrgb", handler=wds.warn_and_continue),
            wds.rename(image="jpg;png;jpeg;webp", text="txt", meta="json"),
            wds.map_dict(image=self.transform, meta=lambda m: m["uid"]),
            wds.to_tuple("__key__", "meta", "image", "text"),
            wds.batched(self.batch_size, partial=True),
        )

    def caption(self, pixels):
        import torch

        b = pixels.shape[0]
        with torch.no_grad():
            out = self.model.generate(
                pixel_values=pixels.to(self.device),
                input_ids=self.prompt_ids.repeat(b, 1).to(self.device),  # [CLS]->[DEC], [SEP] dropped inside
                do_sample=True, top_p=0.9, top_k=50, num_return_sequences=self.r,
                repetition_penalty=1.1, max_length=20, min_length=5,
            )
        ids = out.cpu()
        sep = self.tok.sep_token_id
        self.sequences += ids.shape[0]
        self.max_length_hits += int(((ids == sep).sum(dim=1) == 0).sum())
        self.new_tokens += int((ids != self.tok.pad_token_id).sum()) - 4 * ids.shape[0]  # [DEC] a picture of
        texts = self.tok.batch_decode(ids.tolist(), skip_special_tokens=True)
        return [t[len(PROMPT):] for t in texts]

    def captions_pass(self, shards_dir: str, out_path: str, timings: dict) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = {"uid": [], "key": [], "text": [], "all_generated_caption_list": []}
        it = iter(self._loader(shards_dir))
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            timings["read_decode_preprocess"] += time.perf_counter() - t
            if batch is None:
                break
            keys, uids, images, texts = batch
            t = time.perf_counter()
            flat = self.caption(images)
            _sync(self.device)
            timings["caption"] += time.perf_counter() - t
            rows["uid"] += list(uids)
            rows["key"] += list(keys)
            rows["text"] += list(texts)
            rows["all_generated_caption_list"] += [flat[i * self.r:(i + 1) * self.r] for i in range(len(keys))]
        t = time.perf_counter()
        pq.write_table(pa.table(rows), out_path)
        timings["write"] += time.perf_counter() - t
        return len(rows["uid"])

    def mask(self, sentences):
        out = []
        for s in sentences:
            for p in self.patterns:
                s = p.sub("", s)
            out.append(s)
        return out

    def similarity_pass(self, captions_path: str, out_path: str, timings: dict) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        t = time.perf_counter()
        df = pq.read_table(captions_path).to_pydict()
        alts = self.mask(df["text"])
        gens = [self.mask(list(c)) for c in df["all_generated_caption_list"]]
        best, mean = [], []
        step = self.text_batch
        with torch.no_grad():
            for s in range(0, len(alts), step):
                a, g = alts[s:s + step], gens[s:s + step]
                emb = self.sentence_model.encode(a + [c for cs in g for c in cs], convert_to_tensor=True,
                                                 batch_size=step, show_progress_bar=False)
                n = len(a)
                cos = (emb[n:].view(n, self.r, -1) @ emb[:n].unsqueeze(-1)).squeeze(-1).float().cpu().numpy()
                j = cos.argmax(1)
                top = cos[np.arange(n), j]
                empty = np.array([len(g[i][j[i]]) == 0 for i in range(n)])
                best += np.where(empty, 0.0, top).tolist()
                mean += cos.mean(1).tolist()
        pq.write_table(pa.table({"uid": df["uid"], "key": df["key"], "sieve_score": best, "sieve_mean": mean}),
                       out_path)
        timings["text_pass"] += time.perf_counter() - t

    def run(self, shards_dir: str, out_dir: str) -> tuple[int, dict]:
        os.makedirs(out_dir, exist_ok=True)
        timings = {"read_decode_preprocess": 0.0, "caption": 0.0, "write": 0.0, "text_pass": 0.0}
        cap = os.path.join(out_dir, "captions.parquet")
        n = self.captions_pass(shards_dir, cap, timings)
        self.similarity_pass(cap, os.path.join(out_dir, "scores.parquet"), timings)
        return n, timings


# --------------------------------------------------------------------------------------------
# Main


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (working tree has uncommitted changes to tracked files)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


SWEEP_FLAGS = "gcmstTib"  # what a --sweep item may end in (see --help)


def parse_sweep(text: str) -> list:
    """``--sweep`` items: [((batch[, decoding processes[, text processes]]), flags), ...]; a
    ValueError for anything else (see ``--help``)."""
    sweep = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        numbers = item.rstrip(SWEEP_FLAGS)
        flags = item[len(numbers):]
        if "t" in flags and "T" in flags:
            raise ValueError(f"{item}: t or T, not both")
        sweep.append((tuple(int(x) for x in numbers.split("x")), flags))
    return sweep


def _time_stages(device, times=None, **methods) -> dict:
    """Time methods of objects in place: ``key=(obj, "method")``; with a ``device``, it is
    synchronised around each call (a negligible cost per batch; None for methods that return host
    data anyway). Returns the dict the seconds accumulate in (``times``, or a new one), one key per
    method found (an object without the method is left alone)."""
    times = {} if times is None else times

    def timed(key, fn):
        def run(*a, **kw):
            if device is not None:
                _sync(device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            if device is not None:
                _sync(device)
            times[key] += time.perf_counter() - t
            return out
        return run

    for key, (obj, name) in methods.items():
        if obj is not None and hasattr(obj, name):
            times[key] = 0.0
            setattr(obj, name, timed(key, getattr(obj, name)))
    return times


class GpuUtilisation:
    """Samples ``nvidia-smi``'s GPU utilisation every 100 ms while alive (CUDA runs only)."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self.proc = None
        if device != "cuda" or shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100",
             "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate()
        self.samples = [float(x) for x in out.split() if x.strip().replace(".", "", 1).isdigit()]
        self.proc = None

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)


class ThreadCpu:
    """CPU seconds of this process's threads while alive, by role: read from /proc (Linux) every
    100 ms, named after the Python thread (``caption_0`` -> caption, ``text_1`` -> text,
    ``QueueFeederThread``, ...); threads Python does not know (torch's, CUDA's, the tokenizers')
    are "native". How close the Python threads' sum comes to the wall time shows how much of it
    the GIL allowed. A thread's last 100 ms may be missed if it ends before the sampler stops."""

    def __init__(self):
        self.last: dict = {}
        self.names: dict = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._read()
        self._thread = threading.Thread(target=self._run, name="thread-cpu sampler", daemon=True)
        self._thread.start()

    def _read(self) -> dict:
        out = {}
        for t in threading.enumerate():
            if t.native_id is not None:
                self.names[t.native_id] = t.name
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.last.update(self._read())

    def stop(self) -> dict:
        """{role: CPU seconds} over the sampler's life, largest first."""
        self._stop.set()
        self._thread.join()
        self.last.update(self._read())
        roles: dict = {}
        for tid, cpu in self.last.items():
            name = self.names.get(tid)
            if name == self._thread.name:
                continue
            role = "native" if name is None else re.sub(r"[-_]\d+.*$", "", name)
            roles[role] = roles.get(role, 0.0) + cpu - self.start.get(tid, 0.0)
        return dict(sorted(((k, v) for k, v in roles.items() if v >= 0.005), key=lambda kv: -kv[1]))


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))}; {os.cpu_count()} CPU cores, torch threads " \
               f"{torch.get_num_threads()})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


def main(argv=None) -> int:
    from datacomp_sieve.caption import DECODINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "base"], default="tiny")
    p.add_argument("--images", type=int, default=64, help="number of images N (default 64)")
    p.add_argument("--batch_size", type=int, default=None, help="this engine's batch (default: its own, 16 on the CPU, 256 on GPUs)")
    p.add_argument("--num_captions", type=int, default=8)
    p.add_argument("--decoding", choices=DECODINGS, default=None,
                   help="this engine's decoding (default: its own, graph on CUDA and fast on the CPU; reference: "
                        "transformers' generate inside the engine)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="this engine's precision (default: its own, fp16 on CUDA and fp32 on the CPU)")
    p.add_argument("--samples_per_shard", type=int, default=256)
    p.add_argument("--work_dir", default=None, help="default: a fresh temporary folder")
    p.add_argument("--captioner", default=None, help="a BLIP checkpoint (original .pth or transformers folder) "
                                                      "instead of random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sep_bias", type=float, default=None,
                   help="raise the random model's [SEP] output bias by this much, so that captions end at varied "
                        "lengths as real BLIP's do instead of all running to max_length (3 gives about 7 new "
                        "tokens on average with seed 0's base model); default: unchanged, the worst case")
    p.add_argument("--warmup_images", type=int, default=None,
                   help="images in the untimed warm-up shard (default: one full batch of this engine)")
    p.add_argument("--reference_first", action="store_true",
                   help="time the reference-style pipeline before this engine (default: after), to check order effects")
    p.add_argument("--rounds", type=int, default=1,
                   help="timed rounds, the order alternating between rounds; rates are the medians (default 1)")
    p.add_argument("--reference_images", type=int, default=None,
                   help="time the reference-style pipeline on the first M of the N images only (default: all N); "
                        "for GPUs, where it is too slow for the N this engine needs to fill the device")
    p.add_argument("--sweep", default="",
                   help="after the rounds, time this engine alone at other settings: comma-separated BATCH, "
                        "BATCHxWORKERS or BATCHxWORKERSxTEXT items (WORKERS: image-decoding processes on a GPU; "
                        "TEXT: text processes, which decode captions, mask and tokenise), each optionally ending in any of g (the "
                        "decoding step as a CUDA graph; an item without it runs the growing loop), c (resize and crop in the decoding processes, not on the "
                        "device), m (the text processes run their own text encoder on the device too) and s "
                        "(each batch captioned on this thread, not on one of its own while the next is read), t "
                        "(torch's CPU thread pool in this process cut to one thread, the GPU default), T (one thread "
                        "per core, as before 2026-11-28 in this process; its children keep one each), "
                        "i (each batch moved to the GPU and prepared on a CUDA stream of its own), b (one text-encoder "
                        "forward for all of a batch's texts, not forwards of 256), "
                        "e.g. 256,512x14,256x12x3,256x12x3g,256x12x3gc,256x12x3gm,256x12x3gs,256x12x3gt,256x12x3gi,256gb")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.reference_images is not None and not 1 <= args.reference_images <= args.images:
        p.error("--reference_images must be between 1 and --images")
    try:
        sweep = parse_sweep(args.sweep)
    except ValueError:
        p.error(f"--sweep: give BATCH[xWORKERS[xTEXT]][g][c][m][s][t|T][i][b] items, got {args.sweep!r}")

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch
    import transformers

    from datacomp_sieve.score import ScoreConfig, ShardScorer, score_pool
    from datacomp_sieve.store import ScoreStore

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU", file=sys.stderr)
        return 2
    work = args.work_dir or tempfile.mkdtemp(prefix="score_speed_")
    os.makedirs(work, exist_ok=True)
    shards = _fresh(os.path.join(work, "shards"))
    warm_shards = _fresh(os.path.join(work, "warmup_shards"))
    n_shards = build_shards(shards, args.images, args.samples_per_shard)
    n_ref_images = args.reference_images or args.images
    ref_shards = shards
    if n_ref_images < args.images:  # the same first M samples, in their own shards
        ref_shards = _fresh(os.path.join(work, "reference_shards"))
        build_shards(ref_shards, n_ref_images, args.samples_per_shard)

    # Models (not timed)
    t = time.perf_counter()
    if args.captioner:
        model, tok, image_size = checkpoint_blip(args.captioner)
        captioner_name = args.captioner
        weights = f"checkpoint {args.captioner}"
    else:
        model, tok, image_size = random_blip(args.model, args.seed)
        weights = f"random init, seed {args.seed}"
        if args.sep_bias is not None:
            with torch.no_grad():
                model.text_decoder.cls.predictions.bias[tok.sep_token_id] += args.sep_bias
            weights += f", [SEP] output bias raised by {args.sep_bias:g}"
        captioner_name = f"bench-random-{args.model}"
        register_random_captioner(captioner_name, model, tok, image_size, args.model, args.seed)
    config = ScoreConfig(captioner=captioner_name, device=args.device, num_captions=args.num_captions,
                         batch_size=args.batch_size, seed=args.seed,
                         decoding=args.decoding, precision=args.precision)
    config = config.resolved()
    n_warm = args.warmup_images if args.warmup_images is not None else max(config.batch_size, 16)
    if n_warm > 0:
        build_shards(warm_shards, n_warm, n_warm, tag="warmup")
    sweep_warm = None  # the sweep's untimed runs (processes started, graphs captured): its largest batch
    if sweep:
        sweep_warm = _fresh(os.path.join(work, "sweep_warmup_shards"))
        n_sweep_warm = max(1, min(args.images, max(item[0] for item, _ in sweep)))
        build_shards(sweep_warm, n_sweep_warm, n_sweep_warm, tag="warmup")
    scorer = ShardScorer(config)
    reference = ReferencePipeline(model, tok, image_size, args.device, args.num_captions)
    load_s = time.perf_counter() - t

    params = sum(p.numel() for p in model.parameters())
    print(f"device: {_device_name(args.device)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"commit: {_git_commit()}")
    print(f"model: {args.model} BLIP ({params / 1e6:.1f}M parameters, {image_size} px, {weights})")
    print(f"N: {args.images} images in {n_shards} shard(s) under {shards}; {args.num_captions} captions per image")
    if n_ref_images < args.images:
        print(f"reference-style pipeline timed on the first {n_ref_images} of those images (its rate is "
              f"images per second over those)")
    print(f"fast: image decoding {scorer.image_decoding()}, text half on a thread: {scorer.overlap_text}, "
          f"text processes: {scorer.text_workers}, "
          f"batches captioned on a thread of their own: {scorer.overlap_captioning}")
    print(f"fast: precision {config.precision}, batch {config.batch_size}, decoding {config.decoding}; "
          f"reference: fp32, batch {reference.batch_size}")
    print(f"models loaded in {load_s:.1f} s (not timed)")
    if not args.captioner and args.sep_bias is None:
        print("note: random weights almost never sample [SEP], so captions run to max_length "
              "(16 new tokens): the worst case for decoding")

    # Warm-up (not timed): both pipelines on one full batch, so that the timed runs find their
    # allocations (and, on CUDA, kernels and memory pool) ready
    if n_warm > 0:
        t = time.perf_counter()
        score_pool(warm_shards, _fresh(os.path.join(work, "warmup_fast")), config, overwrite=True,
                   progress=False, scorer=scorer)
        reference.run(warm_shards, _fresh(os.path.join(work, "warmup_reference")))
        reference.max_length_hits = reference.sequences = reference.new_tokens = 0
        print(f"warm-up: {n_warm} images through each pipeline in {time.perf_counter() - t:.1f} s (not timed)")

    # the captioning and text halves' parts (the text parts only where the text half runs in this
    # process: with text processes they run there, untimed)
    cap = scorer.captioner
    split = _time_stages(torch.device(args.device), **{
        "caption: vision encoder": (cap, "encode_images"), "caption: decoding": (cap, "_generate_from_embeds")})
    # not synchronised: the text half runs on its own stream beside the captioning
    _time_stages(None, split, **{"text: token rows -> captions": (cap, "decode"),
                                 "text: MiniLM encode": (scorer.text, "encode"),
                                 # with text processes that only tokenise, the forward runs here
                                 "text: MiniLM forward": (scorer.text, "embed")})

    decode_cpu = []  # per fast run: CPU seconds of the decoding processes
    text_cpu = []  # per fast run: CPU seconds of the text processes (when they only tokenise)
    thread_cpu = []  # per fast run: {thread role: CPU seconds} of this process

    def threads_line(wall: float) -> str:
        return (", ".join(f"{k} {v:.2f}" for k, v in thread_cpu[-1].items()) + f" of {wall:.2f} s wall"
                if thread_cpu and thread_cpu[-1] else "not readable here")

    def run_fast(cfg=config):
        scorer.config = cfg
        decode_cpu.append(0.0)
        text_cpu.append(0.0)
        fast_dir = _fresh(os.path.join(work, "fast"))
        _sync(torch.device(args.device))
        split.update(dict.fromkeys(split, 0.0))
        gpu = GpuUtilisation(args.device)
        threads = ThreadCpu()
        t = time.perf_counter()
        manifest = score_pool(shards, fast_dir, cfg, overwrite=True, progress=False, scorer=scorer)
        _sync(torch.device(args.device))
        fast_s = time.perf_counter() - t
        thread_cpu.append(threads.stop())
        gpu.stop()
        store = ScoreStore(fast_dir)
        stage = {"read": 0.0, "caption": 0.0, "text": 0.0, "clip": 0.0}
        for sh in sorted(glob.glob(os.path.join(shards, "*.tar"))):
            st = store.shard_stats(os.path.basename(sh)[:-4])
            for k, v in st.get("timings", {}).items():
                stage[k] = stage.get(k, 0.0) + v
            decode_cpu[-1] += st.get("decoding_processes_cpu_s", 0.0)
            text_cpu[-1] += st.get("text_processes_cpu_s", 0.0)
        ok = manifest.get("status", {}).get("ok", 0)
        if ok != args.images:
            print(f"WARNING: the engine scored {ok} of {args.images} images: {manifest.get('status')}")
        fast_rate = args.images / fast_s
        stage.update({k: v for k, v in split.items() if v or not k.startswith("text: ")})
        if gpu.samples:
            stage["gpu utilisation %"] = gpu.mean()
        return fast_s, stage, fast_rate

    def warm_up(cfg):
        """One untimed pass over the sweep's warm-up shard, so that the timed run that follows
        finds its processes started and its graphs captured."""
        scorer.config = cfg
        score_pool(sweep_warm, _fresh(os.path.join(work, "warmup_fast")), cfg, overwrite=True, progress=False,
                   scorer=scorer)

    def run_reference():
        ref_dir = _fresh(os.path.join(work, "reference"))
        torch.manual_seed(args.seed)
        _sync(reference.device)
        t = time.perf_counter()
        n_ref, ref_stage = reference.run(ref_shards, ref_dir)
        _sync(reference.device)
        ref_s = time.perf_counter() - t
        if n_ref != n_ref_images:
            print(f"WARNING: the reference pipeline scored {n_ref} of {n_ref_images} images")
        ref_rate = n_ref_images / ref_s
        return ref_s, n_ref, ref_stage, ref_rate

    import statistics

    fast_runs, ref_runs = [], []
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print()
    for k in range(args.rounds):
        ref_first = args.reference_first != (k % 2 == 1)  # alternate the order between rounds
        if ref_first:
            ref_runs.append(run_reference())
            fast_runs.append(run_fast())
        else:
            fast_runs.append(run_fast())
            ref_runs.append(run_reference())
        print(f"round {k + 1}/{args.rounds} ({'reference first' if ref_first else 'fast first'}): "
              f"fast {fast_runs[-1][2]:.2f} img/s ({fast_runs[-1][0]:.2f} s), "
              f"reference {ref_runs[-1][3]:.2f} img/s ({ref_runs[-1][0]:.2f} s)")
    fast_dir, ref_dir = os.path.join(work, "fast"), os.path.join(work, "reference")
    fast_rate = statistics.median(r[2] for r in fast_runs)
    ref_rate = statistics.median(r[3] for r in ref_runs)
    n_ref = ref_runs[-1][1]
    rounds = len(fast_runs)
    fast_s = sum(r[0] for r in fast_runs) / rounds
    ref_s = sum(r[0] for r in ref_runs) / rounds
    stage = {k: sum(r[1][k] for r in fast_runs) / rounds for k in fast_runs[0][1]}
    ref_stage = {k: sum(r[2][k] for r in ref_runs) / rounds for k in ref_runs[0][2]}
    per = f"mean of {rounds} rounds" if rounds > 1 else "1 round"

    util = stage.pop("gpu utilisation %", None)
    # with the text half on a thread, text overlaps captioning: the stages then sum to more than the wall time
    other = fast_s - sum(v for k, v in stage.items() if not k.startswith(("caption: ", "text: ")))
    print()
    print(f"fast ({per}): {args.images} images in {fast_s:.2f} s; stages (store shard stats): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in stage.items())
          + (f", other (store writes, bookkeeping) {other:.2f} s" if not scorer.overlap_text else
             " (text overlaps captioning)"))
    if util is not None:
        print(f"  GPU utilisation during the fast runs (nvidia-smi, every 100 ms): mean {util:.0f}%")
    print(f"  image decoding: {scorer.image_decoding()}")
    print(f"  this process's threads, CPU seconds in the last round: {threads_line(fast_runs[-1][0])}")
    for what, cpu, does, workers, verb in (
            ("decoding processes", decode_cpu, "JPEG decode, resize, crop", scorer.decode_workers, "decode"),
            ("text processes", text_cpu, "masking, tokenising and, where they do it, token rows -> captions",
             scorer.text_workers, "handle")):
        if cpu[0]:
            per_image = 1000 * sum(cpu[:rounds]) / rounds / args.images
            print(f"  {what}: {per_image:.2f} ms CPU per image ({does}): {workers} of them on free cores "
                  f"{verb} at most {1000 * workers / per_image:.0f} images/s")
    print(f"  scores in {fast_dir}")
    print(f"reference ({per}): {n_ref} images in {ref_s:.2f} s; stages: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in ref_stage.items()))
    print(f"  scores in {ref_dir}")
    if reference.sequences:
        share = reference.max_length_hits / reference.sequences
        print(f"reference sequences that ran to max_length (no [SEP]): {reference.max_length_hits}"
              f"/{reference.sequences} ({100 * share:.1f}%); new tokens per caption, [SEP] included: "
              f"{reference.new_tokens / reference.sequences:.1f} on average")
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) at start of timing {load0:.2f}, at end {os.getloadavg()[0]:.2f} "
              f"(other work on the machine skews both pipelines; compare only runs on an idle machine)")
    if sweep:
        print()
        default_workers, default_text = scorer.decode_workers, scorer.text_workers
        default_overlap = scorer.overlap_captioning
        rates = []  # (img/s, sweep item) of the items that ran
        sampler = getattr(scorer.captioner, "sampler", None)
        prev_batch = config.batch_size
        default_threads = scorer.torch_threads
        default_text_batch = scorer.text.batch_size
        for item, flags in sweep:
            graphs = "g" in flags
            # t: one thread for this process's CPU-side torch work (the GPU default), T: one per core
            scorer.torch_threads = 1 if "t" in flags else os.cpu_count() if "T" in flags else default_threads
            try:
                batch = item[0]
                cfg = dataclasses.replace(config, batch_size=batch)
                scorer.overlap_captioning = default_overlap and "s" not in flags
                scorer.input_stream = "i" in flags
                workers = item[1] if len(item) > 1 else default_workers
                text = item[2] if len(item) > 2 else default_text
                resize = False if "c" in flags else None
                # b: one text-encoder forward for all of a batch's texts (images x (captions + 1))
                text_batch = batch * (config.num_captions + 1) if "b" in flags else default_text_batch
                setting = (workers, text, resize, "m" in flags, text_batch)
                changed = False
                # another batch: the processes and the crop ring start again, the ring sized for it
                # (4 batches read ahead; the ring of a smaller batch sends the rest through pipes)
                if batch != prev_batch or setting != (scorer.decode_workers, scorer.text_workers,
                                                      scorer.resize_on_device, scorer.text_model_in_workers,
                                                      scorer.text.batch_size):
                    scorer.close()
                    (scorer.decode_workers, scorer.text_workers, scorer.resize_on_device,
                     scorer.text_model_in_workers, scorer.text.batch_size) = setting
                    changed = True
                if sampler is not None and sampler.cuda_graphs != graphs:
                    sampler.cuda_graphs = graphs
                    changed = True
                if changed or batch != prev_batch:
                    warm_up(cfg)  # untimed: processes started, graphs captured for this batch's shape
                prev_batch = batch
                s_time, s_stage, s_rate = run_fast(cfg)
                util = s_stage.pop("gpu utilisation %", None)
                print(f"sweep: batch {batch}, torch threads {scorer.torch_threads or torch.get_num_threads()}, "
                      f"decode workers {workers} "
                      f"(image decoding: {scorer.image_decoding()}), "
                      f"text workers {text}{' (with the encoder)' if text and scorer._text_model_there() else ''}, "
                      f"text batch {scorer.text.batch_size}, CUDA graphs "
                      f"{bool(sampler is not None and sampler.cuda_graphs)}, captioning thread "
                      f"{scorer.overlap_captioning}, input stream {scorer._input_stream() is not None}: "
                      f"fast {s_rate:.2f} img/s "
                      f"({s_time:.2f} s); "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in s_stage.items())
                      + (f"; GPU utilisation {util:.0f}%" if util is not None else "")
                      + (f"; text processes' CPU {1000 * text_cpu[-1] / args.images:.2f} ms/image" if text_cpu[-1] else "")
                      + f"; threads' CPU s: {threads_line(s_time)}")
                rates.append((s_rate, "x".join(map(str, item)) + flags))
            except Exception:  # noqa: BLE001 - one setting failing should not lose the others' figures
                traceback.print_exc()
                print(f"sweep: {'x'.join(map(str, item))}{flags}: FAILED with an exception")
                scorer.close()
        scorer.close()
        scorer.torch_threads = default_threads
        if rates:
            best = max(rates)
            print(f"sweep: fastest {best[1]} at {best[0]:.2f} img/s, against {fast_rate:.2f} img/s at the defaults")
        scorer.decode_workers, scorer.text_workers, scorer.resize_on_device = default_workers, default_text, None
        scorer.text_model_in_workers, scorer.overlap_captioning = False, default_overlap
        scorer.input_stream = False
        scorer.text.batch_size = default_text_batch
        if sampler is not None:
            sampler.cuda_graphs = config.decoding == "graph"
    if rounds > 1:
        print(f"rates below: median over {rounds} rounds")
    scorer.close()
    print(f"fast {fast_rate:.2f} img/s, reference {ref_rate:.2f} img/s, ratio {fast_rate / ref_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
