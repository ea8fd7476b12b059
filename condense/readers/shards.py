"""Reading img2dataset WebDataset shards safely: one tar, streamed, grouped into samples.

A shard holds `{key}.jpg|png|webp`, `{key}.txt` and `{key}.json` members, consecutive per key.
Reading never trusts the tar:

- members with absolute paths, `..` parts, links, devices or other non-regular entries are
  skipped and counted, never opened or written anywhere;
- a truncated or corrupt tar ends the shard where the damage starts: every sample read before
  it is kept, the sample being read is dropped and counted (`truncated_tar`);
- members are read one at a time (streaming mode), so a shard is never held in memory whole;
- nothing is ever unpickled: `.json` is parsed as JSON, `.txt` decoded as UTF-8, images are
  returned as bytes for the decoder.

`read_shard` yields `Sample`s and fills a `Counter` of dropped members and samples by reason.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 64 << 20  # a larger member is skipped (counted), never read into memory


@dataclass
class Sample:
    """One sample of a shard: its key, image bytes and extension, caption, metadata."""

    key: str
    image: bytes | None = None
    image_ext: str | None = None
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # reasons this sample cannot be used


def member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, or None when the name is unsafe: absolute, with `..`
    or empty parts. The key is everything before the first dot of the file name, and keeps its
    folder (img2dataset writes flat shards; a folder is part of the key, as webdataset does)."""
    if not name or name.startswith(("/", "\\")) or "\\" in name:
        return None
    path = PurePosixPath(name)
    if any(part in ("..", "") for part in path.parts) or path.is_absolute():
        return None
    base = path.name
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    if not stem:
        return None
    key = str(path.parent / stem) if str(path.parent) != "." else stem
    return key, ext.lower()


class _Tail:
    """A read-only stream wrapper that remembers the last bytes read (to see the tar's end)."""

    END = 1024  # a tar ends with two 512-byte zero blocks

    def __init__(self, raw: BinaryIO):
        self.raw, self.last = raw, b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.last = (self.last + data)[-self.END :]
        return data

    def ended_properly(self) -> bool:
        while self.read(1 << 16):  # whatever follows the archive (record padding)
            pass
        return self.last == bytes(self.END)


def read_members(
    fileobj: BinaryIO, dropped: Counter
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(extension, bytes), ...]) for each sample of one tar, in order, members exactly as
    stored. Unsafe or oversized members are skipped and counted; damage ends the shard there
    (counted as `truncated_tar`), dropping only the sample being read."""
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    stream = _Tail(fileobj)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    dropped["unsafe_member"] += 1
                    continue
                parsed = member_key(member.name)
                if parsed is None:
                    dropped["unsafe_member"] += 1
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    dropped["oversized_member"] += 1
                    continue
                if key is not None and parsed[0] != key:
                    yield key, members
                    key, members = None, []
                key = parsed[0]
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # the stream ended inside this member
                    raise tarfile.ReadError("unexpected end of data")
                members.append((parsed[1], data))
        # Cut exactly between two members, a tar reads as complete: only its end marker tells.
        if not stream.ended_properly():
            raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError, ValueError):
        # Damage: whatever sample was being assembled may be incomplete.
        dropped["truncated_tar"] += 1
        key = None
    if key is not None:
        yield key, members


def read_shard(fileobj: BinaryIO, dropped: Counter) -> Iterator[Sample]:
    """Samples of one tar, in order. Problems are counted in `dropped`, never raised."""
    for key, members in read_members(fileobj, dropped):
        sample = Sample(key)
        for ext, data in members:
            add_to_sample(sample, ext, data)
        yield sample


def add_to_sample(sample: Sample, ext: str, data: bytes) -> None:
    if ext in IMAGE_EXTENSIONS:
        if sample.image is not None:
            sample.problems.append("two_images")
        sample.image, sample.image_ext = data, ext
    elif ext == "txt":
        try:
            sample.caption = data.decode("utf-8")
        except UnicodeDecodeError:
            sample.problems.append("caption_not_utf8")
    elif ext == "json":
        try:
            meta = json.loads(data.decode("utf-8"))
            sample.meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            sample.problems.append("bad_json")
    # Other members (img2dataset's .parquet index lives beside the tar, not in it) are ignored.


def usable(sample: Sample) -> str | None:
    """Why a sample cannot be embedded (a drop reason), or None when it can."""
    if sample.problems:
        return sample.problems[0]
    if sample.image is None or not sample.image:
        return "missing_image" if sample.image is None else "empty_image"
    if sample.caption is None:
        return "missing_caption"
    return None
