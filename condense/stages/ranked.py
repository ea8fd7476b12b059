"""What the rank-selection stages share (clip band, centroid band, sample).

Each keeps a range of ranks [r_lo, r_hi) of the rows that entered it, in the order (key,
sample_id): the key is a band's descending score key or the sample's seeded hash. Exact and
distributed, in three steps:

1. every part's entering rows are sorted into a run `_runs/<part>.arrow` (key, sample_id, row);
2. the rows at ranks r_lo and r_hi are found by `cores.select.find_rank`, whose questions Ray
   tasks answer from the runs (the driver holds histograms and at most a few hundred thousand
   keys, never a column);
3. every part writes its output: one row per entering row, in the upstream order, `kept` set for
   the rows between the two boundaries.

The rows entering a stage are dedup's part rows that every stage so far kept; their `sample_id`s
are checked against each upstream part, so stages are joined by key, not by position.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense import schema as S
from condense.cores.select import Boundary, Run, answer, count_below, find_rank, sort_run
from condense.errors import StageError
from condense.pipeline.rundir import RunDir
from condense.stages.base import (
    Stage,
    StageContext,
    StageResult,
    discard_scratch,
    part_files,
    read_scratch,
    run_parts,
    write_part,
    write_scratch,
)

RUNS_DIR = "_runs"
SELECTION_CHAIN = ("dedup", "clip_band", "centroid_band", "sample")  # each filters the previous


def survivors(run_dir: str, part: str, stage: str, columns: list[str]) -> pa.Table:
    """sample_id and `columns` of dedup's part `part`, restricted to the rows every selection stage before
    `stage` kept (checking at each step that the stage's part lists the same sample_ids)."""
    run = RunDir(run_dir)
    wanted = list(dict.fromkeys([S.SAMPLE_ID, *columns]))
    table = pq.read_table(run.stage_dir("dedup") / f"part-{part}.parquet", columns=wanted)
    for upstream in SELECTION_CHAIN[: SELECTION_CHAIN.index(stage)]:
        path = run.stage_dir(upstream) / f"part-{part}.parquet"
        flags = pq.read_table(path, columns=[S.SAMPLE_ID, S.KEPT])
        if not flags.column(S.SAMPLE_ID).equals(table.column(S.SAMPLE_ID)):
            raise StageError(f"{path} does not list the rows that entered {upstream}")
        table = table.filter(flags.column(S.KEPT))
    return table


class RunWriter:
    """Step 1: sort one part's entering rows into a run."""

    def __init__(self, stage: RankedStage, run_dir: str, settings: dict):
        self.stage, self.run_dir, self.settings = stage, run_dir, settings

    def process(self, item: dict) -> dict:
        start = time.perf_counter()
        rows = survivors(self.run_dir, item["source"], self.stage.name, self.stage.inputs)
        keys = self.stage.keys(rows, self.settings)
        run, order = sort_run(keys, rows.column(S.SAMPLE_ID))
        table = pa.table({"key": pa.array(run.keys), S.SAMPLE_ID: run.ids, "row": pa.array(order)})
        path = (
            RunDir(self.run_dir).stage_dir(self.stage.name) / RUNS_DIR / f"{item['source']}.arrow"
        )
        write_scratch(path, [table], table.schema)
        return {
            "part": item["part"],
            "files": [str(path)],
            "rows_in": len(table),
            "seconds": time.perf_counter() - start,
        }


def load_run(path: str) -> tuple[Run, np.ndarray]:
    """A run file, memory-mapped: (run, row positions in the part's entering order)."""
    table = read_scratch(path)
    keys = table.column("key").combine_chunks().to_numpy(zero_copy_only=False)
    ids = table.column(S.SAMPLE_ID).combine_chunks()
    return Run(keys, ids), table.column("row").combine_chunks().to_numpy(zero_copy_only=False)


def answer_runs(paths: list[str], question: tuple) -> list:
    """A Ray task: every run in `paths` answers one question."""
    return [answer(load_run(p)[0], question) for p in paths]


class KeptWriter:
    """Step 3: write one part with `kept` set between the two boundaries."""

    def __init__(self, stage: RankedStage, run_dir: str, lower, upper):
        self.stage, self.run_dir = stage, run_dir
        self.lower, self.upper = lower, upper

    def process(self, item: dict) -> dict:
        start = time.perf_counter()
        rows = survivors(self.run_dir, item["source"], self.stage.name, self.stage.inputs)
        out_dir = RunDir(self.run_dir).stage_dir(self.stage.name)
        run, row = load_run(str(out_dir / RUNS_DIR / f"{item['source']}.arrow"))
        a, b = count_below(run, self.lower), count_below(run, self.upper)
        kept = np.zeros(len(rows), dtype=bool)
        kept[row[a:b]] = True
        table = rows.select(list(self.stage.writes[:-1])).append_column(S.KEPT, pa.array(kept))
        path = write_part(table, out_dir, item["source"])
        return {
            "part": item["part"],
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

    def run(self, ctx: StageContext) -> StageResult:
        out_dir = ctx.run.stage_dir(self.name)
        sources = [p.stem.removeprefix("part-") for p in part_files(ctx.run.stage_dir("dedup"))]
        settings = self.settings(ctx.config)[0]
        t0 = time.perf_counter()
        counts = run_parts(
            ctx,
            self.name,
            [{"part": f"run-{s}", "source": s} for s in sources],
            RunWriter,
            shared={"stage": self, "run_dir": str(ctx.run.root), "settings": settings},
            num_cpus=1.0,
        )
        n = sum(c["rows_in"] for c in counts)
        r_lo, r_hi, dropped, notes = self.ranks(ctx, n)
        paths = [str(out_dir / RUNS_DIR / f"{s}.arrow") for s in sources]
        groups = _groups(paths, 4 * ctx.executor.cpus())

        def ask(question: tuple) -> list:
            answers = ctx.executor.map_tasks(answer_runs, [(g, question) for g in groups])
            return [a for group in answers for a in group]

        lower = find_rank(r_lo, n, ask) if r_lo < n else None
        upper = find_rank(r_hi, n, ask) if r_hi < n else None
        select_seconds = time.perf_counter() - t0
        stats = run_parts(
            ctx,
            self.name,
            [
                {"part": f"out-{s}", "source": s, "rows": c["rows_in"]}
                for s, c in zip(sources, counts, strict=True)
            ],
            KeptWriter,
            shared={
                "stage": self,
                "run_dir": str(ctx.run.root),
                "lower": lower,
                "upper": upper,
            },
            num_cpus=1.0,
        )
        kept = sum(s["kept"] for s in stats)
        if kept != r_hi - r_lo:
            raise StageError(f"{self.name}: kept {kept} rows, expected {r_hi - r_lo}")
        discard_scratch(out_dir, RUNS_DIR, prefix="run-")
        extra = {
            "ranks": [r_lo, r_hi],
            "boundaries": [_describe(lower), _describe(upper)],
            "select_seconds": round(select_seconds, 3),
            **notes,
        }
        return StageResult(n, kept, {k: v for k, v in dropped.items() if v}, extra)


def _describe(b: Boundary | None) -> dict | None:
    return None if b is None else {"key": b.key, S.SAMPLE_ID: b.sample_id}


def _groups(paths: list[str], n: int) -> list[list[str]]:
    size = max(1, -(-len(paths) // max(n, 1)))
    return [paths[i : i + size] for i in range(0, len(paths), size)]
