"""Stage `export`: the coreset, ready to fetch or filter on.

For embedding-only inputs (clip-retrieval folders, Parquet) there are no image bytes to copy, so
export writes what users need to get the images:

- export/part-*.parquet: sample_id, url, caption, source of every coreset row: a url + caption
  table that img2dataset downloads (`--input_format parquet --url_col url --caption_col
  caption`);
- export/keys/<source>.txt: the coreset's sample_ids per input file, one per line (sorted), for
  readers that filter the original files on read instead of copying.

The coreset rows are joined to embed/ by sample_id: each task filters one embed part against the
set of sampled ids, so nothing but the coreset's ids travels to the workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from condense import schema as S
from condense.cores.names import safe_names
from condense.errors import StageError
from condense.pipeline.rundir import atomic_write_bytes
from condense.stages.base import (
    Stage,
    StageContext,
    StageResult,
    part_files,
    run_parts,
    write_part,
)
from condense.strict import StrictModel

KEYS_DIR = "keys"


class ExportConfig(StrictModel):
    """Export of the coreset (img2dataset layout for image inputs; url lists and keys otherwise)."""

    shard_size: int = Field(10_000, ge=1)  # samples per output tar (image inputs)


class ExportPart:
    """Filters one embed part to the coreset rows and writes them with their url and caption."""

    def __init__(self, coreset: pa.Array, embed_dir: str, out_dir: str):
        self.coreset, self.embed_dir, self.out_dir = coreset, Path(embed_dir), out_dir

    def process(self, item: dict) -> dict:
        start = time.perf_counter()
        table = pq.read_table(
            self.embed_dir / f"part-{item['source']}.parquet",
            columns=[S.SAMPLE_ID, S.URL, S.CAPTION, S.SOURCE],
        )
        rows = table.filter(pc.is_in(table.column(S.SAMPLE_ID), value_set=self.coreset))
        write_part(rows, self.out_dir, item["source"])
        return {"part": item["part"], "rows_in": len(rows), "seconds": time.perf_counter() - start}


class ExportStage(Stage):
    name = "export"
    reads = {
        "sample": (S.SAMPLE_ID, S.KEPT),
        "embed": (S.SAMPLE_ID, S.URL, S.CAPTION, S.SOURCE),
    }
    writes = (S.SAMPLE_ID, S.URL, S.CAPTION, S.SOURCE)

    def settings(self, config):
        return [config.export.fingerprint_dict()]

    def run(self, ctx: StageContext) -> StageResult:
        coreset = coreset_ids(ctx.run.stage_dir("sample"))
        embed_dir = ctx.run.stage_dir("embed")
        out_dir = ctx.run.stage_dir(self.name)
        sources = [p.stem.removeprefix("part-") for p in part_files(embed_dir)]
        stats = run_parts(
            ctx,
            self.name,
            [{"part": f"filter-{s}", "source": s} for s in sources],
            ExportPart,
            shared={"coreset": coreset, "embed_dir": str(embed_dir), "out_dir": str(out_dir)},
            num_cpus=1.0,
        )
        exported = sum(s["rows_in"] for s in stats)
        if exported != len(coreset):
            raise StageError(
                f"export: {len(coreset):,} sampled ids but {exported:,} of them found in embed/"
            )
        files = write_key_lists(out_dir)
        extra = {"key_lists": files, "kind": "urls"}
        return StageResult(len(coreset), exported, {}, extra)


def coreset_ids(sample_dir: Path) -> pa.Array:
    """The sample_ids the sample stage kept (the coreset: small by construction)."""
    parts = part_files(sample_dir)
    if not parts:
        return pa.array([], pa.string())
    table = pq.read_table(parts, columns=[S.SAMPLE_ID, S.KEPT])
    return table.filter(table.column(S.KEPT)).column(S.SAMPLE_ID).combine_chunks()


def write_key_lists(out_dir: Path) -> int:
    """keys/<source>.txt for every input file holding coreset rows; returns how many."""
    parts = part_files(out_dir)
    folder = out_dir / KEYS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if not parts:
        return 0
    table = pq.read_table(parts, columns=[S.SOURCE, S.SAMPLE_ID])
    sources = table.column(S.SOURCE).to_numpy(zero_copy_only=False)
    ids = table.column(S.SAMPLE_ID).to_numpy(zero_copy_only=False)
    names = sorted(set(sources.tolist()))
    files = safe_names([Path(n).stem for n in names])
    for name, file in zip(names, files, strict=True):
        keys = np.sort(ids[sources == name])
        atomic_write_bytes(folder / f"{file}.txt", ("\n".join(keys.tolist()) + "\n").encode())
    return len(names)
