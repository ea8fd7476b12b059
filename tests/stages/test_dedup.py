"""Stage dedup on a real Ray: exact components and keep rules against a brute-force reference
(dense similarity + networkx) per cluster, and the same output at any part count, worker count,
task packing or tile size."""

import networkx as nx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from condense.cores.hashing import hash_ids
from condense.errors import StageError
from condense.schema import (
    CENTROID_COS,
    CENTROID_DIST,
    CLIP_SCORE,
    CLUSTER_ID,
    COMPONENT_ID,
    COMPONENT_SIZE,
    IMG_EMB,
    KEPT,
    MAX_SIM,
    SAMPLE_ID,
)
from condense.stages.dedup import DedupStage, kept_column
from condense.stages.scatter import TaskPlan, estimated_sizes, plan_tasks
from tests.conftest import make_config
from tests.stages.upstream import read_stage, run_stage, write_embed_and_cluster

DIM = 24
K = 6  # cluster 5 stays empty


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_rows(seed=0):
    """Clusters whose answer is known: duplicate groups, chains and singletons (0); a giant
    group of near-identical rows plus spread rows (1); one row (2); 30 identical rows (3)."""
    rng = np.random.default_rng(seed)
    vecs, cluster = [], []
    for g in range(25):  # cluster 0
        base = _unit(rng.standard_normal(DIM))
        if g % 5 == 0:  # a chain: neighbours cos 0.92, two apart ~0.69
            turn = rng.standard_normal(DIM)
            turn = _unit(turn - (turn @ base) * base)
            th = np.arccos(0.92)
            vecs += [np.cos(j * th) * base + np.sin(j * th) * turn for j in range(4)]
        else:
            size = int(rng.integers(1, 7))
            vecs += list(base + 0.25 * rng.standard_normal((size, DIM)) / np.sqrt(DIM))
    cluster += [0] * (len(vecs) - len(cluster))
    base = _unit(rng.standard_normal(DIM))  # cluster 1
    vecs += list(base + 0.12 * rng.standard_normal((150, DIM)) / np.sqrt(DIM))
    vecs += list(base + 0.8 * rng.standard_normal((40, DIM)))
    cluster += [1] * 190
    vecs.append(rng.standard_normal(DIM))  # cluster 2: one row
    cluster.append(2)
    same = rng.standard_normal(DIM)  # cluster 3: all identical
    vecs += [same] * 30
    cluster += [3] * 30
    vecs.append(rng.standard_normal(DIM))  # cluster 4: one more lone row
    cluster.append(4)
    n = len(vecs)
    ids = np.array([f"s{int(v):07d}" for v in rng.choice(10**7, n, replace=False)], dtype=object)
    return {
        SAMPLE_ID: ids,
        IMG_EMB: _unit(vecs),
        CLUSTER_ID: np.array(cluster),
        # Coarse values, so keep rules meet ties and must break them by sample_id.
        CENTROID_DIST: np.round(rng.uniform(0.1, 0.9, n), 1).astype(np.float32),
        CENTROID_COS: rng.uniform(0.3, 0.9, n).astype(np.float32),
        CLIP_SCORE: np.round(rng.normal(0.3, 0.05, n), 2).astype(np.float32),
    }


def reference(rows, threshold, rule, seed=0):
    """Kept ids and component sizes from dense similarities and networkx, cluster by cluster."""
    ids, x = rows[SAMPLE_ID], rows[IMG_EMB]
    dist, clip = rows[CENTROID_DIST], rows[CLIP_SCORE]
    h = dict(zip(ids.tolist(), hash_ids(ids.tolist(), seed).tolist(), strict=True))
    order = {
        "middle": lambda i: (float(dist[i]), ids[i]),
        "near": lambda i: (float(dist[i]), ids[i]),
        "far": lambda i: (-float(dist[i]), ids[i]),
        "clip_max": lambda i: (-float(clip[i]), ids[i]),
        "random": lambda i: (h[ids[i]], ids[i]),
    }[rule]
    kept, size = set(), {}
    for c in np.unique(rows[CLUSTER_ID]):
        members = np.flatnonzero(rows[CLUSTER_ID] == c)
        sim = x[members] @ x[members].T
        graph = nx.Graph()
        graph.add_nodes_from(members.tolist())
        ii, jj = np.nonzero(np.triu(sim > threshold, k=1))
        graph.add_edges_from(zip(members[ii].tolist(), members[jj].tolist(), strict=True))
        for comp in nx.connected_components(graph):
            ordered = sorted(comp, key=order)
            kept.add(ids[ordered[len(ordered) // 2 if rule == "middle" else 0]])
            for i in comp:
                size[ids[i]] = len(comp)
    return kept, size


@pytest.fixture(scope="module")
def rows():
    return planted_rows()


def dedup_config(**dedup):
    return make_config("/unused", dedup={"thresholds": [0.8, 0.9], **dedup})


def kept_ids(table, column=KEPT):
    return set(table.filter(table.column(column)).column(SAMPLE_ID).to_pylist())


@pytest.mark.parametrize("rule", ["middle", "far", "near", "clip_max", "random"])
def test_every_keep_rule_matches_the_brute_force_reference(tmp_path, rows, rule):
    write_embed_and_cluster(tmp_path, rows, K, parts=3)
    mark = run_stage(tmp_path, DedupStage(), dedup_config(keep=rule, seed=7, rows_per_task=60))
    table = read_stage(tmp_path, "dedup")
    assert table.column_names == [*DedupStage.writes, "kept_0_8", "kept_0_9"]
    assert len(table) == len(rows[SAMPLE_ID])
    kept, size = reference(rows, 0.86, rule, seed=7)
    assert kept_ids(table) == kept
    got_size = dict(
        zip(
            table.column(SAMPLE_ID).to_pylist(),
            table.column(COMPONENT_SIZE).to_pylist(),
            strict=True,
        )
    )
    assert got_size == size
    for t in (0.8, 0.9):  # the extra thresholds, from the same pass
        assert kept_ids(table, kept_column(t)) == reference(rows, t, rule, seed=7)[0]
    # One kept row per component id; the component id never spans clusters.
    per_component = table.group_by(COMPONENT_ID).aggregate(
        [(KEPT, "sum"), (CLUSTER_ID, "count_distinct")]
    )
    assert pc.all(pc.equal(per_component.column(f"{KEPT}_sum"), 1)).as_py()
    assert pc.max(per_component.column(f"{CLUSTER_ID}_count_distinct")).as_py() == 1
    assert mark["rows_out"] == len(kept) and mark["dropped"] == {
        "duplicate": len(table) - len(kept)
    }
    assert mark["kept_at"] == {
        "0.86": len(kept),
        "0.8": len(reference(rows, 0.8, rule)[0]),
        "0.9": len(reference(rows, 0.9, rule)[0]),
    }
    assert not (tmp_path / "dedup" / "_by_cluster").exists()  # the scatter files are cleaned up


def test_edge_cases_by_hand(tmp_path, rows):
    write_embed_and_cluster(tmp_path, rows, K, parts=2)
    run_stage(tmp_path, DedupStage(), dedup_config())
    table = read_stage(tmp_path, "dedup").to_pandas()
    by_cluster = table.groupby(CLUSTER_ID)
    assert by_cluster.kept.sum()[2] == 1 and by_cluster.size()[2] == 1  # a cluster of one row
    assert table[table.cluster_id == 2].max_sim.iloc[0] == -np.inf
    assert by_cluster.kept.sum()[3] == 1  # all identical: one component of 30
    assert (table[table.cluster_id == 3].component_size == 30).all()
    giant = table[table.cluster_id == 1]
    assert giant.component_size.max() >= 150  # the near-identical group is one component
    # max_sim is SemDeDup's score: exact between the smallest and largest threshold.
    x, ids = rows[IMG_EMB], rows[SAMPLE_ID]
    score = dict(zip(table.sample_id, table.max_sim, strict=True))
    for c in range(5):
        members = np.flatnonzero(rows[CLUSTER_ID] == c)
        if len(members) < 2:
            continue
        sim = x[members] @ x[members].T
        np.fill_diagonal(sim, -np.inf)
        for i, best in zip(members, sim.max(1), strict=True):
            got = score[ids[i]]
            if 0.8 <= best <= 0.9:
                assert abs(got - best) < 1e-5
            else:
                assert (got > 0.9) == (best > 0.9) and (got < 0.8) == (best < 0.8)


def test_same_output_at_any_parts_workers_packing_scatter_or_tile(ray_session, tmp_path, rows):
    from condense.runtime.ray import RayExecutor

    outputs = []
    for i, (parts, settings) in enumerate(
        [
            (1, {"workers": 1, "tile": 2048, "rows_per_task": 10**6}),
            (3, {"workers": 2, "tile": 5, "rows_per_task": 1, "scatter_rows": 1}),
            (5, {"workers": 2, "tile": 64, "rows_per_task": 100, "scatter_rows": 150}),
        ]
    ):
        write_embed_and_cluster(tmp_path / str(i), rows, K, parts=parts, seed=i)
        executor = RayExecutor() if settings["workers"] > 1 else None  # on Ray: two workers
        run_stage(tmp_path / str(i), DedupStage(), dedup_config(**settings), executor=executor)
        outputs.append(read_stage(tmp_path / str(i), "dedup"))
    # Identical, but for max_sim's last bit: BLAS sums a dot product in an order that depends
    # on the matrix shapes it is given.
    scores = [o.column(MAX_SIM).to_numpy() for o in outputs]
    assert np.allclose(scores[0], scores[1], atol=1e-6, rtol=0)
    assert np.allclose(scores[0], scores[2], atol=1e-6, rtol=0)
    rest = [o.drop_columns([MAX_SIM]) for o in outputs]
    assert rest[0].equals(rest[1]) and rest[0].equals(rest[2])


def test_plan_tasks_packs_big_clusters_first():
    sizes = np.array([5, 0, 300, 40, 40, 7, 1])
    tasks = plan_tasks(sizes, 50)
    assert tasks[0] == [2]  # the biggest alone and first
    assert sorted(c for t in tasks for c in t) == [0, 2, 3, 4, 5, 6]  # every non-empty cluster
    assert plan_tasks(sizes, 50) == tasks  # deterministic
    assert all(sum(sizes[c] for c in t[:-1]) < 50 for t in tasks)


def test_a_plan_from_a_sample_puts_every_cluster_in_one_task():
    """Packed from the sample's sizes scaled to all rows, even a cluster the sample missed."""
    sample = np.array([10, 0, 30, 0, 60])
    assert estimated_sizes(sample, 1000).tolist() == [100, 1, 300, 1, 600]
    plan = TaskPlan.of(sample, 1000, rows_per_task=350)
    assert sorted(c for t in plan.tasks for c in t) == [0, 1, 2, 3, 4]
    assert plan.tasks[0] == [4]  # the biggest alone and first
    task_of = plan.task_of()
    assert task_of.min() >= 0 and [task_of[c] for c in plan.tasks[1]] == [1] * len(plan.tasks[1])
    assert plan.key() == TaskPlan.of(sample, 1000, 350).key() != TaskPlan.of(sample, 1000, 50).key()


def interrupted_dedup(tmp_path):
    """A dedup stage run to the end, then made to look interrupted before its mark: returns
    its config, run directory, output and part files."""
    import json

    from condense.pipeline.runner import run_pipeline
    from condense.synth import SynthConfig, generate

    generate(tmp_path / "in", SynthConfig(n=3000, dim=32, seed=2, rows_per_file=1000))
    cfg = make_config(tmp_path / "in", cluster={"k": 6}, dedup={"rows_per_task": 400})
    run = tmp_path / "run"
    run_pipeline(cfg, run, until="dedup", log=lambda _: None, progress=False)
    folder = run / "dedup"
    fingerprint = json.loads((folder / "_stage.json").read_text())["config_hash"]
    before = read_stage(run, "dedup")
    (folder / "_stage.json").unlink()
    (folder / "_progress.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return cfg, run, before, sorted(folder.glob("part-*.parquet"))


def test_resume_redoes_only_missing_parts(tmp_path):
    """A run killed after the scatter files were removed, with one output part lost: --resume
    scatters again (the records went with the files), redoes that part alone, same output."""
    from condense.pipeline.runner import run_pipeline

    cfg, run, before, parts = interrupted_dedup(tmp_path)
    assert len(parts) > 2
    lost = parts[1].stem.removeprefix("part-")
    parts[1].unlink()
    (run / "dedup" / "_parts" / f"{lost}.json").unlink()
    log = []
    run_pipeline(cfg, run, until="dedup", resume=True, log=log.append, progress=False)
    assert any(f"resuming: {len(parts) - 1} of {len(parts)} parts" in line for line in log)
    assert read_stage(run, "dedup").equals(before)


def test_resume_with_another_packing_starts_over(tmp_path):
    """rows_per_task is a runtime setting: a resumed run may pack the clusters otherwise. The
    kept parts and scatter files were cut by the old plan, so they are dropped, not mixed in."""
    from condense.pipeline.runner import run_pipeline

    _, run, before, parts = interrupted_dedup(tmp_path)
    repacked = make_config(tmp_path / "in", cluster={"k": 6}, dedup={"rows_per_task": 10**6})
    log = []
    run_pipeline(repacked, run, until="dedup", resume=True, log=log.append, progress=False)
    assert any("task plan changed" in line for line in log)
    assert len(list((run / "dedup").glob("part-*.parquet"))) == 1 < len(parts)
    after = read_stage(run, "dedup")
    assert after.sort_by(SAMPLE_ID).equals(before.sort_by(SAMPLE_ID))


def test_cluster_ids_outside_k_are_an_error_naming_the_part(tmp_path, rows):
    write_embed_and_cluster(tmp_path, rows, K, parts=2)
    path = tmp_path / "cluster" / "part-00001.parquet"
    table = pq.read_table(path)
    ids = table.column(CLUSTER_ID).to_numpy().copy()
    ids[0] = K
    pq.write_table(table.set_column(1, CLUSTER_ID, pa.array(ids, pa.int32())), path)
    with pytest.raises(StageError, match=r"part-00001.parquet holds cluster ids outside"):
        run_stage(tmp_path, DedupStage(), dedup_config())


def test_resume_with_another_scatter_size_keeps_the_finished_parts(tmp_path):
    """scatter_rows decides only how the scatter files are cut: a resumed run with another
    keeps every finished part (and, all parts being done, scatters nothing)."""
    from condense.pipeline.runner import run_pipeline

    _, run, before, parts = interrupted_dedup(tmp_path)
    resized = make_config(
        tmp_path / "in", cluster={"k": 6}, dedup={"rows_per_task": 400, "scatter_rows": 7}
    )
    log = []
    run_pipeline(resized, run, until="dedup", resume=True, log=log.append, progress=False)
    assert not any("task plan changed" in line for line in log)
    assert any(f"resuming: {len(parts)} of {len(parts)} parts" in line for line in log)
    assert read_stage(run, "dedup").equals(before)


def test_a_bf16_screen_keeps_what_fp32_keeps_and_says_what_it_rechecked(tmp_path, rows):
    pytest.importorskip("torch")
    for i, precision in enumerate(["fp32", "bf16"]):
        write_embed_and_cluster(tmp_path / str(i), rows, K, parts=2)
        mark = run_stage(tmp_path / str(i), DedupStage(), dedup_config(precision=precision))
        assert mark["precision"] == precision
    fp32, bf16 = read_stage(tmp_path / "0", "dedup"), read_stage(tmp_path / "1", "dedup")
    assert bf16.drop_columns([MAX_SIM]).equals(fp32.drop_columns([MAX_SIM]))
    scores = [t.column(MAX_SIM).to_numpy() for t in (fp32, bf16)]
    assert np.allclose(scores[0], scores[1], atol=0.012)  # bf16's bound at this dimension
    assert mark["pairs_rechecked"] > 0
