"""What the rank-selection stages share (clip band, centroid band, sample).

Each keeps a range of ranks [r_lo, r_hi) of the rows that entered it, in the order (key,
sample_id): the key is a band's descending score key or the sample's seeded hash. Exact and
distributed, in three steps:

1. every part's entering rows are sorted by key into `_sorted/<part>.arrow` (key, sample_id,
   row);
2. the rows at ranks r_lo and r_hi are found by `cores.select.find_rank`, whose questions
   workers answer from the sorted parts (the driver holds histograms and at most a few hundred
   thousand keys, never a column);
3. every part writes its output: one row per entering row, in the upstream order, `kept` set for
   the rows between the two boundaries.

The rows entering a stage are dedup's part rows that every stage so far kept; their `sample_id`s
are checked against each upstream part, so stages are joined by key, not by position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from condense.cores.select import (
    Boundary,
    SortedPart,
    answer,
    count_below,
    find_rank,
    sort_part,
)
from condense.errors import StageError
from condense.runtime.processor import Processor, WorkItem, gather
from condense.schema import (
    KEPT,
    ORDER_KEY,
    ROW,
    SAMPLE_ID,
)
from condense.stages.base import SourcePart, Stage, StageContext, StageResult, write_parts
from condense.storage.parts import (
    discard_scratch,
    part_files,
    part_name,
    part_path,
    read_scratch,
    read_table,
    write_part,
    write_scratch,
)
from condense.storage.rundir import RunDir

SORTED_DIR = "_sorted"  # scratch: each part's entering rows sorted by key
ENTERING = ".rows.arrow"  # beside each sorted part: the columns step 3 writes, in entering order
SELECTION_CHAIN = ("dedup", "clip_band", "centroid_band", "sample")  # each filters the previous


def survivors(run_dir: str, part: str, stage: str, columns: list[str]) -> pa.Table:
    """sample_id and `columns` of dedup's part `part`, restricted to the rows every selection stage before
    `stage` kept (checking at each step that the stage's part lists the same sample_ids)."""
    run = RunDir(run_dir)
    wanted = list(dict.fromkeys([SAMPLE_ID, *columns]))
    table = read_table(part_path(run.stage_dir("dedup"), part), columns=wanted)
    for upstream in SELECTION_CHAIN[: SELECTION_CHAIN.index(stage)]:
        path = part_path(run.stage_dir(upstream), part)
        flags = read_table(path, columns=[SAMPLE_ID, KEPT])
        if not flags.column(SAMPLE_ID).equals(table.column(SAMPLE_ID)):
            raise StageError(f"{path} does not list the rows that entered {upstream}")
        table = table.filter(flags.column(KEPT))
    return table


@dataclass
class KeySorter(Processor):
    """Step 1: sort one part's entering rows by key."""

    ranked: RankedStage
    run_dir: str
    settings: dict  # the stage's settings (a sample's seed)

    @property
    def stage(self) -> str:  # one class serves the three ranked stages
        return self.ranked.name

    def process(self, item: SourcePart) -> dict:
        start = time.perf_counter()
        rows = survivors(self.run_dir, item.source, self.ranked.name, self.ranked.inputs)
        keys = self.ranked.keys(rows, self.settings)
        part, order = sort_part(keys, rows.column(SAMPLE_ID))
        table = pa.table(
            {ORDER_KEY: pa.array(part.keys), SAMPLE_ID: part.ids, ROW: pa.array(order)}
        )
        path = sorted_path(self.run_dir, self.ranked.name, item.source)
        write_scratch(path, [table], table.schema)
        # What step 3 writes, kept here in the entering order: it need not read the chain again.
        entering = rows.select(list(self.ranked.writes[:-1]))
        entering_path = path.with_suffix(ENTERING)
        write_scratch(entering_path, [entering], entering.schema)
        return {
            "part": item.part,
            "files": [str(path), str(entering_path)],
            "rows_in": len(table),
            "seconds": time.perf_counter() - start,
        }


def sorted_path(run_dir: str, stage: str, source: str):
    """Where a ranked stage keeps one part's sorted rows while it works."""
    return RunDir(run_dir).stage_dir(stage) / SORTED_DIR / f"{source}.arrow"


def load_sorted(path: str) -> tuple[SortedPart, np.ndarray]:
    """A sorted part, memory-mapped: (its keys and ids, row positions in entering order)."""
    table = read_scratch(path)
    keys = table.column(ORDER_KEY).combine_chunks().to_numpy(zero_copy_only=False)
    ids = table.column(SAMPLE_ID).combine_chunks()
    return SortedPart(keys, ids), table.column(ROW).combine_chunks().to_numpy(zero_copy_only=False)


@dataclass(frozen=True, kw_only=True)
class SortedGroup(WorkItem):
    """Some sorted parts, which one worker reads to answer a question."""

    paths: list[str]


@dataclass
class RankAnswerer(Processor):
    """Step 2: every sorted part of a group answers one question of `find_rank`."""

    stage_name: str
    question: tuple

    @property
    def stage(self) -> str:
        return self.stage_name

    def process(self, item: SortedGroup) -> list[Any]:
        return [answer(load_sorted(p)[0], self.question) for p in item.paths]


@dataclass
class KeptWriter(Processor):
    """Step 3: write one part with `kept` set between the two boundaries."""

    ranked: RankedStage
    run_dir: str
    lower: Boundary | None
    upper: Boundary | None

    @property
    def stage(self) -> str:
        return self.ranked.name

    def process(self, item: SourcePart) -> dict:
        start = time.perf_counter()
        out_dir = RunDir(self.run_dir).stage_dir(self.ranked.name)
        path = sorted_path(self.run_dir, self.ranked.name, item.source)
        rows = read_scratch(path.with_suffix(ENTERING))
        part, row = load_sorted(str(path))
        a, b = count_below(part, self.lower), count_below(part, self.upper)
        kept = np.zeros(len(rows), dtype=bool)
        kept[row[a:b]] = True
        table = rows.append_column(KEPT, pa.array(kept))
        path = write_part(table, out_dir, item.source)
        return {
            "part": item.part,
            "files": [str(path)],
            "rows_in": len(rows),
            "kept": int(b - a),
            "seconds": time.perf_counter() - start,
        }


class RankedStage(Stage):
    """A stage that keeps the ranks [r_lo, r_hi) of its entering rows."""

    inputs: ClassVar[list[str]]  # dedup columns the stage reads (keys and written scores)

    def keys(self, rows: pa.Table, settings: dict) -> np.ndarray:
        """uint64 order keys of the entering rows."""
        raise NotImplementedError

    def ranks(self, ctx: StageContext, n: int) -> tuple[int, int, dict[str, int], dict]:
        """r_lo, r_hi, the drop counts by reason, and notes for `_stage.json`, for n rows."""
        raise NotImplementedError

    def compute(self, ctx: StageContext) -> StageResult:
        out_dir = ctx.run.stage_dir(self.name)
        sources = [part_name(p) for p in part_files(ctx.run.stage_dir("dedup"))]
        settings = self.settings(ctx.config)[0]
        run_dir = str(ctx.run.root)
        t0 = time.perf_counter()
        counts = write_parts(
            ctx,
            KeySorter(self, run_dir, settings),
            [SourcePart(part=f"sorted-{s}", source=s) for s in sources],
        )
        n = sum(c["rows_in"] for c in counts)
        r_lo, r_hi, dropped, notes = self.ranks(ctx, n)
        paths = [str(sorted_path(run_dir, self.name, s)) for s in sources]
        groups = [
            SortedGroup(part=f"group-{i}", paths=g)
            for i, g in enumerate(_groups(paths, 4 * ctx.executor.cpus()))
        ]

        def ask(question: tuple) -> list:
            answers = gather(ctx.executor, RankAnswerer(self.name, question), groups)
            return [a for group in answers for a in group]

        lower = find_rank(r_lo, n, ask) if r_lo < n else None
        upper = find_rank(r_hi, n, ask) if r_hi < n else None
        select_seconds = time.perf_counter() - t0
        stats = write_parts(
            ctx,
            KeptWriter(self, run_dir, lower, upper),
            [
                SourcePart(part=f"out-{s}", source=s, rows=c["rows_in"])
                for s, c in zip(sources, counts, strict=True)
            ],
        )
        kept = sum(s["kept"] for s in stats)
        if kept != r_hi - r_lo:
            raise StageError(f"{self.name}: kept {kept} rows, expected {r_hi - r_lo}")
        discard_scratch(out_dir, SORTED_DIR, prefix="sorted-")
        extra = {
            "ranks": [r_lo, r_hi],
            "boundaries": [_describe(lower), _describe(upper)],
            "select_seconds": round(select_seconds, 3),
            **notes,
        }
        return StageResult(n, kept, {k: v for k, v in dropped.items() if v}, extra)


def _describe(b: Boundary | None) -> dict | None:
    return None if b is None else {"key": b.key, SAMPLE_ID: b.sample_id}


def _groups(paths: list[str], n: int) -> list[list[str]]:
    size = max(1, -(-len(paths) // max(n, 1)))
    return [paths[i : i + size] for i in range(0, len(paths), size)]
