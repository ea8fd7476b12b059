"""The embed stage's image path: shards decoded on CPU tasks, encoded by CLIP actors.

`ShardDecoder` streams one shard (`readers/shards.py`), decodes its images (`cores/images.py`)
and preprocesses them for the model; `BatchEncoder` holds the open_clip model (`clip.py`) and
leaves each shard's embeddings in `embed/_encoded/<part>/`, from where the stage writes the
shard's part exactly as precomputed embeddings are written. Unusable samples are dropped and
counted by reason; they never stop the shard or the job.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from condense.errors import InputError
from condense.faults import kill_if, kill_once
from condense.readers import RawRows
from condense.readers.shards import (
    DEFAULT_LIMITS,
    ShardLimits,
    drop_reason,
    open_shard,
    read_samples,
)
from condense.readers.webdataset import Shard, sample_id_of
from condense.runtime.processor import Processor, Resources
from condense.schema import (
    CAPTION,
    IMG,
    ROW,
    SAMPLE_ID,
    TXT,
    URL,
    arrow_to_vectors,
    vectors_to_arrow,
)
from condense.stages.embed.clip import ModelConfig
from condense.storage.files import atomic_write_json, read_json
from condense.storage.fs import is_url, location
from condense.storage.parts import read_scratch, scratch_rows, write_scratch

DECODE_MEMORY = 1 << 30  # bytes reserved per decode task: it imports torch (~0.6 GiB)
ENCODED = "_encoded"  # in embed/: each shard's embeddings, until its part is written


DECODED = "decoded.json"  # in a shard's scratch folder: written once the shard is decoded
INFLIGHT = "inflight.bin"  # in a shard's scratch folder: the sample being decoded, and deaths


def guard_path(scratch: str, part: str) -> Path:
    """Where a shard's poison guard keeps its mark: beside the shard's scratch on a local run
    directory; on this node's local disk when the run directory is in an object store (two
    8-byte writes per sample are no work for a store). There a retry on another node does not
    see the deaths counted on this one: each node counts its own."""
    if not is_url(scratch):
        return Path(scratch) / part / INFLIGHT
    import hashlib
    import tempfile

    run = hashlib.sha256(str(scratch).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "condense-guard" / run / part / INFLIGHT


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


def encoded_count(folder: Path) -> int | None:
    """Rows a shard's scratch folder holds, or None unless the shard was decoded and every
    decoded row encoded (read from file footers: no vectors are loaded)."""
    decoded = read_json(folder / DECODED)
    if decoded is None:
        return None
    rows = sum(scratch_rows(path) for path in folder.glob("*.arrow"))
    return rows if rows == decoded["rows"] else None


@lru_cache(maxsize=4)
def _transform(model: str, pretrained: str | None):
    """The model's image transform, once per worker process (no weights are built)."""
    from condense.stages.embed.clip import image_transform, preprocess_config

    return image_transform(preprocess_config(model, pretrained))


@dataclass
class ShardDecoder(Processor):
    """CPU side of the embed stream: streams one shard, decodes and preprocesses its images,
    and yields batches of at most `model.batch_size` rows (part, chunk, idx, sample_id,
    caption, url, pixels). Decoded images live only until their batch is yielded. Dropped
    samples are counted by reason (and nulled urls counted) into `scratch/<part>/decoded.json`,
    written after the last batch. A sample id that occurs twice in the shard stops the run at
    once, naming both."""

    stage = "embed"
    model: ModelConfig
    id_field: str | None  # input.id_column
    scratch: str  # embed/_encoded
    limits: ShardLimits
    cpus: float = 1.0  # CPUs per decode task

    @property
    def resources(self) -> Resources:
        # Enough retries for the poison guard to find a sample that kills workers.
        return Resources(cpus=self.cpus, memory=DECODE_MEMORY, retries=self.limits.poison_after + 1)

    def process(self, item: Shard) -> Iterator[dict[str, np.ndarray]]:
        return decode_shard(item, self.model, self.id_field, self.scratch, self.limits)


def decode_shard(
    item: Shard, model: ModelConfig, id_field: str | None, scratch: str, limits: ShardLimits
) -> Iterator[dict[str, np.ndarray]]:
    """The shard's batches (see ShardDecoder)."""
    from condense.cores.text import storable_url

    # A checkpoint replaces the tag in the encoder, so the tag's normalisation does not apply.
    transform = _transform(model.name, None if model.checkpoint else model.pretrained)
    batch_size = model.batch_size
    dropped: Counter = Counter()
    nulled: Counter = Counter()
    seen: dict[str, str] = {}  # with input.id_column: each id and the key that had it
    rows: dict[str, list] = {"sample_id": [], "caption": [], "url": [], "pixels": []}
    kept = chunks = 0

    def batch() -> dict[str, np.ndarray]:
        nonlocal chunks
        n = len(rows["pixels"])
        out = {
            "part": np.array([item.part] * n, dtype=object),
            "chunk": np.full(n, chunks, dtype=np.int64),
            ROW: np.arange(kept - n, kept, dtype=np.int64),
            "sample_id": np.array(rows["sample_id"], dtype=object),
            "caption": np.array(rows["caption"], dtype=object),
            "url": np.array(rows["url"], dtype=object),
            "pixels": np.stack([p.numpy() for p in rows["pixels"]]),
        }
        for values in rows.values():
            values.clear()
        chunks += 1
        return out

    guard = PoisonGuard(guard_path(scratch, item.part), item.source, limits)
    try:
        with open_shard(item.path, limits) as f:
            for number, sample in enumerate(read_samples(f, limits, item.path)):
                sample_id, pixels, reason = _decode_sample(
                    sample, number, guard, transform, id_field, limits
                )
                if reason is not None:
                    dropped[reason] += 1
                    continue
                if id_field:  # keys are distinct within a shard (a repeated key is split_sample)
                    if sample_id in seen:
                        raise InputError(
                            f"shard {item.source}: sample_id {sample_id!r} (input.id_column "
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
    finally:  # reached unless the process died: whatever stopped the decode, it was no death
        guard.leave()
        guard.close()
    atomic_write_json(
        location(scratch) / item.part / DECODED,
        {"rows": kept, "dropped": dict(dropped), "nulled": dict(nulled)},
    )


def _decode_sample(sample, number: int, guard: PoisonGuard, transform, id_field, limits):
    """(sample_id, pixels, None) of a usable sample, else (.., .., its drop reason). The
    decode itself runs under the poison guard's mark."""
    from condense.cores.images import decode_rgb
    from condense.cores.text import id_problem

    reason = drop_reason(sample)
    sample_id = pixels = None
    if reason is None:
        sample_id = sample_id_of(sample.key, sample.meta, id_field)
        reason = id_problem(sample_id)
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
    return sample_id, pixels, reason


def texts(values: np.ndarray):
    """A string column from a batch column: anything but a string is missing."""
    import pyarrow as pa

    return pa.array([v if isinstance(v, str) else None for v in values.tolist()], pa.string())


@dataclass
class BatchEncoder(Processor):
    """Actor side of the embed stream: the CLIP model, loaded once per actor, encodes batches
    of preprocessed images and their captions and writes the embeddings to each shard's
    scratch folder, one Arrow file per decoded chunk (named by its first row). Each chunk is
    encoded on its own, however the executor batched the chunks together: embeddings are the
    same bytes on any executor, at any pool size."""

    stage = "embed"
    model: ModelConfig
    device: str  # cpu or cuda
    threads: int | None  # torch CPU threads (None: torch's default)
    scratch: str  # embed/_encoded
    max_caption_chars: int = DEFAULT_LIMITS.max_caption_chars
    cpus: float = 1.0
    workers: int = 1  # encoder actors

    @property
    def resources(self) -> Resources:
        gpus = 1.0 if self.device.startswith("cuda") else 0.0
        return Resources(cpus=self.cpus, gpus=gpus, actor=True, workers=self.workers)

    def setup(self) -> None:
        from condense.stages.embed.clip import ClipEncoder

        precision = self.model.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        if self.threads and not self.device.startswith("cuda"):
            import torch

            torch.set_num_threads(self.threads)
        self.encoder = ClipEncoder(
            self.model.name,
            pretrained=self.model.pretrained,
            checkpoint=self.model.checkpoint,
            device=self.device,
            precision=precision,
        )

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow as pa

        from condense.cores.text import for_tokenizer

        enc = self.encoder
        for part in set(batch["part"].tolist()):
            kill_once("encode_kill", part)
        keys = sorted(set(zip(batch["part"].tolist(), batch["chunk"].tolist(), strict=True)))
        parts, counts, dim = [], [], 0
        for part, chunk in keys:
            rows = np.flatnonzero((batch["part"] == part) & (batch["chunk"] == chunk))
            pixels = np.ascontiguousarray(batch["pixels"][rows])
            img = enc.encode_images(enc.torch.from_numpy(pixels))
            captions = texts(batch["caption"][rows])
            txt = enc.encode_texts(
                [for_tokenizer(c, self.max_caption_chars) for c in captions.to_pylist()]
            )
            table = pa.table(
                {
                    ROW: pa.array(batch[ROW][rows], pa.int64()),
                    SAMPLE_ID: texts(batch["sample_id"][rows]),
                    CAPTION: captions,
                    URL: texts(batch["url"][rows]),
                    IMG: vectors_to_arrow(img),
                    TXT: vectors_to_arrow(txt),
                }
            )
            first = int(batch[ROW][rows].min())
            write_scratch(
                location(self.scratch) / part / f"{first:09d}.arrow", [table], table.schema
            )
            parts.append(part)
            counts.append(len(rows))
            dim = img.shape[1]
        return {
            "part": np.array(parts, dtype=object),
            "rows": np.array(counts, np.int64),
            "dim": np.full(len(parts), dim, np.int64),
        }


def encoded_rows(
    folder: Path, source: str, dim: int
) -> tuple[RawRows, dict[str, int], dict[str, int]] | None:
    """A shard's scratch folder read back in row order, with its drop and null counts; None
    unless the shard was decoded and every row of it encoded."""
    import pyarrow as pa

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
    table = pa.concat_tables(tables).sort_by(ROW)
    raw = RawRows(
        sample_id=table.column(SAMPLE_ID).to_pylist(),
        caption=table.column(CAPTION).to_pylist(),
        url=table.column(URL).to_pylist(),
        source=source,
        img=arrow_to_vectors(table.column(IMG)),
        txt=arrow_to_vectors(table.column(TXT)),
        first_row=0,
    )
    return raw, decoded["dropped"], nulled
