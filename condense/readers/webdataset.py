"""img2dataset WebDataset shards: listing them as work items, and finding samples in them.

A shard is one tar of `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json` samples, streamed by
`readers/shards.py` with every bad-input rule. The embed stage decodes and encodes the shards
it lists here (`stages/embed/images.py`); export finds its coreset's samples here, read exactly
as embed read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from condense.cores.names import safe_names
from condense.errors import InputError
from condense.readers.shards import DEFAULT_LIMITS, ShardLimits, open_shard, read_samples
from condense.runtime.processor import WorkItem


@dataclass(frozen=True, kw_only=True)
class Shard(WorkItem):
    """One WebDataset tar: the embed stage's work item for image inputs."""

    source: str  # the tar's path below input.path (`sub/00001.tar`)
    path: str  # where it is read from (a local path or any fsspec URL)


def list_shards(path: str) -> list[Shard]:
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
        Shard(part=name, source=source, path=shard)
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
