"""img2dataset WebDataset shards as embed input: one work item per tar, embedded with CLIP.

Planning lists the shards (`*.tar` under input.path, sorted); a worker streams one shard
(`readers/shards.py`), decodes its images on the CPU (`cores/images.py`), encodes images and
captions with the configured open_clip model (`cores/clip.py`) in batches, and hands the rows to
the embed stage's writer, which stores them exactly as precomputed embeddings are stored.
Unusable samples are dropped and counted by reason; they never stop the shard or the job.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
from pydantic import Field

from condense.cores.names import safe_names
from condense.errors import InputError
from condense.faults import kill_if, kill_once
from condense.readers import RawRows
from condense.readers.shards import DEFAULT_LIMITS, ShardLimits, open_shard, read_samples, usable
from condense.strict import StrictModel


class ModelConfig(StrictModel):
    """The CLIP model that embeds images and captions (input.kind: webdataset or urls)."""

    # open_clip model name (ViT-L-14), or a model config JSON (configs/models/tiny-clip.json).
    name: str = "ViT-L-14"
    pretrained: str | None = None  # open_clip pretrained tag, e.g. laion2b_s32b_b82k
    checkpoint: str | None = None  # a local weights file instead of a tag (nothing downloads)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPUs, else fp32
    batch_size: int = Field(64, ge=1)  # images per forward pass

    runtime_fields = frozenset({"batch_size"})


def list_shards(path: str) -> list[dict]:
    """Work items: one per `*.tar` under `path` (a folder or a single tar, local or any fsspec
    URL such as s3://bucket/shards), named by its (sanitised) path without `.tar`."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(path)
    if not fs.exists(root):
        raise InputError(f"input folder {path} does not exist")
    if fs.isdir(root):
        found = sorted(p for p in fs.find(root) if p.endswith(".tar"))
        sources = [p[len(root.rstrip("/")) :].lstrip("/") for p in found]
        paths = [f"{path.rstrip('/')}/{source}" for source in sources]
    else:  # the path is the shard itself
        sources, paths = [PurePosixPath(root).name], [path]
    if not sources:
        raise InputError(f"{path}: no WebDataset shards (*.tar) found")
    names = safe_names([s.removesuffix(".tar") for s in sources])
    return [
        {"part": name, "source": source, "path": shard, "rows": 0}
        for name, source, shard in zip(names, sources, paths, strict=True)
    ]


def sample_id_of(key: str | None, meta: dict, id_field: str | None):
    """A sample's id: its member key, or the `id_field` of its .json (for urls, the column
    img2dataset saved from the url list): a string, or an integer made a string; anything else
    is returned as is, for `id_problem` to refuse."""
    if not id_field:
        return key
    value = meta.get(id_field)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


DECODED = "decoded.json"  # in a shard's scratch folder: written once the shard is decoded
INFLIGHT = "inflight.bin"  # in a shard's scratch folder: the sample being decoded, and deaths


class PoisonGuard:
    """Finds the sample that kills its decode worker. Before each sample, the decoder writes its
    position to a small file (and clears it after): a retried task that finds a position there
    knows its predecessor died decoding that sample, and counts the death. A sample that has
    killed `poison_after` workers is poison: an error naming the shard and the setting that
    skips it, or, with `skip_poison`, a counted drop. Two 8-byte writes per sample."""

    def __init__(self, path: Path, source: str, limits: ShardLimits):
        import struct

        self.path, self.source, self.limits, self._pack = path, source, limits, struct.Struct("<qq")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        data = os.pread(self.fd, self._pack.size, 0)
        index, deaths = self._pack.unpack(data) if len(data) == self._pack.size else (-1, 0)
        self.poison_index, self.deaths = (index, deaths + 1) if index >= 0 else (-1, 0)

    def is_poison(self, index: int, key: str | None) -> bool:
        if index != self.poison_index or self.deaths < self.limits.poison_after:
            return False
        if not self.limits.skip_poison:
            raise InputError(
                f"shard {self.source}: sample {key!r} (number {index} in the shard) killed its "
                f"decode worker {self.deaths} time{'s' * (self.deaths > 1)} (an out-of-memory "
                "decode or a decoder crash); rerun with --resume and input.limits.skip_poison: "
                "true to drop it and keep the rest of the shard (finished shards are kept)"
            )
        return True

    def enter(self, index: int) -> None:
        deaths = self.deaths if index == self.poison_index else 0
        os.pwrite(self.fd, self._pack.pack(index, deaths), 0)

    def leave(self) -> None:
        os.pwrite(self.fd, self._pack.pack(-1, 0), 0)

    def close(self) -> None:
        os.close(self.fd)


def find_samples(
    path: str, ids: set[str], id_field: str | None, limits: ShardLimits = DEFAULT_LIMITS
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(sample_id, members exactly as stored) of the samples of one shard whose id is in `ids`,
    in shard order, streamed; reading stops once all were found. Ids never found are left in
    `ids` (the set is consumed). Samples are read exactly as embed read them, so a sample it
    dropped is never found here."""
    if not ids:
        return
    with open_shard(path, limits) as f:
        for sample in read_samples(f, limits, path):
            if sample.problem is not None:
                continue
            sample_id = sample_id_of(sample.key, sample.meta, id_field)
            if sample_id in ids:
                ids.discard(sample_id)
                yield sample_id, sample.members
                if not ids:
                    return


def encoded_count(folder: Path) -> int | None:
    """Rows a shard's scratch folder holds, or None unless the shard was decoded and every
    decoded row encoded (read from file footers: no vectors are loaded)."""
    import pyarrow.ipc

    from condense.pipeline.rundir import read_json

    decoded = read_json(folder / DECODED)
    if decoded is None:
        return None
    rows = 0
    for path in folder.glob("*.arrow"):
        with pyarrow.ipc.open_file(path) as reader:
            rows += sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return rows if rows == decoded["rows"] else None


@lru_cache(maxsize=4)
def _transform(model: str, pretrained: str | None):
    """The model's image transform, once per worker process (no weights are built)."""
    from condense.cores.clip import image_transform, preprocess_config

    return image_transform(preprocess_config(model, pretrained))


def decode_shard(
    item: dict, model: ModelConfig, id_field: str | None, scratch: str, limits: ShardLimits
) -> Iterator[dict[str, np.ndarray]]:
    """CPU side of the embed stream: stream one shard, decode and preprocess its images, yield
    batches of at most `batch_size` rows (part, idx, sample_id, caption, url, pixels). Decoded
    images live only until their batch is yielded. Dropped samples are counted by reason (and
    nulled urls counted) into `scratch/<part>/decoded.json`, written after the last batch. A
    sample id that occurs twice in the shard stops the run at once, naming both."""
    from condense.cores.images import decode_rgb
    from condense.cores.text import id_problem, storable_url
    from condense.pipeline.rundir import atomic_write_json

    # A checkpoint replaces the tag in the encoder, so the tag's normalisation does not apply.
    transform = _transform(model.name, None if model.checkpoint else model.pretrained)
    batch_size = model.batch_size
    dropped: Counter = Counter()
    nulled: Counter = Counter()
    seen: dict[str, str] = {}  # with input.id_column: each id and the key that had it
    rows: dict[str, list] = {"sample_id": [], "caption": [], "url": [], "pixels": []}
    kept = 0

    def batch() -> dict[str, np.ndarray]:
        n = len(rows["pixels"])
        out = {
            "part": np.array([item["part"]] * n, dtype=object),
            "idx": np.arange(kept - n, kept, dtype=np.int64),
            "sample_id": np.array(rows["sample_id"], dtype=object),
            "caption": np.array(rows["caption"], dtype=object),
            "url": np.array(rows["url"], dtype=object),
            "pixels": np.stack([p.numpy() for p in rows["pixels"]]),
        }
        for values in rows.values():
            values.clear()
        return out

    guard = PoisonGuard(Path(scratch) / item["part"] / INFLIGHT, item["source"], limits)
    with open_shard(item["path"], limits) as f:
        for number, sample in enumerate(read_samples(f, limits, item["path"])):
            reason = usable(sample)
            sample_id = None
            if reason is None:
                sample_id = sample_id_of(sample.key, sample.meta, id_field)
                reason = id_problem(sample_id)
            image = None
            if reason is None and guard.is_poison(number, sample.key):
                reason = "poison_sample"
            if reason is None:
                guard.enter(number)
                kill_if("decode_kill", sample.key)
                kill_once("decode_kill_once", sample.key)
                image, reason = decode_rgb(sample.image, limits.max_pixels, limits.max_aspect_ratio)
                if image is not None:
                    pixels = transform(image)
                guard.leave()
            if reason is not None:
                dropped[reason] += 1
                continue
            if id_field:  # keys are distinct within a shard (a repeated key is split_sample)
                if sample_id in seen:
                    raise InputError(
                        f"shard {item['source']}: sample_id {sample_id!r} (input.id_column "
                        f"{id_field!r}) occurs twice, in samples {seen[sample_id]!r} and "
                        f"{sample.key!r}"
                    )
                seen[sample_id] = sample.key
            url = storable_url(sample.meta.get("url"))
            if url is None and sample.meta.get("url") is not None:
                nulled["url"] += 1
            rows["sample_id"].append(sample_id)
            rows["caption"].append(sample.caption)
            rows["url"].append(url)
            rows["pixels"].append(pixels)
            kept += 1
            if len(rows["pixels"]) == batch_size:
                yield batch()
    if rows["pixels"]:
        yield batch()
    guard.close()
    atomic_write_json(
        Path(scratch) / item["part"] / DECODED,
        {"rows": kept, "dropped": dict(dropped), "nulled": dict(nulled)},
    )


def texts(values: np.ndarray):
    """A string column from a batch column: Ray Data hands a column of all-missing strings
    back as floats (NaN), so anything but a string is missing."""
    import pyarrow as pa

    return pa.array([v if isinstance(v, str) else None for v in values.tolist()], pa.string())


class BatchEncoder:
    """Actor side of the embed stream: the CLIP model, loaded once, encodes batches of
    preprocessed images and their captions and writes the embeddings to the shard's scratch
    folder (one Arrow file per batch and shard, named by its first row)."""

    def __init__(
        self,
        model: ModelConfig,
        device: str,
        threads: int | None,
        scratch: str,
        max_caption_chars: int = DEFAULT_LIMITS.max_caption_chars,
    ):
        self.cfg, self.device, self.threads, self.scratch = model, device, threads, Path(scratch)
        self.max_caption_chars = max_caption_chars
        self.encoder = None

    def setup(self) -> None:
        from condense.cores.clip import ClipEncoder

        precision = self.cfg.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        if self.threads and not self.device.startswith("cuda"):
            import torch

            torch.set_num_threads(self.threads)
        self.encoder = ClipEncoder(
            self.cfg.name,
            pretrained=self.cfg.pretrained,
            checkpoint=self.cfg.checkpoint,
            device=self.device,
            precision=precision,
        )

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow as pa

        from condense import schema as S
        from condense.cores.text import for_tokenizer
        from condense.stages.base import write_scratch

        enc = self.encoder
        for part in set(batch["part"].tolist()):
            kill_once("encode_kill", part)
        img = enc.encode_images(enc.torch.from_numpy(np.ascontiguousarray(batch["pixels"])))
        captions = texts(batch["caption"]).to_pylist()
        txt = enc.encode_texts([for_tokenizer(c, self.max_caption_chars) for c in captions])
        parts, counts = [], []
        for part in sorted(set(batch["part"].tolist())):
            rows = np.flatnonzero(batch["part"] == part)
            table = pa.table(
                {
                    "idx": pa.array(batch["idx"][rows], pa.int64()),
                    "sample_id": texts(batch["sample_id"][rows]),
                    "caption": texts(batch["caption"][rows]),
                    "url": texts(batch["url"][rows]),
                    "img": S.vectors_to_arrow(img[rows]),
                    "txt": S.vectors_to_arrow(txt[rows]),
                }
            )
            first = int(batch["idx"][rows].min())
            write_scratch(self.scratch / part / f"{first:09d}.arrow", [table], table.schema)
            parts.append(part)
            counts.append(len(rows))
        return {
            "part": np.array(parts, dtype=object),
            "rows": np.array(counts, np.int64),
            "dim": np.full(len(parts), img.shape[1], np.int64),
        }


def encoded_rows(
    folder: Path, source: str, dim: int
) -> tuple[RawRows, dict[str, int], dict[str, int]] | None:
    """A shard's scratch folder read back in row order, with its drop and null counts; None
    unless the shard was decoded and every row of it encoded."""
    import pyarrow as pa

    from condense.pipeline.rundir import read_json
    from condense.stages.base import read_scratch

    decoded = read_json(folder / DECODED)
    if decoded is None:
        return None
    nulled = decoded.get("nulled", {})
    files = sorted(folder.glob("*.arrow"))
    tables = [read_scratch(f) for f in files]
    if sum(len(t) for t in tables) != decoded["rows"]:
        return None
    if not tables:
        empty = np.zeros((0, dim), np.float32)
        return RawRows([], [], [], source, empty, empty, 0), decoded["dropped"], nulled
    table = pa.concat_tables(tables).sort_by("idx")
    from condense import schema as S

    raw = RawRows(
        sample_id=table.column("sample_id").to_pylist(),
        caption=table.column("caption").to_pylist(),
        url=table.column("url").to_pylist(),
        source=source,
        img=S.arrow_to_vectors(table.column("img")),
        txt=S.arrow_to_vectors(table.column("txt")),
        first_row=0,
    )
    return raw, decoded["dropped"], nulled


DOWNLOAD_DIR = "input/download"  # where input.kind urls puts img2dataset's shards, in RUN/


def image_root(config, run_root) -> str:
    """Where the run's source shards are: input.path, or RUN/input/download for urls."""
    if config.input.kind == "urls":
        return str(Path(run_root) / DOWNLOAD_DIR)
    return config.input.path
