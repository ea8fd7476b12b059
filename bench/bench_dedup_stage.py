"""Benchmark: the dedup stage's data movement, condense's cluster scatter against Ray Data groupby.

    python bench/bench_dedup_stage.py [--rows 400000 --dim 768 --k 400]

Both sides run the same component search (`cores.components` + the `middle` keep rule) on the
same clusters, on the same local Ray, in the same run; only how rows reach their cluster's
worker differs:

- condense: `DedupStage` as the pipeline runs it (scatter each part sorted by cluster into a
  memory-mapped Arrow file, then tasks packed by cluster size, biggest first);
- Ray Data: `read_parquet` of the already joined rows (embed + cluster columns in one file set,
  which spares it the join condense does), `groupby("cluster_id").map_groups(...)`, then
  `write_parquet`.

It prints seconds for each, their ratio, and checks that both keep the same rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense.config import config_from_dict
from condense.cores.components import components
from condense.cores.keep import keep_mask
from condense.cores.vectors import to_unit_float32
from condense.pipeline.runner import compute_stage
from condense.runtime.ray import RayExecutor
from condense.schema import (
    CENTROID_COS,
    CENTROID_DIST,
    CLIP_SCORE,
    CLUSTER_ID,
    IMG_EMB,
    KEPT,
    SAMPLE_ID,
    arrow_to_vectors,
    vectors_to_arrow,
)
from condense.stages.base import StageContext
from condense.stages.dedup import DedupStage
from condense.storage.rundir import RunDir

ROWS_PER_PART = 100_000


def make_rows(rows: int, dim: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows around k centres (heavy-tailed cluster sizes), a third of them in near-duplicate pairs."""
    rng = np.random.default_rng(seed)
    share = 1.0 / np.arange(1, k + 1) ** 0.8  # heavy-tailed: the largest ~8% of rows at k=400
    cluster = np.sort(rng.choice(k, rows, p=share / share.sum()))
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    x = centres[cluster] * 0.08 + rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
    src = np.flatnonzero(rng.random(rows) < 0.33)
    originals, copies = src[0::2][: len(src) // 2], src[1::2][: len(src) // 2]
    noise = rng.standard_normal((len(copies), dim)).astype(np.float32)
    scale = 0.2 / np.sqrt(dim) * np.linalg.norm(x[originals], axis=1)[:, None]
    x[copies] = x[originals] + noise * scale  # cos ~0.98 with the original
    cluster[copies] = cluster[originals]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {
        SAMPLE_ID: np.array([f"{i:09d}" for i in rng.permutation(rows)], dtype=object),
        IMG_EMB: x.astype(np.float16),
        CLUSTER_ID: cluster.astype(np.int32),
        CENTROID_DIST: rng.uniform(0.5, 1.2, rows).astype(np.float32),
        CENTROID_COS: rng.uniform(0.3, 0.9, rows).astype(np.float32),
        CLIP_SCORE: rng.normal(0.3, 0.07, rows).astype(np.float32),
    }


def write_inputs(root: Path, rows: dict, k: int) -> None:
    """embed/ + cluster/ parts for the stage, and one joined file set for Ray Data."""
    run = RunDir(root / "run")
    for folder in ("embed", "cluster"):
        run.stage_dir(folder).mkdir(parents=True, exist_ok=True)
    (root / "joined").mkdir()
    n = len(rows[SAMPLE_ID])
    order = np.random.default_rng(1).permutation(n)  # parts do not follow clusters
    for p, start in enumerate(range(0, n, ROWS_PER_PART)):
        idx = order[start : start + ROWS_PER_PART]
        cols = {name: rows[name][idx] for name in rows}
        ids = pa.array(cols[SAMPLE_ID].tolist(), pa.string())
        vec = vectors_to_arrow(cols[IMG_EMB])
        pq.write_table(
            pa.table({SAMPLE_ID: ids, IMG_EMB: vec, CLIP_SCORE: cols[CLIP_SCORE]}),
            run.stage_dir("embed") / f"part-{p:05d}.parquet",
        )
        meta = {c: cols[c] for c in (CLUSTER_ID, CENTROID_DIST, CENTROID_COS)}
        pq.write_table(
            pa.table({SAMPLE_ID: ids, **meta}), run.stage_dir("cluster") / f"part-{p:05d}.parquet"
        )
        pq.write_table(
            pa.table({SAMPLE_ID: ids, IMG_EMB: vec, CLIP_SCORE: cols[CLIP_SCORE], **meta}),
            root / "joined" / f"part-{p:05d}.parquet",
        )
    dim = rows[IMG_EMB].shape[1]
    np.save(run.stage_dir("cluster") / "centroids.npy", np.zeros((k, dim), np.float32))
    # The cluster stage's sample: every row (dedup packs its tasks from these sizes).
    sizes = np.bincount(np.asarray(rows[CLUSTER_ID], np.int64), minlength=k)
    np.save(run.stage_dir("cluster") / "sample_sizes.npy", sizes)


def run_condense(root: Path) -> tuple[float, set[str]]:
    config = config_from_dict({"input": {"kind": "synth"}, "ray": {"progress": False}}, "bench")
    run = RunDir(root / "run")
    ctx = StageContext(run=run, config=config, executor=RayExecutor(), progress=False, log=print)
    start = time.perf_counter()
    compute_stage(ctx, DedupStage(), "bench", resume=False)
    seconds = time.perf_counter() - start
    table = pq.read_table(run.stage_dir("dedup"), columns=[SAMPLE_ID, KEPT])
    return seconds, set(table.filter(table.column(KEPT)).column(SAMPLE_ID).to_pylist())


def dedup_group(group: pa.Table) -> pa.Table:
    """The same work per cluster as the stage: sort by sample_id, components, keep middle."""
    from threadpoolctl import threadpool_limits

    group = group.sort_by(SAMPLE_ID)
    x = to_unit_float32(arrow_to_vectors(group.column(IMG_EMB)))
    with threadpool_limits(1):
        labels = components(x, 0.86).labels[0]
    ids = np.asarray(group.column(SAMPLE_ID).to_pylist(), dtype=object)
    kept = keep_mask(
        labels,
        ids,
        group.column(CENTROID_DIST).to_numpy(),
        group.column(CLIP_SCORE).to_numpy(),
        "middle",
    )
    return pa.table({SAMPLE_ID: group.column(SAMPLE_ID), KEPT: pa.array(kept)})


def run_groupby(root: Path) -> tuple[float, set[str]]:
    import ray.data

    start = time.perf_counter()
    ds = ray.data.read_parquet(str(root / "joined"))
    ds = ds.groupby(CLUSTER_ID).map_groups(dedup_group, batch_format="pyarrow")
    ds.write_parquet(str(root / "groupby_out"))
    seconds = time.perf_counter() - start
    table = pq.read_table(root / "groupby_out")
    return seconds, set(table.filter(table.column(KEPT)).column(SAMPLE_ID).to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=400)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    rows = make_rows(args.rows, args.dim, args.k)
    sizes = np.bincount(rows[CLUSTER_ID])
    print(
        f"# dedup stage data movement: {args.rows:,} rows x {args.dim} (float16), "
        f"{np.count_nonzero(sizes)} clusters (largest {sizes.max():,}), {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="bench-dedup-stage-") as tmp:
        root = Path(tmp)
        write_inputs(root, rows, args.k)
        ours, kept_ours = run_condense(root)
        theirs, kept_theirs = run_groupby(root)
    assert kept_ours == kept_theirs, "the two sides kept different rows"
    print("\n| method | seconds | rows/s |")
    print("|---|---:|---:|")
    print(
        f"| condense dedup stage (scatter + packed tasks) | {ours:.1f} | {args.rows / ours:,.0f} |"
    )
    print(
        f"| Ray Data groupby + map_groups (pre-joined input) | {theirs:.1f} | "
        f"{args.rows / theirs:,.0f} |"
    )
    print(f"\nratio (groupby / condense): {theirs / ours:.2f}x; both kept {len(kept_ours):,} rows")


if __name__ == "__main__":
    main()
