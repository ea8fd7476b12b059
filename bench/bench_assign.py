"""Benchmark: the cluster stage's CPU assignment (cores.kmeans.assign) against faiss's flat search.

    python bench/bench_assign.py

Both find each row's two nearest centroids on one thread, on the same rows; `assign` also
re-ranks near ties in float64 and computes the distances and cosines the stage stores, so it
does more than the baseline. Prints seconds, ns per (row, centroid) pair, the ratio, and
checks the nearest ids agree.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from condense.cores.kmeans import assign

SHAPES = [(16, 20_000, 8_000), (16, 100_000, 4_000), (128, 20_000, 4_000), (768, 20_000, 2_000)]


def main() -> None:
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"{'d':>5}{'k':>9}{'rows':>7}{'faiss s':>10}{'assign s':>10}{'ns/pair':>9}{'speedup':>9}")
    for d, k, n in SHAPES:
        x = rng.standard_normal((n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c = rng.standard_normal((k, d), dtype=np.float32)
        start = time.perf_counter()
        index = faiss.IndexFlatL2(d)
        index.add(c)
        _, ids = index.search(x, 2)
        base = time.perf_counter() - start
        with threadpool_limits(1):
            start = time.perf_counter()
            ours = assign(x, c)
            mine = time.perf_counter() - start
        agree = float(np.mean(ours.cluster_id == ids[:, 0]))
        ns = 1e9 * mine / (n * k)
        print(
            f"{d:>5}{k:>9,}{n:>7,}{base:>10.2f}{mine:>10.2f}{ns:>9.2f}{base / mine:>8.2f}x"
            f"   ids agree {agree:.4f}"
        )


if __name__ == "__main__":
    main()
