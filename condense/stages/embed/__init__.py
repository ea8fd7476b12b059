"""Stage `embed`: input rows -> embed/part-*.parquet with unit embeddings and clip_score.

Precomputed embeddings (clip-retrieval folders or Parquet) are read by tasks; WebDataset shards
are embedded by open_clip actors (one model load per actor). Both go through `store_rows`, so
embed/ looks the same whatever the input and every later stage is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from condense.errors import ConfigError, InputError
from condense.readers import IMAGE_KINDS, InputConfig, open_reader, resolve_input
from condense.readers.webdataset import Shard, list_shards
from condense.runtime.processor import Processor, Resources, WorkItem, run_one
from condense.schema import IMG_EMB, embed_schema
from condense.stages.base import Stage, StageContext, StageResult, merge_dropped, write_parts
from condense.stages.embed.clip import ModelConfig
from condense.stages.embed.ids import check_unique_ids
from condense.stages.embed.images import GUARD, ShardEmbedder
from condense.stages.embed.store import EmbedPartWriter
from condense.stages.embed.vectors import vector_files, write_vector_record
from condense.storage.files import content_digest
from condense.storage.fs import location
from condense.storage.parts import finished_parts, part_files, read_schema
from condense.strict import StrictModel

DOWNLOAD_DIR = "input/download"  # in RUN/: where input.kind urls puts img2dataset's shards


class EmbedConfig(StrictModel):
    """How embeddings are stored in embed/."""

    dim: int | None = None  # expected embedding dimension; None: taken from the input
    # Precision the vectors are used at (and stored at, when they are stored); float16 halves
    # the bytes (later stages re-normalise after the upcast).
    dtype: Literal["float16", "float32"] = "float32"
    # Precomputed embeddings: also copy the vectors into embed/ (needed to delete or move the
    # input after embed); false: later stages read them from the input, where they are.
    # Image inputs always store the vectors they compute.
    store_vectors: bool = False
    rows_per_part: int = 100_000  # rows per output part file (and per unit of work / resume)
    check_duplicate_ids: bool = True  # fail when a sample_id occurs twice (rows are joined by id)
    model: ModelConfig = ModelConfig()  # CLIP model for image inputs (webdataset, urls)
    # Embeddings inputs: parallel readers (None: one per CPU). Image inputs: CLIP encoder
    # actors (None: one per GPU, or one per 8 CPUs on a CPU-only cluster).
    workers: int | None = None

    runtime_fields = frozenset({"workers"})


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


def image_root(config, run_root) -> str:
    """Where the run's source shards are: input.path, or RUN/input/download for urls."""
    if config.input.kind == "urls":
        return str(location(run_root) / DOWNLOAD_DIR)
    return config.input.path


@dataclass(frozen=True, kw_only=True)
class Download(WorkItem):
    """img2dataset's download of the url list into the run directory."""

    out: str  # RUN/input/download


@dataclass
class Downloader(Processor):
    """Runs img2dataset (one process group, bounded in time) on one node."""

    stage = "embed"
    input: InputConfig

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, retries=0)

    def process(self, item: Download) -> dict:
        from condense.readers.urls import run_download

        return run_download(self.input, item.out)


def vectors_in_place(config) -> bool:
    """Whether embed/ keeps no copy of the vectors (precomputed ones, read where they are)."""
    return config.input.kind not in IMAGE_KINDS and not config.embed.store_vectors


class EmbedStage(Stage):
    name = "embed"
    # 2: rows stored in id-hash order, with _ids/ side files; 3: the bad-input rules; 4: images
    # decoded, encoded and written by one actor (no second normalisation), captions trimmed;
    # 5: precomputed vectors read in place (embed.store_vectors)
    version = 5
    writes = tuple(embed_schema(1, "float32").names)

    def columns(self, config) -> tuple[str, ...]:
        return tuple(embed_schema(1, "float32", vectors=not vectors_in_place(config)).names)

    def settings(self, config):
        listing = [
            config.input.fingerprint_dict(),
            config.embed.fingerprint_dict(),
            input_listing(config.input),
        ]
        if config.input.kind in IMAGE_KINDS:
            listing.append(model_files(config.embed.model))
        return listing

    def compute(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config
        if cfg.input.kind in IMAGE_KINDS:
            return self._embed_images(ctx)
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
        in_place = vector_files(reader.image_files()) if vectors_in_place(cfg) else None
        writer = EmbedPartWriter(
            reader, cfg.embed.dtype, str(out_dir), cfg.embed.workers, in_place=in_place
        )
        stats = write_parts(ctx, writer, items)
        if in_place is not None:
            parts = {item.part: reader.source(item) for item in items}
            write_vector_record(out_dir, cfg.embed.dtype, reader.dim, parts, in_place)
        rows_out = sum(s["rows_out"] for s in stats)
        if cfg.embed.check_duplicate_ids:
            check_unique_ids(ctx.executor, out_dir, [i.part for i in items], rows_out)
        rows_in = sum(s["rows_in"] for s in stats)
        return StageResult(
            rows_in, rows_out, merge_dropped(stats), {"dim": reader.dim, "dtype": cfg.embed.dtype}
        )

    def _embed_images(self, ctx: StageContext) -> StageResult:
        """WebDataset shards (downloaded first for urls), one part per shard, each read,
        decoded, encoded and written by one actor of a pool of CLIP models (a GPU each where
        the cluster has GPUs). A resumed run keeps the parts already written."""
        from condense.storage.fs import remove_tree

        cfg = ctx.config
        downloaded: dict[str, int] = {}
        if cfg.input.kind == "urls":
            downloaded = self._download(ctx)
        items = list_shards(image_root(cfg, ctx.run.root))
        out_dir = ctx.run.stage_dir(self.name)
        stats = write_parts(ctx, self._embedder(ctx, items, out_dir), items)
        remove_tree(out_dir / GUARD)
        rows_out = sum(s["rows_out"] for s in stats)
        if rows_out == 0:
            raise InputError(f"{cfg.input.path}: no usable sample in any shard")
        if cfg.embed.check_duplicate_ids:
            check_unique_ids(ctx.executor, out_dir, [i.part for i in items], rows_out)
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
        dim = next((int(s["dim"]) for s in stats if "dim" in s), None)
        if dim is None:  # every part was written by an earlier run
            dim = read_schema(part_files(out_dir)[0]).field(IMG_EMB).type.list_size
        extra = {"dim": dim, "dtype": cfg.embed.dtype, "model": cfg.embed.model.name}
        nulled = merge_dropped([{"dropped": s.get("nulled", {})} for s in stats])
        if nulled:  # fields that could not be stored, set to null (the sample is kept)
            extra["nulled"] = nulled
        if downloaded:
            extra["downloaded"] = downloaded
        return StageResult(rows_in, rows_out, dropped, extra)

    def _embedder(self, ctx: StageContext, items: list[Shard], out_dir) -> ShardEmbedder:
        """The actor pool's processor: one actor per GPU; on CPUs one per 8 CPUs, each using
        its share of the CPUs' threads."""
        from condense.stages.embed.clip import preprocess_config
        from condense.stages.embed.pixels import device_decode_supported

        cfg = ctx.config
        model = cfg.embed.model
        gpus, cpus = ctx.executor.gpus(), ctx.executor.cpus()
        pool = cfg.embed.workers or (gpus or max(1, cpus // 8))
        pool = min(pool, gpus) if gpus else max(1, min(pool, cpus))
        decode = model.decode
        if decode != "pil":
            pretrained = None if model.checkpoint else model.pretrained
            preprocess = preprocess_config(model.name, pretrained)
            fits = device_decode_supported(preprocess)
            if decode == "device" and not fits:
                raise ConfigError(
                    f"embed.model.decode device: {model.name} resizes in mode "
                    f"{preprocess['resize_mode']!r}, which only Pillow does; use decode: pil"
                )
            decode = "device" if fits and (gpus or decode == "device") else "pil"
        todo = len(items) - len(finished_parts(out_dir, [i.part for i in items]))
        ctx.log(
            f"[embed] {todo} shards: {model.name} on {pool} {'GPU' if gpus else 'CPU'} "
            f"actor{'s' * (pool > 1)}, images decoded by "
            f"{'the device (Pillow for the rest)' if decode == 'device' else 'Pillow'}"
        )
        return ShardEmbedder(
            model,
            device="cuda" if gpus else "cpu",
            decode=decode,
            threads=None if gpus else max(1, cpus // pool),
            id_field=cfg.input.id_column,
            limits=cfg.input.limits,
            out_dir=str(out_dir),
            dtype=cfg.embed.dtype,
            cpus=1.0 if cpus >= 2 else 0.5,
            workers=pool,
        )

    def _download(self, ctx: StageContext) -> dict[str, int]:
        """input.kind urls: img2dataset into RUN/input/download (skipped when already done)."""
        cfg = ctx.config.input
        out = image_root(ctx.config, ctx.run.root)
        ctx.log(f"[embed] downloading the urls of {cfg.path} with img2dataset into {out}")
        totals = run_one(ctx.executor, Downloader(cfg), Download(part="download", out=out))
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
