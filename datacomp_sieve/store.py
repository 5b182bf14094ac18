"""The score store: one parquet file per input shard, written atomically, plus a manifest.

A shard is done when its parquet file exists: files are written under a temporary name and
renamed, so a killed run leaves no partial file, and a rerun skips what is done. The store
remembers the configuration that wrote it (``config.json``) and refuses to mix configurations.
Resume is a property of the store, not of whatever engine runs the shards.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from .errors import UserError, error_line

log = logging.getLogger(__name__)

CONFIG = "config.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


def schema(with_clip: bool):
    import pyarrow as pa

    fields = [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("sieve_score", pa.float32()),
        ("sieve_mean", pa.float32()),
        ("best_caption", pa.string()),
        ("captions", pa.list_(pa.string())),
    ]
    if with_clip:
        fields.append(("clip_score", pa.float32()))
    fields += [("status", pa.string()), ("error", pa.string())]
    return pa.schema(fields)


def differences(old: dict, new: dict, most: int = 4) -> str:
    """The settings that differ, as ``key: old -> new`` (nested keys dotted), the first ``most``."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:most]]
    return "; ".join(shown) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


class ScoreStore:
    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def shard_path(self, stem: str) -> str:
        return self._path(f"{stem}.parquet")

    # -- configuration -------------------------------------------------------------------------
    def check(self, config: dict, overwrite: bool = False) -> None:
        """Refuse, before anything is loaded or written: a file; a folder that is not empty and is not
        a score store (it could be the pool's metadata or shards: never write into or delete from
        it); a store made with settings other than ``config``'s (the keys ``config`` has), unless
        overwriting."""
        self.fs.invalidate_cache(self.root)  # see completed()
        if not self.fs.exists(self.root):
            return
        if not self.fs.isdir(self.root):
            raise UserError(f"--scores_dir {self.url} is a file, not a folder")
        old = self.config()
        if old is None:
            names = sorted(n for n in (os.path.basename(str(p)) for p in self.fs.ls(self.root, detail=False))
                           if not n.startswith(TMP_PREFIX))
            if names:
                raise UserError(f"--scores_dir {self.url} is not a score store (no {CONFIG}) and is not empty "
                                f"({len(names)} entries, e.g. {names[0]}); give a new or empty folder")
            return
        diff = differences({k: old.get(k) for k in config}, config)
        if diff and not overwrite:
            raise UserError(f"{self.url} holds scores made with other settings ({diff}); use another "
                            f"--scores_dir, or --overwrite to delete them and start again")

    def open_for(self, config: dict, overwrite: bool = False) -> "ScoreStore":
        """Prepare the store for a run with ``config``; refuse a different one unless overwriting."""
        self.check(config, overwrite)
        self.fs.makedirs(self.root, exist_ok=True)
        if overwrite:
            for p in self.fs.ls(self.root, detail=False):
                name = os.path.basename(str(p))
                if name.endswith(".parquet") or name in (CONFIG, MANIFEST) or name.startswith(TMP_PREFIX):
                    self.fs.rm(str(p))
        self.clean_tmp()
        with self.fs.open(self._path(CONFIG), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
        return self

    def config(self) -> dict | None:
        p = self._path(CONFIG)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def clean_tmp(self) -> None:
        """Remove what a killed writer left behind."""
        if not self.fs.exists(self.root):
            return
        for p in self.fs.ls(self.root, detail=False):
            if os.path.basename(str(p)).startswith(TMP_PREFIX):
                self.fs.rm(str(p))

    # -- shards --------------------------------------------------------------------------------
    def done(self, stem: str) -> bool:
        return self.fs.exists(self.shard_path(stem))

    def completed(self) -> set[str]:
        # listed afresh: object-store filesystems keep listings, and the workers that write a
        # store's files are other processes (on other machines, with Ray)
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return set()
        names = (os.path.basename(str(p)) for p in self.fs.ls(self.root, detail=False))
        return {n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith(TMP_PREFIX)}

    def write_shard(self, stem: str, table, stats: dict) -> None:
        """Write one shard's rows atomically, with its statistics in the parquet metadata."""
        import pyarrow.parquet as pq

        meta = dict(table.schema.metadata or {})
        meta[b"datacomp_sieve"] = json.dumps(stats, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        tmp = self._path(f"{TMP_PREFIX}{stem}-{uuid.uuid4().hex[:8]}.parquet")
        try:
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self.fs.mv(tmp, self.shard_path(stem))
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def shard_stats(self, stem: str) -> dict:
        from .metadata import parquet_file

        meta = parquet_file(self.fs, self.shard_path(stem)).schema_arrow.metadata
        return json.loads((meta or {}).get(b"datacomp_sieve", b"{}"))

    def stats_of(self, stems: list[str]) -> dict:
        """``shard_stats`` of many shards, read side by side (a footer each: round trips on object
        stores); a file that cannot be read gives ``None``."""
        from .metadata import each

        def read(stem):
            try:
                return self.shard_stats(stem)
            except Exception as e:  # noqa: BLE001 - a broken score file is scored again, not fatal
                log.warning("score file of shard %s cannot be read (%s)", stem, error_line(e))
                return None

        return dict(zip(stems, each(self.fs, read, stems)))

    def read_shard(self, stem: str):
        import pyarrow.parquet as pq

        with self.fs.open(self.shard_path(stem), "rb") as f:
            return pq.read_table(f, use_threads=False)  # see shards.shard_uids

    def gaps(self) -> str | None:
        """A sentence when fewer score files are here than the manifest counts (files moved or
        deleted since): a selection from the store would silently miss those shards' samples."""
        m = self.manifest() or {}
        counted = m.get("shards")
        have = len(self.completed())
        if isinstance(counted, int) and have < counted:
            return (f"the score store {self.url} has {have} score files but its manifest counts {counted} scored "
                    f"shards: the samples of {counted - have} shard(s) are missing from it (moved or deleted?)")
        return None

    def write_manifest(self, manifest: dict) -> None:
        tmp = self._path(f"{TMP_PREFIX}{MANIFEST}")
        with self.fs.open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True, default=str)
        self.fs.mv(tmp, self._path(MANIFEST))

    def manifest(self) -> dict | None:
        p = self._path(MANIFEST)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)
