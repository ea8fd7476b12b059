"""Run the stages in order: skip what is complete with the same settings, rerun what changed
and everything after it, and resume an interrupted stage part by part when asked.

    from condense.config import load_config
    run_pipeline(load_config("configs/demo.yaml"), "/tmp/run", executor="local")  # ~20 s, CPU
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from condense.config import PipelineConfig
from condense.errors import CondenseError, StageError
from condense.runtime import open_executor
from condense.stages.bands import CentroidBandStage, ClipBandStage
from condense.stages.base import Stage, StageContext, check_columns
from condense.stages.cluster import ClusterStage
from condense.stages.dedup import DedupStage
from condense.stages.embed import EmbedStage
from condense.stages.export import ExportStage
from condense.stages.sample import SampleStage
from condense.storage import meter
from condense.storage.files import atomic_write_bytes
from condense.storage.parts import part_files, read_schema
from condense.storage.rundir import CONFIG, RunDir, RunLock, claim, manifest_entry
from condense.strict import fingerprint

STAGES: list[Stage] = [
    EmbedStage(),
    ClusterStage(),
    DedupStage(),
    ClipBandStage(),
    CentroidBandStage(),
    SampleStage(),
    ExportStage(),
]
STAGE_NAMES = [s.name for s in STAGES]


def versions() -> dict[str, str]:
    """Versions that decide results, recorded with every stage."""
    import numpy
    import pyarrow

    import condense

    out = {
        "condense": condense.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
    }
    from importlib.metadata import PackageNotFoundError, version

    # From the installed packages' metadata: nothing is imported (not Ray under --executor local).
    packages = {
        "ray": ["ray"],
        "faiss": ["faiss-cpu", "faiss-gpu-cu12", "faiss-gpu"],
        "torch": ["torch"],
    }
    for name, candidates in packages.items():
        for package in candidates:
            with contextlib.suppress(PackageNotFoundError):
                out[name] = version(package)
                break
    return out


def stage_fingerprints(config: PipelineConfig) -> dict[str, str]:
    """Each stage's fingerprint: its own settings chained with everything upstream."""
    out, upstream = {}, ""
    for stage in STAGES:
        upstream = fingerprint(stage.name, stage.version, stage.settings(config), upstream)
        out[stage.name] = upstream
    return out


def run_pipeline(
    config: PipelineConfig,
    run_dir: str | Path,
    *,
    until: str | None = None,
    resume: bool = False,
    address: str | None = None,
    progress: bool | None = None,
    executor: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or continue) a pipeline in `run_dir`, holding its lock; returns the manifest.
    `executor` (default: the config's `executor`) is `ray`, or `local` to run every stage in
    this process."""
    if until is not None and until not in STAGE_NAMES:
        raise CondenseError(f"--until {until!r}: no such stage (stages: {', '.join(STAGE_NAMES)})")
    run = RunDir(claim(run_dir, (config.input.path,)))
    with RunLock(run.root, log) as lock:
        run.lock = lock
        atomic_write_bytes(run.root / CONFIG, config.to_yaml().encode())
        ctx = StageContext(
            run=run,
            config=config,
            executor=open_executor(executor or config.executor, config.ray, address),
            progress=config.ray.progress if progress is None else progress,
            log=log,
        )
        return compute_stages(ctx, until, resume)


def compute_stages(ctx: StageContext, until: str | None, resume: bool) -> dict:
    """Each stage in order: skipped when complete with these settings, else run (and every
    later stage cleared first, since its input is about to change)."""
    run, log = ctx.run, ctx.log
    fingerprints = stage_fingerprints(ctx.config)
    for i, stage in enumerate(STAGES):
        fp = fingerprints[stage.name]
        mark = run.stage_mark(stage.name)
        if mark is not None and mark.get("config_hash") == fp:
            log(f"[{stage.name}] complete with these settings: skipped ({mark['rows_out']:,} rows)")
        else:
            for later in STAGES[i + 1 :]:  # their inputs are about to change
                run.clear_stage(later.name)
                run.update_manifest(later.name, None)
            compute_stage(ctx, stage, fp, resume)
        if stage.name == until:
            break
    return run.manifest()


def check_chain(run: RunDir, stage: Stage, rows_in: int) -> None:
    """No row vanishes between stages: a stage's rows_in is the rows_out of the one before."""
    if stage.name not in STAGE_NAMES or STAGE_NAMES.index(stage.name) == 0:
        return
    index = STAGE_NAMES.index(stage.name)
    before = STAGE_NAMES[index - 1]
    mark = run.stage_mark(before)
    if mark is not None and mark["rows_out"] != rows_in:
        raise StageError(
            f"stage {stage.name} read {rows_in:,} rows but {before} wrote {mark['rows_out']:,}: "
            "rows were lost between the stages"
        )


def compute_stage(ctx: StageContext, stage: Stage, fp: str, resume: bool) -> None:
    run = ctx.run
    check_columns(run, stage)
    ctx.resumed = run.start_stage(stage.name, fp, resume)
    ctx.log(f"[{stage.name}] running")
    start = time.perf_counter()
    io_before = meter.snapshot() + ctx.executor.worker_io()
    result = stage.compute(ctx)
    seconds = time.perf_counter() - start
    io = meter.snapshot() + ctx.executor.worker_io() - io_before
    dropped_total = sum(result.dropped.values())
    if result.rows_in != result.rows_out + dropped_total:
        raise StageError(
            f"stage {stage.name}: rows_in {result.rows_in} != rows_out {result.rows_out} + dropped {dropped_total}"
        )
    check_chain(run, stage, result.rows_in)
    parts = part_files(run.stage_dir(stage.name))
    schema = {f.name: str(f.type) for f in read_schema(parts[0])} if parts else {}
    declared = list(stage.columns(ctx.config))
    if parts and list(schema) != declared:
        raise StageError(f"stage {stage.name} wrote columns {list(schema)}, declared {declared}")
    record = {
        "stage": stage.name,
        "status": "complete",
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "dropped": result.dropped,
        "seconds": round(seconds, 3),
        "rows_per_second": round(result.rows_in / seconds, 1) if seconds > 0 else None,
        "parts": len(parts),
        **io.record(),
        "schema": schema,
        "config_hash": fp,
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **result.extra,
    }
    run.finish_stage(stage.name, record)
    run.update_manifest(stage.name, manifest_entry(record))
    ctx.log(
        f"[{stage.name}] done: {result.rows_in:,} rows in, {result.rows_out:,} out"
        + (f", dropped {json.dumps(result.dropped)}" if result.dropped else "")
        + f" ({seconds:.1f} s)"
    )
