"""Reading a pool's downloaded shards: img2dataset's webdataset tars, surviving broken ones.

A shards folder (local path or fsspec URL) holds ``{:08d}.tar`` with ``{:08d}_stats.json`` and
``{:08d}.parquet`` beside each. A tar holds ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per
sample. Samples are streamed with the standard library's tarfile; a tar cut short by a killed
download yields every sample before the break and reports the shard as truncated. Every tar
member is accounted for: in a sample, or counted as stray.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from .errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_NAME = re.compile(r"^(\d+)\.tar$")


@dataclass
class ShardReport:
    """What reading one tar found; filled while iterating."""

    members: int = 0
    samples: int = 0
    stray: int = 0
    truncated: bool = False
    error: str | None = None
    status: dict = field(default_factory=dict)


@dataclass
class Shard:
    stem: str
    url: str
    fs: object = field(repr=False, default=None)
    stats: dict | None = None
    report: ShardReport = field(default_factory=ShardReport)

    @property
    def parquet_url(self) -> str:
        return self.url[: -len(".tar")] + ".parquet"


@dataclass
class Sample:
    key: str
    uid: str | None = None
    image: bytes | None = None
    image_ext: str | None = None
    text: str | None = None
    json: dict | None = None
    status: str = "ok"
    error: str | None = None


class ImageError(Exception):
    """An image that cannot be used; ``code`` is the status stored for its sample."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def list_shards(shards_dir: str) -> list[Shard]:
    """The ``{:08d}.tar`` shards of a folder, in order, with their ``_stats.json`` when present."""
    import fsspec

    if not shards_dir:
        raise UserError("no shards folder given")
    fs, root = fsspec.core.url_to_fs(shards_dir)
    if not fs.exists(root):
        raise UserError(f"shards folder {shards_dir} does not exist")
    if not fs.isdir(root):
        raise UserError(f"shards folder {shards_dir} is not a folder")
    names = {str(p).rstrip("/").rsplit("/", 1)[-1]: str(p) for p in fs.ls(root, detail=False)}
    tars = sorted((n for n in names if SHARD_NAME.match(n)), key=lambda n: (len(n), n))
    if not tars:
        raise UserError(f"shards folder {shards_dir} has no {{:08d}}.tar shards")
    shards = []
    for n in tars:
        stem = n[: -len(".tar")]
        stats = None
        sp = names.get(f"{stem}_stats.json")
        if sp is not None:
            try:
                with fs.open(sp, "r") as f:
                    stats = json.load(f)
            except (ValueError, OSError):
                stats = None  # a broken stats file: the tar itself is the truth
        shards.append(Shard(stem=stem, url=names[n], fs=fs, stats=stats))
    return shards


def _split(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    k, dot, ext = base.partition(".")
    return (f"{d}/{k}" if d else k), (ext.lower() if dot else "")


def _finish(key: str, parts: dict, report: ShardReport) -> Sample:
    s = Sample(key=key)
    problems = []
    for ext, data in parts.items():
        if ext in IMAGE_EXTS and s.image is None:
            s.image, s.image_ext = data, ext
        elif ext == "txt":
            try:
                s.text = data.decode("utf-8")
            except UnicodeDecodeError:
                s.text = data.decode("utf-8", errors="replace")
                problems.append(("bad_text", "alt-text is not valid UTF-8 (undecodable bytes replaced)"))
        elif ext == "json":
            try:
                s.json = json.loads(data.decode("utf-8", errors="replace"))
                if not isinstance(s.json, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                s.json = None
                problems.append(("bad_json", f"json is not readable: {e}"))
        else:
            report.stray += 1  # another member of the sample (e.g. .cls): counted, not used
    if s.json is not None:
        uid = s.json.get("uid")
        s.uid = uid if isinstance(uid, str) and uid else None
        if s.uid is None:
            problems.append(("no_uid", "json has no uid"))
    elif "json" not in parts:
        problems.append(("no_uid", "sample has no json (so no uid)"))
    if s.image is None:
        problems.append(("no_image", "sample has no image member"))
    elif not s.image:
        problems.append(("empty_image", "image member is empty (0 bytes)"))
    if "txt" not in parts:
        s.text = None
        problems.append(("no_text", "sample has no alt-text (.txt)"))
    # the problem that makes the sample unusable first; a text problem alone still scores
    order = ["no_image", "empty_image", "bad_json", "no_uid", "no_text", "bad_text"]
    problems.sort(key=lambda p: order.index(p[0]))
    if problems:
        s.status, s.error = problems[0]
        if s.status == "bad_text":
            s.status = "ok"  # scored with the replaced text; the error says what happened
    report.samples += 1
    report.status[s.status] = report.status.get(s.status, 0) + 1
    return s


def iter_samples(shard: Shard) -> Iterator[Sample]:
    """Every sample of a shard's tar, in order; stops cleanly at a truncation and says so."""
    report = shard.report = ShardReport()
    fs = shard.fs
    if fs is None:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(shard.url)
    key, parts = None, {}
    try:
        with fs.open(shard.url, "rb") as raw:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    report.members += 1
                    if not member.isfile():
                        report.stray += 1
                        continue
                    k, ext = _split(member.name)
                    if k != key:
                        if key is not None:
                            yield _finish(key, parts, report)
                        key, parts = k, {}
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is cut short")
                    if ext in parts:
                        report.stray += 1  # a repeated member: the first one counts
                    else:
                        parts[ext] = data
    except (tarfile.ReadError, EOFError, OSError) as e:
        report.truncated = True
        report.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        whole = key is not None and "json" in parts and "txt" in parts and any(e in parts for e in IMAGE_EXTS)
        if whole:
            yield _finish(key, parts, report)  # every member img2dataset writes is there
            key = None
        if key is not None:
            # the last sample lost members to the break: report it, never silently
            report.status["truncated"] = report.status.get("truncated", 0) + 1
            report.samples += 1
            yield Sample(key=key, uid=_uid_of(parts), status="truncated",
                         error=f"the tar ends inside or right after this sample ({report.error})")
            key = None
    if key is not None:
        yield _finish(key, parts, report)
    expected = (shard.stats or {}).get("successes")
    if not report.truncated and isinstance(expected, int) and report.samples < expected:
        # a tar cut exactly between members still reads as a complete archive
        report.truncated = True
        report.error = f"the tar has {report.samples} samples; its _stats.json says {expected} were written"


def _uid_of(parts: dict) -> str | None:
    try:
        uid = json.loads(parts["json"].decode("utf-8")).get("uid")
        return uid if isinstance(uid, str) and uid else None
    except (KeyError, ValueError, AttributeError):
        return None


def decode_image(data: bytes, max_pixels: int | None = 89_478_485):
    """Bytes -> an RGB PIL image; raises ImageError with a status code and reason.

    Grayscale, palette and CMYK images are converted; transparency is composited on white.
    Images over ``max_pixels`` are refused before decoding (decompression bombs).
    """
    import warnings

    from PIL import Image

    if not data:
        raise ImageError("empty_image", "image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if max_pixels and w * h > max_pixels:
                raise ImageError("too_large", f"image is {w}x{h} = {w * h} pixels, over the {max_pixels} limit")
            im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from None
    except OSError as e:  # PIL: unidentified image, truncated file, broken data stream
        msg = str(e)
        code = "truncated_image" if "truncated" in msg.lower() else "not_an_image"
        raise ImageError(code, msg) from None
    except (ValueError, SyntaxError) as e:
        raise ImageError("not_an_image", str(e)) from None
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im


def shard_uids(shard: Shard) -> dict | None:
    """uid -> img2dataset status from the parquet beside the tar (failed downloads included), or None."""
    import pyarrow.parquet as pq

    fs = shard.fs
    try:
        if not fs.exists(shard.parquet_url):
            return None
        with fs.open(shard.parquet_url, "rb") as f:
            t = pq.read_table(f, columns=["uid", "status"]).to_pydict()
    except Exception:  # a missing column or a broken file: no fast path
        return None
    return dict(zip(t["uid"], t["status"]))


def coverage(metadata_dir: str, shards_dir: str) -> dict:
    """How the metadata and the downloaded shards match up, by uid.

    Metadata rows without a downloaded sample are normal (failed downloads, typically 6-15%);
    downloaded samples without a metadata row are not. Uids are held as 16-byte keys, so a
    128M-row pool needs about 2 GB here.
    """
    import numpy as np

    from .metadata import ParquetFolder
    from .uids import keys_from_arrow, keys_from_strings

    meta = ParquetFolder.open(metadata_dir, "metadata folder")
    meta.require(["uid"])
    mkeys = np.concatenate([keys_from_arrow(b.column(0).drop_null(), meta.what) for b in meta.batches(["uid"])])
    skeys, from_tars, truncated = [], 0, []
    for shard in list_shards(shards_dir):
        statuses = shard_uids(shard)
        if statuses is not None:
            uids = [u for u, st in statuses.items() if st == "success" and u]
        else:  # no img2dataset parquet beside the tar: read the tar itself
            from_tars += 1
            uids = [s.uid for s in iter_samples(shard) if s.uid]
            if shard.report.truncated:
                truncated.append(shard.stem)
        skeys.append(keys_from_strings(uids, shard.url))
    skeys = np.concatenate(skeys) if skeys else np.empty(0, mkeys.dtype)
    mkeys, skeys = np.unique(mkeys), np.unique(skeys)
    both = np.intersect1d(mkeys, skeys, assume_unique=True)
    return {"metadata_rows": int(len(mkeys)), "downloaded": int(len(skeys)), "matched": int(len(both)),
            "metadata_without_sample": int(len(mkeys) - len(both)),
            "samples_without_metadata": int(len(skeys) - len(both)),
            "shards_read_from_tar": from_tars, "truncated_shards": truncated}
