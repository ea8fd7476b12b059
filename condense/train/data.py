"""Training samples: the exported coreset shards read directly (no unpacking), or a LLaVA JSON
with an image folder. A sample is (turns, image bytes, an image file or None); problems are
counted, never raised mid-epoch."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from condense.errors import InputError
from condense.readers.shards import (
    DEFAULT_LIMITS,
    ShardLimits,
    drop_reason,
    open_shard,
    read_samples,
)


def shard_samples(
    shards: list[Path],
    skipped: Counter,
    limits: ShardLimits = DEFAULT_LIMITS,
    wanted: Callable[[int], bool] | None = None,
) -> Iterator[tuple[list[dict], bytes | None]]:
    """Stage-1 samples from WebDataset shards: the image and, as the gpt turn, its caption.
    Shards are read exactly as the embed stage reads them (the same bounds and drop reasons).

    `wanted(position)` says which samples of the stream this reader uses (a training worker's
    share): the others keep their place in the stream, but their images are passed over
    unread (None), so N workers read the images once between them, not N times."""
    position = 0

    def want_image() -> bool:  # asked at a sample's image, whose position is the next one
        return wanted(position)

    for shard in shards:
        with open_shard(str(shard), limits, sparse=wanted is not None) as f:
            for sample in read_samples(f, limits, str(shard), want_image if wanted else None):
                reason = drop_reason(sample)
                if reason is not None:
                    skipped[reason] += 1
                    continue
                turns = [
                    {"from": "human", "value": "<image>\n"},
                    {"from": "gpt", "value": sample.caption},
                ]
                position += 1
                yield turns, sample.image


def json_samples(path: Path, image_folder: Path | None, skipped: Counter):
    """LLaVA-format samples: {"image": relative path (optional), "conversations": [...]}. The
    image is its file's Path, read only when the sample is used (a worker reads its own).

    Every entry is untrusted: one that is not an object, whose conversations are not a list of
    turns with a string `value`, whose image is not one path (a list of images), or whose path
    leaves the image folder (absolute, `..`) is skipped and counted, never opened."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not a readable LLaVA JSON file ({exc})") from exc
    if not isinstance(entries, list):
        raise InputError(f"{path}: a LLaVA JSON file holds a list of samples")
    folder = Path(image_folder or path.parent)
    for entry in entries:
        if not isinstance(entry, dict):
            skipped["bad_entry"] += 1
            continue
        turns = entry.get("conversations")
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns
        ):
            skipped["bad_turns"] += 1
            continue
        name, image = entry.get("image"), None
        if name:
            if not isinstance(name, str):
                skipped["bad_image_field"] += 1  # a list of images, a number, ...
                continue
            image = confined(folder, name)
            if image is None:
                skipped["unsafe_image_path"] += 1
                continue
            try:
                found = image.is_file()
            except OSError:  # a name too long for the filesystem, a folder it may not read
                skipped["unreadable_image"] += 1
                continue
            if not found:
                skipped["missing_image"] += 1
                continue
        images_named = sum(t["value"].count("<image>") for t in turns)
        if images_named != (1 if image is not None else 0):
            skipped["image_count_mismatch"] += 1
            continue
        yield turns, image


def confined(folder: Path, name: str) -> Path | None:
    """`folder / name` when `name` is a relative path that stays inside `folder` (no absolute
    path, no `..`, no NUL), else None. Symlinks inside the folder are the folder owner's."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if "\0" in name or pure.is_absolute() or ".." in pure.parts or PureWindowsPath(name).drive:
        return None
    return Path(folder) / pure


def pixels(
    data: bytes, size: int, mean=None, std=None, limits: ShardLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray | None, str | None]:
    """(CHW float32 pixels, None): shortest side resized, centre-cropped, normalised by the
    vision tower's mean and std (CLIP's by default); or (None, the decoder's drop reason)."""
    from condense.cores.images import decode_rgb
    from condense.train.model import CLIP_MEAN, CLIP_STD

    image, reason = decode_rgb(data, limits.max_pixels, limits.max_aspect_ratio)
    if image is None:
        return None, reason
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), 3)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    a = np.asarray(image, dtype=np.float32) / 255.0
    a = (a - np.array(mean or CLIP_MEAN, np.float32)) / np.array(std or CLIP_STD, np.float32)
    return a.transpose(2, 0, 1).copy(), None


def load_image(
    data: bytes | Path | None,
    size: int,
    skipped: Counter,
    mean=None,
    std=None,
    limits: ShardLimits = DEFAULT_LIMITS,
):
    """A sample's pixels from its image bytes or file; None (counted by the decoder's reason)
    if they do not decode."""
    if data is None:
        return None
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError:
            skipped["unreadable_image"] += 1
            return None
    out, reason = pixels(data, size, mean, std, limits)
    if out is None:
        skipped[reason] += 1
    return out
