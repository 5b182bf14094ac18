"""The native resharder: DataComp's ``resharder.py`` contract, without DataComp's environment.

``reshard(shards_dir, subset, output_dir)`` reads a pool's ``{:08d}.tar`` shards and writes the
samples whose uid is in the subset file to new shards:

- the subset is DataComp's ``u8,u8`` file (``.npy`` or raw memmap); it must be sorted, as
  DataComp's resharder assumes (it finds uids with ``searchsorted``); an unsorted file is refused.
- every listed uid that is found is written once (DataComp writes a uid listed k times k times;
  here duplicates in the file are counted and written once);
- uids listed but not in the shards are counted (``not_found``: normally failed downloads, the
  same number DataComp's "N images in the subset were not found in the input!" gives);
- the output folder is created when missing and must be empty unless ``overwrite`` (DataComp
  requires it to exist and be empty);
- the output is DataComp's: ``{:08d}.tar`` of at most ``shard_size`` samples with
  ``{:08d}_stats.json`` (``{"successes": n}``) beside each, ``sample_ids.npy`` (a copy of the
  subset file) and ``meta.json`` (``output_count``, ``output_shard_count``,
  ``output_shard_format`` as DataComp's train.py reads them, and the counts above).

A sample's members are its image (its own extension), ``.txt`` and ``.json``; its key is
``{uid}-0`` (DataComp's ``{uid}-{j}``). Samples that cannot be used (truncated, no image, no
alt-text, no uid: see ``shards.py``) are not written; those whose uid is in the subset are
counted under ``unusable``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..uids import sorted_duplicates

log = logging.getLogger(__name__)

OUTPUT_SHARD_FORMAT = "{:08d}.tar"
OUTPUT_STATS_FORMAT = "{:08d}_stats.json"


class _UidSet:
    """Membership in a sorted ``u8,u8`` subset: hi words searched, lo words compared."""

    def __init__(self, pairs: np.ndarray, what: str):
        self.hi = np.ascontiguousarray(pairs[pairs.dtype.names[0]], dtype=np.uint64)
        self.lo = np.ascontiguousarray(pairs[pairs.dtype.names[1]], dtype=np.uint64)
        self.duplicates = sorted_duplicates(pairs, what)
        self.unique = len(pairs) - self.duplicates

    def __contains__(self, uid: str) -> bool:
        hi, lo = int(uid[:16], 16), int(uid[16:32], 16)
        a = np.searchsorted(self.hi, np.uint64(hi), "left")
        b = np.searchsorted(self.hi, np.uint64(hi), "right")
        return bool(np.any(self.lo[a:b] == np.uint64(lo)))


def check_output_is_not_input(output_dir: str | os.PathLike, shards_dir: str | os.PathLike,
                              subset_file: str | os.PathLike | None = None) -> None:
    """Refuse an output folder that is, or holds, the input: emptying it (--overwrite) would delete the pool."""
    out = Path(output_dir).expanduser().resolve()
    for flag, p in (("--shards_dir", shards_dir), ("--subset", subset_file)):
        if p is None:
            continue
        p = Path(p).expanduser().resolve()
        if p == out or out in p.parents:
            raise UserError(f"--output_dir {output_dir} {'is' if p == out else 'contains'} {flag} {p}: resharding "
                            "would write over (with --overwrite, delete) its input; give a folder outside it")


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, what: str = "--output_dir") -> Path:
    """Create the folder, or check that it is empty (DataComp's resharder refuses a non-empty one)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{what} {out} is not empty: DataComp's resharder refuses a non-empty output folder; "
                            "give an empty one, or pass --overwrite to delete its contents")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


class _ShardWriter:
    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.shards = 0

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            (self.out / OUTPUT_STATS_FORMAT.format(self.shards - 1)).write_text(json.dumps({"successes": self.count}))
            self.tar = None

    def write(self, key: str, members: dict) -> None:
        if self.tar is None or self.count >= self.shard_size:
            self._close()
            self.tar = tarfile.open(self.out / OUTPUT_SHARD_FORMAT.format(self.shards), "w")
            self.shards += 1
            self.count = 0
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o444
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._close()


def reshard(shards_dir: str, subset_file: str, output_dir: str, shard_size: int = 10000,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Write the subset's samples to new shards; returns the counts written to ``meta.json``."""
    from tqdm import tqdm

    from ..shards import list_shards, iter_samples
    from ..uids import read_subset

    if shard_size < 1:
        raise UserError(f"--shard_size must be at least 1, got {shard_size}")
    pairs = read_subset(subset_file)
    wanted = _UidSet(pairs, f"subset file {subset_file}")
    shards = list_shards(shards_dir)
    check_output_is_not_input(output_dir, shards_dir, subset_file)
    out = prepare_output_dir(output_dir, overwrite)
    if wanted.duplicates:
        log.warning("the subset lists %d uid(s) more than once; each is written once (DataComp's resharder "
                    "would write it once per listing)", wanted.duplicates)
    shutil.copyfile(subset_file, out / "sample_ids.npy")
    total = sum(int((s.stats or {}).get("successes") or 0) for s in shards) or None
    writer = _ShardWriter(out, shard_size)
    processed, written, unusable, seen = 0, 0, {}, set()
    truncated = []
    bar = tqdm(total=total, unit="sample", desc="reshard", disable=not progress, smoothing=0)
    try:
        for shard in shards:
            for s in iter_samples(shard):
                processed += 1
                bar.update(1)
                if s.uid is None or s.uid.lower() not in wanted or s.uid.lower() in seen:
                    continue
                uid = s.uid.lower()
                if not s.ok:
                    unusable[s.status] = unusable.get(s.status, 0) + 1
                    continue
                seen.add(uid)
                writer.write(f"{uid}-0", {s.image_ext: s.image, "txt": s.text.encode("utf-8"),
                                          "json": json.dumps(s.json).encode("utf-8")})
                written += 1
            if shard.report.truncated:
                truncated.append(shard.stem)
                log.warning("shard %s is truncated (%s); the samples before the break were read",
                            shard.stem, shard.report.error)
    finally:
        writer.close()
        bar.close()
    not_found = wanted.unique - written
    meta = {
        "backend": "datacomp-sieve native resharder",
        "input_dir": str(shards_dir), "output_dir": str(out), "subset_file": str(subset_file),
        "shard_size": shard_size, "output_shard_format": OUTPUT_SHARD_FORMAT,
        "output_shard_stats_format": OUTPUT_STATS_FORMAT,
        "processed_count": processed, "output_count": written, "output_shard_count": writer.shards,
        "subset_count": int(len(pairs)), "subset_duplicates": wanted.duplicates,
        "not_found": not_found - sum(unusable.values()), "unusable": unusable,
        "truncated_shards": truncated, "cwd": os.getcwd(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if meta["not_found"]:
        log.warning("%d images in the subset were not found in the input! (failed downloads are expected)",
                    meta["not_found"])
    log.info("wrote %d samples into %d shard(s) in %s", written, writer.shards, out)
    return meta
