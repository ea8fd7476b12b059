"""Benchmark: the rank-selection stages (clip band, centroid band, sample) at 1M and 10M rows.

    python bench/bench_select.py                  # 1M and 10M rows
    python bench/bench_select.py --rows 1000000   # one size

For each size it writes synthetic dedup/ parts (80% kept, LAION-like clip scores, centroid
cosines) into a temporary run directory, runs the three stages on a local Ray exactly as the
pipeline does, and prints rows/s per stage and how the cost grows with the row count. For
context it also times a single-machine reference on the same rows: gather the whole column into
one process and sort it (np.lexsort by key, then sample_id), which is what the stages avoid.
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
from condense.cores.bands import descending_key
from condense.pipeline.runner import compute_stage
from condense.runtime.ray import RayExecutor
from condense.schema import (
    CENTROID_COS,
    CLIP_SCORE,
    KEPT,
    SAMPLE_ID,
)
from condense.stages.bands import CentroidBandStage, ClipBandStage
from condense.stages.base import StageContext
from condense.stages.sample import SampleStage
from condense.storage.rundir import RunDir

ROWS_PER_PART = 500_000


def write_dedup(run_dir: Path, rows: int, seed: int = 0) -> None:
    """dedup/ parts of `rows` synthetic rows in random id order."""
    rng = np.random.default_rng(seed)
    folder = RunDir(run_dir).stage_dir("dedup")
    folder.mkdir(parents=True, exist_ok=True)
    for p, start in enumerate(range(0, rows, ROWS_PER_PART)):
        n = min(ROWS_PER_PART, rows - start)
        ids = pa.array([f"{v:016x}" for v in rng.integers(0, 2**62, n).tolist()], pa.string())
        table = pa.table(
            {
                SAMPLE_ID: ids,
                KEPT: pa.array(rng.random(n) < 0.8),
                CLIP_SCORE: pa.array(rng.normal(0.30, 0.07, n).astype(np.float32)),
                CENTROID_COS: pa.array(rng.uniform(0.3, 0.95, n).astype(np.float32)),
            }
        )
        pq.write_table(table, folder / f"part-{p:05d}.parquet")


def reference_sort(run_dir: Path) -> float:
    """Seconds to gather the clip-score column into this process and sort it (ties by id)."""
    start = time.perf_counter()
    table = pq.read_table(RunDir(run_dir).stage_dir("dedup"), columns=[SAMPLE_ID, KEPT, CLIP_SCORE])
    table = table.filter(table.column(KEPT))
    keys = descending_key(table.column(CLIP_SCORE).to_numpy())
    ids = np.asarray(table.column(SAMPLE_ID).to_pylist(), dtype=object)
    np.lexsort((ids, keys))
    return time.perf_counter() - start


def run_stages(run_dir: Path, sample_n: int) -> list[tuple[str, int, float]]:
    config = config_from_dict(
        {
            "input": {"kind": "synth"},
            "sample": {"n": sample_n, "seed": 0},
            "ray": {"progress": False},
        },
        "bench",
    )
    ctx = StageContext(
        run=RunDir(run_dir), config=config, executor=RayExecutor(), progress=False, log=print
    )
    out = []
    for stage in (ClipBandStage(), CentroidBandStage(), SampleStage()):
        start = time.perf_counter()
        compute_stage(ctx, stage, "bench", resume=False)
        seconds = time.perf_counter() - start
        out.append((stage.name, ctx.run.stage_mark(stage.name)["rows_in"], seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        help="sample.n (default: rows / 625, the recipe's share)",
    )
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    print(f"# rank-selection stages, {os.cpu_count()} CPUs, {ROWS_PER_PART:,} rows per part")
    results = {}
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
            run_dir = Path(tmp)
            write_dedup(run_dir, rows)
            ref = reference_sort(run_dir)
            stages = run_stages(run_dir, args.sample or rows * 16 // 10_000)
            results[rows] = (stages, ref)
    print("\n| rows | stage | rows in | seconds | rows/s |")
    print("|---:|---|---:|---:|---:|")
    for rows, (stages, ref) in results.items():
        for name, rows_in, seconds in stages:
            print(f"| {rows:,} | {name} | {rows_in:,} | {seconds:.1f} | {rows_in / seconds:,.0f} |")
        total = sum(s for _, _, s in stages)
        print(f"| {rows:,} | **all three** | {rows:,} | {total:.1f} | {rows / total:,.0f} |")
        print(f"| {rows:,} | (reference: gather + sort one column) | | {ref:.1f} | |")
    sizes = sorted(results)
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        ta = sum(s for _, _, s in results[a][0])
        tb = sum(s for _, _, s in results[b][0])
        print(
            f"\ngrowth {a:,} -> {b:,} rows ({b / a:.0f}x): {tb / ta:.2f}x the time "
            f"({ta:.1f} s -> {tb:.1f} s)"
        )


if __name__ == "__main__":
    main()
