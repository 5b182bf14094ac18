"""Columnar tables on disk: a pool's metadata folder and a score store, both folders of parquet.

Both are read the same way: list the ``.parquet`` files of a folder (local path or any fsspec URL)
and stream only the columns a step needs, a record batch at a time, so nothing holds a whole
pool in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from .errors import UserError

# DataComp's metadata columns (SPEC.md section 2).
CLIP_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}


def open_folder(url: str, what: str, not_a_folder: str = ""):
    """``(fs, root)`` of an existing folder (local path or fsspec URL); one-line errors otherwise."""
    import fsspec

    if not url:
        raise UserError(f"no {what} given")
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {what} {url}: {e}") from None
    if not fs.exists(root):
        raise UserError(f"{what} {url} does not exist; check the path")
    if not fs.isdir(root):
        raise UserError(f"{what} {url} is not a folder{'; ' + not_a_folder if not_a_folder else ''}")
    return fs, root


@dataclass
class ParquetFolder:
    """The parquet files of one folder, opened through fsspec."""

    url: str
    fs: object
    paths: list[str]
    what: str = "folder"

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
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.fs.open(path, "rb"))
        except Exception as e:  # pyarrow raises several kinds for a broken file
            raise UserError(f"cannot read {path}: {e}") from None

    def schema_names(self) -> set[str]:
        return set(self._file(self.paths[0]).schema_arrow.names)

    def num_rows(self) -> int:
        return sum(self._file(p).metadata.num_rows for p in self.paths)

    def require(self, columns: Sequence[str], hint: str = "") -> None:
        """Fail with one line when a column is missing from any file."""
        for p in self.paths:
            names = set(self._file(p).schema_arrow.names)
            missing = [c for c in columns if c not in names]
            if missing:
                msg = f"{p} has no column {', '.join(missing)}"
                raise UserError(f"{msg}; {hint}" if hint else msg)

    def has_values(self, column: str) -> bool:
        """Whether any row has a non-null value in ``column`` (read from the footers when possible)."""
        for p in self.paths:
            f = self._file(p)
            if column not in f.schema_arrow.names:
                continue
            idx = f.schema_arrow.names.index(column)
            for g in range(f.metadata.num_row_groups):
                rg = f.metadata.row_group(g)
                st = rg.column(idx).statistics
                if st is None or not st.has_null_count or st.null_count < rg.num_rows:
                    return True
        return False

    def batches(self, columns: Sequence[str], batch_rows: int = 1 << 20) -> Iterator:
        """Yield pyarrow RecordBatches of the given columns over all files, in file order."""
        for p in self.paths:
            f = self._file(p)
            yield from f.iter_batches(batch_size=batch_rows, columns=list(columns))
