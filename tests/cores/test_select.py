"""Exact rank selection over sorted runs against one global sort."""

import numpy as np
import pyarrow as pa
import pytest

from condense.cores.select import Boundary, answer, count_below, find_rank, sort_part


def make_runs(keys, ids, splits):
    runs = []
    for part in np.array_split(np.arange(len(keys)), splits):
        run, _ = sort_part(keys[part], pa.array(ids[part].tolist(), pa.string()))
        runs.append(run)
    return runs


def reference(keys, ids):
    order = np.lexsort((ids, keys))
    return [Boundary(int(keys[i]), ids[i]) for i in order]


@pytest.mark.parametrize("limit", [2, 7, 1 << 18])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_every_rank_matches_a_global_sort(limit, splits):
    rng = np.random.default_rng(splits * 100 + limit)
    n = 300
    # Heavy ties: few distinct keys, some far apart in the 64-bit range.
    keys = rng.choice(np.array([3, 3, 4, 2**40, 2**63 + 5, 2**64 - 1], dtype=np.uint64), n)
    ids = np.array([f"id{rng.integers(1e9)}-{i}" for i in range(n)], dtype=object)
    runs = make_runs(keys, ids, splits)
    questions, gathered = [], []

    def ask(q):
        questions.append(q[0])
        answers = [answer(run, q) for run in runs]
        if q[0] == "rows":
            gathered.append(sum(len(ids) for _, ids in answers))
        return answers

    ref = reference(keys, ids)
    for r in list(range(0, n, 17)) + [n - 1]:
        got = find_rank(r, n, ask, limit=limit)
        assert got == ref[r], r
        # The boundary splits every run consistently with the global order.
        assert sum(count_below(run, got) for run in runs) == r
    assert find_rank(n, n, ask, limit=limit) is None
    if limit == 2:  # ties forced the id bisection
        assert "spread" in questions
    assert max(gathered) <= limit  # the caller never gathers more than `limit` rows


def test_wide_keys_need_few_rounds():
    rng = np.random.default_rng(1)
    n = 20000
    keys = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    ids = np.array([f"r{i:06d}" for i in range(n)], dtype=object)
    runs = make_runs(keys, ids, 4)
    rounds = []

    def ask(q):
        rounds.append(q[0])
        return [answer(run, q) for run in runs]

    got = find_rank(12345, n, ask, limit=100)
    assert got == reference(keys, ids)[12345]
    assert rounds.count("histogram") <= 2


def test_bad_rank_and_empty_runs():
    runs = make_runs(np.array([5, 1], np.uint64), np.array(["b", "a"], dtype=object), 1)
    runs += [sort_part(np.zeros(0, np.uint64), pa.array([], pa.string()))[0]]

    def ask(q):
        return [answer(run, q) for run in runs]

    assert find_rank(0, 2, ask) == Boundary(1, "a")
    assert find_rank(1, 2, ask) == Boundary(5, "b")
    with pytest.raises(ValueError, match="outside"):
        find_rank(3, 2, ask)
