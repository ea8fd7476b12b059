import numpy as np
import pytest

from condense.cores.kmeans import (
    FIXED_POINT,
    assign,
    lloyd_partial,
    lloyd_train,
    lloyd_update,
    prepare_centroids,
    train_kmeans,
)


def test_assign_hand_computed():
    centroids = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], np.float32)
    x = np.array([[0.6, 0.8], [-0.8, 0.6], [1.0, 0.0]], np.float32)
    out = assign(x, centroids)
    # Row 0: squared distances 0.8, 1.8, 3.2 -> centroid 0; row 1: 3.2, 2.0, 0.4 -> centroid 2.
    assert out.cluster_id.tolist() == [0, 2, 0]
    assert np.allclose(out.centroid_dist, [np.sqrt(0.8), np.sqrt(0.4), 0.0], atol=1e-6)
    assert np.allclose(out.centroid_cos, [0.6, 0.8, 1.0], atol=1e-6)


def test_exact_ties_go_to_the_lower_centroid_id():
    centroids = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    x = np.array([[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]], np.float32)
    assert assign(x, centroids).cluster_id.tolist() == [0, 0]


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_assign_is_identical_at_every_chunk_size(chunk_rows):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((20, 32)).astype(np.float32)
    ref = assign(x, c, chunk_rows=10_000)
    out = assign(x, c, chunk_rows=chunk_rows)
    assert np.array_equal(out.cluster_id, ref.cluster_id)
    assert np.array_equal(out.centroid_dist, ref.centroid_dist)
    assert np.array_equal(out.centroid_cos, ref.centroid_cos)
    # And each row alone gives the same bits as in a batch.
    for i in (0, 137, 499):
        one = assign(x[i : i + 1], c)
        assert one.cluster_id[0] == ref.cluster_id[i]
        assert one.centroid_dist[0] == ref.centroid_dist[i]
    brute = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(ref.cluster_id, brute)


def test_train_recovers_separated_blobs_and_warm_start():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((4, 16)).astype(np.float32) * 5
    labels = rng.integers(0, 4, 2000)
    x = centers[labels] + rng.standard_normal((2000, 16)).astype(np.float32) * 0.1
    cent = train_kmeans(x, 4, niter=20, seed=0, init_centroids=centers + 0.5)
    ids = assign(x, cent).cluster_id
    # Warm-started from near the truth, each blob is one cluster.
    for c in range(4):
        assert len(np.unique(ids[labels == c])) == 1
    assert len(np.unique(ids)) == 4
    again = train_kmeans(x, 4, niter=20, seed=0, init_centroids=centers + 0.5)
    assert np.array_equal(cent, again)


def test_train_needs_k_rows():
    with pytest.raises(ValueError, match="at least k=5"):
        train_kmeans(np.zeros((3, 4), np.float32), 5, niter=1, seed=0)


def hard_case(rng, dim: int, k: int = 300):
    """Rows and centroids with every kind of tie: an exact tie (two equal centroids, rows on
    them), near ties a few float32 ulps apart, and a crowd of 64 centroids at nearly the same
    distance from a row (more than a screen keeps: its window stays open). Unit rows, centroids
    of norm up to 3 (the bounds scale with it)."""
    x = rng.standard_normal((2500, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.standard_normal((k, dim))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True) * rng.uniform(0.2, 3.0, (k, 1))).astype(
        np.float32
    )
    c[0] /= np.linalg.norm(c[0])
    c[1] = c[0]  # an exact tie: the lower id wins
    x[:5] = c[0]
    for j in range(2, 12):  # near ties: a centroid a few ulps from another
        c[j + 150] = np.nextafter(c[j], np.inf) if j % 2 else c[j] * np.float32(1 + 2e-7)
        x[5 + j] = (c[j] / np.linalg.norm(c[j])).astype(np.float32)
    crowd = rng.standard_normal((64, dim)).astype(np.float32)
    crowd /= np.linalg.norm(crowd, axis=1, keepdims=True)
    c[200:264] = (x[40] + 1e-4 * crowd).astype(np.float32)  # 64 centroids within 1e-4 of row 40
    return x, c


@pytest.mark.parametrize("screen", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("chunk_rows", [None, 7, 1000])
def test_the_gpu_code_assigns_bit_identically_at_every_screen(screen, chunk_rows):
    """The torch search the GPUs run (here on the CPU), its products screened in fp32, tf32,
    bf16 or fp16, gives the CPU path's ids, distances and cosines bit for bit: every row the
    screen cannot decide is settled in float64, and ties within float64 rounding exactly."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    for dim in (16, 96):
        x, c = hard_case(rng, dim)
        ref = assign(x, c)
        got = assign(x, c, device="torch-cpu", chunk_rows=chunk_rows, screen=screen)
        assert np.array_equal(got.cluster_id, ref.cluster_id)
        assert np.array_equal(got.centroid_dist, ref.centroid_dist)
        assert np.array_equal(got.centroid_cos, ref.centroid_cos)
        assert (got.cluster_id[:5] == 0).all()
        # The answer is the nearest centroid by exact (float64, then fsum) arithmetic.
        exact = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
        best = exact.min(axis=1)
        clear = np.sort(exact, axis=1)[:, 1] - best > 1e-9
        assert np.array_equal(got.cluster_id[clear], exact.argmin(axis=1)[clear])


def test_a_tie_within_float64_rounding_is_decided_by_exact_sums():
    """Two centroids whose float64 scores tie within rounding: the exactly smaller one wins,
    and an exact tie goes to the lower id."""
    from condense.cores.kmeans import _exact_tie, prepare_centroids

    x = np.array([1.0, 1e-8, -1e-8], dtype=np.float32)
    c = np.array([[1.0, 0.0, 1e-8], [1.0, 1e-8, 0.0], [1.0, 1e-8, 0.0]], dtype=np.float32)
    prepared = prepare_centroids(c)
    # ||c_j||^2 - 2 x.c_j: c_0 -> 1 + 1e-16 - 2(1 - 1e-16), c_1 -> 1 + 1e-16 - 2(1 + 1e-16)
    assert _exact_tie(x, np.array([0, 1]), prepared) == 1
    assert _exact_tie(x, np.array([2, 1]), prepared) == 1  # c_1 == c_2: the lower id
    # Scores 1 + 2^-200 and 1 round to the same float64: the exact comparison still tells.
    c = np.zeros((2, 64), np.float32)
    c[:, 0], c[0, 1] = 1.0, 2.0**-100
    got = assign(np.zeros((3, 64), np.float32), c)
    assert got.cluster_id.tolist() == [1, 1, 1]


def test_large_rows_on_a_tie_get_the_exact_answer_alone_in_a_chunk_and_on_the_gpu_code():
    """Rows of norm 1e5 on the bisector of two centroids: faiss scores small queries as sums of
    squared differences and large ones with BLAS, torch in fp32 or (out of fp16's range) not in
    fp16; every path, one row at a time or 192 at once, gives the exact nearest centroid."""
    from fractions import Fraction

    rng = np.random.default_rng(5)
    d = 768
    c = rng.normal(size=(2, d))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    c64 = c.astype(np.float64)
    w = c64[1] - c64[0]
    target = (c64[1] @ c64[1] - c64[0] @ c64[0]) / 2
    x = np.abs(rng.normal(size=(64, d))) * (1e5 / np.sqrt(d))
    x = (x - ((x @ w - target) / (w @ w))[:, None] * w[None]).astype(np.float32)

    def exact(row):
        s = [
            sum(
                Fraction(float(b)) * (Fraction(float(b)) - 2 * Fraction(float(a)))
                for a, b in zip(row, cj, strict=True)
            )
            for cj in c
        ]
        return 0 if s[0] <= s[1] else 1

    want = [exact(row) for row in x[:16]]
    one = [int(assign(x[i : i + 1], c).cluster_id[0]) for i in range(16)]
    many = assign(np.tile(x, (3, 1)), c).cluster_id[:16].tolist()
    gpu = [
        assign(x, c, device="torch-cpu", screen=s).cluster_id[:16].tolist()
        for s in ("fp32", "fp16")
    ]
    assert one == many == gpu[0] == gpu[1] == want


def test_the_torch_trainer_finds_the_blobs_faiss_finds():
    """A GPU without faiss-gpu trains with torch (here on the CPU): warm-started or from seeded
    rows it recovers separated blobs, deterministically, and fills an empty cluster."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((4, 16)).astype(np.float32) * 5
    labels = rng.integers(0, 4, 2000)
    x = centers[labels] + rng.standard_normal((2000, 16)).astype(np.float32) * 0.1
    faiss_cent = train_kmeans(x, 4, niter=20, seed=0, init_centroids=centers + 0.5)
    torch_cent = train_kmeans(
        x, 4, niter=20, seed=0, init_centroids=centers + 0.5, device="torch-cpu"
    )
    assert np.allclose(torch_cent, faiss_cent, atol=1e-3)  # the same Lloyd fixed point
    again = train_kmeans(x, 4, niter=20, seed=0, init_centroids=centers + 0.5, device="torch-cpu")
    assert np.array_equal(torch_cent, again)
    # An initial centroid far from every row gets no row: it takes half of the largest cluster.
    init = np.vstack([centers[:3] + 0.5, np.full((1, 16), 1e3, np.float32)])
    cent = train_kmeans(x, 4, niter=20, seed=0, init_centroids=init, device="torch-cpu")
    assert np.abs(cent).max() < 100 and len(np.unique(assign(x, cent).cluster_id)) == 4
    spherical = train_kmeans(x, 4, niter=5, seed=3, spherical=True, device="torch-cpu")
    assert np.allclose(np.linalg.norm(spherical, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("rows", [4, 200])  # faiss: sums of squared differences / BLAS
def test_the_screens_error_stays_within_its_bound(rows):
    """What a comparison of two screened scores sees (the spread of their errors over a row's
    centroids) against twice screen_error, for rows of norm 1 to 1e5 at d = 64 and 768."""
    from condense.cores.kmeans import prepare_centroids, screen_error

    rng = np.random.default_rng(2)
    worst = 0.0
    for d in (64, 768):
        c = rng.normal(size=(256, d)).astype(np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        prepared = prepare_centroids(c)
        for scale in (1.0, 1e3, 1e5):
            x = np.abs(rng.normal(size=(rows, d))) * scale / np.sqrt(d) + 0.37 * scale / 1e5
            x = x.astype(np.float32)
            dist, ids = prepared.index.search(x, 256)
            x64 = x.astype(np.float64)
            exact = ((x64[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
            error = dist - np.take_along_axis(exact, ids, 1)
            norms = np.sqrt((x64**2).sum(1))
            bound = [screen_error("fp32", d, r, prepared.norm_max, faiss=True) for r in norms]
            margin = 2 * np.array(bound)
            worst = max(worst, float(((error.max(1) - error.min(1)) / margin).max()))
    assert 0 < worst <= 1.0


def blobs(rng, n: int = 3000, k: int = 12, d: int = 24, labels: bool = False):
    centres = rng.standard_normal((k, d))
    blob = rng.integers(0, k, n)
    x = centres[blob] + 0.3 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return (x, blob) if labels else x


def test_lloyd_partials_add_up_to_the_same_bits_however_the_rows_are_split():
    rng = np.random.default_rng(3)
    x = blobs(rng)
    c = prepare_centroids(x[:12])
    whole = lloyd_partial(x, c)
    assert whole.counts.sum() == len(x)
    for workers in (2, 4, 7):
        cuts = np.sort(rng.choice(np.arange(1, len(x)), workers - 1, replace=False))
        order = rng.permutation(len(x))  # any rows to any worker, in any order
        parts = [lloyd_partial(x[idx], c) for idx in np.split(order, cuts)]
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        assert np.array_equal(total.sums, whole.sums)
        assert np.array_equal(total.counts, whole.counts)
        assert total.objective == whole.objective
        assert np.array_equal(lloyd_update(total, c.c, False), lloyd_update(whole, c.c, False))
    # The torch path (a GPU's, run here on the CPU) sums the same integers.
    on_torch = lloyd_partial(x, c, device="torch-cpu")
    assert np.array_equal(on_torch.sums, whole.sums) and on_torch.objective == whole.objective
    # Fixed point: each sum is within half a unit per row of the exact float64 sum.
    exact = np.zeros_like(c.c64)
    np.add.at(exact, assign(x, c).cluster_id, x.astype(np.float64))
    assert np.abs(whole.sums / FIXED_POINT - exact).max() <= 0.5 * whole.counts.max() / FIXED_POINT


def test_an_empty_cluster_takes_half_of_the_largest():
    x = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    c = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)  # nobody is nearest to centroid 2
    total = lloyd_partial(x, prepare_centroids(c))
    assert total.counts.tolist() == [3, 1, 0]
    new = lloyd_update(total, c, spherical=False)
    assert np.allclose(new[2], [1 + 1 / 1024, 0]) and np.allclose(new[0], [1 - 1 / 1024, 0])
    assert np.array_equal(new[1], [0, 1])


def test_lloyd_reaches_faiss_fixed_point_from_the_same_start():
    rng = np.random.default_rng(5)
    x, blob = blobs(rng, n=4000, k=10, d=32, labels=True)
    init = x[[np.flatnonzero(blob == b)[0] for b in range(10)]]  # no cluster empties
    ours = lloyd_train(x, init, niter=25)
    theirs = train_kmeans(x, 10, niter=25, seed=0, init_centroids=init)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.array_equal(lloyd_train(x, init, niter=25), ours)
