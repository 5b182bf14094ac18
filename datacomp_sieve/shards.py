"""Reading a pool's downloaded shards: img2dataset's webdataset tars, surviving broken ones.

A shards folder (local path or any fsspec URL) holds ``{:08d}.tar`` with ``{:08d}_stats.json``
and ``{:08d}.parquet`` beside each (SPEC.md section 2). A tar holds ``KEY.jpg``, ``KEY.json``
and ``KEY.txt`` per sample (webdataset writes a sample's members together, extensions sorted).
One shard is one unit of work for the scorer, which writes one score file per shard.

- ``list_shards(dir)``: the shards, sorted by number, each with its ``_stats.json`` when present.
- ``iter_samples(shard)``: streams the tar (one member in memory at a time) and groups members by
  key, webdataset's way: the key is the member's path up to the first dot of its file name. Plain
  regular-file members (what img2dataset writes, each after a pax header that only sets its
  time) are read by a few lines of header parsing, about four times faster than ``tarfile`` (the
  scorer reads on the thread that feeds the GPU); from the first header that is anything else
  (end-of-archive block, another pax or a GNU long-name header, a compressed tar, a break) the
  standard library's ``tarfile`` reads the rest. Each ``Sample`` carries a ``status`` ("ok" or a
  problem code) and a human ``error``; while iterating, ``shard.report`` (a ``ShardReport``)
  counts members, samples, strays and statuses, and says whether the tar was cut short.
  With ``extents=True`` (the scorer's decoding processes), the image members of a local,
  uncompressed tar are not read: ``Sample.image`` is an ``ImageExtent`` (path, offset, size) and
  the process that decodes the image reads its bytes, so they are neither copied nor pickled here.
- ``decode_image(bytes)``: an RGB PIL image, or an ``ImageError`` whose ``code`` is a status.
- ``shard_uids(shard)``: uid -> img2dataset status from the parquet beside the tar (fast path).
- ``coverage(metadata_dir, shards_dir)`` / ``compare_uids(...)``: metadata rows vs downloads.

Sample statuses (``Sample.status``), first problem wins, ``error`` lists every problem found:

    ok            usable (a non-UTF-8 alt-text is decoded with U+FFFD replacements and the
                  sample stays "ok"; ``error`` says so)
    truncated     the tar broke inside this sample (see below)
    no_image      no image member (jpg, jpeg, png, webp, ...)
    empty_image   the image member has 0 bytes
    bad_json      the .json member is not a JSON object
    no_uid        no .json member at all, or a json without a "uid" (``error`` says which)
    bad_uid       the json's uid is not 32 hexadecimal characters (``uid`` is then None, so
                  nothing downstream parses it; the raw value is in ``error``)
    no_text       no .txt member

Broken tars (a killed download: "unexpected end of data"). Every complete sample before the
break is yielded, the shard's report says ``truncated`` with the reason, and reading stops
cleanly. The sample the break cut is never yielded half-formed as "ok": it is yielded once with
status "truncated" (its intact fields filled in, so its uid can be logged), and counted. A
break inside a member's data always truncates that member's sample; a break at a member
boundary keeps the last sample as complete only when it has img2dataset's three members
(image, json, txt). A tar that ends without its end-of-archive marker, that ends inside a
header, or that has a corrupt header, is reported the same way, as is one with fewer samples
than its ``_stats.json`` "successes". A zero-byte tar is an empty truncated shard. Errors of
the filesystem itself (``OSError``: a vanished file, a network failure) are raised, not taken
for truncation, so that an engine retries the shard instead of storing a partial result.

Accounting: every tar member read is either in a sample (``in_samples``: a member that filled
a sample's image, json or txt, or the member the break cut) or ``stray`` (not a regular file,
an extension the reader does not use, or a repeat of one its sample already has):
``members == in_samples + stray`` always.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from .errors import UserError
from .metadata import each, parquet_file, protocols

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_NAME = re.compile(r"^(\d+)\.tar$")
UID_RE = re.compile(r"^[0-9a-fA-F]{32}$")
# img2dataset writes these three per sample; a group that has them survives a break after it.
_COMPLETE = ("json", "txt")
# The first problem in this order is the sample's status.
STATUS_ORDER = ("truncated", "no_image", "empty_image", "bad_json", "no_uid", "bad_uid", "no_text")
#: PIL's own default for ``Image.MAX_IMAGE_PIXELS`` (about 9459 x 9459 pixels).
MAX_IMAGE_PIXELS = 89_478_485
_STRAY_EXAMPLES = 5


# --------------------------------------------------------------------------------------------
# data types


@dataclass
class ShardReport:
    """What reading one tar found; filled while ``iter_samples`` runs, complete when it ends.

    ``members == in_samples + stray``; ``samples == sum(status.values())``.
    """

    members: int = 0          # tar members read (headers; pax/GNU long-name records excluded)
    in_samples: int = 0       # members that went into a yielded sample
    stray: int = 0            # members no sample uses
    samples: int = 0          # samples yielded (every status)
    status: dict = field(default_factory=dict)  # status -> samples
    truncated: bool = False   # the tar is cut short or corrupt: samples after the break are lost
    error: str | None = None  # why it is truncated
    expected: int | None = None  # "successes" in the shard's _stats.json, when known
    stray_examples: list = field(default_factory=list)  # a few stray member names

    def reconciles(self) -> bool:
        """Every member is accounted for and every sample has one status."""
        return self.members == self.in_samples + self.stray and self.samples == sum(self.status.values())


@dataclass
class Shard:
    """One ``{:08d}.tar`` of a shards folder (a unit of work). Picklable (the fs travels along)."""

    stem: str                      # "00000003"
    url: str                       # the tar: a local path, or a URL with its protocol
    fs: object = field(repr=False, default=None)
    stats: dict | None = None      # the parsed {stem}_stats.json, or None
    report: ShardReport = field(default_factory=ShardReport)  # filled by iter_samples
    path: str | None = None        # the tar's path inside ``fs``
    size: int | None = None        # the tar's size in bytes, from the listing
    parquet: str | None = None     # path (inside ``fs``) of {stem}.parquet when listed
    stats_error: str | None = None  # why {stem}_stats.json could not be read, when it exists

    @property
    def parquet_url(self) -> str:
        """Where img2dataset's ``{stem}.parquet`` is (or would be), inside ``fs``."""
        if self.parquet is not None:
            return self.parquet
        return (self.path or self.url)[: -len(".tar")] + ".parquet"

    @property
    def number(self) -> int:
        return int(self.stem)


@dataclass
class Sample:
    """One sample of a tar: its members grouped by key. ``status`` is "ok" or a problem code."""

    key: str
    uid: str | None = None
    image: bytes | None = None     # the encoded image, not decoded (see ``decode_image``); or an ``ImageExtent``
    image_ext: str | None = None   # "jpg", "png", ...
    text: str | None = None        # the alt-text (.txt)
    json: dict | None = None       # img2dataset's per-sample metadata
    status: str = "ok"
    error: str | None = None       # the reasons, "; "-joined; may be set when status is "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class ImageExtent:
    """Where an image member's bytes lie in a local, uncompressed tar (``iter_samples(...,
    extents=True)`` skips them); ``read()`` reads them. Its length is the member's size."""

    path: str
    offset: int
    size: int
    version: tuple = ()  # the tar's (inode, mtime) when it was read: a rewritten tar is opened again

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        with _OPEN_LOCK:  # (a descriptor is closed only under the lock)
            data = os.pread(_open_shard(self.path, self.version), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.path} is shorter than when it was read ({len(data)} of {self.size} bytes at "
                          f"byte {self.offset}): was the shard rewritten while it was scored?")
        return data


_OPEN: dict = {}  # in a process reading extents: the last few tars' file descriptors
_OPEN_LOCK = threading.Lock()


def _open_shard(path: str, version: tuple) -> int:
    """A read-only file descriptor of ``path`` as it was at ``version``, kept open for the next
    images of the same tar (opening a file per image costs a round trip on network filesystems)."""
    key = (path, version)
    fd = _OPEN.pop(key, None)
    if fd is None:
        while len(_OPEN) >= 4:
            os.close(_OPEN.pop(next(iter(_OPEN))))
        fd = os.open(path, os.O_RDONLY)
    _OPEN[key] = fd  # the most recently used last
    return fd


class ImageError(Exception):
    """An image that cannot be used; ``code`` is the status the scorer stores for its sample."""

    code = "bad_image"

    def __init__(self, code_or_message: str, message: str | None = None):
        # ImageError(message) on the subclasses, ImageError(code, message) on the base class
        if message is None:
            super().__init__(code_or_message)
        else:
            super().__init__(message)
            self.code = code_or_message

    def __reduce__(self):  # keep the code across processes (engines send errors back)
        return type(self), (self.code, str(self))


class EmptyImage(ImageError):
    code = "empty_image"


class NotAnImage(ImageError):
    """PIL cannot identify the bytes as any image format (an HTML error page, say)."""

    code = "not_an_image"


class TruncatedImage(ImageError):
    code = "truncated_image"


class CorruptImage(ImageError):
    code = "corrupt_image"


class ImageTooLarge(ImageError):
    """More pixels than the cap: refused before decoding (decompression bombs)."""

    code = "too_large"


class UnsupportedImage(ImageError):
    """Decoded, but in a mode that has no sound conversion to RGB (LAB, say)."""

    code = "unsupported_image"


# --------------------------------------------------------------------------------------------
# listing


def _basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def list_shards(shards_dir: str) -> list[Shard]:
    """The ``{:08d}.tar`` shards of a folder, sorted by number, with ``_stats.json`` when present.

    Raises ``UserError`` when the folder is missing, is not a folder, or has no numbered tars.
    Only the folder itself is listed (img2dataset writes a flat folder).
    """
    from .metadata import open_folder

    fs, root = open_folder(shards_dir, "shards folder", "give the folder that holds the .tar shards")
    entries = {}
    for info in fs.ls(root, detail=True):
        entries[_basename(info["name"])] = info
    tars = sorted((n for n in entries if SHARD_NAME.match(n) and entries[n].get("type") != "directory"),
                  key=lambda n: (int(n[: -len(".tar")]), n))
    if not tars:
        other = sorted(n for n in entries if n.endswith(".tar"))
        hint = ""
        if other:
            hint = f" ({len(other)} other .tar file(s), e.g. {other[0]}: shards are named like 00000000.tar)"
        elif entries.get("shards", {}).get("type") == "directory":
            hint = f"; it has a shards/ folder: did you mean {shards_dir.rstrip('/')}/shards?"
        raise UserError(f"shards folder {shards_dir} has no {{:08d}}.tar shards{hint}")
    local = "file" in protocols(fs)

    def read_stats(n):
        """(stats, why they cannot be read) of the tar named ``n``."""
        sinfo = entries.get(f"{n[: -len('.tar')]}_stats.json")
        if sinfo is None:
            return None, None
        try:
            with fs.open(sinfo["name"], "rb") as f:
                stats = json.loads(f.read().decode("utf-8"))
            if not isinstance(stats, dict):
                raise ValueError("not a JSON object")
            return stats, None
        except (ValueError, OSError) as e:  # a broken stats file: the tar itself is the truth
            return None, f"{type(e).__name__}: {e}"

    shards = []
    for n, (stats, stats_error) in zip(tars, each(fs, read_stats, tars)):
        stem = n[: -len(".tar")]
        path = entries[n]["name"]
        if stats_error is not None:
            log.warning("shard %s: cannot read %s_stats.json (%s); ignoring it", stem, stem, stats_error)
        pinfo = entries.get(f"{stem}.parquet")
        size = entries[n].get("size")
        shards.append(Shard(stem=stem, url=path if local else fs.unstrip_protocol(path), fs=fs, stats=stats,
                            path=path, size=int(size) if size is not None else None,
                            parquet=pinfo["name"] if pinfo is not None else None, stats_error=stats_error))
    return shards


def _fs_path(shard: Shard):
    if shard.fs is not None:
        return shard.fs, shard.path or shard.url
    import fsspec

    return fsspec.core.url_to_fs(shard.url)


def _successes(stats) -> int | None:
    n = (stats or {}).get("successes")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


# --------------------------------------------------------------------------------------------
# reading a tar


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: key = the path up to the first dot of the file name; the rest
    (lower-cased) is the extension. ``"a/b.c.jpg" -> ("a/b", "c.jpg")``."""
    d, _, base = name.rpartition("/")
    k, dot, ext = base.partition(".")
    return (f"{d}/{k}" if d else k), (ext.lower() if dot else "")


class _ProbedTarInfo(tarfile.TarInfo):
    """Remembers, on the TarFile, why reading the last header failed.

    ``tarfile`` ends the member list silently on an end-of-archive block, but also on a missing,
    cut or corrupt header; the recorded error tells those apart. (``tarinfo=`` and
    ``TarInfo.fromtarfile`` are documented hooks of ``tarfile``.)
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            info = super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.sieve_header_error = e
            raise
        tarfile_.sieve_header_error = None
        return info


_BLOCK = 512
_NO_PREFIX = bytes(155)


def _unsigned_checksum(header: bytes) -> int:
    """A tar header's unsigned checksum: its bytes summed with the checksum field as 8 spaces.
    The byte sums come from zlib's adler32, whose low half is 1 + the sum modulo 65521: exact for
    256 bytes (at most 65,280), and a few times faster than ``sum`` over the bytes."""
    halves = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    return 256 + halves - sum(header[148:156])


def _plain_file(header: bytes, types: bytes = b"0\0"):
    """(name, size) when a tar header is a regular file's in the common ustar layout (octal
    numbers, a right unsigned checksum, no name prefix), else None: the rest is tarfile's.
    ``types``: the type flags taken (b"x": a pax extended header's)."""
    if len(header) != _BLOCK or header[156] not in types or header[257:262] != b"ustar" \
            or header[345:500] != _NO_PREFIX:
        return None
    try:
        size = int(header[124:136].rstrip(b" \0"), 8)
        checksum = int(header[148:156].rstrip(b" \0"), 8)
    except ValueError:
        return None
    name = header[:100].split(b"\0", 1)[0]
    if checksum != _unsigned_checksum(header) or not name or name.endswith(b"/"):
        return None
    return name.decode(tarfile.ENCODING, "surrogateescape"), size


_PAX_TIME = re.compile(rb"(\d+) ([amc]time)=(-?\d+(?:\.\d+)?)\n")


def _times_only(records: bytes) -> bool:
    """Whether pax records, well formed, set nothing but times (mtime, atime, ctime): what
    Python's tarfile writes before each member when its mtime is a float (img2dataset's tars,
    through webdataset). Times are all they would change, and nothing here reads them."""
    pos = 0
    while pos < len(records):
        m = _PAX_TIME.match(records, pos)
        if m is None or int(m.group(1)) != m.end() - pos:
            return False
        pos = m.end()
    return pos > 0


def _plain_members(raw, extents=None):
    """(name, data) of the tar's members for as long as they are plain regular files whose data
    is all there, each perhaps after a pax header that only sets times; then returns (offset,
    bytes read from there) for tarfile to go on from. ``extents``: (the tar's local path, its
    size, its version): an image member's data is skipped and comes as an ``ImageExtent``."""
    offset = 0
    while True:
        header = raw.read(_BLOCK)
        member = _plain_file(header)
        if member is None:
            pax = _plain_file(header, b"x")
            if pax is None or pax[1] > 8 * _BLOCK:
                return offset, header
            records = raw.read(pax[1] + -pax[1] % _BLOCK)
            if not _times_only(records[:pax[1]]):
                return offset, header + records
            header += records
            after = raw.read(_BLOCK)
            header += after
            member = _plain_file(after)
            if member is None:
                return offset, header
        name, size = member
        pad = -size % _BLOCK
        start = offset + len(header)  # the member's data
        end = start + size + pad
        if extents is not None and size and end <= extents[1] and split_key(name)[1] in IMAGE_EXTS:
            raw.seek(end)
            yield name, ImageExtent(extents[0], start, size, extents[2])
            offset = end
            continue
        data = raw.read(size)
        padding = raw.read(pad) if pad else b""
        if len(data) < size or len(padding) < pad:
            return offset, header + data + padding
        yield name, data
        offset = end


class _Rest(io.RawIOBase):
    """The bytes ``_plain_members`` read last, then the rest of the file: tarfile's input."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(n)
        if n < 0:
            out, self.head = self.head + self.raw.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + self.raw.read(n - len(out)) if len(out) < n else out


def _header_error(header: bytes):
    """tarfile's complaint about a header block (a ``HeaderError``: the end-of-archive block, an
    empty, cut or corrupt header), or None when it reads. Asked where the plain reader stops, so
    that a tar ending there is reported as when tarfile read it all (tarfile treats a bad first
    header differently from a later one)."""
    try:
        tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return e
    return None


def _end_problem(err, offset) -> str | None:
    """Why a member list that ended without an exception is not a proper end, or None."""
    name = type(err).__name__ if err is not None else None
    at = f" at byte {offset}" if offset is not None else ""
    if name in (None, "EOFHeaderError"):
        return None  # the end-of-archive block
    if name == "EmptyHeaderError":
        return f"the tar ends{at} without its end-of-archive marker (cut between members)"
    if name == "TruncatedHeaderError":
        return f"the tar ends{at} inside a member header"
    if name == "InvalidHeaderError":
        return f"corrupt tar header{at} ({err}); the rest of the tar is unreadable"
    return f"reading stopped{at}: {err}"


class _Group:
    """The members of one key while they are read."""

    __slots__ = ("key", "parts", "used")

    def __init__(self, key: str):
        self.key = key
        self.parts: dict = {}  # ext -> bytes (first image ext, txt, json)
        self.used = 0

    def add(self, ext: str, data: bytes, name: str, report: ShardReport) -> None:
        image = ext in IMAGE_EXTS
        if (image and any(e in self.parts for e in IMAGE_EXTS)) or ext in self.parts \
                or not (image or ext in ("txt", "json")):
            _stray(report, name)  # an unused extension, a second image, a repeated member
            return
        self.parts[ext] = data
        self.used += 1

    def complete(self) -> bool:
        return all(e in self.parts for e in _COMPLETE) and any(e in self.parts for e in IMAGE_EXTS)


def _stray(report: ShardReport, name: str) -> None:
    report.stray += 1
    if len(report.stray_examples) < _STRAY_EXAMPLES:
        report.stray_examples.append(name)


def _build(key: str, parts: dict) -> tuple[Sample, list]:
    """A sample from its members, and its problems as (status, reason) pairs."""
    s = Sample(key=key)
    problems: list = []
    for ext in IMAGE_EXTS:
        if ext in parts:
            s.image, s.image_ext = parts[ext], ext
            break
    if s.image is None:
        problems.append(("no_image", "sample has no image member"))
    elif not s.image:
        problems.append(("empty_image", f"image member {key}.{s.image_ext} is empty (0 bytes)"))
    if "txt" in parts:
        try:
            s.text = parts["txt"].decode("utf-8")
        except UnicodeDecodeError:
            s.text = parts["txt"].decode("utf-8", errors="replace")
            problems.append(("ok", "alt-text is not valid UTF-8 (undecodable bytes replaced by U+FFFD)"))
    else:
        problems.append(("no_text", "sample has no alt-text (.txt member)"))
    if "json" in parts:
        try:
            obj = json.loads(parts["json"].decode("utf-8", errors="replace"))
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
            s.json = obj
        except ValueError as e:
            problems.append(("bad_json", f"json member is not readable: {e}"))
        else:
            uid = obj.get("uid")
            if uid is None or uid == "":
                problems.append(("no_uid", "json has no uid"))
            elif not isinstance(uid, str) or not UID_RE.match(uid):
                problems.append(("bad_uid", f"json uid {uid!r} is not 32 hexadecimal characters"))
            else:
                s.uid = uid
    else:
        problems.append(("no_uid", "sample has no json member (so no uid)"))
    return s, problems


def _finish(group: _Group, report: ShardReport, truncated: str | None = None, cut: int = 0) -> Sample:
    s, problems = _build(group.key, group.parts)
    if truncated is not None:
        problems.append(("truncated", truncated))
    bad = sorted((p for p in problems if p[0] != "ok"), key=lambda p: STATUS_ORDER.index(p[0]))
    s.status = bad[0][0] if bad else "ok"
    reasons = [r for _, r in bad] + [r for c, r in problems if c == "ok"]
    s.error = "; ".join(reasons) if reasons else None
    report.samples += 1
    report.in_samples += group.used + cut
    report.status[s.status] = report.status.get(s.status, 0) + 1
    return s


def iter_samples(shard: Shard, extents: bool = False) -> Iterator[Sample]:
    """Every sample of a shard's tar, in tar order; stops cleanly at a break and says so.

    ``shard.report`` is replaced by a fresh ``ShardReport`` and is complete once the iterator
    is exhausted. Raises ``OSError`` for filesystem failures (see the module docstring).
    ``extents``: where the tar is a local file, the images of its plain members are not read:
    ``Sample.image`` is an ``ImageExtent`` (samples, statuses and the report are the same).
    """
    report = shard.report = ShardReport(expected=_successes(shard.stats))
    fs, path = _fs_path(shard)
    local = None
    if extents:
        if "file" in protocols(fs):
            where = os.path.abspath(fs._strip_protocol(path))
            with contextlib.suppress(OSError):
                st = os.stat(where)
                local = (where, st.st_size, (st.st_ino, st.st_mtime_ns))
    group: _Group | None = None
    cut: str | None = None  # the member whose data was being read
    problem: str | None = None

    def begin(key: str):
        """The group of a file member with this key; returns the sample it finishes, if any."""
        nonlocal group
        done = None
        if group is not None and key != group.key:
            if group.used:
                done = _finish(group, report)
            group = None
        if group is None:
            group = _Group(key)
        return done

    def with_tarfile(fileobj, mode: str, offset: int):
        """The rest of the tar read by tarfile (its offsets count from ``offset``)."""
        nonlocal cut, problem
        with tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_ProbedTarInfo) as tar:
            while True:
                member = tar.next()
                tar.members = []  # stream mode would otherwise keep every header in memory
                if member is None:
                    at = getattr(tar, "offset", None)
                    problem = _end_problem(getattr(tar, "sieve_header_error", None), None if at is None else offset + at)
                    return
                report.members += 1
                if not member.isfile():
                    _stray(report, member.name)
                    continue
                key, ext = split_key(member.name)
                done = begin(key)
                if done is not None:
                    yield done
                cut = member.name
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                cut = None
                group.add(ext, data, member.name, report)

    try:
        # a local tar read with extents: without fsspec's wrapper around every read
        with (open(local[0], "rb") if local else fs.open(path, "rb")) as raw:
            if local and hasattr(os, "posix_fadvise"):
                # this process reads only the headers and the decoding processes the images, out
                # of order: ask the kernel to read the whole tar ahead, as one sequential reader would
                with contextlib.suppress(OSError):
                    os.posix_fadvise(raw.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            plain = _plain_members(raw, local)
            while True:
                try:
                    name, data = next(plain)
                except StopIteration as stop:
                    offset, head = stop.value
                    break
                report.members += 1
                key, ext = split_key(name)
                done = begin(key)
                if done is not None:
                    yield done
                group.add(ext, data, name, report)
            err = _header_error(head[:_BLOCK]) if offset else None
            if err is not None:  # the end-of-archive block, or a break, where the plain members end
                problem = _end_problem(err, offset)
            else:  # tarfile from the first header the plain reader left (a compressed tar: from 0)
                yield from with_tarfile(_Rest(head, raw), "r|*" if offset == 0 else "r|", offset)
    except (tarfile.TarError, EOFError) as e:  # zlib errors come as ReadError
        msg = str(e) or type(e).__name__
        if report.members == 0 and (shard.size == 0 or msg == "empty file"):
            problem = "the tar is empty (0 bytes)"
        elif cut is not None:
            problem = f"{msg} (inside member {cut}, member #{report.members})"
        else:
            problem = f"{msg} (after {report.members} member(s))"
    if problem is not None:
        report.truncated = True
        report.error = problem
    if group is not None and (group.used or cut is not None):
        if cut is not None:  # the break cut one of this sample's members
            yield _finish(group, report, f"the tar breaks inside this sample's member {cut} ({problem})", cut=1)
        elif problem is not None and not group.complete():
            yield _finish(group, report, f"the tar breaks right after this sample, which lacks members ({problem})")
        else:
            yield _finish(group, report)
    if report.expected is not None and report.samples < report.expected:
        short = f"{report.samples} samples read; its _stats.json says {report.expected} were written"
        report.truncated = True
        report.error = f"{report.error}; {short}" if report.error else f"the tar is short: {short}"
    if report.truncated:
        log.warning("shard %s is truncated: %s; %d sample(s) read", shard.stem, report.error, report.samples)


def scan_shard(shard: Shard) -> ShardReport:
    """Read a whole shard for its report only (statuses, strays, truncation)."""
    for _ in iter_samples(shard):
        pass
    return shard.report


def read_samples(shard: Shard, keys) -> dict[str, Sample]:
    """The samples of the given keys only (key -> ``Sample``), for showing a few of a shard.

    The tar is opened for random access: its headers are walked and the other members' data is
    skipped with seeks, so a few samples of a 10,000-sample shard cost a few kB of reads each,
    not the whole tar. Reading stops once every key was passed. Keys not in the tar are absent
    from the result; a broken tar ends the search at the break (what was found is returned).
    Samples are built as ``iter_samples`` builds them (same fields, status and reasons).
    """
    want = set(keys)
    found: dict[str, Sample] = {}
    if not want:
        return found
    fs, path = _fs_path(shard)
    report = ShardReport()  # a scratch report: only the samples matter here
    group: _Group | None = None
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            while True:
                member = tar.next()
                tar.members = []
                if member is None:
                    break
                key, ext = split_key(member.name) if member.isfile() else (None, "")
                if group is not None and key != group.key:
                    found[group.key] = _finish(group, report)
                    group = None
                    if len(found) == len(want):
                        break
                if key not in want:
                    continue
                if group is None:
                    group = _Group(key)
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                group.add(ext, data, member.name, report)
    except (tarfile.TarError, EOFError) as e:
        log.warning("shard %s: reading stopped early (%s); %d of %d sample(s) found",
                    shard.stem, str(e) or type(e).__name__, len(found), len(want))
        group = None  # the break may have cut it
    if group is not None:
        found[group.key] = _finish(group, report)
    return found


# --------------------------------------------------------------------------------------------
# images


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS):
    """Encoded bytes -> an RGB PIL image, or an ``ImageError`` subclass saying why not.

    Grayscale, 16-bit grayscale, bilevel, palette and CMYK images are converted to RGB;
    transparency (alpha, palette or tRNS) is composited on white. Images with more than
    ``max_pixels`` pixels are refused from their header, before decoding (``None`` or 0: no cap
    of ours; PIL still refuses over 2 x ``Image.MAX_IMAGE_PIXELS``, so a cap above that needs
    ``Image.MAX_IMAGE_PIXELS`` raised). EXIF orientation is not applied (img2dataset already
    decoded and re-encoded the images; the reference Sieve and open_clip do not apply it).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise EmptyImage("image is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e)) from None
        except UnidentifiedImageError:
            raise NotAnImage(f"not an image PIL can identify (first bytes {bytes(data[:16])!r})") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
            raise _load_error(e, "header") from None
        w, h = im.size
        if max_pixels and w * h > max_pixels:
            raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels} pixel limit")
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e)) from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
            raise _load_error(e, f"{im.format} data") from None
    try:
        return _to_rgb(im)
    except (ValueError, OSError) as e:
        raise UnsupportedImage(f"cannot convert a {im.mode} image to RGB: {e}") from None


def _load_error(e: Exception, where: str) -> ImageError:
    msg = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "truncat" in msg.lower() or "end of" in msg.lower():
        return TruncatedImage(f"image is truncated ({msg})")
    return CorruptImage(f"image {where} is corrupt ({msg})")


def _to_rgb(im):
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grayscale: scale to 8 bits
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


# --------------------------------------------------------------------------------------------
# uids: the parquet fast path and metadata coverage


def shard_uids(shard: Shard) -> dict | None:
    """uid -> img2dataset status ("success", "failed_to_download", ...) from ``{stem}.parquet``.

    That parquet lists every row img2dataset tried for the shard, failed downloads included,
    so this is much faster than reading the tar. None when there is no parquet (or it lacks
    uid/status or cannot be read: read the tar then). It trusts the parquet: a tar truncated
    after img2dataset finished is not detected here (see ``coverage``).
    """
    fs, _ = _fs_path(shard)
    path = shard.parquet
    if path is None:
        if shard.fs is not None and shard.path is not None:
            return None  # listed, and the listing had no parquet
        path = shard.parquet_url
        if not fs.exists(path):
            return None
    try:
        # ParquetFile, not read_table, whose dataset layer doubles the cost; one thread: pyarrow reading
        # a Python file object on its thread pool can abort the interpreter at exit
        t = parquet_file(fs, path).read(columns=["uid", "status"], use_threads=False)
        missing = sorted({"uid", "status"} - set(t.column_names))
        if missing:
            raise ValueError(f"no {' or '.join(missing)} column")
        t = t.to_pydict()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds; a missing column too
        log.warning("shard %s: cannot use %s (%s); reading the tar instead", shard.stem, path, e)
        return None
    return {u: st for u, st in zip(t["uid"], t["status"]) if u is not None}


def _size_problem(shard: Shard) -> str | None:
    """A cheap look at a tar's size: tars are whole 512-byte blocks, and never empty."""
    if shard.size is None:
        return None
    if shard.size == 0:
        return "the tar is empty (0 bytes)"
    if shard.size % 512:
        return f"the tar's size {shard.size} is not a whole number of 512-byte blocks"
    return None


def compare_uids(metadata_uids, downloaded_uids) -> dict:
    """Counts for two uid collections: iterables of 32-hex strings, or ``uids`` V16 key arrays.

    Metadata rows without a download are normal (failed downloads, typically 6-15% of a pool);
    downloads without a metadata row are not (wrong folders, or a different pool).
    """
    import numpy as np

    from .uids import KEY_DTYPE, keys_from_strings

    def keys(x, what):
        if isinstance(x, np.ndarray) and x.dtype == KEY_DTYPE:
            return x
        return keys_from_strings(x, what)

    m, s = keys(metadata_uids, "the metadata"), keys(downloaded_uids, "the shards")
    mu, su = np.unique(m), np.unique(s)
    both = np.intersect1d(mu, su, assume_unique=True)
    return {"metadata_rows": int(len(mu)), "downloaded": int(len(su)), "matched": int(len(both)),
            "metadata_without_sample": int(len(mu) - len(both)),
            "samples_without_metadata": int(len(su) - len(both)),
            "duplicate_metadata_uids": int(len(m) - len(mu)), "duplicate_samples": int(len(s) - len(su))}


def coverage(metadata_dir: str, shards_dir: str, shards: list | None = None) -> dict:
    """How a pool's metadata and its downloaded shards match up, by uid (``compare_uids``).

    Downloaded uids come from each shard's img2dataset parquet (rows with status "success") or,
    without one, from reading the tar (every sample with a uid, except one the break cut). A
    shard whose tar size is impossible (0 bytes, not whole 512-byte blocks) or that reads as
    truncated is listed in ``truncated_shards``. Uids are held as 16-byte keys: about 2 GB per
    128M rows on each side, so a large pool needs this run per part of the pool. ``shards``: the
    folder's ``list_shards``, when the caller has it already.
    """
    import numpy as np

    from .metadata import ParquetFolder
    from .uids import KEY_DTYPE, keys_from_arrow, keys_from_strings

    meta = ParquetFolder.open(metadata_dir, "metadata folder")
    meta.require(["uid"])
    parts = [keys_from_arrow(b.column(0).drop_null(), meta.what) for b in meta.batches(["uid"])]
    mkeys = np.concatenate(parts) if parts else np.empty(0, KEY_DTYPE)

    def downloaded(shard):
        """(uid keys, whether read from the tar, whether truncated) of one shard."""
        statuses = shard_uids(shard)
        if statuses is not None:
            uids = [u for u, st in statuses.items() if st == "success" and u]
            cut = _size_problem(shard) is not None
        else:  # no img2dataset parquet beside the tar: read the tar itself
            uids = [s.uid for s in iter_samples(shard) if s.uid and s.status != "truncated"]
            cut = shard.report.truncated
        return keys_from_strings(uids, shard.url), statuses is None, cut

    shards = list_shards(shards_dir) if shards is None else shards
    found = each(shards[0].fs, downloaded, shards)
    skeys = [k for k, _, _ in found]
    from_tars = sum(t for _, t, _ in found)
    truncated = [s.stem for s, (_, _, cut) in zip(shards, found) if cut]
    out = compare_uids(mkeys, np.concatenate(skeys) if skeys else np.empty(0, KEY_DTYPE))
    out.update(shards_read_from_tar=from_tars, truncated_shards=truncated)
    return out
