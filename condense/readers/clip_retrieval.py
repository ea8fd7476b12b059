"""clip-retrieval embedding folders: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy,
metadata/metadata_N.parquet, rows aligned by position within file number N (float16 or float32)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from condense.errors import InputError
from condense.readers import InputConfig, RawRows, optional_strings, plan_items, read_parquet_rows

_NUMBERED = re.compile(r"^(img_emb|text_emb|metadata)_(\d+)\.(npy|parquet)$")


def _numbered(folder: Path, stem: str, ext: str) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in folder.iterdir():
        m = _NUMBERED.match(path.name)
        if m and m.group(1) == stem and m.group(3) == ext:
            found[int(m.group(2))] = path
    return found


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise InputError(f"{path}: not a readable .npy file ({exc})") from exc
    return arr.shape, arr.dtype


class ClipRetrievalReader:
    """Plans (file number, row range) items and reads them with memory-mapped .npy files."""

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        self.root = Path(cfg.path)
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
            (img_shape, img_dtype), (txt_shape, txt_dtype) = (
                _npy_shape(imgs[n]),
                _npy_shape(txts[n]),
            )
            for path, shape, dtype in (
                (imgs[n], img_shape, img_dtype),
                (txts[n], txt_shape, txt_dtype),
            ):
                if len(shape) != 2:
                    raise InputError(f"{path}: expected a 2-d array (rows, dim), got shape {shape}")
                if dtype not in (np.float16, np.float32):
                    raise InputError(f"{path}: expected float16 or float32, got {dtype}")
            try:
                meta = pq.ParquetFile(metas[n])
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
            self.files.append(
                {
                    "number": n,
                    "img": str(imgs[n]),
                    "txt": str(txts[n]),
                    "meta": str(metas[n]),
                    "rows": img_shape[0],
                }
            )
            self.total_rows += img_shape[0]

    def plan(self, rows_per_part: int) -> list[dict]:
        return plan_items(self.files, "number", rows_per_part)

    def read(self, item: dict) -> RawRows:
        start, stop = item["start"], item["stop"]
        img = np.asarray(np.load(item["img"], mmap_mode="r")[start:stop])
        txt = np.asarray(np.load(item["txt"], mmap_mode="r")[start:stop])
        meta = read_parquet_rows(item["meta"], start, stop)
        ids = meta.column(self.id_column).cast("string").to_pylist()
        return RawRows(
            sample_id=ids,
            caption=optional_strings(meta, self.cfg.caption_column),
            url=optional_strings(meta, self.cfg.url_column),
            source=str(Path(item["meta"]).relative_to(self.root)),
            img=img,
            txt=txt,
            first_row=start,
        )
