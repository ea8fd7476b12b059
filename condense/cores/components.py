"""Exact connected components of the graph "cos(e_i, e_j) > threshold" inside one cluster.

Memory is O(n x dim) plus one similarity tile: pairs are found tile by tile over the upper
triangle of the similarity matrix and merged into union-find forests at once, so neither the
n x n matrix nor the edge list ever exists. Several thresholds share one similarity pass.

Two exact shortcuts skip work without changing any component:

- **Angle pruning.** Rows are ordered by their angle to a pivot p (the row nearest the cluster's
  mean direction). On the sphere angle(i, j) >= |angle(i, p) - angle(j, p)|, so two tiles whose
  angle ranges lie more than arccos(t_min) apart (plus a safety margin far above float32
  rounding) hold no pair above any threshold and are never multiplied.
- **Group absorption.** Every row within arccos(t_max) of the pivot is joined to the pivot at
  every threshold. In pivot order those rows form a prefix, and tiles wholly inside it are
  skipped: a giant group of near-identical rows costs one pass against the rest, not n^2/2.

**Exact decisions at any precision.** Each tile is a screen, computed in fp32 or, on tensor
cores, in tf32, bf16 or fp16 (`precision`). `screen_bound` gives a rigorous bound on a screened
similarity's error from the precision and the dimension; every pair whose screened value lies
within it of a threshold is recomputed exactly (float64 sums of the float32 vectors' products)
and decided on that value. Every edge is therefore the exact "cos > t", whatever the precision
and the tile size; `rechecked` counts the pairs it took.

The price is paid in `max_sim`, each row's highest similarity to another row (SemDeDup's
score): it is exact whenever it lies between the smallest and the largest threshold. Above the
largest it may be a lower bound (that still exceeds it); below the smallest, a lower value
(that is still below it). So `max_sim > t` is exact for every t in [t_min, t_max]. Pairs inside
the absorbed group, and pairs farther apart than the pruning reach, never count, even where a
tile computes them, so `max_sim` does not depend on the tile size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from condense.cores.screen import screen_bound, screen_dtype, screened_matmul

ANGLE_MARGIN = 1e-3  # radians; float32 similarities of unit vectors err by far less (~1e-5)
CHUNK = 65_536  # rows per float64 chunk when ordering rows by angle
RECHECK_CHUNK = 8192  # pairs per float64 recheck batch


def exact_dots(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x[a_k] . x[b_k] for each pair, summed in float64 (the float32 products are exact there);
    row by row, so a pair's value does not depend on the pairs beside it."""
    out = np.empty(len(a), dtype=np.float64)
    for k in range(0, len(a), RECHECK_CHUNK):
        xa = x[a[k : k + RECHECK_CHUNK]].astype(np.float64)
        xb = x[b[k : k + RECHECK_CHUNK]].astype(np.float64)
        out[k : k + RECHECK_CHUNK] = (xa * xb).sum(axis=1)
    return out


def _compress(parent: np.ndarray) -> np.ndarray:
    """Point every node straight at its root (pointer jumping)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Root of each node, following parent pointers (touches only the nodes' own paths)."""
    r = parent[nodes]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def union_pairs(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge the sets of each pair (a[i], b[i]) in place; returns the forest.

    Work is proportional to the pairs and their paths, not to the forest's size, so a cluster
    of millions of rows pays per tile only for the edges that tile found. Roots always hook
    onto the smaller root, so after `_compress` every node is labelled with its component's
    smallest member, whatever the order of the pairs.
    """
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        differ = ra != rb
        if not differ.any():
            break
        lo = np.minimum(ra[differ], rb[differ])
        hi = np.maximum(ra[differ], rb[differ])
        # Several pairs may hook the same root: minimum.at keeps the smallest target, and the
        # loop repeats until every pair shares a root.
        np.minimum.at(parent, hi, lo)
        a, b = a[differ], b[differ]
        parent[a] = _roots(parent, a)  # shorten the paths just walked
        parent[b] = _roots(parent, b)
    return parent


@dataclass
class Components:
    """Result of `components` for one cluster, in the caller's row order."""

    labels: np.ndarray  # (thresholds, n) int64: each row's component = its smallest row index
    max_sim: np.ndarray  # (n,) float32: highest similarity to another row (-inf when n == 1)
    tiles_computed: int  # similarity tiles multiplied
    tiles_total: int  # tiles of the upper triangle (what a plain tiled pass multiplies)
    entries_computed: int  # similarity entries computed (for the matmul-rate figures)
    absorbed: int  # rows joined to the pivot's group without tiling among themselves
    rechecked: int = 0  # pairs within the screen's error bound of a threshold, recomputed exactly


def components(
    x: np.ndarray,
    thresholds: float | list[float],
    *,
    tile: int = 2048,
    device: str = "cpu",
    precision: str = "fp32",
    prune: bool = True,
) -> Components:
    """Exact components at each threshold (edge i-j iff dot(x_i, x_j) > t, strict, the dot
    summed exactly from the float32 vectors).

    `x` holds unit vectors (float32). Tiles are screened at `precision` (fp32, tf32, bf16 or
    fp16; other than fp32 through torch, on "cpu" too) and pairs near a threshold rechecked
    exactly, so the labels depend on none of `tile`, `device`, `precision` or `prune`.
    """
    ts = [float(t) for t in np.atleast_1d(thresholds)]
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise ValueError(f"thresholds must lie in (0, 1], got {ts}")
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    t_min, t_max = min(ts), max(ts)
    bound = screen_bound(precision, x.shape[1] if x.ndim == 2 else 1)
    labels = np.tile(np.arange(n, dtype=np.int64), (len(ts), 1))
    best = np.full(n, -np.inf, dtype=np.float32)
    if n < 2:
        return Components(labels, best, 0, 0, 0, 0)

    order, angle, core = _pivot_order(x, t_max) if prune else (np.arange(n), None, 1)
    xs = x[order]
    forests = [np.arange(n, dtype=np.int64) for _ in ts]
    if core > 1:  # rows within arccos(t_max) of the pivot: one group at every threshold
        for parent in forests:
            parent[1:core] = 0
        s_core = xs[1:core] @ xs[0]
        best[1:core] = s_core
        best[0] = s_core.max()
    reach = math.acos(t_min) + ANGLE_MARGIN  # on exact angles: no screen widens it
    backend = _backend(device, precision)
    xd = backend.put(xs)
    tiles_total = tiles_done = entries = rechecked = 0
    # Tiles never straddle the end of the absorbed group, so a tile is all group or all rest.
    blocks = [(a, min(a + tile, core)) for a in range(0, core, tile)] if core > 1 else []
    blocks += [(a, min(a + tile, n)) for a in range(core if core > 1 else 0, n, tile)]
    for bi, (i0, i1) in enumerate(blocks):
        for bj in range(bi, len(blocks)):
            j0, j1 = blocks[bj]
            tiles_total += 1
            if core > 1 and j1 <= core:  # both tiles inside the absorbed group
                continue
            if angle is not None and angle[j0] - angle[i1 - 1] > reach:
                tiles_total += len(blocks) - bj - 1  # the rest lie farther still
                break
            tiles_done += 1
            entries += (i1 - i0) * (j1 - j0)
            far = None  # pairs beyond reach: masked, so max_sim does not depend on the tiling
            if angle is not None and angle[j1 - 1] - angle[i0] > reach:
                far = _beyond_reach(angle, i0, i1, j0, j1, reach)
            low = t_min - bound  # every pair that may exceed t_min exactly
            row_max, col_max, ii, jj, vals = backend.tile(xd, i0, i1, j0, j1, low, core, far)
            np.maximum(best[i0:i1], row_max, out=best[i0:i1])
            np.maximum(best[j0:j1], col_max, out=best[j0:j1])
            if len(ii):
                vals = vals.astype(np.float64)
                near = np.zeros(len(vals), dtype=bool)
                for t in ts:
                    near |= np.abs(vals - t) <= bound
                if near.any():  # decided on the exact value
                    vals[near] = exact_dots(xs, ii[near], jj[near])
                    rechecked += int(near.sum())
                for parent, t in zip(forests, ts, strict=True):
                    keep = vals > t
                    union_pairs(parent, ii[keep], jj[keep])
    # Back to the caller's order; label = the component's smallest row index there.
    for k, parent in enumerate(forests):
        roots = _compress(parent)
        smallest = np.full(n, n, dtype=np.int64)
        np.minimum.at(smallest, roots, order)
        labels[k, order] = smallest[roots]
    max_sim = np.empty(n, dtype=np.float32)
    max_sim[order] = best
    return Components(
        labels, max_sim, tiles_done, tiles_total, entries, max(core - 1, 0), rechecked
    )


def _beyond_reach(angle: np.ndarray, i0: int, i1: int, j0: int, j1: int, reach: float):
    """Mask of the tile's pairs whose angles to the pivot differ by more than `reach`.
    Angles ascend, so each row's far columns are a prefix and a suffix of the tile."""
    a, b = angle[i0:i1], angle[j0:j1]
    hi = np.searchsorted(b, a + reach, side="right")
    lo = np.searchsorted(b, a - reach, side="left")
    cols = np.arange(j1 - j0)
    return (cols >= hi[:, None]) | (cols < lo[:, None])


def _pivot_order(x: np.ndarray, t_max: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows ordered by angle to the pivot (the pivot first), those angles, and how many leading
    rows lie strictly within arccos(t_max) of the pivot (the pivot included).

    Angles are computed in float64, a chunk at a time (memory stays O(n x dim) in float32)."""
    n = len(x)
    mean = x.sum(axis=0, dtype=np.float64).astype(np.float32)
    pivot = int(np.argmax(x @ mean))  # the first row nearest the mean direction
    # Angles to the pivot in float64 (pruning relies on them), one chunk at a time.
    p = x[pivot].astype(np.float64)
    p /= np.sqrt(p @ p)
    cos = np.empty(n, dtype=np.float64)
    for i in range(0, n, CHUNK):
        c = x[i : i + CHUNK].astype(np.float64)
        cos[i : i + CHUNK] = (c @ p) / np.sqrt(np.einsum("ij,ij->i", c, c))
    np.clip(cos, -1.0, 1.0, out=cos)
    cos[pivot] = 2.0  # first, whatever rounding says
    order = np.lexsort((np.arange(n), -cos))
    angle = np.arccos(np.minimum(cos[order], 1.0))
    # The core is decided on exact similarities, as every other edge is.
    rest = order[1:]
    inside = exact_dots(x, rest, np.full(len(rest), pivot)) > t_max
    core = 1 + (int(np.argmin(inside)) if not inside.all() else len(inside))
    return order, angle, core


class _Numpy:
    def put(self, x: np.ndarray) -> np.ndarray:
        return x

    def tile(self, x, i0, i1, j0, j1, t_min, core, far):
        sim = x[i0:i1] @ x[j0:j1].T
        if i0 == j0:
            np.fill_diagonal(sim, -np.inf)  # a row is not its own neighbour
        if core > 1 and i0 < core and j0 < core:  # pairs inside the absorbed group: as if skipped
            sim[: core - i0, : core - j0] = -np.inf
        if far is not None:
            np.putmask(sim, far, -np.inf)
        row_max = sim.max(axis=1)
        col_max = sim.max(axis=0)
        rows = np.flatnonzero(row_max > t_min)  # only rows with an edge are scanned again
        if not len(rows):
            return row_max, col_max, rows, rows, np.zeros(0, np.float32)
        r, c = np.nonzero(sim[rows] > t_min)
        ii = rows[r]
        return row_max, col_max, ii + i0, c + j0, sim[ii, c]


class _Torch:
    def __init__(self, device: str, precision: str = "fp32"):
        import torch

        self.torch, self.device, self.precision = torch, device, precision
        self.dtype = screen_dtype(precision)

    def put(self, x: np.ndarray):
        return self.torch.from_numpy(x).to(self.device).to(self.dtype)

    def tile(self, x, i0, i1, j0, j1, t_min, core, far):
        torch = self.torch
        sim = screened_matmul(x[i0:i1], x[j0:j1].T, self.precision).float()
        if i0 == j0:
            sim.fill_diagonal_(-float("inf"))
        if core > 1 and i0 < core and j0 < core:
            sim[: core - i0, : core - j0] = -float("inf")
        if far is not None:
            sim[torch.from_numpy(far).to(sim.device)] = -float("inf")
        row_max = sim.amax(dim=1)
        col_max = sim.amax(dim=0)
        ii, jj = torch.nonzero(sim > t_min, as_tuple=True)
        vals = sim[ii, jj]
        return (
            row_max.cpu().numpy(),
            col_max.cpu().numpy(),
            ii.cpu().numpy() + i0,
            jj.cpu().numpy() + j0,
            vals.cpu().numpy(),
        )


def _backend(device: str, precision: str = "fp32"):
    """numpy on "cpu" in fp32; torch on "cuda"/"cuda:N", on "torch-cpu" (to test that path
    here), and on "cpu" for the other precisions (torch computes bf16 and fp16 on CPUs too)."""
    if device == "cpu" and precision == "fp32":
        return _Numpy()
    if device.startswith("cuda"):
        return _Torch(device, precision)
    if device in ("cpu", "torch-cpu"):
        return _Torch("cpu", precision)
    raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
