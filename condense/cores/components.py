"""Exact connected components of the graph "cos(e_i, e_j) > threshold" inside one cluster.

Memory is O(n x dim) plus one similarity tile: pairs are found tile by tile over the upper
triangle of the similarity matrix and merged into a union-find forest at once, so neither the
n x n matrix nor the edge list ever exists.
"""

from __future__ import annotations

import numpy as np


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


def components(
    x: np.ndarray,
    threshold: float,
    *,
    tile: int = 2048,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Component label of every row (its smallest row index) and each row's highest similarity
    to another row (SemDeDup's score; -inf for a cluster of one).

    Rows are unit vectors; an edge joins i != j iff dot(x_i, x_j) > threshold (strict).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    parent = np.arange(n)
    best = np.full(n, -np.inf, dtype=np.float32)
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        for j0 in range(i0, n, tile):
            j1 = min(n, j0 + tile)
            sim = _tile(x[i0:i1], x[j0:j1], device)
            if i0 == j0:
                np.fill_diagonal(sim, -np.inf)  # a row is not its own neighbour
            np.maximum(best[i0:i1], sim.max(axis=1), out=best[i0:i1])
            np.maximum(best[j0:j1], sim.max(axis=0), out=best[j0:j1])
            ii, jj = np.nonzero(sim > threshold)
            if len(ii):
                union_pairs(parent, ii + i0, jj + j0)
    return _compress(parent), best


def _tile(a: np.ndarray, b: np.ndarray, device: str) -> np.ndarray:
    if device.startswith("cuda"):
        import torch

        return (torch.from_numpy(a).to(device) @ torch.from_numpy(b).to(device).T).cpu().numpy()
    return a @ b.T
