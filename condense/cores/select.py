"""Exact rank selection over many sorted parts, without gathering them in one place.

The rows of a band or a sample are a range of ranks in a total order: by a uint64 key, ties by
`sample_id`. Each part of the data is first sorted into a *sorted part* (keys ascending, ids ascending
within a key). The row at rank r of the union is then found by a few rounds of questions that
every sorted part answers cheaply from its sorted keys:

1. a 65,536-bucket histogram of the keys inside the current key interval (two or three rounds
   narrow a 64-bit interval to one bucket of at most `limit` rows, or to a single key);
2. the (key, id) pairs of that bucket, gathered and sorted: at most `limit` rows;
3. only when more than `limit` rows share one key: a bisection on ids by pivots.

Whoever calls `find_rank` decides where the sorted parts live and how questions reach them (`ask`): a
list in memory in the tests, Ray tasks over files in the stages. Everything here is pure.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

BUCKETS = 1 << 16
TOP = (1 << 64) - 1  # the largest uint64 key
LIMIT = 1 << 18  # most rows the caller ever holds at once


@dataclass(frozen=True, order=True)
class Boundary:
    """A position in the (key, sample_id) order: the row at some rank."""

    key: int
    sample_id: str


@dataclass
class SortedPart:
    """One part's rows sorted by (key, sample_id)."""

    keys: np.ndarray  # uint64, ascending
    ids: pa.Array  # string, ascending within equal keys

    def __len__(self) -> int:
        return len(self.keys)


def sort_part(keys: np.ndarray, ids: pa.Array) -> tuple[SortedPart, np.ndarray]:
    """A part's rows sorted, and the permutation that sorted them."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    table = pa.table({"key": pa.array(np.asarray(keys, dtype=np.uint64)), "id": ids})
    order = pa.compute.sort_indices(table, sort_keys=[("key", "ascending"), ("id", "ascending")])
    order_np = order.to_numpy()
    return SortedPart(np.asarray(keys, dtype=np.uint64)[order_np], ids.take(order)), order_np


def _key_slice(part: SortedPart, key: int) -> tuple[int, int]:
    k = np.uint64(key)
    return int(np.searchsorted(part.keys, k, "left")), int(np.searchsorted(part.keys, k, "right"))


class _Ids(Sequence):
    """A slice of an Arrow string array that bisect can search without converting it."""

    def __init__(self, ids: pa.Array, start: int, stop: int):
        self.ids, self.start, self.stop = ids, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        return self.ids[self.start + i].as_py()


def count_below(part: SortedPart, boundary: Boundary | None) -> int:
    """Rows of the part that come before `boundary` (None: after every row)."""
    if boundary is None:
        return len(part)
    a, b = _key_slice(part, boundary.key)
    return a + bisect_left(_Ids(part.ids, a, b), boundary.sample_id)


def _first_at_or_above(keys: np.ndarray, value: int) -> int:
    return len(keys) if value > TOP else int(np.searchsorted(keys, np.uint64(value), "left"))


def histogram(part: SortedPart, lo: int, hi: int, width: int) -> np.ndarray:
    """Counts of keys in [lo + j*width, lo + (j+1)*width) ∩ [lo, hi], for j < BUCKETS."""
    m = min(BUCKETS, (hi - lo) // width) + 1  # edges lo + j*width that are <= hi (no overflow)
    edges = np.uint64(lo) + np.arange(m, dtype=np.uint64) * np.uint64(width)
    pos = np.searchsorted(part.keys, edges, "left")
    end = _first_at_or_above(part.keys, hi + 1)  # every later edge is hi + 1
    pos = np.concatenate([pos, np.full(BUCKETS + 1 - m, end)])
    return np.diff(pos)


def span(part: SortedPart) -> tuple[int, int] | None:
    """The smallest and largest key (None for an empty part)."""
    return (int(part.keys[0]), int(part.keys[-1])) if len(part) else None


def rows_between(
    part: SortedPart, lo: int, hi: int, id_lo: str | None = None, id_hi: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """(keys, ids) of rows with lo <= key <= hi (and, for a single key, id_lo <= id < id_hi)."""
    a = _first_at_or_above(part.keys, lo)
    b = _first_at_or_above(part.keys, hi + 1)
    if lo == hi and (id_lo is not None or id_hi is not None):
        view = _Ids(part.ids, a, b)
        a, b = (
            a + (bisect_left(view, id_lo) if id_lo is not None else 0),
            a + (bisect_left(view, id_hi) if id_hi is not None else len(view)),
        )
    return part.keys[a:b], part.ids.slice(a, b - a).to_pylist()


def spread_ids(
    part: SortedPart, key: int, id_lo: str | None, id_hi: str | None, m: int
) -> list[str]:
    """Up to m ids spread evenly over the part's rows with this key and id_lo <= id < id_hi."""
    a, b = _key_slice(part, key)
    view = _Ids(part.ids, a, b)
    s = bisect_left(view, id_lo) if id_lo is not None else 0
    e = bisect_left(view, id_hi) if id_hi is not None else len(view)
    if e <= s:
        return []
    picks = np.unique(np.linspace(s, e - 1, num=min(m, e - s)).astype(np.int64))
    return [view[int(i)] for i in picks]


def answer(part: SortedPart, question: tuple) -> object:
    """What one sorted part says to one question of `find_rank`."""
    kind, *args = question
    if kind == "span":
        return span(part)
    if kind == "histogram":
        return histogram(part, *args)
    if kind == "rows":
        return rows_between(part, *args)
    if kind == "spread":
        return spread_ids(part, *args)
    if kind == "count_below":
        return count_below(part, Boundary(*args))
    raise ValueError(f"unknown question {kind!r}")


Ask = Callable[[tuple], list]  # a question -> every sorted part's answer


def find_rank(r: int, total: int, ask: Ask, limit: int = LIMIT) -> Boundary | None:
    """The row at 0-based rank r among `total` rows (None when r == total: past the end)."""
    if not 0 <= r <= total:
        raise ValueError(f"rank {r} outside [0, {total}]")
    if r == total:
        return None
    spans = [sp for sp in ask(("span",)) if sp is not None]
    lo, hi = min(sp[0] for sp in spans), max(sp[1] for sp in spans)
    before, inside = 0, total
    while inside > limit and lo < hi:  # narrow the key interval
        width = -(-(hi - lo + 1) // BUCKETS)
        counts = np.sum(ask(("histogram", lo, hi, width)), axis=0)
        cum = np.concatenate([[0], np.cumsum(counts)])
        b = int(np.searchsorted(cum, r - before, side="right")) - 1
        before += int(cum[b])
        inside = int(counts[b])
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width - 1)
    id_lo = id_hi = None
    while inside > limit:  # more than `limit` rows share the key `lo`: narrow the ids
        # The median of ids spread over every sorted part splits the range; ids are unique, so both
        # sides keep at least one row and the loop ends.
        pivots = sorted(set().union(*ask(("spread", lo, id_lo, id_hi, 64))))
        pivot = pivots[len(pivots) // 2]
        upto = sum(ask(("count_below", lo, pivot)))  # rows before (lo, pivot), overall
        if r < upto:
            id_hi, inside = pivot, upto - before
        else:
            id_lo, inside, before = pivot, inside - (upto - before), upto
    keys, ids = [], []
    for k, i in ask(("rows", lo, hi, id_lo, id_hi)):
        keys.append(k)
        ids.extend(i)
    keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    order = np.lexsort((np.asarray(ids, dtype=object), keys))
    j = order[r - before]
    return Boundary(int(keys[j]), ids[j])
