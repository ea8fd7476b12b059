"""Hand-made upstream stage outputs, so one stage can be run alone on data whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense import schema as S
from condense.pipeline.runner import _run_stage
from condense.runtime.ray import RayExecutor
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
    for i, idx in enumerate(split(len(rows[S.SAMPLE_ID]), parts, seed)):
        name = f"part-{i:05d}.parquet"
        ids = pa.array([rows[S.SAMPLE_ID][j] for j in idx], pa.string())
        pq.write_table(
            pa.table(
                {
                    S.SAMPLE_ID: ids,
                    S.IMG_EMB: S.vectors_to_arrow(rows[S.IMG_EMB][idx]),
                    S.CLIP_SCORE: pa.array(rows[S.CLIP_SCORE][idx], pa.float32()),
                }
            ),
            run.stage_dir("embed") / name,
        )
        pq.write_table(
            pa.table(
                {
                    S.SAMPLE_ID: ids,
                    S.CLUSTER_ID: pa.array(rows[S.CLUSTER_ID][idx], pa.int32()),
                    S.CENTROID_DIST: pa.array(rows[S.CENTROID_DIST][idx], pa.float32()),
                    S.CENTROID_COS: pa.array(rows[S.CENTROID_COS][idx], pa.float32()),
                }
            ),
            run.stage_dir("cluster") / name,
        )
    dim = rows[S.IMG_EMB].shape[1]
    np.save(run.stage_dir("cluster") / "centroids.npy", np.zeros((k, dim), np.float32))


def write_dedup(run_dir: Path, rows: dict, parts: int, seed: int = 0):
    """dedup/ parts holding `rows`: sample_id, kept, clip_score, centroid_cos (what the bands
    and the sample read)."""
    folder = RunDir(run_dir).stage_dir("dedup")
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(split(len(rows[S.SAMPLE_ID]), parts, seed)):
        pq.write_table(
            pa.table(
                {
                    S.SAMPLE_ID: pa.array([rows[S.SAMPLE_ID][j] for j in idx], pa.string()),
                    S.KEPT: pa.array(rows[S.KEPT][idx]),
                    S.CLIP_SCORE: pa.array(rows[S.CLIP_SCORE][idx], pa.float32()),
                    S.CENTROID_COS: pa.array(rows[S.CENTROID_COS][idx], pa.float32()),
                }
            ),
            folder / f"part-{i:05d}.parquet",
        )


def run_stage(run_dir: Path, stage, config, log=quiet_log) -> dict:
    """Run one stage on the session's Ray, with the runner's checks; returns its _stage.json."""
    run = RunDir(run_dir)
    ctx = StageContext(run=run, config=config, executor=RayExecutor(), progress=False, log=log)
    _run_stage(ctx, stage, "test", resume=False)
    return run.stage_mark(stage.name)


def read_stage(run_dir: Path, stage: str) -> pa.Table:
    files = sorted((Path(run_dir) / stage).glob("part-*.parquet"))
    return pq.read_table(files).sort_by(S.SAMPLE_ID)
