"""clip-retrieval embedding folders: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy,
metadata/metadata_N.parquet, rows aligned by position within file number N (float16 or float32)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

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
from condense.storage import meter
from condense.storage.fs import file_size, is_url, location, relative
from condense.storage.parts import npy_header, parquet_file

_NUMBERED = re.compile(r"^(img_emb|text_emb|metadata)_(\d+)\.(npy|parquet)$")


def _numbered(folder: Path, stem: str, ext: str) -> dict[int, Path]:
    """File number -> file; two names for one number (img_emb_1 and img_emb_01) are an error,
    since rows are paired across the three folders by that number."""
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir(), key=str):
        m = _NUMBERED.match(path.name)
        if m and m.group(1) == stem and m.group(3) == ext:
            number = int(m.group(2))
            if number in found:
                raise InputError(
                    f"{found[number]} and {path} both claim file number {number}: "
                    "keep one (rows are paired with metadata by that number)"
                )
            found[number] = path
    return found


NPY_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))  # what condense memory-maps as embeddings


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header alone; anything but a complete little-endian float16
    or float32 array (a zip, an object or big-endian array, a truncated file) is an error
    naming the file. Nothing is ever unpickled."""
    path = location(path)
    try:
        with path.open("rb") as f:
            shape, dtype, offset = npy_header(f)
    except Exception as exc:  # noqa: BLE001 - any unreadable header gets the same message
        head = b""
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(4)
        what = "a zip archive (.npz), not a .npy file" if head == b"PK\x03\x04" else str(exc)
        raise InputError(f"{path}: not a readable .npy file ({what})") from exc
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects ({dtype}); expected float16 or float32")
    if dtype.kind == "f" and dtype.byteorder == ">":
        raise InputError(f"{path}: big-endian {dtype}; save it little-endian (array.astype('<f4'))")
    if dtype not in NPY_DTYPES:
        raise InputError(f"{path}: expected float16 or float32, got {dtype}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = file_size(path)
    if size < expected:
        raise InputError(f"{path}: truncated ({size:,} bytes, its header needs {expected:,})")
    return shape, dtype


def npy_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-d .npy file: memory-mapped on a local disk, one byte-range
    read in an object store."""
    if not is_url(path):
        rows = np.asarray(np.load(path, mmap_mode="r")[start:stop])
    else:
        with location(path).open("rb") as f:
            shape, dtype, offset = npy_header(f)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            f.seek(offset + start * row_bytes)
            data = f.read((stop - start) * row_bytes)
        rows = np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))
    meter.count(read=rows.nbytes, kind=meter.VECTORS)
    return rows


GAP_BYTES = 1 << 20  # rows this close in a store are fetched in one request (cheaper than two)


def row_runs(rows: np.ndarray, gap: int = 1) -> list[tuple[int, int]]:
    """Sorted distinct rows as [start, stop) runs; rows fewer than `gap` apart share a run."""
    if not len(rows):
        return []
    cuts = np.flatnonzero(np.diff(rows) > gap) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def npy_take(path: str, rows: np.ndarray) -> np.ndarray:
    """The given rows (sorted, distinct) of a 2-d .npy file. Locally they are picked out of a
    memory map (only their pages are read); in a store, rows less than GAP_BYTES apart are
    fetched as one byte range and the ranges concurrently, so only what is wanted crosses
    the wire, in few requests."""
    rows = np.asarray(rows, dtype=np.int64)
    if not is_url(path):
        out = np.asarray(np.load(path, mmap_mode="r")[rows])
        meter.count(read=out.nbytes, kind=meter.VECTORS)
        return out
    from condense.storage.fs import filesystem

    with location(path).open("rb") as f:
        shape, dtype, offset = npy_header(f)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    runs = row_runs(rows, gap=max(1, GAP_BYTES // row_bytes))
    fs, inner = filesystem(path)
    blobs = fs.cat_ranges(
        [inner] * len(runs),
        [offset + a * row_bytes for a, _ in runs],
        [offset + b * row_bytes for _, b in runs],
    )
    meter.count(read=sum(len(b) for b in blobs), kind=meter.VECTORS)
    fetched = np.concatenate([np.arange(a, b) for a, b in runs]) if runs else rows
    data = np.frombuffer(b"".join(blobs), dtype=dtype).reshape((-1, *shape[1:]))
    return data[np.searchsorted(fetched, rows)]


class ClipRetrievalReader:
    """Plans (file number, row range) items and reads them with memory-mapped .npy files."""

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        self.root = location(cfg.path)
        self.id_column = cfg.id_column or "key"
        folders = {name: self.root / name for name in ("img_emb", "text_emb", "metadata")}
        for name, folder in folders.items():
            if not folder.is_dir():
                raise InputError(f"{self.root}: missing folder {name}/ (clip-retrieval layout)")
        imgs = _numbered(folders["img_emb"], "img_emb", "npy")
        txts = _numbered(folders["text_emb"], "text_emb", "npy")
        metas = _numbered(folders["metadata"], "metadata", "parquet")
        if not imgs:
            raise InputError(f"{folders['img_emb']}: no img_emb_N.npy files")
        numbers = sorted(set(imgs) | set(txts) | set(metas))
        self.files: list[dict] = []
        self.dim = 0
        self.total_rows = 0
        for n in numbers:
            for name, table in (("img_emb", imgs), ("text_emb", txts), ("metadata", metas)):
                if n not in table:
                    ext = "parquet" if name == "metadata" else "npy"
                    raise InputError(
                        f"{folders[name] / f'{name}_{n}.{ext}'} is missing (file number {n} exists elsewhere)"
                    )
            img_shape, txt_shape = _npy_shape(imgs[n])[0], _npy_shape(txts[n])[0]
            for path, shape in ((imgs[n], img_shape), (txts[n], txt_shape)):
                if len(shape) != 2:
                    raise InputError(f"{path}: expected a 2-d array (rows, dim), got shape {shape}")
            try:
                meta = parquet_file(metas[n])
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{metas[n]}: not a readable Parquet file ({exc})") from exc
            rows = {imgs[n]: img_shape[0], txts[n]: txt_shape[0], metas[n]: meta.metadata.num_rows}
            if len(set(rows.values())) != 1:
                detail = ", ".join(f"{p.name}: {r} rows" for p, r in rows.items())
                raise InputError(f"file number {n} disagrees on row count ({detail})")
            if img_shape[1] != txt_shape[1]:
                raise InputError(
                    f"{txts[n]}: dimension {txt_shape[1]} differs from {imgs[n].name} ({img_shape[1]})"
                )
            if self.dim and img_shape[1] != self.dim:
                raise InputError(
                    f"{imgs[n]}: dimension {img_shape[1]} differs from earlier files ({self.dim})"
                )
            self.dim = img_shape[1]
            if self.id_column not in meta.schema_arrow.names:
                raise InputError(
                    f"{metas[n]}: no id column {self.id_column!r} (columns: {meta.schema_arrow.names}); "
                    "set input.id_column"
                )
            check_id_type(metas[n], meta.schema_arrow, self.id_column)
            self.files.append(
                {
                    "file": n,
                    "img": str(imgs[n]),
                    "txt": str(txts[n]),
                    "path": str(metas[n]),
                    "rows": img_shape[0],
                }
            )
            self.total_rows += img_shape[0]

    def plan(self, rows_per_part: int) -> list[InputSlice]:
        return plan_items(self.files, rows_per_part)

    def source(self, item: InputSlice) -> str:
        return relative(item.path, self.root)

    def image_files(self) -> dict[str, tuple[str, str]]:
        return {relative(f["path"], self.root): (f["img"], "npy") for f in self.files}

    def read(self, item: InputSlice) -> RawRows:
        start, stop = item.start, item.stop
        img = npy_rows(item.img, start, stop)
        txt = npy_rows(item.txt, start, stop)
        meta = read_parquet_rows(item.path, start, stop)
        return RawRows(
            sample_id=id_strings(meta, self.id_column, item.path),
            caption=optional_strings(meta, self.cfg.caption_column, item.path),
            url=optional_strings(meta, self.cfg.url_column, item.path),
            source=self.source(item),
            img=img,
            txt=txt,
            first_row=start,
        )
