"""The generator plants what it says, and its ground truth is right."""

import networkx as nx
import numpy as np
import pyarrow.parquet as pq
import pytest

from condense.readers import InputConfig, open_reader
from condense.synth import CHAIN_COS, SynthConfig, generate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, SynthConfig(n=3000, dim=128, seed=3, rows_per_file=1000))
    reader = open_reader(InputConfig(path=str(out)))
    rows = [reader.read(i) for i in reader.plan(1000)]
    img = np.concatenate([r.img for r in rows]).astype(np.float32)
    txt = np.concatenate([r.txt for r in rows]).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    truth = pq.read_table(out / "truth.parquet").to_pandas()
    ids = sum((r.sample_id for r in rows), [])
    assert ids == truth.sample_id.tolist()
    return summary, img, txt, truth


def test_same_seed_same_bytes(tmp_path):
    a = generate(tmp_path / "a", SynthConfig(n=500, dim=16, seed=1, rows_per_file=200))
    b = generate(tmp_path / "b", SynthConfig(n=500, dim=16, seed=1, rows_per_file=200))
    assert a == b
    for f in ("img_emb/img_emb_2.npy", "text_emb/text_emb_0.npy", "truth.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_layout_and_kinds(corpus):
    summary, img, _, truth = corpus
    assert summary["files"] == 3 and summary["rows"] == 3000
    kinds = truth.kind.value_counts().to_dict()
    assert set(kinds) == {"single", "dup", "chain", "giant"}
    assert kinds["giant"] == 90  # 3% of rows
    sizes = truth[truth.group_id >= 0].groupby("group_id").size()
    assert sizes.min() >= 2 and sizes.max() >= 10  # heavy tail


def test_clip_scores_spread_like_real_ones(corpus):
    _, img, txt, _ = corpus
    scores = np.einsum("ij,ij->i", img, txt)
    assert 0.27 < np.median(scores) < 0.33
    assert np.quantile(scores, 0.05) > 0.12 and np.quantile(scores, 0.95) < 0.48


def test_ground_truth_is_the_graph_at_086(corpus):
    """Connected components at cos > 0.86 are exactly the planted groups (float16 storage included)."""
    summary, img, _, truth = corpus
    sim = img @ img.T
    np.fill_diagonal(sim, 0)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(img)))
    graph.add_edges_from(zip(*np.nonzero(np.triu(sim > 0.86)), strict=True))
    found = sorted(sorted(c) for c in nx.connected_components(graph))
    label = np.where(
        truth.group_id.to_numpy() >= 0, truth.group_id.to_numpy(), -1 - np.arange(len(truth))
    )
    planted = sorted(sorted(np.flatnonzero(label == g).tolist()) for g in np.unique(label))
    assert found == planted
    assert summary["expected_dedup_kept"] == len(planted)


def test_chains_need_the_graph(corpus):
    _, img, _, truth = corpus
    chains = truth[truth.kind == "chain"].groupby("group_id")
    checked = 0
    for _, members in chains:
        if len(members) < 3:
            continue
        # Member order along the chain is the generator's; recover it from similarities.
        idx = members.index.to_numpy()
        sim = img[idx] @ img[idx].T
        assert (sim[np.triu_indices(len(idx), 1)] < 0.86).any(), (
            "a chain has two members below threshold"
        )
        near = np.sort(sim, axis=1)[:, -2]  # each member's nearest other member
        assert (near > 0.86).all() and np.isclose(np.median(near), CHAIN_COS, atol=0.03)
        checked += 1
    assert checked >= 5
