"""Stage `embed`: input rows -> embed/part-*.parquet with unit embeddings and clip_score.

Precomputed embeddings (clip-retrieval folders or Parquet) are read by tasks; WebDataset shards
are embedded by open_clip actors (one model load per actor). Both go through `store_rows`, so
embed/ looks the same whatever the input and every later stage is shared.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from condense import schema as S
from condense.cores.hashing import hash_ids
from condense.cores.vectors import (
    DROP_MISSING_ID,
    as_stored,
    clip_scores,
    invalid_rows,
    normalize,
    to_unit_float32,
)
from condense.errors import InputError
from condense.readers import Reader, open_reader, resolve_input
from condense.readers.webdataset import ModelConfig
from condense.stages.base import (
    Stage,
    StageContext,
    StageResult,
    merge_dropped,
    run_parts,
    write_part,
)
from condense.stages.unique_ids import ID_HASH_SEED, check_unique_ids, write_id_hashes
from condense.strict import StrictModel

EMBED_ROW_GROUP = 8192  # rows per Parquet row group: the unit a partial read (a sample) fetches


class EmbedConfig(StrictModel):
    """How embeddings are stored in embed/."""

    dim: int | None = None  # expected embedding dimension; None: taken from the input
    # Stored precision; float16 halves the disk (later stages re-normalise after the upcast).
    dtype: Literal["float16", "float32"] = "float32"
    rows_per_part: int = 100_000  # rows per output part file (and per unit of work / resume)
    check_duplicate_ids: bool = True  # fail when a sample_id occurs twice (rows are joined by id)
    model: ModelConfig = ModelConfig()  # CLIP model for image inputs (input.kind: webdataset)
    workers: int | None = None  # parallel readers; None: one per CPU

    runtime_fields = frozenset({"workers"})


class EmbedPartWriter:
    """Reads one input slice, drops unusable rows by reason, writes one part file."""

    def __init__(self, reader: Reader, dtype: str, out_dir: str):
        self.reader = reader
        self.dtype = dtype
        self.out_dir = out_dir

    def process(self, item: dict) -> dict:
        start = time.perf_counter()
        stats = store_rows(self.reader.read(item), item["part"], self.dtype, self.out_dir, {})
        return {**stats, "seconds": time.perf_counter() - start}


class ShardEmbedWriter:
    """Embeds one WebDataset shard with CLIP (in an actor that loaded the model once) and
    writes one part, exactly as EmbedPartWriter writes precomputed rows."""

    def __init__(self, model, device: str, dtype: str, out_dir: str, id_field: str | None):
        from condense.readers.webdataset import ShardEncoder

        self.encoder = ShardEncoder(model, device, id_field)
        self.dtype, self.out_dir = dtype, out_dir

    def setup(self) -> None:
        self.encoder.setup()

    def process(self, item: dict) -> dict:
        start = time.perf_counter()
        raw, dropped = self.encoder.read(item)
        stats = store_rows(raw, item["part"], self.dtype, self.out_dir, dropped)
        return {**stats, "dim": int(raw.img.shape[1]), "seconds": time.perf_counter() - start}


def store_rows(raw, part: str, dtype: str, out_dir: str, dropped_before: dict[str, int]) -> dict:
    """Drop unusable rows by reason, normalise, store in id-hash order, write one part."""
    n = len(raw.img)
    ids = np.asarray(raw.sample_id, dtype=object)
    missing = np.array([i is None or i == "" for i in ids], dtype=bool)
    masks = invalid_rows(raw.img, raw.txt)
    dropped = {**dropped_before, DROP_MISSING_ID: int(missing.sum())}
    keep = ~missing
    for reason, mask in masks.items():
        mask = mask & keep
        dropped[reason] = int(mask.sum())
        keep &= ~mask
    # Rows are stored in the order of their id hash: any seeded window of that order is a
    # uniform sample that a reader can fetch without scanning the part (see cluster).
    kept_ids = ids[keep]
    hashes = hash_ids(kept_ids.tolist(), ID_HASH_SEED) if len(kept_ids) else np.zeros(0, np.uint64)
    order = np.lexsort((kept_ids, hashes))
    idx = np.flatnonzero(keep)[order]
    img = as_stored(normalize(raw.img[idx]), dtype)
    txt = as_stored(normalize(raw.txt[idx]), dtype)
    # Scored from the stored vectors, exactly as later stages will see them.
    score = clip_scores(to_unit_float32(img), to_unit_float32(txt))
    table = pa.Table.from_arrays(
        [
            pa.array(ids[idx].tolist(), type=pa.string()),
            pa.array([raw.caption[i] for i in idx], type=pa.string()),
            pa.array([raw.url[i] for i in idx], type=pa.string()),
            pa.array([raw.source] * len(idx), type=pa.string()),
            S.vectors_to_arrow(img),
            S.vectors_to_arrow(txt),
            pa.array(score, type=pa.float32()),
        ],
        schema=S.embed_schema(raw.img.shape[1], dtype),
    )
    write_id_hashes(Path(out_dir), part, hashes[order], raw.first_row + idx)
    write_part(table, out_dir, part, row_group_rows=EMBED_ROW_GROUP)
    return {
        "part": part,
        "rows_in": n + sum(dropped_before.values()),
        "rows_out": int(keep.sum()),
        "dropped": {k: v for k, v in dropped.items() if v},
    }


def input_listing(cfg) -> list[tuple[str, int]]:
    """Names and sizes of the input files: new or rewritten files make embed (and what follows)
    run again, even when the config is unchanged."""
    if cfg.kind == "synth" or not cfg.path:
        return []
    root = Path(cfg.path)
    if root.is_file():  # a url list: a rewritten file downloads again
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    if not root.is_dir():
        return []
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()
    )


class EmbedStage(Stage):
    name = "embed"
    version = 2  # 2: rows stored in id-hash order, with _ids/ side files
    writes = tuple(S.embed_schema(1, "float32").names)

    def settings(self, config):
        return [
            config.input.fingerprint_dict(),
            config.embed.fingerprint_dict(),
            input_listing(config.input),
        ]

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config
        if cfg.input.kind in ("webdataset", "urls"):
            return self._run_images(ctx)
        input_cfg = resolve_input(cfg.input, ctx.run.root, ctx.log)
        reader = open_reader(input_cfg)
        if cfg.embed.dim is not None and reader.dim != cfg.embed.dim:
            raise InputError(
                f"{input_cfg.path}: embeddings have dimension {reader.dim}, embed.dim is {cfg.embed.dim}"
            )
        items = reader.plan(cfg.embed.rows_per_part)
        if not items:
            raise InputError(f"{input_cfg.path}: the input holds no rows")
        out_dir = ctx.run.stage_dir(self.name)
        stats = run_parts(
            ctx,
            self.name,
            items,
            EmbedPartWriter,
            shared={"reader": reader, "dtype": cfg.embed.dtype, "out_dir": str(out_dir)},
            num_cpus=1.0,
            pool_size=cfg.embed.workers,
        )
        if cfg.embed.check_duplicate_ids:
            check_unique_ids(
                ctx.executor, out_dir, [i["part"] for i in items], sum(s["rows_out"] for s in stats)
            )
        rows_in = sum(s["rows_in"] for s in stats)
        rows_out = sum(s["rows_out"] for s in stats)
        return StageResult(
            rows_in, rows_out, merge_dropped(stats), {"dim": reader.dim, "dtype": cfg.embed.dtype}
        )

    def _run_images(self, ctx: StageContext) -> StageResult:
        """WebDataset shards (downloaded first for urls): one part per shard, embedded by CLIP
        actors (a GPU each where the cluster has GPUs, the CPU otherwise)."""
        from condense.readers.webdataset import image_root, list_shards

        cfg = ctx.config
        downloaded: dict[str, int] = {}
        if cfg.input.kind == "urls":
            downloaded = self._download(ctx)
        items = list_shards(image_root(cfg, ctx.run.root))
        out_dir = ctx.run.stage_dir(self.name)
        gpus = ctx.executor.gpus()
        stats = run_parts(
            ctx,
            self.name,
            items,
            ShardEmbedWriter,
            shared={
                "model": cfg.embed.model,
                "device": "cuda" if gpus else "cpu",
                "dtype": cfg.embed.dtype,
                "out_dir": str(out_dir),
                "id_field": cfg.input.id_column,
            },
            num_cpus=1.0,
            num_gpus=1.0 if gpus else 0.0,
            pool_size=cfg.embed.workers,
            actors=True,  # the model loads once per actor
        )
        rows_out = sum(s["rows_out"] for s in stats)
        if rows_out == 0:
            raise InputError(f"{cfg.input.path}: no usable sample in any shard")
        if cfg.embed.check_duplicate_ids:
            check_unique_ids(ctx.executor, out_dir, [i["part"] for i in items], rows_out)
        dropped = merge_dropped(stats)
        rows_in = sum(s["rows_in"] for s in stats)
        if downloaded:  # rows that never became a sample count from the url list on
            failed = {
                "download_failed": downloaded["failed_to_download"],
                "resize_failed": downloaded["failed_to_resize"],
            }
            dropped = {**dropped, **{k: v for k, v in failed.items() if v}}
            rows_in += sum(failed.values())
        dim = max(s.get("dim", 0) for s in stats)
        extra = {"dim": dim, "dtype": cfg.embed.dtype, "model": cfg.embed.model.name}
        if downloaded:
            extra["downloaded"] = downloaded
        return StageResult(rows_in, rows_out, dropped, extra)

    def _download(self, ctx: StageContext) -> dict[str, int]:
        """input.kind urls: img2dataset into RUN/input/download (skipped when already done)."""
        from condense.readers.urls import run_download
        from condense.readers.webdataset import image_root

        cfg = ctx.config.input
        out = image_root(ctx.config, ctx.run.root)
        ctx.log(f"[embed] downloading the urls of {cfg.path} with img2dataset into {out}")
        totals = ctx.executor.call(run_download, cfg, out, num_cpus=1.0)
        ctx.log(
            f"[embed] downloaded {totals['successes']:,} of {totals['count']:,} urls "
            f"({totals['failed_to_download']:,} failed to download, "
            f"{totals['failed_to_resize']:,} failed to resize)"
        )
        if totals["successes"] == 0:
            raise InputError(
                f"{cfg.path}: img2dataset downloaded none of the {totals['count']:,} urls"
            )
        return totals
