"""k-means training on every worker: exact Lloyd iterations over a sample split between them.

Each worker of a pool (one per GPU, else CPU workers) holds a share of the round's training
sample for the whole round. The driver

1. finds the sample: every worker sends the ring offsets of its parts' rows in the seed's
   window (`sample.py`), and the driver picks the `size`-th smallest as the cut;
2. takes the initial centroids (first round): the k sample rows nearest the window's start,
   a uniform random choice that does not depend on the split either;
3. iterates: sends the centroids to every worker (once into the object store), each assigns
   its rows exactly (`cores.kmeans.assign`) and sums them per centroid in fixed point, and the
   driver adds the partials as integers, in any order, into the next centroids.

So the centroids are bit-identical at any worker count and however the parts are split, and
equal to `lloyd_train` on the whole sample in one process. Each worker sends one k x d int64
partial per iteration (0.6 GB at k = 100,000, d = 768), which the driver adds as it arrives
(the pool yields them in completion order). A last pass against the final centroids counts
the sample's rows per centroid, which pack dedup's tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from condense.cores.hashing import smallest_hash_order
from condense.cores.kmeans import (
    FIXED_POINT,
    LloydPartial,
    lloyd_partial,
    lloyd_update,
    prepare_centroids,
)
from condense.cores.vectors import to_unit_float32
from condense.errors import StageError
from condense.runtime.processor import Processor, Resources, WorkItem
from condense.schema import IMG_EMB, SAMPLE_ID, arrow_to_vectors
from condense.stages.cluster.sample import (
    window_fraction,
    window_keys,
    window_start,
    window_width,
)
from condense.stages.embed.vectors import EmbedVectors


@dataclass(frozen=True, kw_only=True)
class WindowKeys(WorkItem):
    """Find the worker's rows in a window of the ring; send their ring offsets."""

    parts: tuple[str, ...]  # the worker's share of embed/'s parts
    start: int
    width: int


@dataclass(frozen=True, kw_only=True)
class IdsAt(WorkItem):
    """The sample_ids of the worker's window rows at this ring offset (a hash collision)."""

    key: int


@dataclass(frozen=True, kw_only=True)
class KeepSample(WorkItem):
    """Keep the window rows below `cut` (all when None), and those at it (all, or `tied`);
    read their vectors and hold them for the round."""

    cut: int | None
    tied: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class FirstRows(WorkItem):
    """Ring offsets, ids and vectors of the held rows at offsets up to `last`."""

    last: int


@dataclass(frozen=True, kw_only=True)
class Iterate(WorkItem):
    """One Lloyd iteration of the held rows against these centroids."""

    centroids: np.ndarray


@dataclass
class LloydWorker(Processor):
    """Holds a share of the training sample and runs Lloyd iterations on it."""

    stage = "cluster"
    vectors: EmbedVectors  # where embed/'s image vectors are
    device: str  # cpu, cuda (its GPU) or auto
    screen: str  # cluster.screen, on a GPU
    threads: int  # BLAS/faiss threads
    cpus: float = 1.0
    gpu: bool = False

    @property
    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=1.0 if self.gpu else 0.0, actor=True, retries=0)

    def setup(self) -> None:
        from condense.stages.cluster import worker_device

        self.device = worker_device(self.device, "cluster")
        try:
            import faiss

            faiss.omp_set_num_threads(self.threads)
        except ImportError:
            pass
        self.window: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.x = np.zeros((0, 0), np.float32)
        self.keys = np.zeros(0, np.uint64)
        self.ids: list[str] = []

    def process(self, item):
        handler = {
            WindowKeys: self._window,
            IdsAt: self._ids_at,
            KeepSample: self._keep,
            FirstRows: self._first,
            Iterate: self._iterate,
        }[type(item)]
        return handler(item)

    def _window(self, item: WindowKeys) -> np.ndarray:
        self.window = [
            (p, *window_keys(self.vectors, p, item.start, item.width)) for p in item.parts
        ]
        return np.concatenate([keys for _, _, keys in self.window] + [np.zeros(0, np.uint64)])

    def _ids_at(self, item: IdsAt) -> list[str]:
        out = []
        for part, picked, keys in self.window:
            at = picked[keys == np.uint64(item.key)]
            if len(at):
                out += self.vectors.read(part, [SAMPLE_ID], at).column(SAMPLE_ID).to_pylist()
        return out

    def _keep(self, item: KeepSample) -> int:
        from threadpoolctl import threadpool_limits

        xs, keys, ids = [], [], []
        for part, picked, part_keys in self.window:
            below = np.ones(len(part_keys), bool) if item.cut is None else part_keys < item.cut
            at = np.zeros(len(part_keys), bool) if item.cut is None else part_keys == item.cut
            chosen = below | at
            if not chosen.any():
                continue
            table = self.vectors.read(part, [SAMPLE_ID, IMG_EMB], picked[chosen])
            part_ids = np.asarray(table.column(SAMPLE_ID).to_pylist(), dtype=object)
            keep = below[chosen] | (at[chosen] & _among(part_ids, item.tied))
            with threadpool_limits(self.threads):
                xs.append(to_unit_float32(arrow_to_vectors(table.column(IMG_EMB)))[keep])
            keys.append(part_keys[chosen][keep])
            ids += part_ids[keep].tolist()
        self.window = []
        self.x = np.concatenate(xs) if xs else np.zeros((0, self.vectors.dim), np.float32)
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        self.ids = ids
        return len(self.x)

    def _first(self, item: FirstRows):
        rows = np.flatnonzero(self.keys <= np.uint64(item.last))
        return self.keys[rows], [self.ids[i] for i in rows], self.x[rows]

    def _iterate(self, item: Iterate) -> LloydPartial:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.threads):
            prepared = prepare_centroids(item.centroids)
            return lloyd_partial(self.x, prepared, device=self.device, screen=self.screen)


def _among(ids: np.ndarray, tied: tuple[str, ...] | None) -> np.ndarray:
    if tied is None:
        return np.ones(len(ids), bool)
    return np.isin(ids, np.asarray(tied, dtype=object))


def split_parts(rows: dict[str, int], workers: int) -> list[tuple[str, ...]]:
    """Consecutive parts cut into `workers` shares of about equal rows (some may be empty)."""
    names = list(rows)
    bounds = np.cumsum([rows[n] for n in names])
    total = int(bounds[-1]) if len(bounds) else 0
    cuts = np.searchsorted(bounds, [total * (i + 1) / workers for i in range(workers)], "left")
    shares, lo = [], 0
    for cut in cuts.tolist():
        hi = min(len(names), cut + 1)
        shares.append(tuple(names[lo:hi]))
        lo = hi
    return shares


@dataclass
class RoundResult:
    centroids: np.ndarray
    counts: np.ndarray  # sample rows per centroid in the last iteration
    sample_seconds: float
    objective: list[float]  # mean squared distance per iteration


def train_round(
    pool,
    shares: list[tuple[str, ...]],
    *,
    rows: int,
    size: int,
    seed: int,
    k: int,
    niter: int,
    spherical: bool,
    init: np.ndarray | None,
    log: Callable[[str], None],
    label: str,
) -> RoundResult:
    """One k-means round on a pool of LloydWorkers (see the module's doc)."""
    started = time.perf_counter()
    cut, tied, sample_rows, kth = _find_sample(pool, shares, rows, size, seed, k)
    held = sum(pool.broadcast(KeepSample(part="keep", cut=cut, tied=tied)))
    if held != sample_rows:
        raise StageError(f"cluster: the workers hold {held:,} sample rows, not {sample_rows:,}")
    if sample_rows < k:
        raise StageError(f"cluster: the training sample has {sample_rows} rows, fewer than k={k}")
    c = init if init is not None else _first_rows(pool, k, kth)
    sample_seconds = time.perf_counter() - started
    objective = []
    total = None
    for it in range(niter):
        t = time.perf_counter()
        total = _combined(pool, Iterate(part=f"iter-{it}", centroids=c))
        c = lloyd_update(total, c, spherical)
        objective.append(total.objective / FIXED_POINT / sample_rows)
        log(
            f"[cluster] {label} iteration {it + 1}/{niter}: mean squared distance "
            f"{objective[-1]:.6f} ({time.perf_counter() - t:.1f} s)"
        )
    # The sample's rows per final centroid, which pack dedup's tasks (as the faiss path does).
    counts = _combined(pool, Iterate(part="sizes", centroids=c)).counts
    return RoundResult(c, counts, sample_seconds, objective)


def _combined(pool, item: Iterate) -> LloydPartial:
    """Every worker's partial, added as it arrives (integers: in any order)."""
    total = None
    for partial in pool.broadcast(item):
        total = partial if total is None else total + partial
    return total


def _find_sample(pool, shares, rows: int, size: int, seed: int, k: int):
    """The cut on the ring (None: the whole window), the ids kept at it when a hash collision
    puts more rows there than fit, the sample's size, and its k-th smallest offset."""
    start, fraction = window_start(seed), window_fraction(size, rows)
    while True:
        width = window_width(fraction)
        items = [
            WindowKeys(part=f"window-{i}", parts=s, start=start, width=width)
            for i, s in enumerate(shares)
        ]
        keys = np.concatenate(pool.run(items) + [np.zeros(0, np.uint64)])
        if len(keys) >= size or fraction >= 1.0:
            break
        fraction = min(1.0, fraction * 2)  # a rare shortfall: widen the window
    kth = int(np.partition(keys, k - 1)[k - 1]) if len(keys) >= k else 0
    if len(keys) <= size:
        return None, None, len(keys), kth
    cut = int(np.partition(keys, size - 1)[size - 1])
    below = int(np.count_nonzero(keys < np.uint64(cut)))
    at = int(np.count_nonzero(keys == np.uint64(cut)))
    if below + at == size:
        return cut, None, size, kth
    ids = sorted(i for got in pool.broadcast(IdsAt(part="ties", key=cut)) for i in got)
    return cut, tuple(ids[: size - below]), size, kth


def _first_rows(pool, k: int, last: int) -> np.ndarray:
    """The k held rows nearest the window's start (ties by sample_id), `last` being the k-th
    offset: the first centroids."""
    got = [g for g in pool.broadcast(FirstRows(part="first", last=last)) if len(g[0])]
    keys = np.concatenate([g[0] for g in got])
    ids = np.asarray([i for g in got for i in g[1]], dtype=object)
    order = smallest_hash_order(keys, ids)[:k]
    return np.ascontiguousarray(np.concatenate([g[2] for g in got])[order])
