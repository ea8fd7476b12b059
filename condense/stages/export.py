"""Stage `export`: the coreset, ready to train on, fetch or filter on.

Every input kind gets:

- export/part-*.parquet: sample_id, url, caption, source of every coreset row: a url + caption
  table that img2dataset downloads (`--input_format parquet --url_col url --caption_col
  caption`);
- export/keys/<source>.txt: the coreset's sample_ids per input file (per source tar for image
  inputs), one per line (sorted), for readers that filter the original files on read.

Image inputs (input.kind webdataset or urls) also get the coreset itself, in img2dataset's
layout, copied byte for byte from the source shards (`readers/shards.py` reads them safely):

- export/shards/{00000..}.tar with `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`; beside each
  a `.parquet` index (key, sample_id, url, caption, source, image_ext, status) and `_stats.json`;
- export/coreset.json in the LLaVA pretrain format: per sample an id, the image as
  `{shard}/{key}.{ext}` (the tar's name without `.tar`, then the member) and two turns, human
  `<image>\n` and gpt the caption.

The coreset rows are joined to embed/ by sample_id: each task filters one embed part against the
set of sampled ids, so nothing but the coreset's ids travels to the workers. Output shards take
the coreset in (source, sample_id) order, so each task streams a few source tars, one member at
a time, and stops reading a source once it has what it needs.
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from condense.cores.names import safe_names
from condense.errors import StageError
from condense.faults import kill_once
from condense.readers import IMAGE_KINDS
from condense.readers.shards import ShardLimits
from condense.runtime.processor import Processor, WorkItem
from condense.schema import (
    CAPTION,
    IMAGE_EXT,
    KEPT,
    KEY,
    SAMPLE_ID,
    SHARD_INDEX_SCHEMA,
    SOURCE,
    URL,
)
from condense.stages.base import SourcePart, Stage, StageContext, StageResult, write_parts
from condense.stages.embed import EmbedStage, image_root
from condense.stages.sample import SampleStage
from condense.storage.files import atomic_file, atomic_write_bytes, atomic_write_json
from condense.storage.fs import location
from condense.storage.parts import (
    part_files,
    part_name,
    part_path,
    read_table,
    write_part,
    write_table,
)
from condense.strict import StrictModel

KEYS_DIR = "keys"
SHARDS_DIR = "shards"
CORESET_JSON = "coreset.json"


class ExportConfig(StrictModel):
    """Export of the coreset (img2dataset layout for image inputs; url lists and keys otherwise)."""

    shard_size: int = Field(10_000, ge=1)  # samples per output tar (image inputs)


@dataclass
class ExportPart(Processor):
    """Filters one embed part to the coreset rows and writes them with their url and caption."""

    stage = "export"
    coreset: pa.Array  # the sampled ids
    embed_dir: str
    out_dir: str

    def process(self, item: SourcePart) -> dict:
        start = time.perf_counter()
        table = read_table(
            part_path(self.embed_dir, item.source),
            columns=[SAMPLE_ID, URL, CAPTION, SOURCE],
        )
        rows = table.filter(pc.is_in(table.column(SAMPLE_ID), value_set=self.coreset))
        path = write_part(rows, self.out_dir, item.source)
        return {
            "part": item.part,
            "files": [str(path)],
            "rows_in": len(rows),
            "seconds": time.perf_counter() - start,
        }


class ExportStage(Stage):
    name = "export"
    reads = {
        SampleStage.name: (SAMPLE_ID, KEPT),
        EmbedStage.name: (SAMPLE_ID, URL, CAPTION, SOURCE),
    }
    writes = (SAMPLE_ID, URL, CAPTION, SOURCE)

    def settings(self, config):
        return [config.export.fingerprint_dict()]

    def compute(self, ctx: StageContext) -> StageResult:
        coreset = coreset_ids(ctx.run.stage_dir(SampleStage.name))
        embed_dir = ctx.run.stage_dir(EmbedStage.name)
        out_dir = ctx.run.stage_dir(self.name)
        sources = [part_name(p) for p in part_files(embed_dir)]
        stats = write_parts(
            ctx,
            ExportPart(coreset, str(embed_dir), str(out_dir)),
            [SourcePart(part=f"filter-{s}", source=s) for s in sources],
        )
        exported = sum(s["rows_in"] for s in stats)
        if exported != len(coreset):
            raise StageError(
                f"export: {len(coreset):,} sampled ids but {exported:,} of them found in embed/"
            )
        rows = exported_rows(out_dir)  # read back once, for the key lists and the shard plan
        files = write_key_lists(out_dir, rows)
        extra = {"key_lists": files, "kind": "urls"}
        if ctx.config.input.kind in IMAGE_KINDS:
            extra = {**extra, **self._write_shards(ctx, out_dir, rows), "kind": "webdataset"}
        return StageResult(len(coreset), exported, {}, extra)

    def _write_shards(self, ctx: StageContext, out_dir: Path, rows: pa.Table) -> dict:
        """Copy the coreset's samples into export/shards/ and write coreset.json."""
        from condense.readers.webdataset import list_shards

        paths = {s.source: s.path for s in list_shards(image_root(ctx.config, ctx.run.root))}
        items = plan_shards(rows, ctx.config.export.shard_size)
        copier = ShardCopier(
            paths, str(out_dir / SHARDS_DIR), ctx.config.input.id_column, ctx.config.input.limits
        )
        stats = write_parts(ctx, copier, items, unit="samples")
        copied = sum(s["rows_in"] for s in stats)
        write_coreset_json(out_dir / SHARDS_DIR, [i.shard for i in items], out_dir / CORESET_JSON)
        return {
            "shards": len(items),
            "samples": copied,
            "bytes": sum(s["bytes"] for s in stats),
            "coreset_json": CORESET_JSON,
        }


def coreset_ids(sample_dir: Path) -> pa.Array:
    """The sample_ids the sample stage kept (the coreset: small by construction)."""
    parts = part_files(sample_dir)
    if not parts:
        return pa.array([], pa.string())
    table = read_table(parts, columns=[SAMPLE_ID, KEPT])
    return table.filter(table.column(KEPT)).column(SAMPLE_ID).combine_chunks()


def exported_rows(out_dir: Path) -> pa.Table:
    """source, sample_id, url and caption of every coreset row export/ holds."""
    parts = part_files(out_dir)
    columns = [SOURCE, SAMPLE_ID, URL, CAPTION]
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return read_table(parts, columns=columns)


def write_key_lists(out_dir: Path, table: pa.Table) -> int:
    """keys/<source>.txt for every input file holding coreset rows; returns how many."""
    folder = out_dir / KEYS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if not len(table):
        return 0
    sources = table.column(SOURCE).to_numpy(zero_copy_only=False)
    ids = table.column(SAMPLE_ID).to_numpy(zero_copy_only=False)
    names = sorted(set(sources.tolist()))
    stems = [Path(n).stem for n in names]
    if len({s.lower() for s in stems}) < len(stems):  # same file name in two folders
        stems = [str(Path(n).with_suffix("")) for n in names]
    files = safe_names(stems)
    for name, file in zip(names, files, strict=True):
        keys = np.sort(ids[sources == name])
        atomic_write_bytes(folder / f"{file}.txt", ("\n".join(keys.tolist()) + "\n").encode())
    return len(names)


@dataclass(frozen=True, kw_only=True)
class OutputShard(WorkItem):
    """One output tar and its coreset rows (source, sample_id, url, caption, key)."""

    shard: str  # its number, `00000`
    table: pa.Table


def plan_shards(table: pa.Table, shard_size: int) -> list[OutputShard]:
    """Output shards: the coreset in (source, sample_id) order, cut every shard_size rows, each
    row with the member name (a sanitised, distinct key) it gets in its output tar."""
    if not len(table):
        return []
    table = table.sort_by([(SOURCE, "ascending"), (SAMPLE_ID, "ascending")])
    keys = safe_names(table.column(SAMPLE_ID).to_pylist(), dots=False)
    table = table.append_column(KEY, pa.array(keys, pa.string()))
    items = []
    for number, start in enumerate(range(0, len(table), shard_size)):
        rows = table.slice(start, shard_size)
        shard = f"{number:05d}"
        items.append(OutputShard(part=f"shard-{shard}", shard=shard, rows=len(rows), table=rows))
    return items


@dataclass
class ShardCopier(Processor):
    """Writes one output shard: streams the source tars it needs, one sample at a time, and
    copies the wanted samples' members byte for byte under their new keys."""

    stage = "export"
    paths: dict[str, str]  # source shard -> where it is read from
    out_dir: str  # export/shards
    id_field: str | None  # input.id_column
    limits: ShardLimits  # shards are read exactly as embed read them

    def process(self, item: OutputShard) -> dict:
        from condense.readers.shards import IMAGE_EXTENSIONS, KEPT_EXTENSIONS
        from condense.readers.webdataset import find_samples

        copied = set(KEPT_EXTENSIONS)  # never a .pickle or .pyd a reader may load
        start, started_at = time.perf_counter(), time.time()
        table = item.table
        wanted: dict[str, dict[str, int]] = {}
        sources, ids = table.column(SOURCE).to_pylist(), table.column(SAMPLE_ID).to_pylist()
        for row, (source, sample_id) in enumerate(zip(sources, ids, strict=True)):
            wanted.setdefault(source, {})[sample_id] = row
        order, image_ext, written = [], [], 0
        out_dir = location(self.out_dir)
        shard = out_dir / item.shard
        keys = table.column(KEY).to_pylist()
        with atomic_file(shard.with_suffix(".tar")) as f, tarfile.open(fileobj=f, mode="w|") as tar:
            for source in sorted(wanted):
                if source not in self.paths:
                    raise StageError(f"export: source shard {source} is no longer in the input")
                need = set(wanted[source])
                found = find_samples(self.paths[source], need, self.id_field, self.limits)
                for sample_id, members in found:
                    row = wanted[source][sample_id]
                    for ext, data in members:
                        if ext in copied:
                            add_member(tar, f"{keys[row]}.{ext}", data)
                            written += len(data)
                    order.append(row)
                    image_ext.append(next((e for e, _ in members if e in IMAGE_EXTENSIONS), None))
                    kill_once("export_kill", item.shard)  # a test's copier killed mid-shard
                if need:
                    missing = ", ".join(sorted(need)[:5])
                    raise StageError(
                        f"export: {len(need)} coreset samples not found in source shard "
                        f"{self.paths[source]} (e.g. {missing}): was it changed after embed?"
                    )
        rows = table.take(pa.array(order, pa.int64()))
        index = pa.Table.from_arrays(
            [
                rows.column(KEY),
                rows.column(SAMPLE_ID),
                rows.column(URL),
                rows.column(CAPTION),
                rows.column(SOURCE),
                pa.array(image_ext, pa.string()),
                pa.array(["success"] * len(rows), pa.string()),
            ],
            schema=SHARD_INDEX_SCHEMA,
        )
        write_table(index, shard.with_suffix(".parquet"))
        seconds = time.perf_counter() - start
        atomic_write_json(
            out_dir / f"{item.shard}_stats.json",
            {
                "count": len(rows),
                "successes": len(rows),
                "failed_to_download": 0,
                "failed_to_resize": 0,
                "duration": seconds,
                "start_time": started_at,
                "end_time": started_at + seconds,
                "status_dict": {"success": len(rows)},
                "bytes": written,
                "sources": len(wanted),
            },
        )
        files = [shard.with_suffix(".tar"), shard.with_suffix(".parquet")]
        files.append(out_dir / f"{item.shard}_stats.json")
        return {
            "part": item.part,
            "files": [str(f) for f in files],
            "rows_in": len(rows),
            "bytes": written,
            "seconds": seconds,
        }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file member with fixed metadata, so the same coreset gives the same bytes."""
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_coreset_json(shards_dir: Path, shards: list[str], path: Path) -> None:
    """coreset.json in the LLaVA pretrain format, streamed shard by shard from the indexes."""
    with atomic_file(path) as f:
        f.write(b"[")
        first = True
        for shard in shards:
            index = read_table(shards_dir / f"{shard}.parquet")
            for key, sample_id, caption, ext in zip(
                index.column(KEY).to_pylist(),
                index.column(SAMPLE_ID).to_pylist(),
                index.column(CAPTION).to_pylist(),
                index.column(IMAGE_EXT).to_pylist(),
                strict=True,
            ):
                entry = {
                    "id": sample_id,
                    "image": f"{shard}/{key}.{ext}",
                    "conversations": [
                        {"from": "human", "value": "<image>\n"},
                        {"from": "gpt", "value": caption},
                    ],
                }
                f.write(
                    ("\n" if first else ",\n").encode()
                    + json.dumps(entry, ensure_ascii=False).encode()
                )
                first = False
        f.write(b"\n]\n")
