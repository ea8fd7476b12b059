"""The embed stage's image path: each shard read, decoded, encoded and written by one actor.

`ShardEmbedder` holds the open_clip model (`clip.py`) on its device, one actor per GPU (or per
8 CPUs). For each shard it streams the tar (`readers/shards.py`), checks and decodes the images
(`cores/images.py`), encodes images and captions, and writes the shard's part exactly as
precomputed embeddings are written (`store.py`): nothing passes through a scratch file or the
object store. On a GPU, plain JPEGs (nearly all of an img2dataset corpus) are decoded there,
batched, by nvJPEG (`pixels.py`), while a thread reads the next batch's bytes and decodes what
the device cannot (Pillow: PNG, WebP, CMYK, EXIF-turned). Unusable samples are dropped and
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
from condense.readers.shards import ShardLimits, drop_reason, open_shard, read_samples
from condense.readers.webdataset import Shard, sample_id_of
from condense.runtime.processor import Processor, Resources
from condense.stages.embed.clip import ModelConfig
from condense.storage.fs import is_url, location

GUARD = "_guard"  # in embed/: each shard's poison mark, until the stage ends
INFLIGHT = "inflight.bin"  # in a shard's guard folder: the sample being decoded, and deaths


def guard_path(guard_dir: str, part: str) -> Path:
    """Where a shard's poison guard keeps its mark: in embed/_guard/ on a local run directory;
    on this node's local disk when the run directory is in an object store (two 8-byte writes
    per sample are no work for a store). There a retry on another node does not see the deaths
    counted on this one: each node counts its own."""
    if not is_url(guard_dir):
        return Path(guard_dir) / part / INFLIGHT
    import hashlib
    import tempfile

    run = hashlib.sha256(str(guard_dir).encode()).hexdigest()[:16]
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


@lru_cache(maxsize=4)
def _transform(model: str, pretrained: str | None):
    """The model's image transform, once per worker process (no weights are built)."""
    from condense.stages.embed.clip import image_transform, preprocess_config

    return image_transform(preprocess_config(model, pretrained))


def decode_shard(
    item: Shard,
    model: ModelConfig,
    id_field: str | None,
    guard_dir: str,
    limits: ShardLimits,
    counts: dict | None = None,
    device_jpegs: bool = False,
) -> Iterator[dict]:
    """One shard's usable samples, in batches of at most `model.batch_size` rows: `sample_id`,
    `caption`, `url` (numpy object arrays) and `pixels` (the preprocessed images, one CPU
    tensor). With `device_jpegs`, plain JPEGs are not decoded: `pixels` is a list holding, per
    row, a preprocessed tensor or the JPEG's bytes for the device decoder.

    Dropped samples are counted by reason, and nulled urls counted, into `counts` (`rows`,
    `dropped`, `nulled`) once the shard is read. A sample id that occurs twice in the shard
    stops the run at once, naming both. Decoding runs under the shard's poison guard."""
    from condense.cores.images import PLAIN_JPEG
    from condense.cores.text import storable_url

    # A checkpoint replaces the tag in the encoder, so the tag's normalisation does not apply.
    transform = _transform(model.name, None if model.checkpoint else model.pretrained)
    dropped: Counter = Counter()
    nulled: Counter = Counter()
    seen: dict[str, str] = {}  # with input.id_column: each id and the key that had it
    rows: dict[str, list] = {"sample_id": [], "caption": [], "url": [], "pixels": []}
    kept = 0

    def batch() -> dict:
        import torch

        pixels = list(rows["pixels"])
        out = {k: np.array(v, dtype=object) for k, v in rows.items() if k != "pixels"}
        out["pixels"] = pixels if device_jpegs else torch.stack(pixels)
        for values in rows.values():
            values.clear()
        return out

    guard = PoisonGuard(guard_path(guard_dir, item.part), item.source, limits)
    try:
        with open_shard(item.path, limits) as f:
            for number, sample in enumerate(read_samples(f, limits, item.path)):
                sample_id, image, reason = _decode_sample(
                    sample, number, guard, id_field, limits, device_jpegs
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
                rows["pixels"].append(sample.image if image is PLAIN_JPEG else transform(image))
                kept += 1
                if len(rows["pixels"]) == model.batch_size:
                    yield batch()
        if rows["pixels"]:
            yield batch()
    finally:  # reached unless the process died: whatever stopped the decode, it was no death
        guard.leave()
        guard.close()
    if counts is not None:
        counts.update(rows=kept, dropped=dict(dropped), nulled=dict(nulled))


def _decode_sample(sample, number: int, guard: PoisonGuard, id_field, limits, device_jpegs):
    """(sample_id, image, None) of a usable sample (image: RGB, or PLAIN_JPEG for the device
    decoder), else (.., .., its drop reason). The decode runs under the poison guard's mark."""
    from condense.cores.images import decode_or_plain_jpeg, decode_rgb
    from condense.cores.text import id_problem

    reason = drop_reason(sample)
    sample_id = image = None
    if reason is None:
        sample_id = sample_id_of(sample.key, sample.meta, id_field)
        reason = id_problem(sample_id)
    if reason is None and guard.is_poison(number, sample.key):
        reason = "poison_sample"
    if reason is None:
        guard.enter(number)
        kill_if("decode_kill", sample.key)
        kill_once("decode_kill_once", sample.key)
        decode = decode_or_plain_jpeg if device_jpegs else decode_rgb
        image, reason = decode(sample.image, limits.max_pixels, limits.max_aspect_ratio)
        guard.leave()
    return sample_id, image, reason


@dataclass
class ShardEmbedder(Processor):
    """The embed stage's actor: the CLIP model, loaded once per actor, turns whole shards into
    embed/ parts. Images are encoded in the shard's order in batches of `model.batch_size`;
    captions in order of their token length, each batch cut to its longest caption
    (`ClipEncoder.encode_texts`). Embeddings leave the model unit-norm and are stored as they
    are."""

    stage = "embed"
    model: ModelConfig
    device: str  # cpu or cuda
    decode: str  # pil, or device: plain JPEGs decoded by torchvision on `device`
    threads: int | None  # torch CPU threads (None: torch's default)
    id_field: str | None  # input.id_column
    limits: ShardLimits
    out_dir: str  # embed/
    dtype: str  # embed.dtype
    cpus: float = 1.0
    workers: int = 1  # actors

    @property
    def resources(self) -> Resources:
        gpus = 1.0 if self.device.startswith("cuda") else 0.0
        # Enough retries for the poison guard to find a sample that kills its worker.
        return Resources(
            cpus=self.cpus,
            gpus=gpus,
            actor=True,
            workers=self.workers,
            retries=self.limits.poison_after + 1,
        )

    def setup(self) -> None:
        from condense.stages.embed.clip import ClipEncoder, preprocess_config
        from condense.stages.embed.pixels import DevicePixels

        precision = self.model.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        if self.threads and not self.device.startswith("cuda"):
            import torch

            torch.set_num_threads(self.threads)
        pretrained = None if self.model.checkpoint else self.model.pretrained
        self.encoder = ClipEncoder(
            self.model.name,
            pretrained=self.model.pretrained,
            checkpoint=self.model.checkpoint,
            device=self.device,
            precision=precision,
            batch_size=self.model.batch_size,
        )
        self.pixels = None
        if self.decode == "device":
            self.pixels = DevicePixels(
                preprocess_config(self.model.name, pretrained),
                self.device,
                _transform(self.model.name, pretrained),
                self.limits,
            )

    def process(self, item: Shard) -> dict:
        import time

        from condense.cores.text import for_tokenizer
        from condense.stages.embed.store import store_rows

        start = time.perf_counter()
        kill_once("encode_kill", item.part)
        enc = self.encoder
        counts: dict = {}
        batches = decode_shard(
            item,
            self.model,
            self.id_field,
            str(location(self.out_dir) / GUARD),
            self.limits,
            counts,
            device_jpegs=self.pixels is not None,
        )
        if self.device.startswith("cuda"):  # CPUs read and decode ahead while the GPU works
            from condense.stages.embed.pixels import read_ahead

            batches = read_ahead(batches, depth=2)
        ids, captions, urls, images = [], [], [], []
        failed: Counter = Counter()
        for batch in batches:
            pixels = batch["pixels"]
            if self.pixels is not None:
                pixels, keep, reasons = self.pixels(pixels)
                failed.update(reasons)
                for name in ("sample_id", "caption", "url"):
                    batch[name] = batch[name][keep]
            images.append(enc.embed_images(pixels))  # on the device until the shard is done
            ids += batch["sample_id"].tolist()
            captions += [c if isinstance(c, str) else None for c in batch["caption"].tolist()]
            urls += batch["url"].tolist()
        limit = self.limits.max_caption_chars
        txt = enc.encode_texts([for_tokenizer(c, limit) for c in captions])
        img = enc.torch.cat(images).cpu().numpy() if images else np.zeros((0, enc.dim), np.float32)
        raw = RawRows(ids, captions, urls, item.source, img, txt, 0)
        dropped = Counter(counts["dropped"]) + failed
        stats = store_rows(raw, item.part, self.dtype, self.out_dir, dict(dropped), unit=True)
        return {
            **stats,
            "nulled": counts["nulled"],
            "dim": enc.dim,
            "seconds": time.perf_counter() - start,
        }
