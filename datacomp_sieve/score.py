"""Scoring: shards in, one score file per shard out.

``ShardScorer`` is the unit of work: it loads the models once and turns one shard into one
table of rows (a row for every sample, with a status). It knows nothing of the engine that
runs it; ``score_pool`` drives an engine (``engines.py``; in process by default). Resume comes
from the store: a shard whose file exists is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field

from .errors import UserError, first_line

log = logging.getLogger(__name__)


#: images per captioning call on a GPU by default (H100 measurements in bench/RESULTS.md)
GPU_BATCH_SIZE = 256


@dataclass
class ScoreConfig:
    """Everything that changes the scores. Two runs with equal configs give equal stores."""

    captioner: str = "blip-base-14m"
    text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    num_captions: int = 8
    masking: str = "official"
    clip_model: str | None = None
    clip_pretrained: str = "openai"
    device: str | None = None
    precision: str | None = None
    decoding: str | None = None  # graph on GPUs (caption.DECODINGS), fast on the CPU
    batch_size: int | None = None  # 16 on the CPU (the reference's), GPU_BATCH_SIZE on GPUs
    text_batch_size: int | None = None  # sentences per text-encoder forward; None: 256, the reference's
    seed: int = 0
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb limit

    def resolved(self, has_gpu: bool | None = None, where: str = "torch sees") -> "ScoreConfig":
        """Defaults filled in and checked. ``has_gpu``: whether the machines that will run the
        work have GPUs (default: whether torch sees one here); ``where`` names them in errors."""
        if has_gpu is None:
            import torch

            has_gpu = torch.cuda.is_available()
        device = self.device or ("cuda" if has_gpu else "cpu")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda") and not has_gpu:
            raise UserError(f"--device cuda was asked for, but {where} no GPU; use --device cpu")
        precision = self.precision or ("fp16" if device.startswith("cuda") else "fp32")
        if precision not in ("fp32", "fp16", "bf16"):
            raise UserError(f"--precision must be fp32, fp16 or bf16, got {precision}")
        if device == "cpu" and precision == "fp16":
            raise UserError("fp16 is for GPUs; on the CPU use --precision fp32 or bf16")
        from .caption import DECODINGS

        decoding = self.decoding or ("graph" if device.startswith("cuda") else "fast")
        if decoding not in DECODINGS:
            raise UserError(f"--decoding must be one of {', '.join(DECODINGS)}, got {decoding}")
        if self.num_captions < 1:
            raise UserError(f"--num_captions must be at least 1, got {self.num_captions}")
        batch_size = GPU_BATCH_SIZE if device.startswith("cuda") else 16
        batch_size = batch_size if self.batch_size is None else self.batch_size
        if batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {batch_size}")
        if self.text_batch_size is not None and self.text_batch_size < 1:
            raise UserError(f"--text_batch_size must be at least 1, got {self.text_batch_size}")
        # the default given explicitly is the default: a store made without the flag accepts it
        text_batch = None if self.text_batch_size == TEXT_BATCH_SIZE else self.text_batch_size
        return ScoreConfig(**{**asdict(self), "device": device, "precision": precision, "decoding": decoding,
                              "batch_size": batch_size, "text_batch_size": text_batch})

    def identity(self) -> dict:
        """What the store checks before adding shards: every setting that changes the numbers.

        The batch size is one: random draws are consumed per generate call.
        """
        return asdict(self)


#: sentences per text-encoder forward by default: the reference's (its --per_device_batch_size)
TEXT_BATCH_SIZE = 256


def shard_seed(seed: int, stem: str) -> int:
    """A shard's own seed: results do not depend on which worker runs which shard, or when."""
    h = hashlib.sha256(f"{seed}:{stem}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


#: samples per task sent to a decoding process
_CHUNK = 16
#: the largest side of the images decoding processes send whole (``ShardScorer.resize_on_device``);
#: img2dataset's DataComp downloads are at most 512 pixels a side
WHOLE_IMAGE_SIDE = 512


def _chunks(items, n: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode(data, max_pixels):
    """(status, error, RGB PIL image or None) of one encoded image (bytes, or a ``shards.ImageExtent``
    to read them from)."""
    from .shards import ImageError, ImageExtent, decode_image

    if isinstance(data, ImageExtent):
        data = data.read()
    try:
        return "ok", None, decode_image(data, max_pixels=max_pixels)
    except ImageError as e:
        return e.code, str(e), None


_ATTACHED = {}  # in a decoding process: the shared crop memory it writes into, by name


def _attached(name: str, shape: tuple):
    """In a decoding process: the parent's ``_CropRing`` memory as an array (attached once)."""
    if name not in _ATTACHED:
        import numpy as np
        from multiprocessing.shared_memory import SharedMemory

        shm = SharedMemory(name=name)
        _ATTACHED[name] = (shm, np.ndarray(shape, dtype=np.uint8, buffer=shm.buf))
    return _ATTACHED[name][1]


def _decode_chunk(images: list, transform, max_pixels, ring=None) -> list:
    """In a decoding process: encoded images -> (CPU seconds spent, [(status, error, uint8 crop or
    None) each]). With ``ring`` (the shared memory's name and shape, a slot per image, whether
    whole images are wanted), a crop is written into the top left of its slot and ``IN_RING``
    comes back in its place: no crop travels through the pipe; or, where whole images are wanted
    and the image fits the slot, the decoded image itself is written and its (height, width)
    comes back: the resize and crop are left to ``resample.crop_batch`` on the model's device."""
    import numpy as np

    cpu = time.process_time()
    out = []
    target = _attached(*ring[:2]) if ring is not None else None
    for i, data in enumerate(images):
        status, error, image = _decode(data, max_pixels)
        crop = None
        if image is not None:
            h, w = image.height, image.width
            if target is not None and ring[3] and image.mode == "RGB" and h <= target.shape[1] and w <= target.shape[2]:
                target[ring[2][i], :h, :w] = np.asarray(image)
                crop = (h, w)
            else:
                crop = transform.to_uint8(image)
                if target is not None and crop.shape[0] <= target.shape[1] and crop.shape[1] <= target.shape[2]:
                    target[ring[2][i], :crop.shape[0], :crop.shape[1]] = crop
                    crop = IN_RING
        out.append((status, error, crop))
    return time.process_time() - cpu, out


IN_RING = "in the ring"  # what a decoding process sends back for a crop it wrote into shared memory


class _Slot(int):
    """A crop's place in the ``_CropRing``; ``whole``: (height, width) where it holds the whole
    decoded image instead."""

    whole = None


def _ring_prefix() -> str:
    """The start of a ring's name in /dev/shm: this tool's, and the pid namespace's (a pid means
    something only within its own; containers sharing /dev/shm can have others), then the pid."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"datacomp-sieve-ring-{ns}-"


def _remove_dead_rings() -> None:
    """Remove the rings of processes of this pid namespace that are gone: a run killed with its
    processes (SIGKILL to a job) cannot free its ring (a GB on a GPU), and /dev/shm keeps it till reboot."""
    prefix = _ring_prefix()
    if not os.path.isdir("/proc/self"):  # no way to tell a live process here
        return
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.unlink(f"/dev/shm/{name}")
            log.info("removed /dev/shm/%s, the shared memory of a scoring process that was killed", name)
        except OSError:  # removed meanwhile by another starting run
            pass


class _CropRing:
    """Shared memory the decoding processes write their uint8 crops (or whole decoded images, see
    ``ShardScorer.resize_on_device``) into, one slot each: only statuses come back through the
    pipe, so this process does not read, unpickle and stack a few hundred kB per image; the batch
    is gathered from the slots in one torch copy (which releases the GIL). Slots are taken when a
    chunk is sent and given back when its batch is gathered, or all at once when a shard starts
    (nothing is in flight then)."""

    def __init__(self, slots: int, shape: tuple):
        import numpy as np
        from multiprocessing.shared_memory import SharedMemory

        self.shape = (slots, *shape)
        self.shm = SharedMemory(name=f"{_ring_prefix()}{os.getpid()}-{os.urandom(4).hex()}", create=True,
                                size=int(np.prod(self.shape)))
        self._unlink = weakref.finalize(self, self.shm.unlink)  # at exit too, when never closed
        self.array = np.ndarray(self.shape, dtype=np.uint8, buffer=self.shm.buf)
        self.free: list = []
        self._out = None
        self.reset()

    @classmethod
    def create(cls, slots: int, shape: tuple, least: int = 1) -> "_CropRing | None":
        """A ring of ``slots`` slots, or of fewer (at least ``least``) where /dev/shm has not room
        for twice as many (containers often give it 64 MB: writing past that kills the writer; the
        chunks that find no free slot use the pipes), or None where it is missing or smaller still."""
        import numpy as np

        each = int(np.prod(shape))
        _remove_dead_rings()
        try:
            st = os.statvfs("/dev/shm")
            room = st.f_bavail * st.f_frsize
            fit = min(slots, room // (2 * each))
            if fit < least:
                raise OSError(f"{room / 2**20:.0f} MB free")
            if fit < slots:
                log.info("shared memory for %d of %d decoded images (/dev/shm: %.0f MB free); the others come "
                         "back through pipes", fit, slots, room / 2**20)
            return cls(fit, shape)
        except OSError as e:
            log.info("decoded images come back through pipes, not shared memory (/dev/shm: %s; %.0f MB "
                     "wanted)", first_line(e), slots * each / 2**20)
            return None

    def reset(self) -> None:
        self.free = list(range(self.shape[0] - 1, -1, -1))

    def take(self, n: int) -> "list | None":
        """n free slots, or None when fewer are free (that chunk's crops then use the pipe)."""
        if len(self.free) < n:
            return None
        return [_Slot(self.free.pop()) for _ in range(n)]

    def gather(self, pixels, height: int, width: int, pin: bool = False):
        """uint8 (B, height, width, 3): the top left of ``pixels``' slots (or crops that came
        through a pipe); the slots are given back. ``pin``: into page-locked memory (torch's cache
        of it), for a non-blocking copy to a GPU; else into one buffer reused by every call (fresh
        memory costs more than the copy), so the batch is only good until the next call."""
        import torch

        src = torch.from_numpy(self.array)[:, :height, :width]
        shape = (len(pixels), height, width, 3)
        if pin:
            out = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        else:
            n = len(pixels) * height * width * 3
            if self._out is None or self._out.numel() < n:
                self._out = torch.empty(n, dtype=torch.uint8)
            out = self._out[:n].view(shape)
        slots = [p for p in pixels if isinstance(p, _Slot)]
        if len(slots) == len(pixels):
            torch.index_select(src, 0, torch.tensor(slots), out=out)
        else:
            for i, p in enumerate(pixels):
                out[i] = src[p] if isinstance(p, _Slot) else torch.from_numpy(p)
        self.free.extend(slots)
        return out

    def close(self) -> None:
        self.array = self._out = None
        self._unlink()
        self.shm.close()


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity: what a SLURM or container allocation
    gives it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def text_share(cpus: int) -> int:
    """The most text processes ``cpus`` cores get: one per five cores, at least one."""
    return max(1, cpus // 5)


def gpu_processes(cpus: int) -> tuple[int, int]:
    """(text processes, image-decoding processes) for a GPU with ``cpus`` cores: ``text_share``
    text processes, at most 3 (each turns token rows into captions, masks and tokenises 1,300-1,900
    images/s on the 2-core test machine: bench/text_host_cost.py), and the decoding
    processes on the rest but two (this process's threads), at most 32."""
    text = min(3, text_share(cpus))
    return text, max(1, min(32, cpus - 2 - text))


def _spawn_pool(workers: int, initializer=None, initargs=()):
    """Worker processes started fresh (spawn): the parent may hold CUDA, which forked children
    must not inherit. They leave Ctrl-C to this process and end when it does (``stopping.as_child``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_child,
                               initargs=(initializer, initargs))


def _start_child(initializer, initargs) -> None:
    from .stopping import as_child

    as_child()
    # one of many processes: no thread pools of its own, whatever the parent's environment says (a
    # Ray actor's gives its cores), for the libraries it loads from now on and for torch if loaded
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


_TEXT = {}  # in a text process: its encoder and masking


def _start_text_worker(text_encoder: str, device: str, precision: str, masking: str, batch_size: int,
                       decoder=None) -> None:
    from transformers.utils import logging as hf_logging

    from .text import TextEncoder

    hf_logging.disable_progress_bar()  # the scoring process has shown its own loading
    _TEXT.update(encoder=TextEncoder(text_encoder, device=device, precision=precision, batch_size=batch_size),
                 masking=masking, decoder=decoder)


def _score_texts(alt_texts: list, captions: list):
    """In a text process: ``sieve_scores`` with its own encoder on the device."""
    from .text import sieve_scores

    return sieve_scores(_TEXT["encoder"], alt_texts, captions, masking=_TEXT["masking"])


def _text_features(alt_texts: list, captions: list | None, token_rows=None):
    """In a text process: the text half's host work, (decoding,) masking and tokenising; the encoder's
    forward runs in the scoring process (``TextEncoder.embed``, then ``text.scores_of``).
    ``token_rows``: (ids, r) to turn into the captions here (the captioner's ``decoder``), which
    then come back too; and the CPU seconds this took."""
    from .caption import per_image
    from .text import masked_texts

    cpu = time.process_time()
    made = None
    if token_rows is not None:
        made = captions = per_image(_TEXT["decoder"](token_rows[0]), token_rows[1])
    alt, flat, counts, empty = masked_texts(alt_texts, captions, _TEXT["masking"])
    features = _TEXT["encoder"].features(alt + flat)
    return features, (None, None, counts, empty), made, time.process_time() - cpu


@dataclass
class ShardResult:
    table: object
    stats: dict = field(default_factory=dict)


class ShardScorer:
    """Models loaded once; ``score(shard)`` turns one shard into one table."""

    def __init__(self, config: ScoreConfig):
        from .caption import build_captioner
        from .text import TextEncoder

        self.config = config.resolved()
        cfg = self.config
        self.captioner = build_captioner(cfg.captioner, device=cfg.device, precision=cfg.precision,
                                         decoding=cfg.decoding)
        self.on_gpu = on_gpu = str(cfg.device).startswith("cuda")
        # on a GPU the sentence encoder runs in the captioner's half precision
        self.text_precision = cfg.precision if on_gpu else "fp32"
        self.text = TextEncoder(cfg.text_encoder, device=cfg.device, precision=self.text_precision,
                                batch_size=cfg.text_batch_size or TEXT_BATCH_SIZE)
        #: On a GPU, images are decoded ahead of the models (in the main process, decoding would
        #: starve the GPU): in ``decode_workers`` processes where the captioner's transform allows
        #: (uint8 crops come back and are normalised on the GPU), else in ``decode_threads``
        #: threads. On the CPU the models want every core: 0 and 0, decoding in line.
        cpus = usable_cpus()
        text_workers, self.decode_workers = gpu_processes(cpus) if on_gpu else (0, 0)
        self.decode_threads = min(8, cpus) if on_gpu else 0
        #: On a GPU, a batch's captions are turned into text and scored on a thread while the
        #: model captions the next batch.
        self.overlap_text = on_gpu
        #: On a GPU, a batch is captioned on a thread of its own while this one reads, gathers and
        #: moves the next batch to the device (the sampling loop waits on the device at every
        #: step, with the GIL released): the host's share of each batch overlaps the device's.
        self.overlap_captioning = on_gpu
        #: With the captioning thread on a GPU: each batch is copied to the device, resized and
        #: normalised on a CUDA stream of its own, so that the copy overlaps the captioning of the
        #: batch before instead of queueing behind it. Off: on one H200 it gained 3.9% and 2.6% in two
        #: runs, less than the 4.3% between two runs of one setting (bench/RESULTS.md, 2026-11-28).
        self.input_stream = False
        #: torch's CPU threads in this process while it scores (None: as they are). On a GPU this
        #: process's CPU-side torch work is small, and a pool of one thread per core spins on the
        #: cores the decoding and text processes need. On one H200 (16 cores, 11 decoding and 3 text
        #: processes) its 16 threads used 316 CPU seconds in a 31 s run; one thread in every process
        #: (OMP_NUM_THREADS=1) made runs 1.7x (growing shapes) and 2.0x (CUDA graphs) as fast, one
        #: thread in this process alone 1.25x (bench/RESULTS.md, 2026-11-28).
        self.torch_threads = 1 if on_gpu else None  # the processes it starts: one each (_start_child)
        #: The text half's host work (masking, tokenising) in this many processes of their own
        #: (0: in this process; on GPUs ``gpu_processes``). On a thread it would hold this
        #: process's GIL for about 0.9 ms per image (bench/text_host_cost.py), more than 2,500
        #: images/s leave for everything; split, this process keeps less than half of it.
        self.text_workers = text_workers
        #: With text processes: False (default), they mask and tokenise (and decode the captions,
        #: ``decode_in_text_workers``), and the text encoder runs here on its own CUDA stream (one
        #: CUDA context); True, each runs its own copy of the encoder on the device as well.
        #: Either way the scores are the same.
        self.text_model_in_workers = False
        #: the decoding processes read the images' bytes from the tar themselves where it is a
        #: local, uncompressed file (``shards.ImageExtent``): this process reads only the headers,
        #: alt-texts and json, and sends offsets, not images, through the pipes
        self.image_extents = True
        #: with text processes that only tokenise, they also turn the captioner's token rows into
        #: captions (``BlipCaptioner.decoder``), which come back with the tokens
        self.decode_in_text_workers = True
        #: crops from the decoding processes come back through shared memory (``_CropRing``)
        self.shared_memory = True
        #: with shared memory, the decoding processes send whole decoded images (up to
        #: ``WHOLE_IMAGE_SIDE`` pixels a side) and the resize and crop run on the model's device
        #: (``resample.py``: Pillow's pixels, bit for bit; checked against the installed Pillow
        #: first): a decoding process then does about a third of the work. None: on GPUs.
        self.resize_on_device: bool | None = None
        self._whole = False  # whether the current ring takes whole images
        self._pool = None
        self._ring = None
        self._decode_cpu = 0.0  # CPU seconds the decoding processes spent on this shard
        self._text_pool = None
        self._decoding_there = False  # whether the text processes turn token rows into captions
        self._text_lock = threading.Lock()  # the text threads start the text processes: once
        self.clip = None
        if cfg.clip_model:
            from .clip import ClipScorer

            self.clip = ClipScorer(cfg.clip_model, cfg.clip_pretrained, device=cfg.device)

    def describe(self) -> dict:
        out = {"captioner": getattr(self.captioner, "description", str(self.captioner)),
               "text_encoder": getattr(self.text, "description", self.config.text_encoder)}
        if self.clip is not None:
            out["clip"] = self.clip.description
        return out

    def _prepare(self, sample):
        """(sample, status, error, image, pixels): the image decoded and preprocessed, or why not."""
        if sample.status != "ok":
            return sample, sample.status, sample.error, None, None
        status, error, image = _decode(sample.image, self.config.max_image_pixels)
        if image is None:
            return sample, status, error, None, None
        return sample, "ok", sample.error, image, self.captioner.preprocess(image)  # error: a note (bad UTF-8)

    def _in_processes(self) -> bool:
        """Whether images are decoded in processes: asked for, the captioner's transform can
        send uint8 crops, no CLIP model needs the PIL images, and this process may have children."""
        import multiprocessing

        from .caption import ImageTransform

        return (self.decode_workers > 0 and isinstance(self.captioner.preprocess, ImageTransform)
                and self.clip is None and not multiprocessing.current_process().daemon)

    def image_decoding(self) -> str:
        """Where images are decoded: "processes (N)" (once they ran: "processes (N, how the images
        come back)"), "threads (N)" or "in line"."""
        if self._in_processes():
            if self._pool is None:
                return f"processes ({self.decode_workers})"
            how = "pipes" if self._ring is None else \
                "shared memory, resized on the device" if self._whole else "shared memory"
            return f"processes ({self.decode_workers}, {how})"
        return f"threads ({self.decode_threads})" if self.decode_threads else "in line"

    def _prepared(self, samples):
        """``_prepare`` over ``samples``, in order, with decoding ahead of the models in
        processes or threads (see ``decode_workers``); at most ``4 * batch_size`` samples ahead.
        From processes, ``pixels`` is a uint8 crop (``ImageTransform.to_uint8``) and ``image`` None."""
        from collections import deque

        limit = 4 * self.config.batch_size
        ahead = deque()
        if self._in_processes():
            try:
                for chunk in _chunks(samples, _CHUNK):
                    ahead.append((chunk, *self._submit(chunk, limit)))
                    if len(ahead) * _CHUNK >= limit:
                        yield from self._decoded(*ahead.popleft())
                while ahead:
                    yield from self._decoded(*ahead.popleft())
            finally:  # stopped early (the shard failed): let chunks in flight finish writing their slots
                from concurrent.futures import wait

                wait([f for _, f, _ in ahead if f is not None])
            return
        if not self.decode_threads:
            yield from map(self._prepare, samples)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            for sample in samples:
                ahead.append(pool.submit(self._prepare, sample))
                if len(ahead) >= limit:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def _submit(self, chunk, ahead: int):
        """(future, slots) of a chunk sent to the decoding processes; ``ahead``: how many samples
        may be in flight (the crop ring holds them, a batch being filled and a chunk more)."""
        from concurrent.futures.process import BrokenProcessPool

        images = [s.image for s in chunk if s.status == "ok"]
        if not images:
            return None, None
        transform = self.captioner.preprocess
        if self._pool is None:
            self._pool = _spawn_pool(self.decode_workers)
            if self.shared_memory:
                self._whole = self._resize_here(transform)
                side = max(WHOLE_IMAGE_SIDE, transform.size) if self._whole else transform.size
                self._ring = _CropRing.create(ahead + self.config.batch_size + _CHUNK, (side, side, 3),
                                              least=2 * _CHUNK)
        slots = self._ring.take(len(images)) if self._ring is not None else None
        ring = (self._ring.shm.name, self._ring.shape, slots, self._whole) if slots is not None else None
        try:
            return self._pool.submit(_decode_chunk, images, transform, self.config.max_image_pixels, ring), slots
        except BrokenProcessPool:  # a decoding process died since the last chunk
            raise self._broken("an image-decoding") from None

    def _resize_here(self, transform) -> bool:
        """Whether to resize and crop on the model's device (``resize_on_device``)."""
        from . import resample

        # by default where batches go to a GPU as uint8 (in fp32 they are normalised on the CPU)
        wanted = self.resize_on_device if self.resize_on_device is not None else \
            self.on_gpu and self.config.precision != "fp32"
        if not wanted or transform.resize < transform.size:
            return False
        if resample.matches_pillow(transform, self.config.device if self.on_gpu else "cpu"):
            return True
        log.warning("resizing on the device does not match this Pillow's pixels; decoding processes resize")
        return False

    def _crops(self, pixels, device, pin: bool):
        """uint8 (B, size, size, 3) on ``device`` from slots of the ring (crops, or whole images
        resized and cropped here) and crops that came through a pipe; the slots are given back."""
        import torch

        from . import resample

        transform = self.captioner.preprocess
        size = transform.size
        whole = [i for i, p in enumerate(pixels) if getattr(p, "whole", None)]
        if not whole:
            return self._ring.gather(pixels, size, size, pin).to(device, non_blocking=pin)
        out = torch.empty((len(pixels), size, size, 3), dtype=torch.uint8, device=device)
        rest = [i for i, p in enumerate(pixels) if not getattr(p, "whole", None)]
        if rest:
            out[rest] = self._ring.gather([pixels[i] for i in rest], size, size, pin).to(device, non_blocking=pin)
        sizes = [pixels[i].whole for i in whole]
        images = self._ring.gather([pixels[i] for i in whole], max(h for h, _ in sizes), max(w for _, w in sizes), pin)
        plans = [transform.crop_plan(h, w) for h, w in sizes]
        out[whole] = resample.crop_batch(images.to(device, non_blocking=pin), sizes, plans, size)
        return out

    def _decoded(self, chunk, future, slots):
        cpu, done = self._result(future, "an image-decoding") if future is not None else (0.0, ())
        self._decode_cpu += cpu
        done = iter(done)
        j = 0
        for sample in chunk:
            if sample.status != "ok":
                yield sample, sample.status, sample.error, None, None
                continue
            status, error, pixels = next(done)
            if slots is not None:
                if isinstance(pixels, (str, tuple)):  # IN_RING, or (height, width) of a whole image
                    if isinstance(pixels, tuple):
                        slots[j].whole = pixels
                    pixels = slots[j]
                else:  # not decoded (or sent through the pipe): its slot is free again
                    self._ring.free.append(slots[j])
                j += 1
            yield sample, status, error if status != "ok" else sample.error, None, pixels

    def _input_stream(self):
        """The CUDA stream batches are moved to the device and prepared on (``input_stream``), or
        None."""
        import torch

        if not (self.input_stream and self.on_gpu):
            return None
        if getattr(self, "_in_stream", None) is None:
            self._in_stream = torch.cuda.Stream(device=self.config.device)
        return self._in_stream

    def _text_stream(self):
        """A context running the text encoder on its own CUDA stream when it overlaps captioning."""
        import contextlib

        import torch

        if not (self.overlap_text and self.on_gpu):
            return contextlib.nullcontext()
        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(device=self.config.device)
        return torch.cuda.stream(self._stream)

    def _text_processes(self):
        """The text processes' pool, started by the first text thread that asks."""
        with self._text_lock:
            if self._text_pool is None:
                cfg = self.config
                # without the model, a process only tokenises: its copy stays on the CPU
                device, precision = (cfg.device, self.text_precision) if self._text_model_there() else ("cpu", "fp32")
                # the folder this process loaded (resolved once, said once in the log), else the name
                source = getattr(self.text, "source", None)
                source = source if source and os.path.isdir(str(source)) else cfg.text_encoder
                decoder = self._decoder()
                self._decoding_there = decoder is not None
                self._text_pool = _spawn_pool(self.text_workers, initializer=_start_text_worker, initargs=(
                    source, device, precision, cfg.masking, self.text.batch_size, decoder))
            return self._text_pool

    def _decoder(self):
        """The captioner's token rows -> captions function for the text processes (where they only
        tokenise and the captioner has one), else None: captions are decoded here."""
        decoder = getattr(self.captioner, "decoder", None)
        return decoder() if decoder is not None and self.decode_in_text_workers and not self._text_model_there() \
            else None

    def _text_model_there(self) -> bool:
        """Whether the text processes run the text encoder too (see ``text_model_in_workers``)."""
        return self.text_model_in_workers or not self.text.splits

    def _result(self, future, what: str, text: bool = False):
        """A process pool task's result (``future``: a future, or a function that submits the
        task and returns its future); when a worker process died, its pools are stopped (started
        again for the next shard) and the shard fails with a one-line error. ``text``: a text
        process's task, waited for on a text thread; only the text processes are stopped then
        (the scoring thread may be using the decoding processes and their shared memory)."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return (future() if callable(future) else future).result()
        except BrokenProcessPool:
            raise self._broken(what, text) from None

    def _broken(self, what: str, text: bool = False) -> RuntimeError:
        """Stop the pools a dead worker process broke (see ``_result``); the error to raise."""
        if text:
            with self._text_lock:
                pool, self._text_pool = self._text_pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        else:
            self.close()
        return RuntimeError(f"{what} process died (a crash in a library?); the shard is not written, "
                            "rerun to retry it")

    def close(self) -> None:
        """Stop the decoding and text processes (started again when needed)."""
        for pool in (self._pool, self._text_pool):
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        self._pool = self._text_pool = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def score(self, shard, progress=None) -> ShardResult:
        if not self.torch_threads:
            return self._score(shard, progress)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            return self._score(shard, progress)
        finally:
            torch.set_num_threads(threads)

    def _score(self, shard, progress):
        import contextlib
        import multiprocessing
        from collections import deque

        import numpy as np
        import pyarrow as pa
        import torch

        from .shards import iter_samples
        from .store import schema
        from .text import scores_of, sieve_scores

        cfg = self.config
        t0 = time.time()
        gen = torch.Generator(device="cpu").manual_seed(shard_seed(cfg.seed, shard.stem))
        rows = {k: [] for k in schema(self.clip is not None).names}
        counts: dict = {}
        # text_wait: time the captioning loop waited for text halves running beside it (with the
        # text half on a thread or in processes; in line it is 0 and "text" is on the main path)
        timings = {"read": 0.0, "caption": 0.0, "text": 0.0, "clip": 0.0, "text_wait": 0.0}
        pending: list = []  # (row index, image, pixels, alt-text)

        texts_ahead = deque()  # text halves of earlier batches, running on threads, oldest first
        # text processes: asked for, and this process may have children (a daemon may not)
        text_workers = self.text_workers if not multiprocessing.current_process().daemon else 0
        depth = max(1, text_workers)  # how many may run at once

        def text_half(idx, images, texts, captions):
            t = time.time()
            pool = self._text_processes() if text_workers else None
            model_there = pool is not None and self._text_model_there()
            # text processes that only tokenise turn the token rows into captions too
            there = pool is not None and self._decoding_there and not model_there
            rows = getattr(captions, "token_rows", None) if there else None
            caps = captions() if rows is None else None
            if model_there:
                best, mean, which = self._result(
                    lambda: pool.submit(_score_texts, list(texts), caps), "a text", text=True)
            elif pool is not None:
                if rows is not None:
                    rows = (rows[0].numpy().astype(np.int32), rows[1])
                (batches, order), masked, made, cpu = self._result(
                    lambda: pool.submit(_text_features, list(texts), caps, rows), "a text", text=True)
                text_cpu.append(cpu)
                caps = made if rows is not None else caps
                with self._text_stream():
                    emb = self.text.embed(batches, order)
                best, mean, which = scores_of(emb, masked)
            else:
                with self._text_stream():  # on its own CUDA stream: not queued behind the next batch's captioning
                    best, mean, which = sieve_scores(self.text, list(texts), caps, masking=cfg.masking)
            timings["text"] += time.time() - t
            clip = None
            if self.clip is not None:
                t = time.time()
                clip = self.clip.score(list(images), list(texts))
                timings["clip"] += time.time() - t
            return idx, caps, best, mean, which, clip

        def fill(idx, caps, best, mean, which, clip):
            for j, i in enumerate(idx):
                rows["sieve_score"][i] = float(best[j])
                rows["sieve_mean"][i] = float(mean[j])
                rows["captions"][i] = list(caps[j])
                rows["best_caption"][i] = caps[j][int(which[j])]
                if clip is not None:
                    rows["clip_score"][i] = float(clip[j])
            if progress is not None:
                progress.update(len(idx))

        def drain(keep: int):
            """Fill in the oldest text halves until at most ``keep`` run (the wait is timed)."""
            t = time.time()
            while len(texts_ahead) > keep:
                fill(*texts_ahead.popleft().result())
            timings["text_wait"] += time.time() - t

        def caption(stacked, ready=None):
            t = time.time()
            # the scorer's GPU as this thread's current device (CUDA graphs capture on a stream of it)
            with torch.cuda.device(cfg.device) if self.on_gpu else contextlib.nullcontext():
                if ready is not None:  # the batch was moved and prepared on the input stream
                    here = torch.cuda.current_stream()
                    here.wait_event(ready)
                    if stacked.is_cuda:  # used on this stream: not freed before it is done
                        stacked.record_stream(here)
                captions = self.captioner.start_captions(stacked, cfg.num_captions, generator=gen)
            timings["caption"] += time.time() - t  # only this function's thread writes this key
            return captions

        def to_text(idx, images, texts, captions):
            drain(depth - 1)
            if text_thread is not None:
                texts_ahead.append(text_thread.submit(text_half, idx, images, texts, captions))
            else:
                fill(*text_half(idx, images, texts, captions))

        def handed(then=None):
            """The batch captioning on ``cap_thread``, once done, goes on to its text half; ``then``
            (the next batch) starts captioning first, so the device does not wait for the hand-over."""
            nonlocal captioning
            done = captioning and (*captioning[:3], captioning[3].result())
            captioning = then and (*then[:3], cap_thread.submit(caption, *then[3:]))
            if done:
                to_text(*done)

        def flush():
            nonlocal prep_s
            if not pending:
                return
            idx, images, pixels, texts = zip(*pending)
            pending.clear()
            t = time.time()
            stream = self._input_stream() if cap_thread is not None else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if isinstance(pixels[0], (_Slot, np.ndarray)):  # crops from the decoding processes
                    # on a GPU in half precision, normalised there (4x fewer bytes to move; rounded
                    # to half anyway); in fp32 on the CPU, as the reference
                    to_gpu = self.on_gpu and cfg.precision != "fp32"
                    if self._ring is not None:
                        batch = self._crops(pixels, cfg.device if to_gpu else "cpu", pin=to_gpu)
                    else:
                        batch = torch.from_numpy(np.stack(pixels))
                        if to_gpu:
                            batch = batch.pin_memory().to(cfg.device, non_blocking=True)
                    stacked = self.captioner.preprocess.normalize(batch)
                else:
                    stacked = torch.stack(pixels)
            ready = None
            if stream is not None:  # the captioning waits for this stream's work, not for the host
                ready = torch.cuda.Event()
                ready.record(stream)
            prep_s += time.time() - t
            if cap_thread is not None:
                handed((idx, images, texts, stacked, ready))
            else:
                to_text(idx, images, texts, caption(stacked))

        from concurrent.futures import ThreadPoolExecutor

        overlap = self.overlap_text or text_workers
        text_thread = ThreadPoolExecutor(depth, thread_name_prefix="text") if overlap else None
        # the batch being captioned on its own thread while this one reads and prepares the next
        cap_thread = ThreadPoolExecutor(1, thread_name_prefix="caption") if self.overlap_captioning else None
        captioning = None  # (idx, images, texts, future of the captions function)
        prep_s = 0.0  # gathering, moving and normalising batches (on this thread)
        text_cpu: list = []  # CPU seconds of the text processes' tasks (they tokenise only)
        self._decode_cpu = 0.0
        if self._ring is not None:
            self._ring.reset()  # nothing of an earlier shard is in flight (``_prepared`` waits)
        # decoding processes read the images' bytes from a local tar themselves
        prepared = self._prepared(iter_samples(shard, extents=self.image_extents and self._in_processes()))
        try:
            t = time.time()
            for sample, status, error, image, pixels in prepared:
                i = len(rows["uid"])
                rows["uid"].append(sample.uid)
                rows["key"].append(sample.key)
                for k in ("sieve_score", "sieve_mean", "best_caption", "captions") + (("clip_score",) if self.clip else ()):
                    rows[k].append(None)
                text = sample.text if sample.text is not None else ""
                if status == "ok" and sample.uid is None:
                    status, error = "no_uid", "sample has no uid in its json"
                rows["status"].append(status)
                rows["error"].append(error)
                counts[status] = counts.get(status, 0) + 1
                if status == "ok":
                    pending.append((i, image, pixels, text))
                    if len(pending) >= cfg.batch_size:
                        timings["read"] += time.time() - t
                        flush()
                        t = time.time()
                elif progress is not None:
                    progress.update(1)
            timings["read"] += time.time() - t
            flush()
            if cap_thread is not None:
                handed()
            drain(0)
        except torch.cuda.OutOfMemoryError as e:  # a user can fix this one: say how
            torch.cuda.empty_cache()
            raise RuntimeError(_out_of_memory(cfg, e)) from None
        finally:
            prepared.close()  # now, not when the traceback is freed: chunks in flight end before the next shard
            for pool in (cap_thread, text_thread):
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        timings["caption"] += prep_s
        table = pa.table(rows, schema=schema(self.clip is not None))
        report = getattr(shard, "report", None)
        stats = {
            "shard": shard.stem,
            "tar_bytes": getattr(shard, "size", None),  # a tar of another size is scored again
            "rows": table.num_rows,
            "status": counts,
            "seconds": round(time.time() - t0, 3),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "image_decoding": self.image_decoding(),
        }
        if self._in_processes():
            stats["decoding_processes_cpu_s"] = round(self._decode_cpu, 3)
        if text_cpu:
            stats["text_processes_cpu_s"] = round(sum(text_cpu), 3)
        if report is not None:
            stats["tar"] = report if isinstance(report, dict) else asdict(report)
        return ShardResult(table, stats)


def _out_of_memory(cfg: ScoreConfig, e: BaseException) -> str:
    """One line for a GPU out-of-memory error: what ran out, and the flag that fixes it."""
    detail = ". ".join(first_line(e).split(". ")[:2]).rstrip(".")  # "CUDA out of memory. Tried to allocate 2.00 GiB"
    hint = f"rerun with a smaller --batch_size, e.g. {cfg.batch_size // 2}" if cfg.batch_size > 1 else \
        "the models do not fit this GPU even one image at a time"
    return (f"GPU out of memory ({detail}) with batches of {cfg.batch_size} images x "
            f"{cfg.num_captions} captions on {cfg.device}: {hint}")


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("datacomp-sieve", "torch", "transformers", "sentence-transformers", "open_clip_torch",
                "numpy", "pyarrow", "pillow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def _expected_samples(shard) -> int | None:
    stats = getattr(shard, "stats", None) or {}
    n = stats.get("successes")
    return int(n) if isinstance(n, int) else None


def parse_part(part: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``: the K-th of N parts of the pool, counted from 0 (as Slurm numbers
    the tasks of ``--array=0-M``). Anything else is a ``UserError``."""
    m = re.fullmatch(r"\s*(-?[0-9]+)/(-?[0-9]+)\s*", str(part))
    if not m:
        raise UserError(f"--part takes K/N (part K of N, K from 0 to N-1; e.g. $SLURM_ARRAY_TASK_ID/32 in a "
                        f"job array --array=0-31), got {part!r}")
    k, n = int(m[1]), int(m[2])
    if n < 1:
        raise UserError(f"--part {part}: the number of parts must be at least 1")
    if not 0 <= k < n:
        raise UserError(f"--part {part}: parts are counted from 0, so K must be 0 to {n - 1} (a job array "
                        f"numbered from 1 gives $((SLURM_ARRAY_TASK_ID - 1))/N; a task resubmitted alone has "
                        f"SLURM_ARRAY_TASK_COUNT=1: write N out)")
    return k, n


def part_index(stem: str, n: int) -> int:
    """The part of ``n`` that shard ``stem`` ({:08d}) belongs to: its number modulo ``n``. It depends on
    the shard alone, not on the listing a job happened to see (shards still arriving, gaps), so
    every job of an array agrees, and consecutive shards spread evenly over the parts."""
    return int(stem) % n


def part_of(shards: list, k: int, n: int) -> list:
    """Part ``k`` of ``n`` of the shards: those whose number is ``k`` modulo ``n`` (``part_index``)."""
    return [s for s in shards if part_index(s.stem, n) == k]


def score_pool(shards_dir: str, scores_dir: str, config: ScoreConfig, *, overwrite: bool = False,
               progress: bool = True, scorer: "ShardScorer | None" = None, engine=None,
               part: str | None = None) -> dict:
    """Score every shard not yet in the store (with ``part="K/N"``, those of part K of N:
    ``part_of``); returns the run manifest.

    ``engine`` (``datacomp_sieve.engines``) runs the shards; by default this process does. Resume
    and the configuration check are done here, before any engine runs a shard. Shards that fail
    are listed in the manifest's ``failed``, and ``ShardsFailed`` is raised once the others are done.
    Jobs running other parts may share the store: the manifest counts the score files present
    when the run ends, whoever wrote them.
    """
    from tqdm.auto import tqdm

    from .engines import InProcessEngine
    from .shards import list_shards
    from .store import ScoreStore

    if part is not None:
        k, n = parse_part(part)
        if overwrite:
            raise UserError(f"--overwrite deletes the whole store, the score files of the other parts included: "
                            f"not with --part {part}; run once without --part, or delete {scores_dir}, first")
    shards = list_shards(shards_dir)
    mine = shards if part is None else part_of(shards, k, n)
    store = ScoreStore(scores_dir)
    engine = engine or InProcessEngine(scorer)
    cfg = engine.resolve(config)
    store.check({"config": cfg.identity()}, overwrite)  # before the models load
    opened: list = []  # once open_for has run: with --overwrite, the old store is deleted by then
    with _resume_said(store, mine, part, overwrite, opened):  # Ctrl-C, SIGTERM: what is in the store, how to go on
        by_stem = {s.stem: s for s in shards}
        known = {} if overwrite else _stats_in_store(store, by_stem)[1]
        todo = [s.stem for s in mine if not _scored(s, known)]
        manifest = None if todo else store.manifest()
        if manifest is not None:
            if part is None:
                log.info("all %d shards are already scored in %s: nothing to do", len(shards), scores_dir)
            else:
                log.info("the %d shard(s) of part %s are already scored in %s: nothing to do", len(mine), part,
                         scores_dir)
                _say_parts_to_come(part, sum(v is not None for v in known.values()), len(shards), scores_dir)
            engine.close()
            # the file keeps the last scoring run's details; the caller learns what this one did
            return {**manifest, "run": {"shards_scored": 0, "shards_skipped": len(mine), "shards_failed": 0}}
        of = "" if part is None else f" (part {part}: {len(mine)} of the pool's {len(shards)})"
        log.info("%d of %d shard(s) to score%s", len(todo), len(mine), of)
        t0 = time.time()
        try:  # interrupted while loading too: the engine's processes (a Ray cluster it started) are stopped
            models = engine.start(cfg, n_shards=len(todo))
            load_s = time.time() - t0
            # The captioner's description names its weights (and their sha256); the text encoder's says
            # where the same weights came from (hub or bundled copy), so it goes to the manifest only.
            identity = {"config": cfg.identity(), "captioner": models["captioner"]}
            store.open_for(identity, overwrite=overwrite)
            opened.append(True)
        except BaseException:
            engine.close()
            raise
        if overwrite:  # open_for deleted every score file
            todo = [s.stem for s in shards]
        skipped = len(mine) - len(todo)
        if skipped:
            log.info("resuming: %d of %d shards are already scored in %s", skipped, len(mine), scores_dir)
        for line in models.values():
            log.info("%s", line)
        expected = [_expected_samples(by_stem[s]) for s in todo]
        total = sum(e for e in expected if e is not None) if all(e is not None for e in expected) else None
        t1 = time.time()
        bar = tqdm(total=total, unit="img", desc="scoring", disable=not progress, dynamic_ncols=True)
        try:
            failed = engine.run([by_stem[s] for s in todo], store, bar)
        finally:
            bar.close()
            engine.close()
        # the files this run wrote are read again; those other jobs wrote meanwhile, by _record
        scored = set(todo)
        known = {k: v for k, v in known.items() if k not in scored}
        run = {"shards_scored": len(todo) - len(failed), "shards_skipped": skipped, "shards_failed": len(failed),
               **({"part": part} if part is not None else {}), "model_load_seconds": round(load_s, 3),
               "scoring_seconds": round(time.time() - t1, 3), **engine.info(), **environment()}
        manifest = _record(store, by_stem, {**identity, "models": models}, known, set(todo), failed, run)
        if failed:
            raise ShardsFailed(manifest, failed, len(mine), part)
        if part is not None:
            _say_parts_to_come(part, manifest["shards"], len(shards), scores_dir)
        return manifest


@contextlib.contextmanager
def _resume_said(store, mine: list, part: str | None, overwrite: bool = False, opened: list = ()):
    """An interrupted run (``KeyboardInterrupt``: Ctrl-C, or SIGTERM as ``stopping.Terminated``) says
    in its message how much of what it was to score is in the store and how to go on. ``opened``:
    not empty once the store was opened for this run (with ``overwrite``, emptied by then)."""
    try:
        yield
    except KeyboardInterrupt as e:
        if overwrite and not opened:  # stopped while loading: nothing deleted or written yet
            e.args = (f"{store.url} is as it was (nothing deleted or scored yet); rerun the same command",)
            raise
        try:
            have = len(store.completed() & {s.stem for s in mine})
        except Exception:  # noqa: BLE001 - the store cannot be listed now: the message says less
            have = None
        of = "" if part is None else f" of part {part}"
        done = "" if have is None else f"{have} of the {len(mine)} shard(s){of} are scored in {store.url}; "
        again = ("rerun it without --overwrite to score the rest (finished shards are kept; --overwrite would "
                 "delete them again)" if overwrite else
                 "rerun the same command to score the rest (finished shards are kept)")
        e.args = (f"{done}shards in progress are not written; {again}",)
        raise


def _stats_in_store(store, stems, known: dict | None = None) -> tuple[list, dict]:
    """``(present, known)``: which of ``stems`` have a score file in the store now (listed afresh),
    sorted, and ``known`` (stem -> statistics, None for an unreadable file) with theirs added, read
    only for those it does not hold yet."""
    known = {} if known is None else known
    present = sorted(store.completed() & set(stems))
    known.update(store.stats_of([s for s in present if s not in known]))
    return present, known


def _say_parts_to_come(part: str, present: int, total: int, scores_dir: str) -> None:
    if present < total:
        log.info("part %s is done: %d of the pool's %d shards are in %s; the other parts' shards are still to "
                 "come (a part whose job died is run again)", part, present, total, scores_dir)
    else:
        log.info("part %s is done, and so is the store: all %d shards are in %s", part, total, scores_dir)


def _record(store, pool: dict, identity: dict, known: dict, attempted: set, failed: dict, run: dict) -> dict:
    """Write the store's manifest, counting the score files of ``pool`` (stem -> shard) present now
    that hold their shard's scores (``_scored``: this run's and other jobs'; ``known``: statistics
    already read, by stem, updated here). ``failed``: this run's failures, and the earlier
    manifest's for shards this run did not try (another part's, an earlier run's), both only while
    the shard has no score file (an overlapping job may have scored it meanwhile).

    Jobs of other parts may finish at the same moment: once written, the store is listed again, and
    the manifest written again while it has changed, so that whichever job writes last counts the
    files of all that finished before it. (Two jobs that fail shards and write at the same moment
    can still lose one's failures from the file: its own message says them, and the shard stays
    missing, which ``pool-info --scores_dir`` and a selection's warning show.)"""
    counted, manifest = None, None
    while True:
        present, known = _stats_in_store(store, pool, known)
        if present == counted:
            return manifest
        done = [s for s in present if _scored(pool[s], known, say=False)]
        scored = set(done)
        earlier = (store.manifest() or {}).get("failed") or {}
        errors = {s: e for s, e in earlier.items() if s in pool and s not in attempted}
        errors.update(failed)
        manifest = build_manifest(store, done, identity, {s: known[s] for s in done})
        manifest["failed"] = {s: e for s, e in sorted(errors.items()) if s not in scored}
        manifest["pool_shards"] = len(pool)
        manifest["run"] = run
        store.write_manifest(manifest)
        counted = present


class ShardsFailed(UserError):
    """Some shards failed every attempt; the others are in the store. ``manifest`` says which and why."""

    def __init__(self, manifest: dict, failed: dict, tried: int, part: str | None = None):
        self.manifest = manifest
        names = ", ".join(f"{k} ({v})" for k, v in list(failed.items())[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        of = "" if part is None else f" of part {part}"
        super().__init__(f"{len(failed)} of {tried} shard(s){of} failed: {names}{more}; the other shards are in "
                         f"{manifest['store']} (errors in manifest.json); rerun to retry the failed ones")


def _scored(shard, known: dict, say: bool = True) -> bool:
    """Whether the store's file for this shard holds its scores: there is one, it can be read, and
    it was made from a tar of the size this one has (a tar downloaded again after a truncated
    download, or another pool's shard of the same name, is scored again)."""
    if shard.stem not in known:
        return False
    stats = known[shard.stem]
    if stats is None:
        if say:
            log.warning("shard %s: its score file cannot be read; scoring it again", shard.stem)
        return False
    then = stats.get("tar_bytes")
    if then is not None and shard.size is not None and then != shard.size:
        if say:
            log.warning("shard %s changed since it was scored (%d bytes then, %d now); scoring it again",
                        shard.stem, then, shard.size)
        return False
    return True


def build_manifest(store, stems: list[str], identity: dict, stats: dict | None = None) -> dict:
    """Counts and timings of the whole store, from each shard file's own statistics (``stats``:
    those already read, by stem); shards whose tar was cut short or unreadable are listed in
    ``truncated`` with the reason."""
    counts: dict = {}
    rows = 0
    timings: dict = {}
    tar: dict = {}
    truncated: dict = {}
    stats = stats if stats is not None else store.stats_of(stems)
    for stem in stems:
        st = stats.get(stem) or {}
        if (st.get("tar") or {}).get("truncated"):
            truncated[stem] = st["tar"].get("error") or "truncated"
        rows += st.get("rows", 0)
        for k, v in st.get("status", {}).items():
            counts[k] = counts.get(k, 0) + v
        for k, v in st.get("timings", {}).items():
            timings[k] = round(timings.get(k, 0.0) + v, 3)
        for k, v in (st.get("tar") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tar[k] = tar.get(k, 0) + v
    return {"store": store.url, "shards": len(stems), "rows": rows, "status": counts, "timings": timings,
            "tar": tar, "truncated": truncated, **identity}


def store_progress(scores_dir: str, shards: list) -> dict:
    """How much of a pool (its ``shards``, sorted) a score store holds, from the score files present
    (as a resumed ``score`` would count them: a file that cannot be read, or made from a tar of
    another size, is to be scored again): ``scored`` stems, ``missing`` stems, their earlier
    failures (``failed``: stem -> error, from the manifest), the rows and statuses of the scored
    files, and, when the last run was a ``--part K/N``, the ``parts`` of N that still have shards
    to score."""
    from .metadata import exists
    from .store import CONFIG, ScoreStore

    store = ScoreStore(scores_dir)
    there = exists(store.fs, store.root, "--scores_dir", scores_dir)
    if not there or store.config() is None:
        what = "does not exist" if not there else f"is not a score store (no {CONFIG})"
        raise UserError(f"--scores_dir {scores_dir} {what}")
    stems = [s.stem for s in shards]
    known = _stats_in_store(store, stems)[1]
    scored = [s.stem for s in shards if _scored(s, known)]
    done = set(scored)
    missing = [s for s in stems if s not in done]
    manifest = store.manifest() or {}
    counts = build_manifest(store, scored, {}, {s: known[s] for s in scored})
    left = set(missing)
    out = {"store": scores_dir, "shards": len(stems), "scored": scored, "missing": missing,
           "rows": counts["rows"], "status": counts["status"],
           "failed": {s: e for s, e in (manifest.get("failed") or {}).items() if s in left}}
    last = (manifest.get("run") or {}).get("part")
    if last and missing:
        n = parse_part(last)[1]
        out["parts"] = [f"{k}/{n}" for k in sorted({part_index(s, n) for s in missing})]
    return out
