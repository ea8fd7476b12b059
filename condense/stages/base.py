"""What every stage shares: its context, its result, and part-by-part output with resume.

A stage's output is a set of `part-*.parquet` files. Each part is written atomically and then
recorded in `_parts/<part>.json` with its counts; an interrupted stage resumed with `--resume`
keeps the recorded parts and does only the rest.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from condense.errors import StageError
from condense.pipeline.rundir import (
    PARTS_DIR,
    RunDir,
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    file_sizes,
    files_intact,
    read_json,
)

if TYPE_CHECKING:
    from condense.config import PipelineConfig
    from condense.runtime.ray import RayExecutor


@dataclass
class StageContext:
    """Everything a stage needs to run: where, with what settings, on which executor."""

    run: RunDir
    config: PipelineConfig
    executor: RayExecutor
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
    """A pipeline step. Subclasses name their inputs and outputs and implement `run`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the stage computes something different
    reads: ClassVar[dict[str, tuple[str, ...]]] = {}  # upstream stage -> columns this stage reads
    writes: ClassVar[tuple[str, ...]] = ()  # columns of this stage's part files

    def columns(self, config: PipelineConfig) -> tuple[str, ...]:
        """The columns this run's part files hold (`writes`, plus any the settings add)."""
        return self.writes

    def settings(self, config: PipelineConfig) -> list[Any]:
        """The config sections that decide this stage's output (fingerprinted)."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError


def part_files(folder: Path) -> list[Path]:
    """The stage's part files in a stable order."""
    return sorted(Path(folder).glob("part-*.parquet"))


def check_columns(run: RunDir, stage: Stage) -> None:
    """Fail before starting when an upstream stage lacks a column this stage reads."""
    for upstream, columns in stage.reads.items():
        parts = part_files(run.stage_dir(upstream))
        if not parts:
            continue  # an empty upstream is handled by the stage itself
        names = set(pq.read_schema(parts[0]).names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise StageError(
                f"stage {stage.name} reads {missing} from {parts[0]}, which lacks them"
            )


def write_part(table: pa.Table, folder: Path, part: str, row_group_rows: int | None = None) -> Path:
    """Write one part file atomically.

    Text and key columns are zstd-compressed; float vectors are stored plain (their mantissas do
    not compress, and decompressing them would cost every later stage CPU time).
    """
    buf = io.BytesIO()
    compression = {
        f.name: "none" if pa.types.is_fixed_size_list(f.type) else "zstd" for f in table.schema
    }
    levels = {name: 1 for name, codec in compression.items() if codec == "zstd"}
    pq.write_table(
        table,
        buf,
        compression=compression,
        compression_level=levels or None,
        use_dictionary=[name for name, codec in compression.items() if codec == "zstd"],
        row_group_size=row_group_rows,
    )
    path = Path(folder) / f"part-{part}.parquet"
    atomic_write_bytes(path, buf.getvalue())
    return path


def part_rows(folder: Path) -> dict[str, int]:
    """Row count of each part file (from the Parquet footers), by part name."""
    return {
        p.stem.removeprefix("part-"): pq.ParquetFile(p).metadata.num_rows
        for p in part_files(folder)
    }


def write_scratch(path: Path, tables: Iterator[pa.Table] | list[pa.Table], schema: pa.Schema):
    """Write tables to one uncompressed Arrow IPC file, atomically: the stages' scratch format
    (memory-mappable, so readers page in only the slices they touch)."""
    with atomic_file(path) as f, pa.ipc.new_file(f, schema) as writer:
        for table in tables:
            writer.write_table(table)


def read_scratch(path: Path | str) -> pa.Table:
    """A scratch file, memory-mapped (zero-copy)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def iter_row_groups(path: str | Path, columns: list[str]) -> Iterator[pa.Table]:
    """Yield a part file's row groups in order, reading the next one while the caller works on
    the current (Arrow and numpy release the GIL, so disk and CPU overlap in one worker)."""
    from concurrent.futures import ThreadPoolExecutor

    f = pq.ParquetFile(path)
    n = f.metadata.num_row_groups

    def read(g: int) -> pa.Table:
        return f.read_row_group(g, columns=columns, use_threads=False)

    with ThreadPoolExecutor(max_workers=1) as io:
        pending = io.submit(read, 0) if n else None
        for g in range(n):
            table = pending.result()
            if g + 1 < n:
                pending = io.submit(read, g + 1)
            yield table


def record_part(folder: Path, part: str, stats: dict) -> None:
    """Mark a part as finished: written after its Parquet file, so a record means a whole part."""
    atomic_write_json(Path(folder) / PARTS_DIR / f"{part}.json", stats)


def discard_scratch(folder: Path, scratch: str, prefix: str) -> None:
    """Remove a stage's scratch folder and the records of the parts that wrote it, records
    first: a run killed in between redoes those parts on resume instead of trusting files that
    are gone."""
    import shutil

    for record in (Path(folder) / PARTS_DIR).glob(f"{prefix}*.json"):
        record.unlink()
    shutil.rmtree(Path(folder) / scratch, ignore_errors=True)


def run_parts(
    ctx: StageContext,
    stage: str,
    items: list[dict],
    factory: Callable[..., Any],
    *,
    shared: dict[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    pool_size: int | None = None,
    actors: bool = False,
    unit: str = "rows",
) -> list[dict]:
    """Run `factory`'s processor on every item not already recorded; return all part stats.

    Each item has a `part` name; its processor writes `part-<part>.parquet` and returns stats
    with at least `rows_in`. Stats are recorded here, after the part file exists.
    """
    folder = ctx.run.stage_dir(stage)
    done: dict[str, dict] = {}
    for item in items:
        # A record is trusted only while the files it lists are there with their sizes.
        stats = read_json(folder / PARTS_DIR / f"{item['part']}.json")
        if isinstance(stats, dict) and files_intact(folder, stats.get("files")):
            done[item["part"]] = stats
    todo = [item for item in items if item["part"] not in done]
    if done:
        ctx.log(f"[{stage}] resuming: {len(done)} of {len(items)} parts already written")
    total_rows = sum(
        int(item.get("rows", item.get("stop", 0) - item.get("start", 0))) for item in todo
    )
    progress = Progress(ctx, stage, len(todo), total_rows, unit)
    try:
        for stats, node in ctx.executor.map_items(
            todo,
            factory,
            shared=shared,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            pool_size=pool_size,
            actors=actors,
        ):
            stats = {**stats, "node": node, "files": file_sizes(folder, stats.get("files", []))}
            record_part(folder, stats["part"], stats)
            done[stats["part"]] = stats
            progress.update(int(stats["rows_in"]))
    finally:
        progress.close()
    return [done[item["part"]] for item in items]


class Progress:
    """Parts done and rows/s: a live bar on a terminal, a line every 10 s in logs (ray job logs)."""

    def __init__(self, ctx: StageContext, stage: str, parts: int, rows: int, unit: str):
        import sys

        self.ctx, self.stage, self.parts, self.rows, self.unit = ctx, stage, parts, rows, unit
        self.done_parts = self.done_rows = 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if ctx.progress and sys.stderr.isatty():
            from tqdm import tqdm

            if parts:
                desc = f"{stage} ({rows:,} {unit})" if rows else stage
                self.bar = tqdm(total=parts, desc=desc, unit="part", dynamic_ncols=True)
            else:  # a stream of rows, total unknown
                self.bar = tqdm(desc=stage, unit=f" {unit}", dynamic_ncols=True)

    def rate(self) -> float:
        return self.done_rows / max(time.perf_counter() - self.start, 1e-9)

    def update(self, rows: int, parts: int = 1) -> None:
        """Count finished parts and rows (parts=0: rows of a stream with no parts)."""
        self.done_parts += parts
        self.done_rows += rows
        if self.bar is not None:
            self.bar.update(parts if self.parts else rows)
            self.bar.set_postfix_str(f"{self.rate():,.0f} {self.unit}/s")
            return
        finished = bool(self.parts) and self.done_parts == self.parts
        if self.ctx.progress and (time.perf_counter() - self.last_line >= 10 or finished):
            self.last_line = time.perf_counter()
            of = f"/{self.rows:,}" if self.rows else ""
            done = f"{self.done_parts}/{self.parts} parts, " if self.parts else ""
            self.ctx.log(
                f"[{self.stage}] {done}{self.done_rows:,}{of} "
                f"{self.unit} ({self.rate():,.0f} {self.unit}/s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def merge_dropped(stats: list[dict]) -> dict[str, int]:
    """Sum per-part drop counts by reason."""
    total: dict[str, int] = {}
    for s in stats:
        for reason, count in s.get("dropped", {}).items():
            total[reason] = total.get(reason, 0) + int(count)
    return {k: v for k, v in sorted(total.items()) if v}
