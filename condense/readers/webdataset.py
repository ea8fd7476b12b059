"""img2dataset WebDataset shards as embed input: one work item per tar, embedded with CLIP.

Planning lists the shards (`*.tar` under input.path, sorted); a worker streams one shard
(`readers/shards.py`), decodes its images on the CPU (`cores/images.py`), encodes images and
captions with the configured open_clip model (`cores/clip.py`) in batches, and hands the rows to
the embed stage's writer, which stores them exactly as precomputed embeddings are stored.
Unusable samples are dropped and counted by reason; they never stop the shard or the job.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

import numpy as np
from pydantic import Field

from condense.cores.names import safe_names
from condense.errors import InputError
from condense.readers import RawRows
from condense.strict import StrictModel


class ModelConfig(StrictModel):
    """The CLIP model that embeds images and captions (input.kind: webdataset or urls)."""

    # open_clip model name (ViT-L-14), or a model config JSON (configs/models/tiny-clip.json).
    name: str = "ViT-L-14"
    pretrained: str | None = None  # open_clip pretrained tag, e.g. laion2b_s32b_b82k
    checkpoint: str | None = None  # a local weights file instead of a tag (nothing downloads)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPUs, else fp32
    batch_size: int = Field(64, ge=1)  # images per forward pass
    max_pixels: int = Field(64_000_000, ge=1)  # larger images are dropped (decompression bombs)

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


def open_shard(path: str) -> BinaryIO:
    """A shard opened for streaming reads, wherever fsspec can reach it."""
    import fsspec

    return fsspec.open(path, "rb").open()


def sample_id_of(key: str, meta: dict, id_field: str | None) -> str | None:
    """A sample's id: its member key, or the `id_field` of its .json (for urls, the column
    img2dataset saved from the url list); None when that field is missing."""
    if not id_field:
        return key
    value = meta.get(id_field)
    return None if value is None else str(value)


class ShardEncoder:
    """Turns one shard into RawRows: decode on the CPU, encode with CLIP in batches."""

    def __init__(self, model: ModelConfig, device: str, id_field: str | None = None):
        self.cfg, self.device, self.id_field = model, device, id_field
        self.encoder = None

    def setup(self) -> None:
        from condense.cores.clip import ClipEncoder

        precision = self.cfg.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        self.encoder = ClipEncoder(
            self.cfg.name,
            pretrained=self.cfg.pretrained,
            checkpoint=self.cfg.checkpoint,
            device=self.device,
            precision=precision,
        )

    def read(self, item: dict) -> tuple[RawRows, dict[str, int]]:
        from condense.cores.images import decode_rgb
        from condense.readers.shards import read_shard, usable

        if self.encoder is None:
            self.setup()
        dropped: Counter = Counter()
        keys, captions, urls = [], [], []
        pixels: list = []  # preprocessed images waiting for the next batch
        img, txt = [], []  # embeddings of the batches done

        def flush() -> None:
            enc = self.encoder
            done = sum(len(e) for e in img)
            img.append(enc.encode_images(enc.torch.stack(pixels)))
            txt.append(enc.encode_texts(captions[done:]))
            pixels.clear()

        # Decoded images live only until their batch is encoded: memory is one batch, not a
        # shard of 10,000 decoded images.
        with open_shard(item["path"]) as f:
            for sample in read_shard(f, dropped):
                reason = usable(sample)
                image = None
                if reason is None:
                    image, reason = decode_rgb(sample.image, self.cfg.max_pixels)
                if reason is not None:
                    dropped[reason] += 1
                    continue
                keys.append(sample_id_of(sample.key, sample.meta, self.id_field))
                captions.append(sample.caption)
                url = sample.meta.get("url")
                urls.append(url if isinstance(url, str) else None)
                pixels.append(self.encoder.preprocess(image))
                if len(pixels) == self.cfg.batch_size:
                    flush()
        if pixels:
            flush()
        dim = self.encoder.dim
        raw = RawRows(
            sample_id=keys,
            caption=captions,
            url=urls,
            source=item["source"],
            img=np.concatenate(img) if img else np.zeros((0, dim), np.float32),
            txt=np.concatenate(txt) if txt else np.zeros((0, dim), np.float32),
            first_row=0,
        )
        return raw, dict(dropped)


DOWNLOAD_DIR = "input/download"  # where input.kind urls puts img2dataset's shards, in RUN/


def image_root(config, run_root) -> str:
    """Where the run's source shards are: input.path, or RUN/input/download for urls."""
    if config.input.kind == "urls":
        return str(Path(run_root) / DOWNLOAD_DIR)
    return config.input.path
