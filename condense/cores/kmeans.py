"""k-means training (faiss, or exact Lloyd iterations that split over workers) and exact
nearest-centroid assignment.

Lloyd iterations (`lloyd_partial`, `lloyd_update`) assign rows exactly and sum them in fixed
point (int64 units of 2^-32), so partial sums from any number of workers, split any way, add
up to the same integers and the same centroids.

Assignment gives bit-identical answers whatever the batch a row arrives in, the device and the
precision of its products: the candidate search is a screen (faiss or BLAS in fp32 on CPUs,
torch in fp32, tf32, bf16 or fp16 on a GPU) with a rigorous error bound; the rows it cannot
decide are settled in float64 and ties within float64 rounding by exact sums, ties to the
lower centroid id (`_nearest`). The distance and cosine are computed per row in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FAISS_MIN_DIM = 64  # CPU candidate search: faiss from this dimension on, BLAS tiles below
SCORE_BLOCK_BYTES = 1 << 22  # the BLAS search's scores per block of centroids (cache-sized)


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
    that path here) trains with `lloyd_train` on that device (the same Lloyd iterations).
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
        init = init_centroids
        if init is None:  # k seeded random rows
            init = x[np.random.default_rng(seed).permutation(n)[:k]]
        return lloyd_train(x, init, niter=niter, spherical=spherical, device=device)
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


FIXED_POINT = 2.0**32  # Lloyd sums: training rows' components in units of 2^-32, as int64
MAX_TRAIN_ROWS = 2**30  # so sums of unit components stay well inside int64 (2^30 x 2^32)
SUM_ROWS = 16_384  # rows quantised and summed at once (their int64 copy: 100 MB at d = 768)
EMPTY_NUDGE = 1.0 / 1024  # an empty cluster and the one it splits move this far apart


@dataclass(frozen=True)
class LloydPartial:
    """One worker's share of a Lloyd iteration: per centroid, the sum of its nearest rows in
    fixed point and their count; and the sum of their squared distances, also in fixed point.
    Integers add exactly in any order, so partials combine to the same bits however the rows
    were split."""

    sums: np.ndarray  # int64 (k, d): sum of round(x * 2^32) over each centroid's rows
    counts: np.ndarray  # int64 (k,)
    objective: int  # sum of round(||x - c||^2 * 2^32)

    def __add__(self, other: LloydPartial) -> LloydPartial:
        return LloydPartial(
            self.sums + other.sums, self.counts + other.counts, self.objective + other.objective
        )


def lloyd_partial(
    x: np.ndarray,
    centroids: Centroids,
    *,
    device: str = "cpu",
    screen: str = "fp32",
    scale: float = 1.0,
) -> LloydPartial:
    """Assign rows to their nearest centroids (exactly: `assign`) and sum them per centroid in
    fixed point, in units of scale x 2^-32: on a torch device with its integer index_add, else
    in numpy. `scale`, a power of two, bounds every component (1 for unit rows)."""
    k, d = centroids.c.shape
    if len(x) and float(np.abs(x).max()) > scale:
        raise ValueError(f"Lloyd's fixed-point sums take components within [-{scale}, {scale}]")
    counts = np.zeros(k, np.int64)
    objective = 0
    sums = _FixedSums(k, d, device)
    for lo in range(0, len(x), SUM_ROWS):
        xs = np.ascontiguousarray(x[lo : lo + SUM_ROWS], dtype=np.float32)
        a = assign(xs, centroids, device=device, screen=screen)
        dist = a.centroid_dist.astype(np.float64)
        objective += int(np.rint(dist * dist / scale**2 * FIXED_POINT).astype(np.int64).sum())
        counts += np.bincount(a.cluster_id, minlength=k)
        sums.add(xs / np.float32(scale) if scale != 1.0 else xs, a.cluster_id)
    return LloydPartial(sums.result(), counts, objective)


class _FixedSums:
    """Per-centroid sums of round(x * 2^32) in int64 (each product exact in float64), kept
    in one array: in numpy by sorted runs, or on a torch device by integer atomic adds,
    exact in any order, copied to the host once."""

    def __init__(self, k: int, d: int, device: str):
        self.torch = _on_torch(device)
        if self.torch:
            import torch

            self.where = "cpu" if device == "torch-cpu" else device
            self.sums = torch.zeros((k, d), dtype=torch.int64, device=self.where)
        else:
            self.sums = np.zeros((k, d), np.int64)

    def add(self, x: np.ndarray, labels: np.ndarray) -> None:
        if not len(x):
            return
        if self.torch:
            import torch

            q = torch.round(torch.from_numpy(x).to(self.where).double() * FIXED_POINT).long()
            self.sums.index_add_(0, torch.from_numpy(labels.astype(np.int64)).to(self.where), q)
            return
        q = np.rint(x.astype(np.float64) * FIXED_POINT).astype(np.int64)
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        self.sums[sorted_labels[starts]] += np.add.reduceat(q[order], starts, axis=0)

    def result(self) -> np.ndarray:
        return self.sums.cpu().numpy() if self.torch else self.sums


def lloyd_update(
    total: LloydPartial, previous: np.ndarray, spherical: bool, scale: float = 1.0
) -> np.ndarray:
    """The next centroids from the combined partials: each cluster's mean; an empty cluster
    (in id order) takes half of the largest one, both moved a little apart as faiss does; a
    function of the combined integers only, so the same at any worker count."""
    counts = total.counts.copy()
    means = total.sums.astype(np.float64) * (scale / FIXED_POINT) / np.maximum(counts, 1)[:, None]
    c = np.where(counts[:, None] > 0, means, previous).astype(np.float32)
    for empty in np.flatnonzero(total.counts == 0).tolist():
        big = int(np.argmax(counts))
        c[empty] = c[big] * np.float32(1 + EMPTY_NUDGE)
        c[big] = c[big] * np.float32(1 - EMPTY_NUDGE)
        counts[empty] = counts[big] // 2
        counts[big] -= counts[empty]
    if spherical:
        norms = np.linalg.norm(c.astype(np.float64), axis=1)
        c = (c / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
    return np.ascontiguousarray(c)


def lloyd_train(
    x: np.ndarray,
    init: np.ndarray,
    *,
    niter: int,
    spherical: bool = False,
    device: str = "cpu",
    screen: str = "fp32",
) -> np.ndarray:
    """Lloyd's k-means in one process from `init`: `niter` exact assignments and fixed-point
    means. The distributed trainer (stages/cluster/lloyd.py) computes the same iterations split over
    workers, and gives these very bits."""
    if len(x) > MAX_TRAIN_ROWS:
        raise ValueError(f"Lloyd training takes at most {MAX_TRAIN_ROWS:,} rows, got {len(x):,}")
    # The fixed point's unit: a power of two (exact to divide by) bounding every component.
    top = float(np.abs(x).max(initial=0.0))
    scale = 2.0 ** max(0, int(np.ceil(np.log2(top)))) if top > 0 else 1.0
    c = np.ascontiguousarray(init, dtype=np.float32)
    for _ in range(niter):
        prepared = prepare_centroids(c)
        partial = lloyd_partial(x, prepared, device=device, screen=screen, scale=scale)
        c = lloyd_update(partial, c, spherical, scale)
    return c


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
    c64: np.ndarray  # float64 (k, d), for the exact re-rank of near ties
    c_sq: np.ndarray  # float64 squared norms
    index: object | None  # faiss.IndexFlatL2 over c (CPU search at FAISS_MIN_DIM and above)
    norm_max: float = 1.0  # the largest centroid norm (the screens' error bounds scale with it)
    half_sq: np.ndarray | None = None  # float32 halves of the squared norms (the BLAS search)
    on_device: dict = field(default_factory=dict)  # (device, precision) -> torch tensors

    def torch_tensors(self, device: str, precision: str):
        """On a torch device, copied there once: the centroids at the screen's precision, half
        their squared norms (float32), and the float64 centroids and squared norms."""
        key = (device, precision)
        if key not in self.on_device:
            import torch

            from condense.cores.screen import screen_dtype

            c = torch.from_numpy(self.c).to(device)
            half = torch.from_numpy(self.half_sq).to(device)
            c64 = torch.from_numpy(self.c64).to(device)
            self.on_device[key] = (
                c.to(screen_dtype(precision)),
                half,
                c64,
                torch.from_numpy(self.c_sq).to(device),
            )
        return self.on_device[key]


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
    c_sq = np.einsum("ij,ij->i", c64, c64)
    norm_max = float(np.sqrt(c_sq.max(initial=0.0)))
    return Centroids(c, c64, c_sq, index, norm_max, half_sq=(0.5 * c_sq).astype(np.float32))


def assign(
    x: np.ndarray,
    centroids: np.ndarray | Centroids,
    *,
    device: str = "cpu",
    chunk_rows: int | None = None,
    screen: str = "fp32",
) -> Assignment:
    """Assign each row of x to its nearest centroid (squared Euclidean distance, ties to the
    lower id). The answer is the exact one whatever the device, the chunk and the `screen` (the
    precision of a torch device's products: fp32, tf32, bf16 or fp16; CPUs search in fp32)."""
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
    # A GPU holds 4,096 x k scores (1.6 GB at k = 100,000).
    if _on_torch(device) or prepared.index is not None:
        step = chunk_rows or 4096
    else:
        step = chunk_rows or min(scores, 4 * x.shape[1])
    ids = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float64)
    cos = np.empty(n, dtype=np.float64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        xs = x[start:stop]
        chosen = _nearest(xs, prepared, device, screen)
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


def _on_torch(device: str) -> bool:
    return device.startswith("cuda") or device == "torch-cpu"


def screen_error(
    precision: str, dim: int, row_norm: float, centroid_norm: float, faiss: bool = False
) -> float:
    """A rigorous bound on the error of a screened score s_j (the squared distance up to a
    constant per row: ||c_j||^2 - 2 x.c_j, faiss's ||x||^2 + ||c_j||^2 - 2 x.c_j, or faiss's
    sum (x_i - c_ji)^2 on small queries) for rows of norm <= row_norm and centroids of norm <=
    centroid_norm.

    The product's error is `screen_bound` scaled by the norms (taken as at least 1, which also
    covers its subnormal term); ||c_j||^2 is off by at most (gamma_d + u) ||c||^2 (faiss sums
    it in fp32; here it is rounded once from float64), and the two or three fp32 additions by
    u (||x|| + ||c||)^2 each; with `faiss`, also its sum of squared differences, by (gamma_d +
    3u) (||x|| + ||c||)^2. The bound is the sum of them; 1% on top covers its own arithmetic."""
    from condense.cores.screen import SUM_ERROR, screen_bound

    a, b = max(1.0, row_norm), max(1.0, centroid_norm)
    u = SUM_ERROR
    gamma = dim * u / (1 - dim * u)
    product = 2.0 * screen_bound(precision, dim) * a * b
    pairwise = (gamma + 3 * u) * (a + b) ** 2 if faiss else 0.0
    return 1.01 * (product + (gamma + u) * b * b + 3 * u * (a + b) ** 2 + pairwise)


FP16_PRODUCTS = 16_384.0  # |x| |c| above this: fp16 products may overflow, the screen is fp32


def exact_error(dim: int, row_norm: float, centroid_norm: float) -> float:
    """A bound on the error of the float64 score ||c_j||^2 - 2 x.c_j (float32 inputs, whose
    products are exact in float64; sums in any order)."""
    a, b = max(1.0, row_norm), max(1.0, centroid_norm)
    u = 2.0**-53
    gamma = (dim + 2) * u / (1 - (dim + 2) * u)
    return 1.01 * gamma * (b * b + 2 * a * b) + 1e-300


DEVICE_CANDIDATES = 32  # centroids per row a torch screen keeps (top-k on the device)
OPEN_ROWS = 256  # rows scored against every centroid at once in float64 on a device
CPU_CANDIDATES = 8  # centroids per row faiss keeps on CPUs (a window of near ties fits)
WINDOW_ROWS = 512  # rows whose candidate windows are scored in float64 at once


def _nearest(x: np.ndarray, prepared: Centroids, device: str, screen: str) -> np.ndarray:
    """Nearest centroid ids for one chunk, exactly, in three steps:

    1. a screen (faiss or BLAS in fp32 on CPUs, torch at `screen` on a device) scores every
       centroid; a row whose best score beats the runner-up by more than twice the screen's
       error bound has its answer;
    2. the other rows are scored in float64, on the candidates the screen could not rule out
       (all centroids where the screen kept too few), and settled where the best float64 score
       beats the next by more than twice its own error bound;
    3. what is left are ties within float64 rounding, compared exactly (`_exact_tie`), ties to
       the lower id.

    No step depends on the chunk, the device or the screen, so neither does the answer."""
    k, d = prepared.c.shape
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    row_norm = float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64).max(initial=0.0)))
    if _on_torch(device):
        return _nearest_torch(x, prepared, device, screen, row_norm)
    scores, cand = _screen_cpu(x, prepared)
    margin = 2 * screen_error("fp32", d, row_norm, prepared.norm_max, prepared.index is not None)
    best = cand[:, 0].copy()
    return _refine(
        best,
        scores,
        cand,
        x,
        lambda r: x[r].astype(np.float64),
        (prepared.c64, prepared.c_sq, np.arange(k)),
        margin,
        prepared,
        row_norm,
        np,
    )


def _refine(best, scores, cand, x, rows64, exact_c, margin, prepared, row_norm, xp):
    """Steps 2 and 3 of `_nearest` for one chunk, on the screen's arrays: numpy (`xp` = np) or
    torch tensors on their device (`xp` = torch). `scores` ascending with their centroids
    `cand` (-1: an id the screen did not keep), `rows64(r)` the rows r in float64 there,
    `exact_c` the float64 centroids, their squared norms and every centroid's id there."""
    c64, c_sq, everyone = exact_c
    k, m = len(prepared.c), scores.shape[1]
    unsure = xp.where(~(scores[:, 1] - scores[:, 0] > margin))[0]  # NaN: unsure
    if not len(unsure):
        return best
    # A window closes when the screen's last candidate lies beyond it: the answer is then among
    # the candidates inside. A row with a score that is not finite, or whose screen kept no
    # ids past the best (BLAS), never closes one: it is scored against every centroid.
    s = scores[unsure]
    closed = (
        xp.isfinite(s).all(1) & (cand[unsure, -1] >= 0) & ((s[:, -1] > s[:, 0] + margin) | (m == k))
    )
    rows, wide = unsure[closed], unsure[~closed]
    for start in range(0, len(rows), WINDOW_ROWS):
        r = rows[start : start + WINDOW_ROWS]
        ids = cand[r]
        exact = c_sq[ids] - 2.0 * xp.einsum("rd,rmd->rm", rows64(r), c64[ids])
        exact = xp.where(scores[r] <= scores[r, :1] + margin, exact, float("inf"))
        host = _host(r)
        best[host] = _settle(exact, ids, x[host], prepared, row_norm)
    for start in range(0, len(wide), OPEN_ROWS):  # every centroid, a few rows at a time
        r = wide[start : start + OPEN_ROWS]
        exact = c_sq[None, :] - 2.0 * (rows64(r) @ c64.T)
        host = _host(r)
        best[host] = _settle(exact, everyone, x[host], prepared, row_norm)
    return best


def _host(a) -> np.ndarray:
    """A numpy array as it is; a torch tensor copied to the host."""
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def _settle(exact, cand, x: np.ndarray, prepared: Centroids, row_norm: float) -> np.ndarray:
    """Steps 2 and 3 for rows with float64 scores `exact` of their candidates `cand` (per row,
    inf where a row has fewer; or one list shared by every row): numpy arrays, or torch tensors
    on their device (only ties come back)."""
    if isinstance(exact, np.ndarray):
        rows = np.arange(len(exact))
    else:
        import torch

        rows = torch.arange(len(exact), device=exact.device)
    win = exact.argmin(1)
    low = exact[rows, win]
    margin = 2 * exact_error(prepared.c.shape[1], row_norm, prepared.norm_max)
    near = exact <= (low + margin)[:, None]
    shared = cand.ndim == 1
    out = _host(cand[win] if shared else cand[rows, win]).astype(np.int64)
    for r in np.flatnonzero(_host(near.sum(1)) > 1):
        tied = cand[near[r]] if shared else cand[r][near[r]]
        out[r] = _exact_tie(x[r], _host(tied), prepared)
    return out


def _exact_tie(x: np.ndarray, cand: np.ndarray, prepared: Centroids) -> int:
    """Among candidates whose float64 scores tie within rounding: the smallest exact score
    sum(c_i^2 - 2 x_i c_i), ties to the lower id. Every term is exact in float64 and a multiple
    of 2^-298, so the sign of math.fsum over one candidate's terms minus another's is the sign
    of the exact difference (a nonzero sum of such terms never rounds to zero)."""
    import math

    x64 = x.astype(np.float64)

    def terms(j: int) -> np.ndarray:
        c = prepared.c64[j]
        return np.concatenate([c * c, -2.0 * x64 * c])

    ids = sorted(int(j) for j in cand)
    best, best_terms = ids[0], terms(ids[0])
    for j in ids[1:]:
        t = terms(j)
        if math.fsum(np.concatenate([t, -best_terms]).tolist()) < 0:
            best, best_terms = j, t
    return best


def _screen_cpu(x: np.ndarray, prepared: Centroids) -> tuple[np.ndarray, np.ndarray]:
    """The best fp32 scores per row (float64 arrays, ascending) and their centroids: faiss's
    CPU_CANDIDATES best; BLAS's two best, with the runner-up's id left out (-1)."""
    k = len(prepared.c)
    if prepared.index is not None:
        # faiss's fused BLAS + top-k is the fastest CPU search; exactness comes from the re-rank.
        dist, ids = prepared.index.search(x, min(CPU_CANDIDATES, k))
        return dist.astype(np.float64), ids.astype(np.int64)
    # Below FAISS_MIN_DIM dimensions faiss's top-k heap costs more than the products: BLAS
    # scores and a two-pass minimum are faster (bench/bench_assign.py). Centroids are taken a
    # block at a time, so the scores stay in cache at any k (1.5x at k = 100,000, d = 16), and
    # each block's two best are folded into the running best and runner-up.
    c, half_sq = prepared.c, prepared.half_sq
    n = len(x)
    rows = np.arange(n)
    best = np.zeros(n, np.int64)
    best_val = np.full(n, np.inf, np.float32)
    second = np.full(n, np.inf, np.float32)
    block = max(256, SCORE_BLOCK_BYTES // (4 * max(n, 1)))
    for lo in range(0, len(c), block):
        half = x @ c[lo : lo + block].T
        np.subtract(half_sq[None, lo : lo + block], half, out=half)
        top = np.argmin(half, axis=1)
        top_val = half[rows, top]
        half[rows, top] = np.inf
        runner_up = half.min(axis=1)
        better = top_val < best_val  # ties keep the earlier block: the lower id
        second = np.where(better, np.minimum(best_val, runner_up), np.minimum(second, top_val))
        best = np.where(better, top + lo, best)
        best_val = np.where(better, top_val, best_val)
    scores = 2.0 * np.stack([best_val, second], axis=1).astype(np.float64)
    return scores, np.stack([best, np.full(n, -1)], axis=1)


def _nearest_torch(x, prepared: Centroids, device: str, screen: str, row_norm: float):
    """`_nearest` with steps 1 and 2 on a torch device (the GPU path; "torch-cpu" runs it on
    the CPU to test it): the screen at `screen`, top-DEVICE_CANDIDATES candidates per row, the
    float64 scores of the rows it leaves open computed there too (`_refine` on tensors)."""
    import torch

    from condense.cores.screen import screen_dtype, screened_matmul

    device = "cpu" if device == "torch-cpu" else device
    k, d = prepared.c.shape
    if screen == "fp16" and max(1.0, row_norm) * max(1.0, prepared.norm_max) > FP16_PRODUCTS:
        screen = "fp32"  # products beyond fp16's range would be inf
    c, half_c, c64, c_sq64 = prepared.torch_tensors(device, screen)
    xt = torch.from_numpy(x).to(device)
    scores = half_c[None, :] - screened_matmul(xt.to(screen_dtype(screen)), c.T, screen).float()
    m = min(DEVICE_CANDIDATES, k)
    vals, cand = torch.topk(scores, k=m, dim=1, largest=False)  # ascending
    vals = 2.0 * vals.double()
    margin = 2 * screen_error(screen, d, row_norm, prepared.norm_max)
    best = _host(cand[:, 0]).astype(np.int64)
    everyone = torch.arange(k, device=device)
    return _refine(
        best,
        vals,
        cand,
        x,
        lambda r: xt[r].double(),
        (c64, c_sq64, everyone),
        margin,
        prepared,
        row_norm,
        torch,
    )
