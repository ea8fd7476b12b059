"""k-means training (faiss) and exact nearest-centroid assignment.

Assignment is written to give bit-identical answers whatever the batch a row arrives in: the
candidate search is a float32 matrix product (fast, batch-shaped), but the winner and its
distance and cosine are settled per row in float64, with ties broken by the lower centroid id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Rows whose two best float32 squared distances are closer than this are re-ranked in float64:
# float32 matrix-product error on unit vectors is ~1e-6, so this is a wide safety margin.
_AMBIGUITY = 1e-4
FAISS_MIN_DIM = 64  # CPU candidate search: faiss from this dimension on, BLAS tiles below


def train_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    spherical: bool = False,
    init_centroids: np.ndarray | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> np.ndarray:
    """Train k-means on the rows of x; returns float32 centroids of shape (k, d).

    `init_centroids` warm-starts training (the recipe's rounds over fresh samples). On CPUs and
    with faiss-gpu, faiss trains; `device='cuda'` without faiss-gpu (or 'torch-cpu', to test
    that path here) trains with torch (`_train_torch`, the same Lloyd iterations).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"k-means needs at least k={k} training rows, got {n}")
    try:
        import faiss
    except ImportError:
        faiss = None
    use_gpu = device.startswith("cuda")
    if device == "torch-cpu" or (use_gpu and (faiss is None or faiss.get_num_gpus() == 0)):
        return _train_torch(x, k, niter, seed, spherical, init_centroids, device)
    if faiss is None:
        raise ImportError(
            "k-means needs faiss: pip install 'condense[cpu]' (faiss-cpu) or 'condense[gpu]' (faiss-gpu)"
        )
    if threads:
        faiss.omp_set_num_threads(int(threads))
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        gpu=use_gpu,
        verbose=False,
        # Train on every row handed in: the caller already drew the sample it wants.
        max_points_per_centroid=max(1, -(-n // k)),
        min_points_per_centroid=1,
    )
    init = None if init_centroids is None else np.ascontiguousarray(init_centroids, np.float32)
    km.train(x, init_centroids=init)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _train_torch(x, k, niter, seed, spherical, init_centroids, device) -> np.ndarray:
    """Lloyd's k-means in torch (a GPU without faiss-gpu): start from `init_centroids` or k
    seeded random rows, then `niter` times assign every row to its nearest centroid (in chunks
    of 4,096 rows) and move each centroid to its rows' mean (sums in float64). An empty cluster
    takes half of the largest one, as faiss does: both centroids moved a little apart."""
    import torch

    where = "cpu" if device == "torch-cpu" else device
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(x).to(where)
    if init_centroids is not None:
        c = torch.from_numpy(np.ascontiguousarray(init_centroids, np.float32)).to(where)
    else:
        c = xt[torch.from_numpy(rng.permutation(len(x))[:k]).to(where)].clone()
    for _ in range(niter):
        half = 0.5 * (c * c).sum(dim=1)
        labels = torch.cat(
            [(half[None, :] - xt[i : i + 4096] @ c.T).argmin(dim=1) for i in range(0, len(x), 4096)]
        )
        sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=where)
        sums.index_add_(0, labels, xt.double())
        counts = torch.bincount(labels, minlength=k)
        c = (sums / counts.clamp(min=1)[:, None]).float()
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            big = int(torch.argmax(counts))
            nudge = 1.0 / 1024
            c[empty], c[big] = c[big] * (1 + nudge), c[big] * (1 - nudge)
            counts[empty] = counts[big] // 2
            counts[big] -= counts[empty]
        if spherical:
            c = c / c.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return np.ascontiguousarray(c.cpu().numpy(), dtype=np.float32)


@dataclass(frozen=True)
class Assignment:
    """Nearest centroid of each row: id, Euclidean distance and cosine to the raw centroid."""

    cluster_id: np.ndarray  # int32
    centroid_dist: np.ndarray  # float32, ||x - c||
    centroid_cos: np.ndarray  # float32, x.c / (||x|| ||c||)


@dataclass(frozen=True)
class Centroids:
    """Centroids made ready for many `assign` calls: float32 and float64 copies, squared norms,
    and the CPU faiss index when one is used (built once, not per call: at k = 100,000 and
    d = 768 each build copies 300 MB)."""

    c: np.ndarray  # float32 (k, d)
    c64: np.ndarray  # float64 (k, d), for the re-rank of near ties
    c_sq: np.ndarray  # float64 squared norms
    index: object | None  # faiss.IndexFlatL2 over c (CPU search at FAISS_MIN_DIM and above)
    on_device: dict = field(default_factory=dict)  # device -> (c, c_sq / 2) as torch tensors

    def torch_tensors(self, device: str):
        """The centroids and half their squared norms on a torch device, copied there once."""
        if device not in self.on_device:
            import torch

            half = torch.from_numpy((0.5 * self.c_sq).astype(np.float32)).to(device)
            self.on_device[device] = (torch.from_numpy(self.c).to(device), half)
        return self.on_device[device]


def prepare_centroids(centroids: np.ndarray) -> Centroids:
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    c64 = c.astype(np.float64)
    index = None
    if c.shape[1] >= FAISS_MIN_DIM:
        try:
            import faiss

            index = faiss.IndexFlatL2(c.shape[1])
            index.add(c)
        except ImportError:
            pass
    return Centroids(c, c64, np.einsum("ij,ij->i", c64, c64), index)


def assign(
    x: np.ndarray,
    centroids: np.ndarray | Centroids,
    *,
    device: str = "cpu",
    chunk_rows: int | None = None,
) -> Assignment:
    """Assign each row of x to its nearest centroid (squared Euclidean distance, ties to the lower id)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    prepared = centroids if isinstance(centroids, Centroids) else prepare_centroids(centroids)
    c, c_sq = prepared.c, prepared.c_sq
    n = len(x)
    k = len(c)
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"rows have dimension {x.shape[1]}, centroids {c.shape[1]}")
    # faiss bounds its own memory (it scores blocks of 4,096 x 1,024) and is fastest on large
    # queries: chunks of 4,096 rows. The BLAS search below FAISS_MIN_DIM holds a chunk's scores:
    # at most 2^24 of them (64 MiB) and 4 rows per dimension, so they stay in cache (at a small
    # dimension the passes over the scores cost more than the products).
    scores = max(16, min(4096, (1 << 24) // max(k, 1)))  # rows whose scores fit in 64 MiB
    # A GPU holds 4,096 x k scores (1.6 GB at k = 100,000); faiss bounds its own.
    if device.startswith("cuda") or device == "torch-cpu" or prepared.index is not None:
        step = chunk_rows or 4096
    else:
        step = chunk_rows or min(scores, 4 * x.shape[1])
    ids = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float64)
    cos = np.empty(n, dtype=np.float64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        xs = x[start:stop]
        chosen = _nearest(xs, prepared, device)
        ids[start:stop] = chosen
        # Per row: float32 element-wise terms, float64 sums. No term depends on the other rows
        # of the chunk, so these bits are the same whatever batch a row arrives in.
        dots = np.sum(xs * c[chosen], axis=1, dtype=np.float64)
        x_sq = np.sum(xs * xs, axis=1, dtype=np.float64)
        cc = c_sq[chosen]
        # float64 keeps ||x||^2 + ||c||^2 - 2 x.c accurate even for rows sitting on a centroid.
        dist[start:stop] = np.sqrt(np.maximum(x_sq + cc - 2.0 * dots, 0.0))
        norms = np.sqrt(x_sq * cc)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos[start:stop] = np.where(norms > 0, dots / norms, 0.0)
    return Assignment(ids.astype(np.int32), dist.astype(np.float32), cos.astype(np.float32))


def _nearest(x: np.ndarray, prepared: Centroids, device: str) -> np.ndarray:
    """Nearest centroid ids for one chunk: float32 candidates, float64 re-rank of near ties."""
    best, gap = _two_nearest(x, prepared, device)
    if len(prepared.c) == 1:
        return best
    unsure = np.flatnonzero(gap <= _AMBIGUITY)
    if len(unsure):
        # Near ties (often two centroids faiss split from one) are settled in float64;
        # argmin returns the first, so exact ties go to the lower centroid id.
        exact = prepared.c_sq[None, :] - 2.0 * (x[unsure].astype(np.float64) @ prepared.c64.T)
        best[unsure] = np.argmin(exact, axis=1)
    return best


def _two_nearest(x: np.ndarray, prepared: Centroids, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Best centroid per row by float32 arithmetic, and the squared-distance gap to the runner-up."""
    c, c_sq = prepared.c, prepared.c_sq
    if device.startswith("cuda") or device == "torch-cpu":  # torch-cpu: the GPU code, here
        try:
            import faiss
        except ImportError:  # torch alone (the device image has no faiss)
            faiss = None
        if device.startswith("cuda") and faiss is not None and faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatL2(res, c.shape[1])
            index.add(c)
            dist, ids = index.search(x, min(2, len(c)))
            gap = dist[:, -1] - dist[:, 0] if len(c) > 1 else np.full(len(x), np.inf)
            return ids[:, 0].astype(np.int64), gap
        import torch  # no faiss-gpu: the same search with torch

        device = "cpu" if device == "torch-cpu" else device
        xt = torch.from_numpy(x).to(device)
        ct, half_c = prepared.torch_tensors(device)
        half = half_c[None, :] - xt @ ct.T
        vals, ids = torch.topk(half, k=min(2, len(c)), dim=1, largest=False)
        vals, ids = vals.cpu().numpy(), ids.cpu().numpy()
        gap = 2 * (vals[:, -1] - vals[:, 0]) if len(c) > 1 else np.full(len(x), np.inf)
        return ids[:, 0].astype(np.int64), gap
    if prepared.index is not None:
        # faiss's fused BLAS + top-k is the fastest CPU search; exactness comes from the re-rank.
        dist, ids = prepared.index.search(x, min(2, len(c)))
        gap = dist[:, -1] - dist[:, 0] if len(c) > 1 else np.full(len(x), np.inf)
        return ids[:, 0].astype(np.int64), gap
    # Below FAISS_MIN_DIM dimensions faiss's top-k heap costs more than the products: BLAS
    # scores and a two-pass minimum are faster (bench/bench_assign.py).
    half = x @ c.T
    np.subtract(0.5 * c_sq.astype(np.float32)[None, :], half, out=half)
    best = np.argmin(half, axis=1)
    rows = np.arange(len(x))
    best_val = half[rows, best]
    half[rows, best] = np.inf
    gap = 2 * (half.min(axis=1) - best_val) if len(c) > 1 else np.full(len(x), np.inf)
    return best, gap
