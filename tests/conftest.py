"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def toy_pool(tmp_path_factory):
    """A toy DataComp pool (datacomp_sieve.toy_pool) with tiny-random-CLIP score columns.

    Built once per session (~10-15 s). Layout: metadata/, shards/, pool_manifest.json;
    ``datacomp_sieve.toy_pool.rows_by_uid(path)`` gives each uid's photo, category and text.
    """
    from datacomp_sieve.toy_pool import build_toy_pool

    out = tmp_path_factory.mktemp("toy_pool") / "pool"
    build_toy_pool(out, clip="tiny", progress=False)
    return out


@pytest.fixture(scope="session")
def toy_pool_noclip(tmp_path_factory):
    """The same toy pool with both CLIP columns null (clip="none"); ~6 s."""
    from datacomp_sieve.toy_pool import build_toy_pool

    out = tmp_path_factory.mktemp("toy_pool_noclip") / "pool"
    build_toy_pool(out, clip="none", progress=False)
    return out


@pytest.fixture
def footer_reads(monkeypatch):
    """Counts, by folder URL, how many times a run reads a parquet folder's footers."""
    from collections import Counter

    from datacomp_sieve.metadata import ParquetFolder

    reads = Counter()
    real = ParquetFolder.footers

    def counted(self):
        if self._footers is None:
            reads[str(self.url)] += 1
        return real(self)

    monkeypatch.setattr(ParquetFolder, "footers", counted)
    return reads
