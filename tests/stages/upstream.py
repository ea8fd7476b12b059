"""Hand-made upstream stage outputs, so one stage can be run alone on data whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense.pipeline.runner import compute_stage
from condense.runtime.local import LocalExecutor
from condense.schema import (
    CENTROID_COS,
    CENTROID_DIST,
    CLIP_SCORE,
    CLUSTER_ID,
    IMG_EMB,
    KEPT,
    SAMPLE_ID,
    vectors_to_arrow,
)
from condense.stages.base import StageContext
from condense.storage.rundir import RunDir
from tests.conftest import quiet_log


def split(n: int, parts: int, seed: int = 0) -> list[np.ndarray]:
    """Rows dealt into `parts` parts in a shuffled order (so parts do not follow clusters)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(order, parts)]


def write_embed_and_cluster(run_dir: Path, rows: dict, k: int, parts: int, seed: int = 0):
    """embed/ and cluster/ parts (plus centroids.npy) holding `rows`: sample_id, img_emb (unit
    float32), clip_score, cluster_id, centroid_dist, centroid_cos."""
    run = RunDir(run_dir)
    for stage in ("embed", "cluster"):
        run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(split(len(rows[SAMPLE_ID]), parts, seed)):
        name = f"part-{i:05d}.parquet"
        ids = pa.array([rows[SAMPLE_ID][j] for j in idx], pa.string())
        pq.write_table(
            pa.table(
                {
                    SAMPLE_ID: ids,
                    IMG_EMB: vectors_to_arrow(rows[IMG_EMB][idx]),
                    CLIP_SCORE: pa.array(rows[CLIP_SCORE][idx], pa.float32()),
                }
            ),
            run.stage_dir("embed") / name,
        )
        pq.write_table(
            pa.table(
                {
                    SAMPLE_ID: ids,
                    CLUSTER_ID: pa.array(rows[CLUSTER_ID][idx], pa.int32()),
                    CENTROID_DIST: pa.array(rows[CENTROID_DIST][idx], pa.float32()),
                    CENTROID_COS: pa.array(rows[CENTROID_COS][idx], pa.float32()),
                }
            ),
            run.stage_dir("cluster") / name,
        )
    dim = rows[IMG_EMB].shape[1]
    np.save(run.stage_dir("cluster") / "centroids.npy", np.zeros((k, dim), np.float32))
    # The cluster stage's sample: every row (dedup packs its tasks from these sizes).
    sizes = np.bincount(np.asarray(rows[CLUSTER_ID], np.int64), minlength=k)
    np.save(run.stage_dir("cluster") / "sample_sizes.npy", sizes)


def write_dedup(run_dir: Path, rows: dict, parts: int, seed: int = 0):
    """dedup/ parts holding `rows`: sample_id, kept, clip_score, centroid_cos (what the bands
    and the sample read)."""
    folder = RunDir(run_dir).stage_dir("dedup")
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(split(len(rows[SAMPLE_ID]), parts, seed)):
        pq.write_table(
            pa.table(
                {
                    SAMPLE_ID: pa.array([rows[SAMPLE_ID][j] for j in idx], pa.string()),
                    KEPT: pa.array(rows[KEPT][idx]),
                    CLIP_SCORE: pa.array(rows[CLIP_SCORE][idx], pa.float32()),
                    CENTROID_COS: pa.array(rows[CENTROID_COS][idx], pa.float32()),
                }
            ),
            folder / f"part-{i:05d}.parquet",
        )


def run_stage(run_dir: Path, stage, config, log=quiet_log, executor=None) -> dict:
    """Run one stage with the runner's checks (on the local executor unless given another);
    returns its _stage.json."""
    run = RunDir(run_dir)
    executor = executor or LocalExecutor()
    ctx = StageContext(run=run, config=config, executor=executor, progress=False, log=log)
    compute_stage(ctx, stage, "test", resume=False)
    return run.stage_mark(stage.name)


def read_stage(run_dir: Path, stage: str) -> pa.Table:
    files = sorted((Path(run_dir) / stage).glob("part-*.parquet"))
    return pq.read_table(files).sort_by(SAMPLE_ID)
