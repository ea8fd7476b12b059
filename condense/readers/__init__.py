"""Readers turn an input folder into work items and items into rows of embeddings.

A reader plans on the driver from file headers alone (names, row counts, dimensions), so bad
layouts fail before any work starts; `read(item)` runs on a worker and returns one slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import model_validator

from condense.errors import InputError
from condense.readers.shards import ShardLimits
from condense.readers.urls import DownloadConfig
from condense.runtime.processor import WorkItem
from condense.strict import StrictModel
from condense.synth import SynthConfig

IMAGE_KINDS = ("webdataset", "urls")  # inputs that hold images (embedded with CLIP)


class InputConfig(StrictModel):
    """What the pipeline reads."""

    # embeddings: precomputed; synth: generated into RUN/input/; webdataset, urls: images.
    kind: Literal["embeddings", "synth", "webdataset", "urls"] = "embeddings"
    path: str | None = None  # input folder (a Parquet file for urls); unused for synth
    synth: SynthConfig = SynthConfig()  # the generated corpus, for kind synth
    # Embeddings layout; auto: an img_emb/ folder means clip-retrieval, else Parquet files.
    format: Literal["auto", "clip_retrieval", "parquet"] = "auto"
    # Column holding the sample id; None: "key" (clip-retrieval), "sample_id" (Parquet), the
    # shard member key (webdataset) or img2dataset's key (urls).
    id_column: str | None = None
    caption_column: str = "caption"  # metadata column with the caption (may be absent)
    url_column: str = "url"  # metadata column with the url (may be absent)
    download: DownloadConfig = DownloadConfig()  # img2dataset settings, for kind urls
    # Bounds per sample and per shard for image inputs (webdataset, urls) and the trainer.
    limits: ShardLimits = ShardLimits()

    @model_validator(mode="after")
    def _path_needed(self):
        if self.kind != "synth" and not self.path:
            raise ValueError(f"input.path is required for input.kind {self.kind}")
        return self

    def fingerprint_dict(self):
        data = super().fingerprint_dict()
        if self.kind != "synth":
            data.pop("synth")
        if self.kind != "urls":
            data.pop("download")
        if self.kind in IMAGE_KINDS:
            data["limits"] = self.limits.fingerprint_dict()
        else:
            data.pop("limits")
        return data


@dataclass(frozen=True)
class RawRows:
    """One slice of input: aligned ids, texts and raw (not yet normalised) embeddings."""

    sample_id: list[str | None] | np.ndarray
    caption: list[str | None]
    url: list[str | None]
    source: str
    img: np.ndarray
    txt: np.ndarray
    first_row: int  # row number of the slice's first row within `source`, for error messages


@dataclass(frozen=True, kw_only=True)
class InputSlice(WorkItem):
    """Rows [start, stop) of one input file: the embed stage's work item for embeddings."""

    file: int  # the file's number (clip-retrieval) or index (Parquet)
    path: str  # the file holding the ids: the metadata Parquet (clip-retrieval) or the Parquet
    start: int
    stop: int
    img: str | None = None  # clip-retrieval: img_emb_N.npy
    txt: str | None = None  # clip-retrieval: text_emb_N.npy


class Reader(Protocol):
    dim: int
    total_rows: int

    def plan(self, rows_per_part: int) -> list[InputSlice]: ...

    def read(self, item: InputSlice) -> RawRows: ...

    def source(self, item: InputSlice) -> str:
        """The `source` its rows carry: the path of the item's file below the input folder."""
        ...

    def image_files(self) -> dict[str, tuple[str, str]]:
        """{source: (path, "npy" | "parquet")}: the file holding each source's image vectors."""
        ...


def open_reader(cfg: InputConfig) -> Reader:
    """Pick the reader for `cfg` and validate the input's layout (synth input: call `resolve_input` first)."""
    from condense.storage.fs import location, unreachable

    if cfg.kind not in ("embeddings", "synth"):  # image inputs are embedded by stages/embed
        raise InputError(f"input.kind {cfg.kind} holds images, not embeddings")
    root = location(cfg.path)
    try:
        exists, folder = root.exists(), root.is_dir()
    except Exception as exc:  # a store without credentials, a missing bucket
        raise InputError(f"input {root}: cannot reach it ({unreachable(root, exc)})") from None
    if not exists:
        raise InputError(f"input folder {root} does not exist")
    if not folder:
        raise InputError(f"input.path {root} is not a folder")
    if not any(root.iterdir()):
        raise InputError(f"input folder {root} is empty")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "clip_retrieval" if (root / "img_emb").is_dir() else "parquet"
    if fmt == "clip_retrieval":
        from condense.readers.clip_retrieval import ClipRetrievalReader

        return ClipRetrievalReader(cfg)
    from condense.readers.parquet import ParquetEmbeddingReader

    return ParquetEmbeddingReader(cfg)


def split_rows(total: int, rows_per_part: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most rows_per_part rows covering 0..total."""
    return [(s, min(total, s + rows_per_part)) for s in range(0, total, rows_per_part)]


def plan_items(files: list[dict], rows_per_part: int) -> list[InputSlice]:
    """One work item per slice of at most rows_per_part rows of each input file; the part name
    (file number, slice number) is stable, so reruns and resumes find their parts again."""
    return [
        InputSlice(
            part=f"{f['file']:05d}-{i:04d}",
            rows=stop - start,
            file=f["file"],
            path=f["path"],
            start=start,
            stop=stop,
            img=f.get("img"),
            txt=f.get("txt"),
        )
        for f in files
        for i, (start, stop) in enumerate(split_rows(f["rows"], rows_per_part))
    ]


def optional_strings(table, name: str, path: str = "") -> list[str | None]:
    """A text column as Python strings, or all None when the input has no such column."""
    if name in table.column_names:
        return _strings(table.column(name), name, path)
    return [None] * table.num_rows


def check_id_type(path, schema, column: str) -> None:
    """The id column must hold text or integers: bytes have no canonical text form."""
    import pyarrow as pa

    t = schema.field(column).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise InputError(f"{path}: id column {column!r} holds {t}; expected strings or integers")


def id_strings(table, column: str, path: str) -> list[str | None]:
    """The id column as Python strings (integers written in decimal)."""
    return _strings(table.column(column), column, path)


def _strings(column, name: str, path: str) -> list[str | None]:
    """A column as Python strings; bytes that are not UTF-8 are an error naming the file."""
    import pyarrow as pa

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        raise InputError(f"{path}: column {name!r} holds bytes ({column.type}); expected strings")
    try:
        column = column.cast(pa.string())
        column.validate(full=True)
        return column.to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: column {name!r} is not valid UTF-8 text ({exc})") from exc


def read_parquet_rows(path: str, start: int, stop: int):
    """Rows [start, stop) of a Parquet file, reading only the row groups that overlap them."""
    from condense.storage.parts import parquet_file, read_groups

    f = parquet_file(path)
    groups, offset, first = [], 0, None
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return f.schema_arrow.empty_table()
    table = read_groups(f, groups, None)
    return table.slice(start - first, stop - start)


def resolve_input(cfg: InputConfig, run_root, log=print) -> InputConfig:
    """For `kind: synth`, generate the corpus into RUN/input/ (once) and read it from there
    (in an object store: generated locally, then uploaded, its synth.json last)."""
    import tempfile

    from condense.storage.files import read_json
    from condense.storage.fs import is_url, location, put_tree, remove_tree

    if cfg.kind != "synth":
        return cfg
    from condense.synth import generate

    folder = location(run_root) / "input"
    meta = read_json(folder / "synth.json")
    wanted = cfg.synth.model_dump()
    if not (isinstance(meta, dict) and meta.get("config") == wanted):
        remove_tree(folder)
        log(f"[embed] generating {cfg.synth.n:,} synthetic rows ({cfg.synth.dim}-d) in {folder}")
        if is_url(folder):
            with tempfile.TemporaryDirectory() as tmp:
                generate(tmp, cfg.synth)
                summary = (location(tmp) / "synth.json").read_bytes()
                (location(tmp) / "synth.json").unlink()
                put_tree(tmp, folder)
                (folder / "synth.json").write_bytes(summary)
        else:
            generate(folder, cfg.synth)
    return cfg.model_copy(
        update={"path": str(folder), "format": "clip_retrieval", "id_column": "key"}
    )
