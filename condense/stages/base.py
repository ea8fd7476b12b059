"""What every stage shares: its context, its result, and part-by-part output with resume.

A stage reads its upstream stages' parts, hands typed work items and a processor to its
context's executor (`runtime/processor.py`) and returns its counts; the runner writes
`_stage.json`. Part files and their records are the storage layer's (`storage/parts.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from condense.errors import StageError
from condense.faults import pause_while
from condense.runtime.processor import Executor, Processor, WorkItem
from condense.stages.progress import Progress
from condense.storage.parts import commit_part, finished_parts, part_files, read_schema
from condense.storage.rundir import RunDir


@dataclass(frozen=True, kw_only=True)
class SourcePart(WorkItem):
    """Work on one part of an upstream stage, which `source` names (`00003`)."""

    source: str


@dataclass
class StageContext:
    """Everything a stage needs to run: where, with what settings, on which executor."""

    run: RunDir
    config: Any  # the PipelineConfig (the config module sits above the stages)
    executor: Executor
    resumed: bool = False  # finished parts of an interrupted run were kept
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class StageResult:
    """Counts for `_stage.json`: rows_in = rows_out + sum(dropped.values())."""

    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """A pipeline step. Subclasses name their inputs and outputs and implement `compute`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the stage computes something different
    reads: ClassVar[dict[str, tuple[str, ...]]] = {}  # upstream stage -> columns this stage reads
    writes: ClassVar[tuple[str, ...]] = ()  # columns of this stage's part files

    def columns(self, config) -> tuple[str, ...]:
        """The columns this run's part files hold (`writes`, plus any the settings add)."""
        return self.writes

    def settings(self, config) -> list[Any]:
        """The config sections that decide this stage's output (fingerprinted)."""
        raise NotImplementedError

    def compute(self, ctx: StageContext) -> StageResult:
        """Write the stage's parts into its folder and return its counts."""
        raise NotImplementedError


def check_columns(run: RunDir, stage: Stage) -> None:
    """Fail before starting when an upstream stage lacks a column this stage reads."""
    for upstream, columns in stage.reads.items():
        parts = part_files(run.stage_dir(upstream))
        if not parts:
            continue  # an empty upstream is handled by the stage itself
        names = set(read_schema(parts[0]).names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise StageError(
                f"stage {stage.name} reads {missing} from {parts[0]}, which lacks them"
            )


def write_parts(ctx: StageContext, processor: Processor, items: list, unit: str = "rows") -> list:
    """Run `processor` on every item whose part is not finished yet; return every item's part
    record, in the items' order.

    Each item names a `part`; its processor writes that part's files and returns its stats
    (at least `part`, `files` and `rows_in`). The part is committed here, after its files
    exist, so a record always means a whole part."""
    folder = ctx.run.stage_dir(processor.stage)
    done = finished_parts(folder, [item.part for item in items])
    todo = [item for item in items if item.part not in done]
    if done:
        ctx.log(f"[{processor.stage}] resuming: {len(done)} of {len(items)} parts already written")
    progress = Progress(
        processor.stage, len(todo), sum(item.rows for item in todo), unit, ctx.progress, ctx.log
    )
    try:
        for item, stats, node in ctx.executor.map(processor, todo):
            ctx.run.check_lock()  # a driver that lost the run directory commits nothing more
            done[item.part] = commit_part(folder, {**stats, "part": item.part, "node": node})
            progress.update(int(stats["rows_in"]))
            pause_while("driver_pause", f"{processor.stage}:{progress.done_parts}")
    finally:
        progress.close()
    return [done[item.part] for item in items]


def merge_dropped(stats: list[dict]) -> dict[str, int]:
    """Sum per-part drop counts by reason."""
    total: dict[str, int] = {}
    for s in stats:
        for reason, count in s.get("dropped", {}).items():
            total[reason] = total.get(reason, 0) + int(count)
    return {k: v for k, v in sorted(total.items()) if v}
