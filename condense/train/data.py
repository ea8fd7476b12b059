"""Training samples: the exported coreset shards read directly (no unpacking), or a LLaVA JSON
with an image folder. A sample is (turns, image bytes, an image file or None); problems are
counted, never raised mid-epoch."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def shard_samples(shards: list[Path], skipped: Counter) -> Iterator[tuple[list[dict], bytes]]:
    """Stage-1 samples from WebDataset shards: the image and, as the gpt turn, its caption."""
    from condense.readers.shards import read_shard, usable

    for shard in shards:
        with open(shard, "rb") as f:
            for sample in read_shard(f, skipped):
                reason = usable(sample)
                if reason is not None:
                    skipped[reason] += 1
                    continue
                turns = [
                    {"from": "human", "value": "<image>\n"},
                    {"from": "gpt", "value": sample.caption},
                ]
                yield turns, sample.image


def json_samples(path: Path, image_folder: Path | None, skipped: Counter):
    """LLaVA-format samples: {"image": relative path (optional), "conversations": [...]}. The
    image is its file's Path, read only when the sample is used (a worker reads its own)."""
    for entry in json.loads(Path(path).read_text()):
        image = None
        if entry.get("image"):
            image = Path(image_folder or Path(path).parent) / entry["image"]
            if not image.is_file():
                skipped["missing_image"] += 1
                continue
        turns = entry.get("conversations") or []
        images_named = sum(t.get("value", "").count("<image>") for t in turns)
        if images_named != (1 if image is not None else 0):
            skipped["image_count_mismatch"] += 1
            continue
        yield turns, image


def pixels(data: bytes, size: int, mean=None, std=None) -> np.ndarray | None:
    """CHW float32 pixels (shortest side resized, centre-cropped, normalised by the vision
    tower's mean and std, CLIP's by default); None if the bytes do not decode."""
    from condense.cores.images import decode_rgb
    from condense.train.model import CLIP_MEAN, CLIP_STD

    image, reason = decode_rgb(data)
    if image is None:
        return None
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), 3)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    a = np.asarray(image, dtype=np.float32) / 255.0
    a = (a - np.array(mean or CLIP_MEAN, np.float32)) / np.array(std or CLIP_STD, np.float32)
    return a.transpose(2, 0, 1).copy()


def load_image(data: bytes | Path | None, size: int, skipped: Counter, mean=None, std=None):
    """A sample's pixels from its image bytes or file; None (counted) if they do not decode."""
    if data is None:
        return None
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError:
            skipped["unreadable_image"] += 1
            return None
    out = pixels(data, size, mean, std)
    if out is None:
        skipped["undecodable_image"] += 1
    return out
