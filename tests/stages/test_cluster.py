"""Stage cluster with real faiss: planted topics found, and the same answer at any block count,
worker count or executor."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from condense.errors import StageError
from condense.pipeline.runner import run_pipeline
from condense.synth import SynthConfig, generate
from tests.conftest import make_config, quiet_log


def run(cfg, run_dir, **kw):
    return run_pipeline(cfg, run_dir, log=quiet_log, progress=False, **kw)


def cluster_table(run_dir) -> pd.DataFrame:
    files = sorted((run_dir / "cluster").glob("part-*.parquet"))
    return pq.read_table(files).to_pandas().sort_values("sample_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate(out, SynthConfig(n=4000, dim=64, seed=5, topics=6, rows_per_file=4000))
    return out


def test_kmeans_finds_the_planted_topics(corpus, tmp_path):
    # 6 topics + the giant near-identical cluster = 7 planted clusters; k = 14 leaves room for
    # random initialisation to split a topic, but no cluster may mix two topics.
    # The copy of the vectors in embed/ is what this test checks the clusters against.
    cfg = make_config(
        corpus, cluster={"k": 14, "niter": 20, "seed": 0}, embed={"store_vectors": True}
    )
    run(cfg, tmp_path)
    df = cluster_table(tmp_path).merge(
        pq.read_table(corpus / "truth.parquet").to_pandas(), on="sample_id"
    )
    assert len(df) == 4000
    purity = df.groupby("cluster_id").topic.agg(lambda t: t.value_counts().iloc[0] / len(t))
    assert purity.min() > 0.98, purity
    # Rows sit nearer their own centroid than any other, and the columns agree with centroids.npy.
    centroids = np.load(tmp_path / "cluster" / "centroids.npy")
    assert centroids.shape == (14, 64)
    emb = (
        pq.read_table(sorted((tmp_path / "embed").glob("part-*.parquet")))
        .to_pandas()
        .sort_values("sample_id")
    )
    x = np.stack(emb.img_emb.to_numpy()).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = cluster_table(tmp_path)
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(table.cluster_id.to_numpy(), d2.argmin(1))
    assert np.allclose(table.centroid_dist, np.sqrt(d2.min(1)), atol=1e-5)
    c = centroids[table.cluster_id.to_numpy()]
    cos = (x * c).sum(1) / np.linalg.norm(c, axis=1)
    assert np.allclose(table.centroid_cos, cos, atol=1e-5)
    mark = json.loads((tmp_path / "cluster" / "_stage.json").read_text())
    assert mark["rows_in"] == mark["rows_out"] == 4000
    assert [r["rows"] for r in mark["train_rounds"]] == [4000]


def test_same_output_at_1_2_4_blocks_and_any_worker_count(ray_session, corpus, tmp_path):
    # The training sample (1,500 of 4,000 rows), Lloyd's iterations over 1, 2 or 4 workers and
    # the assignment must not see the split.
    tables, centroids = [], []
    shapes = [(4000, 1, 1), (2000, 2, 2), (1000, 1, 4)]
    for i, (rows_per_part, workers, train_workers) in enumerate(shapes):
        cfg = make_config(  # two workers: on Ray
            corpus,
            executor="ray" if workers > 1 else "local",
            embed={"rows_per_part": rows_per_part},
            cluster={
                "k": 10,
                "sample_size": 1500,
                "rounds": 2,
                "workers": workers,
                "train_workers": train_workers,
            },
        )
        run(cfg, tmp_path / str(i))
        parts = sorted((tmp_path / str(i) / "cluster").glob("part-*.parquet"))
        assert len(parts) == 4000 // rows_per_part
        tables.append(cluster_table(tmp_path / str(i)))
        centroids.append(np.load(tmp_path / str(i) / "cluster" / "centroids.npy"))
    for table, cent in zip(tables[1:], centroids[1:], strict=True):
        assert np.array_equal(cent, centroids[0])
        pd.testing.assert_frame_equal(table, tables[0], check_exact=True)


def test_lloyd_over_workers_is_lloyd_in_one_process(corpus, tmp_path):
    """The distributed trainer gives the bits of `lloyd_train` on the seed's sample, started
    from its first k rows, and near faiss's fixed point from the same start."""
    from condense.cores.kmeans import lloyd_train, train_kmeans
    from condense.stages.cluster.sample import draw_sample
    from condense.stages.embed.vectors import EmbedVectors

    cfg = make_config(
        corpus,
        embed={"rows_per_part": 700},
        cluster={"k": 6, "sample_size": 2500, "niter": 12, "seed": 3, "train_workers": 3},
    )
    run(cfg, tmp_path, until="cluster")
    got = np.load(tmp_path / "cluster" / "centroids.npy")
    vectors = EmbedVectors.of(tmp_path / "embed")
    parts = sorted(
        p.stem.removeprefix("part-") for p in (tmp_path / "embed").glob("part-*.parquet")
    )
    sample = draw_sample(parts, vectors, 4000, 2500, seed=3)
    assert np.array_equal(got, lloyd_train(sample, sample[:6], niter=12))
    faiss = train_kmeans(sample, 6, niter=12, seed=0, init_centroids=sample[:6])
    assert np.abs(got - faiss).max() < 1e-5  # 1.2e-7 here: one float32 ulp
    mark = json.loads((tmp_path / "cluster" / "_stage.json").read_text())
    objective = mark["train_rounds"][0]["objective"]
    assert len(objective) == 12 and objective[-1] <= objective[0]


def test_spherical_and_warm_started_rounds(corpus, tmp_path):
    cfg = make_config(corpus, cluster={"k": 7, "spherical": True, "rounds": 3, "sample_size": 1000})
    run(cfg, tmp_path)
    centroids = np.load(tmp_path / "cluster" / "centroids.npy")
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    mark = json.loads((tmp_path / "cluster" / "_stage.json").read_text())
    assert [r["rows"] for r in mark["train_rounds"]] == [1000, 1000, 1000]


def test_training_sample_does_not_depend_on_parts(corpus, tmp_path):
    from condense.stages.cluster.sample import draw_sample, ring_offset, window_start
    from condense.stages.embed.vectors import EmbedVectors

    samples = []
    for rows_per_part in (4000, 700):
        cfg = make_config(corpus, embed={"rows_per_part": rows_per_part, "store_vectors": True})
        run(cfg, tmp_path / str(rows_per_part), until="embed")
        embed_dir = tmp_path / str(rows_per_part) / "embed"
        parts = [p.stem.removeprefix("part-") for p in sorted(embed_dir.glob("part-*.parquet"))]
        vectors = EmbedVectors.of(embed_dir)
        samples.append([draw_sample(parts, vectors, 4000, 321, seed) for seed in (9, 10)])
    assert samples[0][0].shape == (321, 64)
    assert np.array_equal(samples[0][0], samples[1][0])
    assert np.array_equal(samples[0][1], samples[1][1])
    assert not np.array_equal(samples[0][0], samples[0][1])  # a fresh sample per round
    # The sample is exactly the 321 rows that follow the seed's start on the id-hash ring.
    from condense.cores.hashing import hash_ids
    from condense.stages.embed.ids import ID_HASH_SEED

    emb = pq.read_table(sorted((tmp_path / "4000" / "embed").glob("part-*.parquet"))).to_pandas()
    emb["h"] = ring_offset(hash_ids(emb.sample_id.tolist(), ID_HASH_SEED), window_start(9))
    chosen = emb.sort_values(["h", "sample_id"]).head(321)
    expect = np.stack(chosen.img_emb.to_numpy()).astype(np.float32)
    assert np.array_equal(samples[0][0], expect)


def test_k_larger_than_rows_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(StageError, match=r"cluster.k=5000 is larger than the 4,000 rows in embed/"):
        run(make_config(corpus, cluster={"k": 5000}), tmp_path)
    assert (tmp_path / "embed" / "_stage.json").exists()
    assert not (tmp_path / "cluster" / "_stage.json").exists()
