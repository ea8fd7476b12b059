"""Parquet files of embeddings: one row per sample with sample_id, img_emb and txt_emb columns
(fixed-size or plain lists of float16/float32), caption and url optional."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense.errors import InputError
from condense.readers import (
    InputConfig,
    InputSlice,
    RawRows,
    check_id_type,
    id_strings,
    optional_strings,
    plan_items,
    read_parquet_rows,
)
from condense.schema import (
    IMG_EMB,
    SAMPLE_ID,
    TXT_EMB,
    arrow_to_vectors,
)
from condense.storage.fs import location, relative
from condense.storage.parts import parquet_file


def _list_dim(path: Path, pf: pq.ParquetFile, column: str) -> int:
    field = pf.schema_arrow.field(column)
    t = field.type
    if pa.types.is_fixed_size_list(t):
        value_type = t.value_type
        dim = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        value_type = t.value_type
        first = (
            pf.read_row_group(0, columns=[column]).column(0) if pf.metadata.num_row_groups else None
        )
        # The first non-null vector (a null one is a dropped row, not the file's dimension).
        valid = first.drop_null() if first is not None else None
        dim = len(valid[0]) if valid is not None and len(valid) else 0
    else:
        raise InputError(f"{path}: column {column!r} must be a list of floats, got {t}")
    if not (
        pa.types.is_float16(value_type)
        or pa.types.is_float32(value_type)
        or pa.types.is_float64(value_type)
    ):
        raise InputError(f"{path}: column {column!r} holds {value_type}, expected floats")
    return dim


class ParquetEmbeddingReader:
    """Plans (file, row range) items over every *.parquet below the input folder."""

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        self.root = location(cfg.path)
        self.id_column = cfg.id_column or SAMPLE_ID
        paths = sorted(
            (p for p in self.root.rglob("*.parquet") if not p.name.startswith((".", "_"))), key=str
        )
        if not paths:
            raise InputError(
                f"{self.root}: no .parquet files (and no img_emb/ folder for the clip-retrieval layout)"
            )
        self.files: list[dict] = []
        self.dim = 0
        self.total_rows = 0
        for path in paths:
            try:
                pf = parquet_file(path)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
            names = pf.schema_arrow.names
            for column in (self.id_column, IMG_EMB, TXT_EMB):
                if column not in names:
                    raise InputError(f"{path}: missing column {column!r} (columns: {names})")
            check_id_type(path, pf.schema_arrow, self.id_column)
            dims = {c: _list_dim(path, pf, c) for c in (IMG_EMB, TXT_EMB)}
            if dims[IMG_EMB] != dims[TXT_EMB]:
                raise InputError(
                    f"{path}: img_emb has dimension {dims[IMG_EMB]}, txt_emb {dims[TXT_EMB]}"
                )
            rows = pf.metadata.num_rows
            if rows == 0:
                continue
            if self.dim and dims[IMG_EMB] != self.dim:
                raise InputError(
                    f"{path}: dimension {dims[IMG_EMB]} differs from earlier files ({self.dim})"
                )
            self.dim = dims[IMG_EMB]
            self.files.append({"path": str(path), "rows": rows, "file": len(self.files)})
            self.total_rows += rows

    def plan(self, rows_per_part: int) -> list[InputSlice]:
        return plan_items(self.files, rows_per_part)

    def source(self, item: InputSlice) -> str:
        return relative(item.path, self.root)

    def image_files(self) -> dict[str, tuple[str, str]]:
        return {relative(f["path"], self.root): (f["path"], "parquet") for f in self.files}

    def read(self, item: InputSlice) -> RawRows:
        path = item.path
        table = read_parquet_rows(path, item.start, item.stop)
        img = _vectors(table, IMG_EMB, path, self.dim)
        txt = _vectors(table, TXT_EMB, path, self.dim)
        return RawRows(
            sample_id=id_strings(table, self.id_column, path),
            caption=optional_strings(table, self.cfg.caption_column, path),
            url=optional_strings(table, self.cfg.url_column, path),
            source=self.source(item),
            img=img,
            txt=txt,
            first_row=item.start,
        )


def _vectors(table: pa.Table, column: str, path: str, dim: int) -> np.ndarray:
    col = table.column(column)
    try:
        if col.null_count:
            # A null vector is unusable: give it NaNs so the embed stage counts it as non-finite.
            col = col.combine_chunks()
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            out = np.full((len(col), dim), np.nan, dtype=np.float32)
            if valid.any():
                out[valid] = arrow_to_vectors(col.filter(pa.array(valid)))
            return out
        vecs = arrow_to_vectors(col)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: column {column!r}: {exc}") from exc
    if vecs.ndim != 2 or vecs.shape[1] != dim:
        raise InputError(
            f"{path}: column {column!r} has dimension {vecs.shape[-1]}, expected {dim}"
        )
    return vecs if vecs.dtype in (np.float16, np.float32) else vecs.astype(np.float32)


def parquet_take(path: str, rows: np.ndarray, column: str, dim: int) -> np.ndarray:
    """The vectors of `column` at the given rows (sorted) of a Parquet file, reading only the
    row groups that hold them."""
    from condense.storage.parts import read_rows

    return _vectors(read_rows(path, np.asarray(rows, np.int64), [column]), column, path, dim)
