"""Exact components and keep rules against a brute-force reference (dense matrix + networkx)."""

import networkx as nx
import numpy as np
import pytest

from condense.cores.components import _compress, components, union_pairs
from condense.cores.keep import KEEP_RULES, keep_mask


def reference_labels(x, threshold):
    sim = x @ x.T
    graph = nx.Graph()
    graph.add_nodes_from(range(len(x)))
    ii, jj = np.nonzero(np.triu(sim > threshold, k=1))
    graph.add_edges_from(zip(ii.tolist(), jj.tolist(), strict=True))
    labels = np.empty(len(x), dtype=np.int64)
    for comp in nx.connected_components(graph):
        labels[list(comp)] = min(comp)
    return labels


def planted(seed=0, n_groups=30, dim=32):
    """Duplicate groups (cos ~0.95), chains (neighbours ~0.92, two apart ~0.70), singletons."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        base = rng.standard_normal(dim)
        base /= np.linalg.norm(base)
        size = int(rng.integers(1, 8))
        if g % 5 == 0:  # a chain
            turn = rng.standard_normal(dim)
            turn -= turn @ base * base
            turn /= np.linalg.norm(turn)
            theta = np.arccos(0.92)
            rows += [np.cos(k * theta) * base + np.sin(k * theta) * turn for k in range(4)]
        else:
            rows += [base + 0.2 * rng.standard_normal(dim) / np.sqrt(dim) for _ in range(size)]
    x = np.array(rows, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(len(x))]


def max_sim_reference(x):
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return sim.max(axis=1)


def assert_max_sim_exact_between(got, x, t_min, t_max):
    """max_sim's contract: exact in [t_min, t_max]; outside, on the right side of the range."""
    ref = max_sim_reference(x)
    inside = (ref >= t_min) & (ref <= t_max)
    assert np.allclose(got[inside], ref[inside], atol=1e-6)
    assert (got[ref > t_max] > t_max).all()
    assert (got[ref < t_min] < t_min).all()
    assert (got <= ref + 1e-6).all()


@pytest.mark.parametrize("tile", [1, 3, 16, 4096])
@pytest.mark.parametrize("prune", [True, False])
def test_components_match_networkx_at_every_tile_size(tile, prune):
    x = planted()
    got = components(x, 0.86, tile=tile, prune=prune)
    assert np.array_equal(got.labels[0], reference_labels(x, 0.86))
    if prune:
        assert_max_sim_exact_between(got.max_sim, x, 0.86, 0.86)
    else:  # nothing skipped: every row's score is exact
        assert np.allclose(got.max_sim, max_sim_reference(x), atol=1e-6)
        assert got.tiles_computed == got.tiles_total


def test_several_thresholds_in_one_pass_match_each_alone():
    x = planted(seed=4)
    ts = [0.80, 0.86, 0.90]
    got = components(x, ts, tile=7)
    for k, t in enumerate(ts):
        assert np.array_equal(got.labels[k], reference_labels(x, t))
        assert np.array_equal(got.labels[k], components(x, t, tile=5).labels[0])
    assert_max_sim_exact_between(got.max_sim, x, 0.80, 0.90)


def giant_cluster(seed=1, n=600, dim=48, group=0.8):
    """Mostly one group of near-identical rows (cos ~0.97), the rest spread and chained."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(dim)
    base /= np.linalg.norm(base)
    m = int(group * n)
    dup = base + 0.18 * rng.standard_normal((m, dim)) / np.sqrt(dim)
    rest = base + 0.9 * rng.standard_normal((n - m, dim)) / np.sqrt(dim) * np.sqrt(dim) / 4
    x = np.vstack([dup, rest, rest[:20] + 0.05 * rng.standard_normal((20, dim)) / np.sqrt(dim)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("tile", [8, 64, 1000])
def test_giant_group_is_absorbed_and_still_exact(tile):
    x = giant_cluster()
    ts = [0.80, 0.86, 0.90]
    got = components(x, ts, tile=tile)
    for k, t in enumerate(ts):
        assert np.array_equal(got.labels[k], reference_labels(x, t))
    assert got.absorbed >= 400  # the group joined the pivot without tiling within itself
    if tile < 100:
        assert got.tiles_computed < got.tiles_total / 2  # whole tiles were skipped
    assert_max_sim_exact_between(got.max_sim, x, 0.80, 0.90)


def test_angle_pruning_skips_far_tiles_exactly():
    # Rows spread over a half circle: far apart rows cannot be joined, so their tiles are skipped.
    angles = np.linspace(0, np.pi, 400)
    x = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], 1).astype(np.float32)
    got = components(x, 0.99995, tile=10)
    assert np.array_equal(got.labels[0], reference_labels(x, 0.99995))
    assert got.tiles_computed < got.tiles_total / 4


def test_torch_path_matches_numpy():
    pytest.importorskip("torch")
    x = giant_cluster(seed=2)
    a = components(x, [0.86, 0.9], tile=50)
    b = components(x, [0.86, 0.9], tile=50, device="torch-cpu")
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.max_sim, b.max_sim, atol=1e-6)


def test_chain_is_one_component_though_ends_are_far():
    theta = np.arccos(0.92)
    x = np.array([[np.cos(k * theta), np.sin(k * theta), 0.0] for k in range(4)], np.float32)
    assert (x[0] @ x[2]) < 0.86
    assert components(x, 0.86, tile=2).labels[0].tolist() == [0, 0, 0, 0]


def test_threshold_is_strict_and_singletons_stay():
    # Neighbours are exactly cos 0.5 apart; the ends are cos -0.5.
    x = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [-0.5, np.sqrt(0.75)]], np.float32)
    assert components(x, 0.5).labels[0].tolist() == [0, 1, 2]  # 0.5 is not > 0.5
    assert components(x, 0.49).labels[0].tolist() == [0, 0, 0]
    one = components(x[:1], 0.86)
    assert one.labels[0].tolist() == [0] and one.max_sim[0] == -np.inf
    assert components(x[:0], 0.86).labels.shape == (1, 0)


def test_identical_rows_form_one_component():
    x = np.tile(np.array([[0.6, 0.8, 0.0]], np.float32), (50, 1))
    for tile in (8, 4096):
        got = components(x, 0.86, tile=tile)
        assert set(got.labels[0].tolist()) == {0}
        assert got.absorbed == 49


def test_bad_thresholds_are_refused():
    x = planted()
    for bad in (0.0, -0.1, 1.5, []):
        with pytest.raises(ValueError, match="thresholds must lie in"):
            components(x, bad)


def test_union_pairs_is_order_free():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 200, 150), rng.integers(0, 200, 150)
    ref = _compress(union_pairs(np.arange(200), a, b))
    perm = rng.permutation(150)
    assert np.array_equal(_compress(union_pairs(np.arange(200), b[perm], a[perm])), ref)
    split = union_pairs(union_pairs(np.arange(200), a[:70], b[:70]), a[70:], b[70:])
    assert np.array_equal(_compress(split), ref)
    # Each label is the smallest member of its component (networkx as the reference).
    graph = nx.Graph()
    graph.add_nodes_from(range(200))
    graph.add_edges_from(zip(a.tolist(), b.tolist(), strict=True))
    for comp in nx.connected_components(graph):
        assert set(ref[list(comp)].tolist()) == {min(comp)}


def test_keep_rules_by_hand():
    labels = np.array([0, 0, 0, 0, 4, 5, 5])
    ids = np.array(["d", "a", "c", "b", "e", "g", "f"], dtype=object)
    dist = np.array([0.3, 0.1, 0.2, 0.2, 0.5, 0.7, 0.7])
    clip = np.array([0.1, 0.4, 0.4, 0.2, 0.3, 0.1, 0.2])

    def kept(rule):
        return sorted(ids[keep_mask(labels, ids, dist, clip, rule)].tolist())

    def kept_random(*args):
        return sorted(ids[keep_mask(*args, "random", seed=1)].tolist())

    # Component 0 by (dist, id): a(0.1), b(0.2), c(0.2), d(0.3); m=4 -> position 2 -> c.
    assert kept("middle") == ["c", "e", "g"]  # component 5: f(0.7), g(0.7) -> position 1 -> g
    assert kept("near") == ["a", "e", "f"]
    assert kept("far") == ["d", "e", "f"]
    assert kept("clip_max") == ["a", "e", "f"]  # a and c tie at 0.4: a by id
    for rule in KEEP_RULES:
        mask = keep_mask(labels, ids, dist, clip, rule, seed=1)
        assert mask.sum() == 3
    # random: the member with the smallest hash(seed, sample_id) of each component.
    from condense.cores.hashing import hash_ids

    h = hash_ids(ids.tolist(), 1)
    expect = sorted(ids[labels == c][np.argmin(h[labels == c])] for c in (0, 4, 5))
    assert kept_random(labels, ids, dist, clip) == expect
    with pytest.raises(ValueError, match="valid rules: middle, far, near, clip_max, random"):
        keep_mask(labels, ids, dist, clip, "mid")


def pairs_at_the_thresholds(thresholds, dim=64, seed=5, ulps=6):
    """Pairs of unit float32 vectors whose exact dot lies a few float32 ulps either side of each
    threshold (and on it), each pair in its own random plane; returns x and the pairs with their
    exact dots (float64 sums of the float32 products)."""
    from condense.cores.components import exact_dots

    rng = np.random.default_rng(seed)
    rows, pairs = [], []
    for t in thresholds:
        for k in range(-ulps, ulps + 1):
            q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
            c = t + k * 2.0**-24
            a = q[:, 0]
            b = c * q[:, 0] + np.sqrt(1 - c * c) * q[:, 1]
            pairs.append((len(rows), len(rows) + 1))
            rows += [a, b]
    x = np.array(rows, dtype=np.float32)
    a, b = np.array(pairs).T
    return x, a, b, exact_dots(x, a, b)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("tile", [1, 3, 64])
def test_every_precision_decides_pairs_at_the_threshold_exactly(precision, tile):
    pytest.importorskip("torch")
    ts = [0.8, 0.86, 0.9]
    x, a, b, exact = pairs_at_the_thresholds(ts)
    assert (np.abs(exact[:, None] - np.array(ts)).min(axis=1) < 1e-6).all()  # all at the edge
    got = components(x, ts, tile=tile, precision=precision)
    for k, t in enumerate(ts):
        joined = got.labels[k][a] == got.labels[k][b]
        assert np.array_equal(joined, exact > t), (precision, tile, t)
    assert got.rechecked >= len(a)  # each pair sat within the bound of a threshold


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_low_precision_screens_give_the_fp32_components(precision):
    pytest.importorskip("torch")
    ts = [0.8, 0.86, 0.9]
    for x in (planted(seed=4), giant_cluster(seed=3)):
        ref = components(x, ts, tile=64)
        for tile in (5, 64, 2048):
            got = components(x, ts, tile=tile, precision=precision)
            assert np.array_equal(got.labels, ref.labels), (precision, tile)


def test_the_screen_bound_covers_the_error_it_claims():
    torch = pytest.importorskip("torch")
    from condense.cores.components import screen_bound

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        xt = torch.from_numpy(x).to(dtype)
        screened = (xt @ xt.T).float().numpy().astype(np.float64)
        worst = np.abs(screened - exact).max()
        assert worst <= screen_bound(precision, 768), precision
        assert worst > screen_bound(precision, 768) / 64  # the bound is not absurdly loose
    with pytest.raises(ValueError, match="unknown precision"):
        screen_bound("int8", 768)
