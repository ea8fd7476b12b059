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


@pytest.mark.parametrize("tile", [1, 3, 16, 4096])
def test_components_match_networkx_at_every_tile_size(tile):
    x = planted()
    labels, best = components(x, 0.86, tile=tile)
    assert np.array_equal(labels, reference_labels(x, 0.86))
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    assert np.allclose(best, sim.max(axis=1), atol=1e-6)


def test_chain_is_one_component_though_ends_are_far():
    theta = np.arccos(0.92)
    x = np.array([[np.cos(k * theta), np.sin(k * theta), 0.0] for k in range(4)], np.float32)
    assert (x[0] @ x[2]) < 0.86
    labels, _ = components(x, 0.86, tile=2)
    assert labels.tolist() == [0, 0, 0, 0]


def test_threshold_is_strict_and_singletons_stay():
    # Neighbours are exactly cos 0.5 apart; the ends are cos -0.5.
    x = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [-0.5, np.sqrt(0.75)]], np.float32)
    labels, best = components(x, 0.5)
    assert labels.tolist() == [0, 1, 2]  # 0.5 is not > 0.5
    labels, _ = components(x, 0.49)
    assert labels.tolist() == [0, 0, 0]
    one, best_one = components(x[:1], 0.86)
    assert one.tolist() == [0] and best_one[0] == -np.inf


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
