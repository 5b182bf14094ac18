"""Sample identity: 32-hex uids and DataComp's ``"u8,u8"`` subset files.

DataComp maps a uid to ``(int(uid[:16], 16), int(uid[16:32], 16))`` and stores a subset as a
lexicographically sorted structured array of that dtype, saved with ``np.save``. Its resharder
finds samples with ``np.searchsorted``, so the file must be sorted, and it writes a uid once per
listing, so duplicates must not be emitted.

Internally uids travel as ``(N, 16)`` big-endian bytes viewed as ``V16``: comparing those bytes
is the same as comparing ``(hi, lo)`` numerically, which makes sorting and joining cheap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

UID_DTYPE = np.dtype("u8,u8")
KEY_DTYPE = np.dtype("V16")

_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
# two hex characters, read as one little-endian uint16 -> their byte (0xFFFF when either is not hex)
_first, _second = _NIBBLE.astype(np.uint16)[np.arange(65536) & 255], _NIBBLE.astype(np.uint16)[np.arange(65536) >> 8]
_PAIR = np.where((_first == 255) | (_second == 255), 0xFFFF, (_first << 4) | _second).astype(np.uint16)


def uid_to_pair(uid: str) -> tuple[int, int]:
    """The DataComp integer pair of one uid."""
    return int(uid[:16], 16), int(uid[16:32], 16)


def pair_to_uid(hi: int, lo: int) -> str:
    return f"{int(hi):016x}{int(lo):016x}"


def _hex_matrix_to_keys(chars: np.ndarray, what: str) -> np.ndarray:
    """(N, 32) ascii hex codes -> (N,) V16 keys."""
    packed = _PAIR[np.ascontiguousarray(chars).view("<u2")]
    if packed.size and packed.max() > 255:
        bad = int((packed > 255).any(axis=1).sum())
        raise UserError(f"{bad} uid(s) in {what} are not 32 hexadecimal characters")
    return packed.astype(np.uint8).view(KEY_DTYPE).reshape(-1)


def keys_from_arrow(array, what: str = "the input") -> np.ndarray:
    """Parse a pyarrow string array (or ChunkedArray) of uids into V16 keys without Python loops."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        parts = [keys_from_arrow(c, what) for c in array.chunks]
        return np.concatenate(parts) if parts else np.empty(0, KEY_DTYPE)
    if array.null_count:
        raise UserError(f"{array.null_count} uid(s) in {what} are missing (null)")
    if pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    if not pa.types.is_string(array.type):
        raise UserError(f"the uid column in {what} is {array.type}, expected strings")
    n = len(array)
    if n == 0:
        return np.empty(0, KEY_DTYPE)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=n + 1, offset=array.offset * 4)
    if not np.all(np.diff(offsets) == 32):
        bad = int((np.diff(offsets) != 32).sum())
        raise UserError(f"{bad} uid(s) in {what} are not 32 hexadecimal characters")
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return _hex_matrix_to_keys(data.reshape(n, 32), what)


def keys_from_strings(uids, what: str = "the input") -> np.ndarray:
    """Parse an iterable of uid strings into V16 keys."""
    import pyarrow as pa

    return keys_from_arrow(pa.array(list(uids), type=pa.string()), what)


def keys_to_pairs(keys: np.ndarray) -> np.ndarray:
    """V16 keys -> DataComp's structured ``u8,u8`` array (same order)."""
    raw = keys.view(np.uint8).reshape(-1, 16)
    out = np.empty(len(keys), UID_DTYPE)
    out["f0"] = raw[:, :8].copy().view(">u8").reshape(-1)
    out["f1"] = raw[:, 8:].copy().view(">u8").reshape(-1)
    return out


def pairs_to_keys(pairs: np.ndarray) -> np.ndarray:
    """DataComp's ``u8,u8`` array -> V16 keys (same order)."""
    pairs = np.asarray(pairs)
    names = pairs.dtype.names
    raw = np.empty((len(pairs), 2), dtype=">u8")
    raw[:, 0] = pairs[names[0]]
    raw[:, 1] = pairs[names[1]]
    return raw.view(np.uint8).reshape(-1, 16).copy().view(KEY_DTYPE).reshape(-1)


def keys_to_hex(keys: np.ndarray) -> list[str]:
    return [bytes(k).hex() for k in keys.view(np.uint8).reshape(-1, 16)]


def halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two big-endian halves of V16 keys as native uint64: ordered as the keys are."""
    pairs = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
    return pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64)


def key_order(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """A stable sorting order of keys given as :func:`halves`.

    Numpy compares 16-byte voids one byte at a time; uids are random, so the high halves alone
    order them, and both halves are sorted on only when two high halves tie.
    """
    order = np.argsort(hi)
    s = hi[order]
    if len(s) > 1 and (s[1:] == s[:-1]).any():
        order = np.lexsort((lo, hi))
    return order


def matches(a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(ia, ib)`` of the keys in both of two sorted, distinct key lists given as halves."""
    (ha, la), (hb, lb) = a, b
    if len(ha) > 1 and (ha[1:] == ha[:-1]).any():  # high halves tie: merge on both halves
        h, lo = np.concatenate([ha, hb]), np.concatenate([la, lb])
        src = np.concatenate([np.zeros(len(ha), np.uint8), np.ones(len(hb), np.uint8)])
        idx = np.concatenate([np.arange(len(ha)), np.arange(len(hb))])
        o = np.lexsort((src, lo, h))
        h, lo, idx = h[o], lo[o], idx[o]
        same = (h[1:] == h[:-1]) & (lo[1:] == lo[:-1])
        return idx[:-1][same], idx[1:][same]
    i = np.minimum(np.searchsorted(ha, hb), max(len(ha) - 1, 0))
    found = (ha[i] == hb) & (la[i] == lb) if len(ha) else np.zeros(len(hb), bool)
    return i[found], np.flatnonzero(found)


def sort_unique(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Sorted distinct keys and how many duplicates were dropped."""
    keys = keys[key_order(*halves(keys))]
    if len(keys) < 2:
        return keys, 0
    u8 = keys.view(np.uint8).reshape(-1, 16)
    same = np.all(u8[1:] == u8[:-1], axis=1)
    dups = int(same.sum())
    if dups:
        keep = np.ones(len(keys), bool)
        keep[1:] = ~same
        keys = keys[keep]
    return keys, dups


def subset_path(save_path: str | os.PathLike) -> Path:
    """Where ``np.save(save_path, ...)`` would write: it appends ``.npy`` when missing."""
    p = Path(save_path)
    return p if p.suffix == ".npy" else p.with_name(p.name + ".npy")


class SubsetWriter:
    """Collects kept uids and writes DataComp's sorted, de-duplicated ``u8,u8`` file atomically.

    Up to ``memory_keys`` uids are held in memory; past that they are spilled to 256 partition
    files by their leading byte, and each partition is sorted on its own, so memory stays flat
    however large the subset. The file is byte-identical to ``np.save`` of the sorted array.
    """

    PARTS = 256

    def __init__(self, tmp_dir: str | None = None, memory_keys: int = 8_000_000):
        self.tmp_dir = tmp_dir
        self.memory_keys = memory_keys
        self.buf: list[np.ndarray] = []
        self.nbuf = 0
        self.dir: str | None = None
        self.files: list | None = None

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            self.buf.append(keys)
            self.nbuf += len(keys)
            if self.nbuf >= self.memory_keys:
                self._spill()

    def _spill(self) -> None:
        import tempfile

        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="datacomp-sieve-uids-", dir=self.tmp_dir)
            self.files = [open(os.path.join(self.dir, f"{p:03d}.bin"), "wb") for p in range(self.PARTS)]
        if not self.buf:
            return
        keys = np.concatenate(self.buf)
        self.buf, self.nbuf = [], 0
        part = keys.view(np.uint8).reshape(-1, 16)[:, 0]
        order = np.argsort(part, kind="stable")
        keys, part = keys[order], part[order]
        bounds = np.searchsorted(part, np.arange(self.PARTS + 1))
        for p in range(self.PARTS):
            if bounds[p + 1] > bounds[p]:
                keys[bounds[p] : bounds[p + 1]].tofile(self.files[p])

    def write(self, save_path: str | os.PathLike) -> tuple[Path, int]:
        """Write the file; returns its path and the number of uids in it."""
        import shutil

        path = subset_path(save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        dups = 0
        try:
            if self.dir is None:
                keys = np.concatenate(self.buf) if self.buf else np.empty(0, KEY_DTYPE)
                self.buf = []
                keys, dups = sort_unique(keys)
                parts = [keys]
                total = len(keys)
            else:
                self._spill()
                for f in self.files:
                    f.close()
                total = 0
                for p in range(self.PARTS):
                    f = os.path.join(self.dir, f"{p:03d}.bin")
                    k, d = sort_unique(np.fromfile(f, dtype=KEY_DTYPE))
                    k.tofile(f)
                    dups += d
                    total += len(k)
                parts = None
            header = {"descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False, "shape": (total,)}
            with open(tmp, "wb") as out:
                np.lib.format.write_array_header_1_0(out, header)
                if parts is not None:
                    for k in parts:
                        out.write(keys_to_pairs(k).tobytes())
                else:
                    for p in range(self.PARTS):
                        k = np.fromfile(os.path.join(self.dir, f"{p:03d}.bin"), dtype=KEY_DTYPE)
                        out.write(keys_to_pairs(k).tobytes())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
        if dups:
            log.warning("dropped %d duplicate uid(s): DataComp's resharder would write them twice", dups)
        return path, total


def write_subset(save_path: str | os.PathLike, keys: np.ndarray) -> tuple[Path, int]:
    """Write keys as DataComp's sorted, de-duplicated ``u8,u8`` file, atomically."""
    w = SubsetWriter()
    w.add(keys)
    return w.write(save_path)


def sorted_duplicates(pairs: np.ndarray, what: str) -> int:
    """How many uids a ``u8,u8`` subset lists again after their first listing; a subset that is not in
    ascending order is refused: DataComp's resharder (and this tool) find uids in it by binary
    search, so an unsorted file silently matches almost nothing."""
    if len(pairs) < 2:
        return 0
    hi, lo = pairs[pairs.dtype.names[0]], pairs[pairs.dtype.names[1]]
    same_hi = hi[1:] == hi[:-1]
    ascending = (hi[1:] > hi[:-1]) | (same_hi & (lo[1:] >= lo[:-1]))
    if not bool(np.all(ascending)):
        raise UserError(f"{what} is not sorted: DataComp's resharder (and this tool) find uids by binary "
                        "search; write it with `datacomp-sieve filter` or np.sort it first")
    return int(np.sum(same_hi & (lo[1:] == lo[:-1])))


def read_subset(path: str | os.PathLike) -> np.ndarray:
    """Read a subset file: an ``.npy`` of dtype ``u8,u8`` or a raw memmap of that dtype."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"subset file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        arr = np.load(path, mmap_mode="r")
    else:
        if path.stat().st_size % UID_DTYPE.itemsize:
            raise UserError(f"{path} is neither an .npy file nor a raw u8,u8 memmap (size not a multiple of 16)")
        arr = np.memmap(path, dtype=UID_DTYPE, mode="r")
    if arr.dtype != UID_DTYPE:
        raise UserError(f"{path} has dtype {arr.dtype}, expected DataComp's u8,u8")
    return arr
