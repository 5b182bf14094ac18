"""The score store: one parquet file per input shard, written atomically, plus a manifest.

A shard is done when its parquet file exists: files are written under a temporary name and
renamed, so a killed run leaves no partial file, and a rerun skips what is done. The store
remembers the configuration that wrote it (``config.json``) and refuses to mix configurations.
Resume is a property of the store, not of whatever engine runs the shards.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Iterable

from .errors import UserError

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
    def open_for(self, config: dict, overwrite: bool = False) -> "ScoreStore":
        """Prepare the store for a run with ``config``; refuse a different one unless overwriting."""
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise UserError(f"--scores_dir {self.url} is a file, not a folder")
        self.fs.makedirs(self.root, exist_ok=True)
        old = self.config()
        if old is not None and old != config:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise UserError(
                    f"{self.url} holds scores made with other settings ({', '.join(diff)}); use another "
                    f"--scores_dir, or --overwrite to delete them and start again"
                )
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

    def missing(self, stems: Iterable[str]) -> list[str]:
        have = self.completed()
        return [s for s in stems if s not in have]

    def completed(self) -> set[str]:
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
        import pyarrow.parquet as pq

        with self.fs.open(self.shard_path(stem), "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        return json.loads(meta.get(b"datacomp_sieve", b"{}"))

    def read_shard(self, stem: str):
        import pyarrow.parquet as pq

        with self.fs.open(self.shard_path(stem), "rb") as f:
            return pq.read_table(f)

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
