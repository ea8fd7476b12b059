import numpy as np
import pyarrow as pa
import pytest

from condense.cores.hashing import hash_ids, smallest_hash_order


def test_hash_depends_only_on_seed_and_id():
    ids = [f"{i:09d}" for i in range(1000)]
    whole = hash_ids(ids, seed=7)
    # Any split into chunks, any order, gives each id the same hash.
    parts = np.concatenate([hash_ids(ids[:300], 7), hash_ids(ids[300:], 7)])
    assert np.array_equal(whole, parts)
    perm = np.random.default_rng(0).permutation(1000)
    assert np.array_equal(hash_ids([ids[i] for i in perm], 7), whole[perm])
    # Arrow arrays with an offset (slices) hash the same.
    assert np.array_equal(hash_ids(pa.array(ids).slice(10, 5), 7), whole[10:15])


def test_seed_changes_hash_and_hashes_spread():
    ids = [f"id-{i}" for i in range(20000)]
    a, b = hash_ids(ids, 0), hash_ids(ids, 1)
    assert (a != b).mean() > 0.999
    assert len(np.unique(a)) == len(a)
    # Roughly uniform: each quarter of the uint64 range holds ~25% of the ids.
    quarters = np.bincount((a >> np.uint64(62)).astype(int), minlength=4) / len(a)
    assert np.all(np.abs(quarters - 0.25) < 0.02)


def test_distinct_ids_of_different_lengths_and_unicode():
    h = hash_ids(["a", "a\x00", "ab", "", "é", "e\u0301"], 3)
    assert len(set(h.tolist())) == 6


def test_null_ids_rejected():
    with pytest.raises(ValueError, match="null"):
        hash_ids(pa.array(["a", None]), 0)


def test_order_breaks_hash_ties_by_id():
    hashes = np.array([5, 3, 5, 1], dtype=np.uint64)
    ids = np.array(["b", "z", "a", "q"], dtype=object)
    assert smallest_hash_order(hashes, ids).tolist() == [3, 1, 2, 0]
