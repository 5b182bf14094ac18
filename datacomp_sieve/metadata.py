"""Columnar tables on disk: a pool's metadata folder and a score store, both folders of parquet.

Both are read the same way: list the ``.parquet`` files of a folder (local path or any fsspec URL)
and stream only the columns a step needs, a record batch at a time, so nothing holds a whole
pool in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .errors import UserError, error_line

# DataComp's metadata columns (SPEC.md section 2).
CLIP_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}


def protocols(fs) -> tuple:
    """An fsspec filesystem's protocol names ("file" for the local disk)."""
    p = getattr(fs, "protocol", ())
    return (p,) if isinstance(p, str) else tuple(p)


def each(fs, fn, items: list) -> list:
    """``[fn(x) for x in items]``, 16 at a time where each read is a round trip (object stores);
    one after another on a local disk, where threads only add cost (on 2 cores: 12,800
    _stats.json 0.3 s in turn, 1.2 s on 16 threads; 12,800 parquet footers 2.0 s, 3.2-5.9 s)."""
    if "file" in protocols(fs) or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(fn, items))


def parquet_file(fs, path: str):
    """``pq.ParquetFile`` of ``path`` on ``fs``: a local file by its path, through pyarrow's own reader
    (about twice as fast as through a Python file object, which pyarrow's threads would also call
    back into: that can abort the interpreter at exit)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path if "file" in protocols(fs) else fs.open(path, "rb"))


def exists(fs, path: str, what: str, url: str) -> bool:
    """``fs.exists(path)``, with a filesystem that cannot be reached (no credentials, a wrong endpoint,
    access denied) said in one line rather than as the client library's traceback."""
    try:
        return fs.exists(path)
    except Exception as e:  # noqa: BLE001 - botocore, gcsfs, network errors: each its own kind
        hint = ("; credentials and the endpoint come from the usual AWS environment (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, an instance role; AWS_ENDPOINT_URL for a store other "
                "than AWS)" if str(url).startswith(("s3://", "s3a://")) else "")
        raise UserError(f"cannot reach {what} {url}: {error_line(e)}{hint}") from None


def open_folder(url: str, what: str, not_a_folder: str = ""):
    """``(fs, root)`` of an existing folder (local path or fsspec URL), listed afresh; one-line errors
    otherwise."""
    import fsspec

    if not url:
        raise UserError(f"no {what} given")
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {what} {url}: {e}") from None
    # object-store filesystems (s3fs, gcsfs) keep the listings they made: what was written since
    # (by another process or machine: a store's workers, a download) must not be missed
    fs.invalidate_cache(root)
    if not exists(fs, root, what, url):
        raise UserError(f"{what} {url} does not exist; check the path")
    if not fs.isdir(root):
        raise UserError(f"{what} {url} is not a folder{'; ' + not_a_folder if not_a_folder else ''}")
    return fs, root


@dataclass(frozen=True)
class _Footer:
    """What selection needs from a file's footer, kept for every file of a folder."""

    groups: tuple  # rows of each row group
    names: tuple
    valued: frozenset  # columns whose statistics do not say every value is null


@dataclass
class ParquetFolder:
    """The parquet files of one folder, opened through fsspec.

    A pool's store has one file per shard (128,000 files for DataComp's large pool), so each
    footer is read once, and :meth:`batches` reads the
    next files on threads while the caller works, joining small files' rows into full batches.
    """

    url: str
    fs: object
    paths: list[str]
    what: str = "folder"
    _footers: list | None = field(default=None, repr=False)

    @classmethod
    def open(cls, url: str, what: str = "folder") -> "ParquetFolder":
        fs, root = open_folder(url, what)
        entries = fs.ls(root, detail=False)
        if not entries:
            raise UserError(f"{what} {url} is empty; point it at the folder that holds the .parquet files")
        paths = sorted(
            str(p) for p in entries
            if str(p).endswith(".parquet") and not str(p).rsplit("/", 1)[-1].startswith((".", "_"))
        )
        if not paths:
            raise UserError(f"{what} {url} has no .parquet files; point it at the folder that holds them")
        return cls(url=url, fs=fs, paths=paths, what=what)

    def _file(self, path: str):
        try:
            return parquet_file(self.fs, path)
        except Exception as e:  # pyarrow raises several kinds for a broken file
            raise UserError(f"cannot read {path}: {e}") from None

    def footers(self) -> list[_Footer]:
        """Every file's footer, in path order (read once; several at a time on object stores)."""
        if self._footers is None:
            seen: dict = {}  # one copy of each schema's names: a folder may hold 128,000 files

            def read(path):
                meta = self._file(path).metadata
                names = tuple(meta.schema.to_arrow_schema().names)
                leaves = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
                valued = set()
                for name in names:
                    j = leaves.get(name)
                    if j is None:  # a nested column: no statistics of its own
                        valued.add(name)
                        continue
                    for g in range(meta.num_row_groups):
                        rg = meta.row_group(g)
                        st = rg.column(j).statistics
                        if st is None or not st.has_null_count or st.null_count < rg.num_rows:
                            valued.add(name)
                            break
                groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
                return _Footer(groups, seen.setdefault(names, names), seen.setdefault(frozenset(valued), frozenset(valued)))

            self._footers = each(self.fs, read, self.paths)
        return self._footers

    def schema_names(self) -> set[str]:
        return set(self.footers()[0].names)

    def num_rows(self) -> int:
        return sum(sum(f.groups) for f in self.footers())

    def require(self, columns: Sequence[str], hint: str = "") -> None:
        """Fail with one line when a column is missing from any file."""
        for p, footer in zip(self.paths, self.footers()):
            missing = [c for c in columns if c not in footer.names]
            if missing:
                msg = f"{p} has no column {', '.join(missing)}"
                raise UserError(f"{msg}; {hint}" if hint else msg)

    def row_groups(self) -> list[tuple[int, int, int]]:
        """``(file index, row group, rows)`` of every row group, in the order :meth:`batches` reads them."""
        return [(i, g, n) for i, f in enumerate(self.footers()) for g, n in enumerate(f.groups)]

    def has_values(self, column: str) -> bool:
        """Whether any row has a non-null value in ``column`` (read from the footers when possible)."""
        return any(column in f.valued for f in self.footers())

    def batches(self, columns: Sequence[str], batch_rows: int = 1 << 20) -> Iterator:
        """Yield pyarrow Tables of the given columns over all files, in file order.

        Row groups are read a few at a time on threads, up to about a batch ahead of the
        caller; the rows of small files are joined into tables of about ``batch_rows`` rows.
        """
        import os
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        columns = list(columns)
        units = [(self.paths[i], g, n) for i, g, n in self.row_groups()]
        ahead = batch_rows

        def read(path, group):
            try:
                return self._file(path).read_row_group(group, columns=columns, use_threads=False).to_batches()
            except (OSError, ValueError) as e:  # pyarrow's errors for a damaged file
                raise UserError(f"cannot read {path}: {e}") from None

        def stream(path, group):  # a row group too big to hold ahead, batch by batch
            try:
                yield from self._file(path).iter_batches(batch_size=batch_rows, row_groups=[group],
                                                         columns=columns, use_threads=False)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {path}: {e}") from None

        pending: list = []
        held = i = queued = 0
        window: deque = deque()

        def fill():  # queue the next row groups, a batch's worth at most
            nonlocal i, queued
            while i < len(units) and units[i][2] <= ahead and queued + units[i][2] <= ahead:
                window.append((units[i][2], pool.submit(read, *units[i][:2])))
                queued += units[i][2]
                i += 1

        with ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 1))) as pool:
            try:
                while i < len(units) or window:
                    fill()
                    if window:
                        n, future = window.popleft()
                        queued -= n
                        fill()  # the next ones are read while this one is used
                        got = future.result()
                    else:
                        got = stream(*units[i][:2])
                        i += 1
                    for b in got:
                        if pending and (b.schema != pending[0].schema or held + len(b) > batch_rows):
                            yield _concat(pending)
                            pending, held = [], 0
                        pending.append(b)
                        held += len(b)
                if pending:
                    yield _concat(pending)
            finally:
                for _, future in window:
                    future.cancel()


def _concat(batches: list):
    """One table of record batches that share a schema (not copied: its columns are chunked)."""
    import pyarrow as pa

    return pa.Table.from_batches(batches)
