"""The score store: one parquet file per input shard, written atomically, plus a manifest.

A shard is done when its parquet file exists: files are written under a temporary name and
renamed, so a killed run leaves no partial file, and a rerun skips what is done. The store
remembers the configuration that wrote it (``config.json``) and refuses to mix configurations.
Resume is a property of the store, not of whatever engine runs the shards. Several jobs may
share a store (``score --part``): every file is written under a temporary name of its writer's own
and renamed, and a job removes only temporary files too old to be another live job's.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
import uuid

from .errors import UserError, error_line

log = logging.getLogger(__name__)

CONFIG = "config.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
#: A temporary file older than this is a leftover of a killed writer; younger, it may be another
#: job's file being written right now (several jobs share a store: ``score --part``), so it is left.
#: A temporary file lives only while one finished shard's parquet (or a JSON file) is written:
#: seconds, minutes on a slow object store. The age, not the writer's host and process id, decides:
#: a process id says nothing about writers on other nodes of a shared filesystem or object store, nor
#: about one in another container of the same host (a pid namespace of its own), and a live writer's
#: file must never be removed. Six hours also leave room for clocks that differ between the nodes and
#: the file server; a leftover meanwhile costs only its bytes (its name is ignored everywhere).
TMP_MAX_AGE_S = 6 * 3600


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
    def check(self, config: dict, overwrite: bool = False) -> dict | None:
        """Refuse, before anything is loaded or written: a file; a folder that is not empty and is not
        a score store (it could be the pool's metadata or shards: never write into or delete from
        it); a store made with settings other than ``config``'s (the keys ``config`` has), unless
        overwriting. Returns the store's configuration (None: no store yet)."""
        from .metadata import exists

        self.fs.invalidate_cache(self.root)  # see completed()
        if not exists(self.fs, self.root, "--scores_dir", self.url):
            return None
        if not self.fs.isdir(self.root):
            raise UserError(f"--scores_dir {self.url} is a file, not a folder")
        old = self.config()
        if old is None:
            names = sorted(n for n in (os.path.basename(str(p)) for p in self.fs.ls(self.root, detail=False))
                           if not n.startswith(TMP_PREFIX))
            if names:
                raise UserError(f"--scores_dir {self.url} is not a score store (no {CONFIG}) and is not empty "
                                f"({len(names)} entries, e.g. {names[0]}); give a new or empty folder")
            return None
        diff = differences({k: old.get(k) for k in config}, config)
        if diff and not overwrite:
            raise UserError(f"{self.url} holds scores made with other settings ({diff}); give the store's "
                            f"settings (e.g. --decoding), use another --scores_dir, or --overwrite to delete them "
                            f"and start again")
        return old

    def open_for(self, config: dict, overwrite: bool = False) -> "ScoreStore":
        """Prepare the store for a run with ``config``; refuse a different one unless overwriting.

        Other jobs may be writing to the store (``score --part``): their temporary files are left,
        and ``config.json`` is written only when it is missing or differs, under a temporary name
        then renamed. Of two jobs creating a store together, the one that finds the other's settings
        there once it has written its own is refused, before it writes any shard (where the
        filesystem creates a file only if absent, atomically: local and shared disks, S3; see
        ``_write_json``)."""
        old = self.check(config, overwrite)
        self.fs.makedirs(self.root, exist_ok=True)
        if overwrite:
            for p in self.fs.ls(self.root, detail=False):
                name = os.path.basename(str(p))
                if name.endswith(".parquet") or name in (CONFIG, MANIFEST) or name.startswith(TMP_PREFIX):
                    self.fs.rm(str(p))
        self.clean_tmp()
        if overwrite or old != config:  # deleted above, missing, or with keys this run does not check
            # a new store's config.json is created, never replaced (on a local or shared disk): of two
            # jobs starting together, the first one's stays and the check below refuses the other
            self._write_json(CONFIG, config, replace=old is not None)
            self.check(config)
        return self

    def config(self) -> dict | None:
        p = self._path(CONFIG)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def clean_tmp(self, max_age_s: float = TMP_MAX_AGE_S) -> None:
        """Remove what killed writers left behind: temporary files older than ``max_age_s`` (see
        ``TMP_MAX_AGE_S``); a file whose age cannot be told is left."""
        if not self.fs.exists(self.root):
            return
        now = time.time()
        for p in self.fs.ls(self.root, detail=False):
            if not os.path.basename(str(p)).startswith(TMP_PREFIX):
                continue
            try:
                when = self.fs.modified(str(p))
                # fsspec's dates are UTC; a date without a zone is taken as UTC, not as local time
                age = now - (when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)).timestamp()
            except Exception:  # noqa: BLE001 - gone meanwhile (renamed by its writer), or no dates here
                continue
            if age > max_age_s:
                log.info("removing %s, left %.1f hours ago by a writer that did not finish", p, age / 3600)
                try:
                    self.fs.rm(str(p))
                except FileNotFoundError:  # another job starting removed it first
                    pass

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
        deleted since), or than the pool it was made from has shards (parts of a job array still to
        come, shards that failed): a selection from the store would silently miss their samples."""
        m = self.manifest() or {}
        counted, pool = m.get("shards"), m.get("pool_shards")
        have = len(self.completed())
        if isinstance(counted, int) and have < counted:
            return (f"the score store {self.url} has {have} score files but its manifest counts {counted} scored "
                    f"shards: the samples of {counted - have} shard(s) are missing from it (moved or deleted?)")
        if isinstance(pool, int) and have < pool:
            return (f"the score store {self.url} has {have} score files of the pool's {pool} shards: the other "
                    f"{pool - have} are not scored yet (parts still running or not run, or failed: see its manifest)")
        return None

    def write_manifest(self, manifest: dict) -> None:
        self._write_json(MANIFEST, manifest)

    def _write_json(self, name: str, obj: dict, replace: bool = True) -> None:
        """Write ``name`` whole or not at all: under a temporary name of this writer's own (jobs
        sharing the store write theirs side by side), then renamed over it. ``replace=False`` leaves
        one that exists, where the filesystem can say so atomically: a hard link on a local or shared
        disk, a conditional write (create if absent) on an object store that has one (S3)."""
        from .metadata import protocols

        data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
        final = self._path(name)
        if not replace and "s3" in protocols(self.fs):
            try:  # one PUT with If-None-Match: whole or not at all (an S3 that ignores it overwrites)
                self.fs.pipe_file(final, data, mode="create")
                return
            except FileExistsError:
                return
            except Exception as e:  # noqa: BLE001 - e.g. a botocore too old for the condition
                log.debug("conditional write of %s failed (%s); writing it by rename", final, error_line(e))
        tmp = self._path(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
        try:
            self.fs.pipe_file(tmp, data)
            if replace or "file" not in protocols(self.fs):
                self.fs.mv(tmp, final)  # without a create-if-absent, the last writer's file stays
            else:
                try:
                    os.link(tmp, final)  # fails where the name exists, never replaces it
                except FileExistsError:
                    pass
                except OSError:  # a filesystem without hard links: renamed
                    self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def manifest(self) -> dict | None:
        """The manifest, or None when there is none or it cannot be read (the next run that scores
        writes it anew from the score files: it holds nothing they do not, but earlier failures)."""
        p = self._path(MANIFEST)
        if not self.fs.exists(p):
            return None
        try:
            with self.fs.open(p, "r") as f:
                m = json.load(f)
        except (ValueError, OSError) as e:
            log.warning("%s cannot be read (%s); it is written anew after the next scoring run", p, error_line(e))
            return None
        return m if isinstance(m, dict) else None
