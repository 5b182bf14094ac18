import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from datacomp_sieve.errors import UserError
from datacomp_sieve.uids import (
    UID_DTYPE, keys_from_arrow, keys_from_strings, keys_to_hex, keys_to_pairs, pairs_to_keys,
    read_subset, sort_unique, uid_to_pair, write_subset,
)

hex_uid = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)


@settings(max_examples=50, deadline=None)
@given(st.lists(hex_uid, min_size=0, max_size=40))
def test_keys_match_datacomp_int_parsing(uids):
    pairs = keys_to_pairs(keys_from_strings(uids))
    assert pairs.dtype == UID_DTYPE
    assert [tuple(map(int, p)) for p in pairs] == [uid_to_pair(u) for u in uids]
    assert keys_to_hex(pairs_to_keys(pairs)) == uids


@settings(max_examples=50, deadline=None)
@given(st.lists(hex_uid, min_size=0, max_size=60))
def test_sorted_keys_are_datacomp_sorted_pairs(uids):
    # DataComp sorts the structured array lexicographically; sorting our keys must agree.
    keys, dups = sort_unique(keys_from_strings(uids))
    expected = np.unique(np.array([uid_to_pair(u) for u in uids], UID_DTYPE))
    assert np.array_equal(keys_to_pairs(keys), expected)
    assert dups == len(uids) - len(set(uids))


def test_uppercase_and_sliced_arrow_arrays():
    uids = ["00000000000000010000000000000002", "FFFFFFFFFFFFFFFFffffffffffffffff", "0123456789abcdef0123456789ABCDEF"]
    arr = pa.array(["x" * 32] + uids).slice(1)
    pairs = keys_to_pairs(keys_from_arrow(arr))
    assert [tuple(map(int, p)) for p in pairs] == [uid_to_pair(u) for u in uids]
    chunked = pa.chunked_array([pa.array(uids[:1]), pa.array(uids[1:])])
    assert np.array_equal(keys_from_arrow(chunked), keys_from_arrow(pa.array(uids)))


@pytest.mark.parametrize("bad", ["abc", "g" * 32, "0" * 33])
def test_bad_uids_are_user_errors(bad):
    with pytest.raises(UserError, match="32 hexadecimal"):
        keys_from_strings(["0" * 32, bad])


def test_null_uid_is_user_error():
    with pytest.raises(UserError, match="missing"):
        keys_from_arrow(pa.array(["0" * 32, None]))


@pytest.mark.parametrize("spread", [4, 256])  # 4: high halves tie, and duplicates
def test_key_order_and_matches_agree_with_numpy_s_byte_order(spread):
    from datacomp_sieve.uids import halves, key_order, matches

    rng = np.random.default_rng(spread)
    keys = rng.integers(0, spread, size=(5000, 16), dtype=np.uint8).view("V16").reshape(-1)
    assert np.array_equal(key_order(*halves(keys)), np.argsort(keys, kind="stable"))
    small, dups = sort_unique(keys)
    assert np.array_equal(small, np.unique(keys)) and dups == len(keys) - len(np.unique(keys))
    a, b = np.unique(keys[:3000]), np.unique(keys[2000:])
    _, ia, ib = np.intersect1d(a, b, assume_unique=True, return_indices=True)
    got = matches(halves(a), halves(b))
    assert len(ia) > 100 and np.array_equal(got[0], ia) and np.array_equal(got[1], ib)
    assert [len(x) for x in matches(halves(a[:0]), halves(b))] == [0, 0]


def test_write_subset_sorted_unique_and_np_save_compatible(tmp_path, caplog):
    uids = ["%032x" % v for v in [5, 3, 2**100, 3, 7]]
    path, n = write_subset(tmp_path / "out", keys_from_strings(uids))
    assert path.name == "out.npy" and n == 4
    assert "1 duplicate" in caplog.text
    arr = np.load(path, mmap_mode="r")
    assert arr.dtype == np.dtype("u8,u8")
    expected = np.array(sorted({uid_to_pair(u) for u in uids}), np.dtype("u8,u8"))
    assert np.array_equal(arr, expected)
    # byte-identical to what np.save writes for the same array (DataComp's writer)
    np.save(tmp_path / "ref.npy", expected)
    assert path.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    # DataComp's resharder lookup: searchsorted left/right finds each uid once
    for u in uids:
        q = np.array([uid_to_pair(u)], np.dtype("u8,u8"))
        assert np.searchsorted(arr, q, "right")[0] - np.searchsorted(arr, q, "left")[0] == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_read_subset_npy_and_raw_memmap(tmp_path):
    pairs = keys_to_pairs(np.sort(keys_from_strings(["%032x" % v for v in range(10)])))
    np.save(tmp_path / "a.npy", pairs)
    pairs.tofile(tmp_path / "raw.bin")
    assert np.array_equal(read_subset(tmp_path / "a.npy"), pairs)
    assert np.array_equal(read_subset(tmp_path / "raw.bin"), pairs)
    np.save(tmp_path / "bad.npy", np.arange(4, dtype=np.int64))
    with pytest.raises(UserError, match="dtype"):
        read_subset(tmp_path / "bad.npy")
    with pytest.raises(UserError, match="not found"):
        read_subset(tmp_path / "missing.npy")


def test_writer_spills_to_partitions_and_stays_byte_identical(tmp_path):
    from datacomp_sieve.uids import SubsetWriter

    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(3000, 16), dtype=np.uint8)
    raw[1500:1600] = raw[:100]  # duplicates across batches
    keys = raw.view("V16").reshape(-1)
    w = SubsetWriter(tmp_dir=str(tmp_path), memory_keys=250)
    for s in range(0, len(keys), 170):
        w.add(keys[s : s + 170])
    path, n = w.write(tmp_path / "spilled.npy")
    assert n == 2900
    np.save(tmp_path / "ref.npy", np.unique(keys_to_pairs(keys)))
    assert path.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.is_dir()]
    # an empty subset is a valid, empty DataComp file
    path, n = SubsetWriter().write(tmp_path / "empty.npy")
    np.save(tmp_path / "empty_ref.npy", np.empty(0, UID_DTYPE))
    assert n == 0 and path.read_bytes() == (tmp_path / "empty_ref.npy").read_bytes()
