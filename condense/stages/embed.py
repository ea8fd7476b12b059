"""Stage `embed`: input rows -> embed/part-*.parquet with unit embeddings and clip_score.

Precomputed embeddings (clip-retrieval folders or Parquet) are read by tasks; WebDataset shards
are embedded by open_clip actors (one model load per actor). Both go through `store_rows`, so
embed/ looks the same whatever the input and every later stage is shared.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pyarrow as pa

from condense import schema as S
from condense.cores.hashing import hash_ids
from condense.cores.text import DROP_BAD_ID, id_problem
from condense.cores.vectors import (
    DROP_MISSING_ID,
    as_stored,
    clip_scores,
    invalid_rows,
    normalize,
    to_unit_float32,
)
from condense.errors import InputError
from condense.pipeline.rundir import PARTS_DIR, content_digest
from condense.readers import IMAGE_KINDS, Reader, open_reader, resolve_input
from condense.readers.webdataset import ModelConfig
from condense.stages.base import (
    Progress,
    Stage,
    StageContext,
    StageResult,
    merge_dropped,
    run_parts,
    write_part,
)
from condense.stages.unique_ids import ID_HASH_SEED, check_unique_ids, write_id_hashes
from condense.strict import StrictModel

ENCODED = "_encoded"  # scratch: embeddings of image shards, per shard, until its part is written
EMBED_ROW_GROUP = 8192  # rows per Parquet row group: the unit a partial read (a sample) fetches


class EmbedConfig(StrictModel):
    """How embeddings are stored in embed/."""

    dim: int | None = None  # expected embedding dimension; None: taken from the input
    # Stored precision; float16 halves the disk (later stages re-normalise after the upcast).
    dtype: Literal["float16", "float32"] = "float32"
    rows_per_part: int = 100_000  # rows per output part file (and per unit of work / resume)
    check_duplicate_ids: bool = True  # fail when a sample_id occurs twice (rows are joined by id)
    model: ModelConfig = ModelConfig()  # CLIP model for image inputs (webdataset, urls)
    # Embeddings inputs: parallel readers (None: one per CPU). Image inputs: CLIP encoder
    # actors (None: one per GPU, or one per 8 CPUs on a CPU-only cluster).
    workers: int | None = None

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


class ShardPartWriter:
    """Writes one WebDataset shard's part from the embeddings the encoder actors left in its
    scratch folder, exactly as EmbedPartWriter writes precomputed rows."""

    def __init__(self, scratch: str, dim: int, dtype: str, out_dir: str):
        self.scratch, self.dim, self.dtype, self.out_dir = Path(scratch), dim, dtype, out_dir

    def process(self, item: dict) -> dict:
        import shutil

        from condense.readers.webdataset import encoded_rows

        start = time.perf_counter()
        found = encoded_rows(self.scratch / item["part"], item["source"], self.dim)
        if found is None:
            raise InputError(f"embed: shard {item['source']} was not completely encoded")
        raw, dropped, nulled = found
        stats = store_rows(raw, item["part"], self.dtype, self.out_dir, dropped)
        shutil.rmtree(self.scratch / item["part"], ignore_errors=True)
        return {**stats, "nulled": nulled, "seconds": time.perf_counter() - start}


def store_rows(raw, part: str, dtype: str, out_dir: str, dropped_before: dict[str, int]) -> dict:
    """Drop unusable rows by reason, normalise, store in id-hash order, write one part."""
    n = len(raw.img)
    ids = np.asarray(raw.sample_id, dtype=object)
    problems = [id_problem(i) for i in ids.tolist()]
    missing = np.array([p == DROP_MISSING_ID for p in problems], dtype=bool)
    bad_id = np.array([p == DROP_BAD_ID for p in problems], dtype=bool)
    masks = invalid_rows(raw.img, raw.txt)
    dropped = Counter(dropped_before)
    dropped[DROP_MISSING_ID] += int(missing.sum())
    dropped[DROP_BAD_ID] += int(bad_id.sum())
    keep = ~missing & ~bad_id
    for reason, mask in masks.items():
        mask = mask & keep
        dropped[reason] += int(mask.sum())
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
    ids_path = write_id_hashes(Path(out_dir), part, hashes[order], raw.first_row + idx)
    path = write_part(table, out_dir, part, row_group_rows=EMBED_ROW_GROUP)
    return {
        "part": part,
        "files": [str(path), str(ids_path)],
        "rows_in": n + sum(dropped_before.values()),
        "rows_out": int(keep.sum()),
        "dropped": {k: v for k, v in dropped.items() if v},
    }


def input_listing(cfg) -> list[tuple]:
    """Names, sizes, modification times and content digests of the input files (local or any
    fsspec URL): new, rewritten or replaced files make embed (and what follows) run again, even
    when the config is unchanged and a replacement kept the size."""
    if cfg.kind == "synth" or not cfg.path:
        return []
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(cfg.path)
    if fs.isfile(root):  # a url list: a rewritten file downloads again
        return [_file_entry(fs, root, PurePosixPath(root).name, fs.info(root))]
    if not fs.isdir(root):
        return []
    prefix = root.rstrip("/") + "/"
    return sorted(
        _file_entry(fs, path, path.removeprefix(prefix), info)
        for path, info in fs.find(root, detail=True).items()
    )


def _file_entry(fs, path: str, name: str, info: dict) -> tuple:
    size = int(info.get("size") or 0)
    mtime = info.get("mtime", info.get("LastModified", ""))
    return (name, size, str(mtime), content_digest(fs, path, size, info))


def model_files(model: ModelConfig) -> list[tuple]:
    """The model's local files (a config JSON, a checkpoint, a pretrained path), by content:
    new weights at the same path embed again."""
    from fsspec.core import url_to_fs

    out = []
    for role, value in (
        ("name", model.name),
        ("checkpoint", model.checkpoint),
        ("pretrained", model.pretrained),
    ):
        if not value or (role == "name" and not value.endswith(".json")):
            continue
        fs, path = url_to_fs(value)
        if fs.isfile(path):
            out.append((role, *_file_entry(fs, path, PurePosixPath(path).name, fs.info(path))))
    return out


def reset_scratch(folder: Path) -> None:
    """Empty a shard's scratch folder for a new attempt, keeping the poison guard's mark: a
    sample that killed workers before a --resume is still known to."""
    from condense.readers.webdataset import INFLIGHT

    if folder.is_dir():
        for path in folder.iterdir():
            if path.name != INFLIGHT:
                path.unlink()


class EmbedStage(Stage):
    name = "embed"
    version = 3  # 2: rows stored in id-hash order, with _ids/ side files; 3: the bad-input rules
    writes = tuple(S.embed_schema(1, "float32").names)

    def settings(self, config):
        listing = [
            config.input.fingerprint_dict(),
            config.embed.fingerprint_dict(),
            input_listing(config.input),
        ]
        if config.input.kind in IMAGE_KINDS:
            listing.append(model_files(config.embed.model))
        return listing

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config
        if cfg.input.kind in IMAGE_KINDS:
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
        """WebDataset shards (downloaded first for urls), one part per shard, in two steps:

        1. a Ray Data stream: CPU tasks decode and preprocess each shard's images into batches,
           an actor pool of CLIP models (a GPU each where the cluster has GPUs) encodes them
           and leaves the embeddings in embed/_encoded/<part>/;
        2. one task per shard writes its part from there, as for precomputed embeddings.

        A resumed run keeps written parts and shards already fully encoded."""
        import shutil

        from condense.readers.webdataset import (
            BatchEncoder,
            decode_shard,
            encoded_count,
            image_root,
            list_shards,
        )

        cfg = ctx.config
        model = cfg.embed.model
        downloaded: dict[str, int] = {}
        if cfg.input.kind == "urls":
            downloaded = self._download(ctx)
        items = list_shards(image_root(cfg, ctx.run.root))
        out_dir = ctx.run.stage_dir(self.name)
        scratch = out_dir / ENCODED
        written = {p.stem.removeprefix("part-") for p in out_dir.glob("part-*.parquet")}
        recorded = {p.stem for p in (out_dir / PARTS_DIR).glob("*.json")}
        todo = []
        for item in items:
            if item["part"] in recorded and item["part"] in written:
                continue
            if encoded_count(scratch / item["part"]) is None:
                reset_scratch(scratch / item["part"])
                todo.append(item)
        dim = self._encoded_dim(scratch, out_dir)
        if todo:
            gpus = ctx.executor.gpus()
            cpus = ctx.executor.cpus()
            pool = cfg.embed.workers or (gpus or max(1, cpus // 8))
            # One actor per GPU at most; on CPUs, leave at least one CPU to the decode tasks.
            pool = min(pool, gpus) if gpus else max(1, min(pool, cpus - 1))
            ctx.log(
                f"[embed] {len(todo)} shards: decoding on CPU tasks, encoding with {model.name} "
                f"on {pool} {'GPU' if gpus else 'CPU'} actor{'s' * (pool > 1)}"
            )
            progress = Progress(ctx, self.name, 0, 0, "images")
            try:
                for result in ctx.executor.map_stream(
                    todo,
                    decode_shard,
                    BatchEncoder,
                    produce_shared={
                        "model": model,
                        "id_field": cfg.input.id_column,
                        "scratch": str(scratch),
                        "limits": cfg.input.limits,
                    },
                    shared={
                        "model": model,
                        "device": "cuda" if gpus else "cpu",
                        "threads": None if gpus else max(1, cpus // pool),
                        "scratch": str(scratch),
                        "max_caption_chars": cfg.input.limits.max_caption_chars,
                    },
                    batch_size=model.batch_size,
                    produce_cpus=1.0 if cpus >= 2 else 0.5,
                    num_cpus=1.0 if cpus >= 2 else 0.5,
                    num_gpus=1.0 if gpus else 0.0,
                    pool_size=pool,
                    # Enough retries for the poison guard to find a sample that kills workers.
                    produce_retries=cfg.input.limits.poison_after + 1,
                ):
                    progress.update(int(result["rows"]), parts=0)
                    dim = int(result["dim"])
            finally:
                progress.close()
        stats = run_parts(
            ctx,
            self.name,
            items,
            ShardPartWriter,
            shared={
                "scratch": str(scratch),
                "dim": dim,
                "dtype": cfg.embed.dtype,
                "out_dir": str(out_dir),
            },
            num_cpus=1.0,
        )
        shutil.rmtree(scratch, ignore_errors=True)
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
                "download_refused": downloaded.get("refused", 0),
                "resize_failed": downloaded["failed_to_resize"],
            }
            dropped = {**dropped, **{k: v for k, v in failed.items() if v}}
            rows_in += sum(failed.values())
        extra = {"dim": dim, "dtype": cfg.embed.dtype, "model": model.name}
        nulled = merge_dropped([{"dropped": s.get("nulled", {})} for s in stats])
        if nulled:  # fields that could not be stored, set to null (the sample is kept)
            extra["nulled"] = nulled
        if downloaded:
            extra["downloaded"] = downloaded
        return StageResult(rows_in, rows_out, dropped, extra)

    @staticmethod
    def _encoded_dim(scratch: Path, out_dir: Path) -> int:
        """The embedding dimension of what an interrupted run already encoded or wrote (0 if
        nothing): parts of shards without a usable sample are written with it."""
        import pyarrow.ipc
        import pyarrow.parquet as pq

        for path in sorted(scratch.glob("*/*.arrow")):
            return pyarrow.ipc.open_file(path).schema.field("img").type.list_size
        for path in sorted(out_dir.glob("part-*.parquet")):
            return pq.read_schema(path).field(S.IMG_EMB).type.list_size
        return 0

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
            f"{totals.get('refused', 0):,} refused, {totals['failed_to_resize']:,} failed to resize)"
        )
        if totals["successes"] == 0:
            raise InputError(
                f"{cfg.path}: img2dataset downloaded none of the {totals['count']:,} urls"
            )
        return totals
