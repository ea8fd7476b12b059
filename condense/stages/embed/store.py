"""How embed/ stores rows, whatever the input: unusable rows dropped by reason, vectors
normalised and stored in id-hash order, with each part's id hashes beside it (`ids.py`)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from condense.cores.hashing import hash_ids
from condense.cores.text import DROP_BAD_ID, id_problem
from condense.cores.vectors import (
    DROP_MISSING_ID,
    as_stored,
    clip_scores,
    invalid_rows,
    normalize,
    to_unit_float32,
)
from condense.readers import InputSlice, Reader
from condense.runtime.processor import Processor, Resources
from condense.schema import embed_schema, vectors_to_arrow
from condense.stages.embed.ids import ID_HASH_SEED, write_id_hashes
from condense.stages.embed.vectors import VectorFile, check_version
from condense.storage.fs import location
from condense.storage.parts import write_part

EMBED_ROW_GROUP = 8192  # rows per Parquet row group: the unit a partial read (a sample) fetches


@dataclass
class EmbedPartWriter(Processor):
    """Reads one input slice, drops unusable rows by reason, writes one part file: with the
    vectors, or (`in_place` holds the image files' versions) with the rows' places in the
    input, which later stages read (`vectors.py`)."""

    stage = "embed"
    reader: Reader
    dtype: str  # embed.dtype
    out_dir: str  # embed/
    workers: int | None = None  # embed.workers
    in_place: dict[str, VectorFile] | None = None  # source -> its image file, as first seen

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, workers=self.workers)

    def process(self, item: InputSlice) -> dict:
        start = time.perf_counter()
        vf = self.in_place[self.reader.source(item)] if self.in_place else None
        if vf:  # what is read here is the version later stages will read
            check_version(vf)
        raw = self.reader.read(item)
        if vf:
            check_version(vf)
        stats = store_rows(raw, item.part, self.dtype, self.out_dir, {}, vectors=vf is None)
        return {**stats, "seconds": time.perf_counter() - start}


def store_rows(
    raw,
    part: str,
    dtype: str,
    out_dir: str,
    dropped_before: dict[str, int],
    unit: bool = False,
    vectors: bool = True,
) -> dict:
    """Drop unusable rows by reason, normalise (unless `unit`: the vectors left the model
    normalised), store in id-hash order, write one part: with the vectors, or (not `vectors`)
    with each row's row in its source, where later stages read them."""
    n = len(raw.img)
    ids = np.asarray(raw.sample_id, dtype=object)
    problems = [id_problem(i) for i in ids.tolist()]
    missing = np.array([p == DROP_MISSING_ID for p in problems], dtype=bool)
    bad_id = np.array([p == DROP_BAD_ID for p in problems], dtype=bool)
    masks = invalid_rows(raw.img, raw.txt)
    dropped = Counter(dropped_before)
    dropped[DROP_MISSING_ID] += int(missing.sum())
    dropped[DROP_BAD_ID] += int(bad_id.sum())
    keep = ~missing & ~bad_id
    for reason, mask in masks.items():
        mask = mask & keep
        dropped[reason] += int(mask.sum())
        keep &= ~mask
    # Rows are stored in the order of their id hash: any seeded window of that order is a
    # uniform sample that a reader can fetch without scanning the part (see cluster).
    kept_ids = ids[keep]
    hashes = hash_ids(kept_ids.tolist(), ID_HASH_SEED) if len(kept_ids) else np.zeros(0, np.uint64)
    order = np.lexsort((kept_ids, hashes))
    idx = np.flatnonzero(keep)[order]
    img, txt = raw.img[idx], raw.txt[idx]
    if not unit:
        img, txt = normalize(img), normalize(txt)
    img, txt = as_stored(img, dtype), as_stored(txt, dtype)
    # Scored from the stored vectors, exactly as later stages will see them.
    score = clip_scores(to_unit_float32(img), to_unit_float32(txt))
    where = (
        [vectors_to_arrow(img), vectors_to_arrow(txt)]
        if vectors
        else [pa.array(raw.first_row + idx, type=pa.int64())]
    )
    table = pa.Table.from_arrays(
        [
            pa.array(ids[idx].tolist(), type=pa.string()),
            pa.array([raw.caption[i] for i in idx], type=pa.string()),
            pa.array([raw.url[i] for i in idx], type=pa.string()),
            pa.array([raw.source] * len(idx), type=pa.string()),
            *where,
            pa.array(score, type=pa.float32()),
        ],
        schema=embed_schema(raw.img.shape[1], dtype, vectors),
    )
    ids_path = write_id_hashes(location(out_dir), part, hashes[order], raw.first_row + idx)
    path = write_part(table, out_dir, part, row_group_rows=EMBED_ROW_GROUP)
    return {
        "part": part,
        "files": [str(path), str(ids_path)],
        "rows_in": n + sum(dropped_before.values()),
        "rows_out": int(keep.sum()),
        "dropped": {k: v for k, v in dropped.items() if v},
    }
