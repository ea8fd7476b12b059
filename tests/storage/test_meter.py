"""The storage layer meters the bytes it moves, by kind: what a read fetches, what a write
stores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense.schema import vectors_to_arrow
from condense.storage import meter
from condense.storage.files import atomic_write_npy
from condense.storage.parts import (
    part_path,
    read_array,
    read_rows,
    read_scratch,
    read_table,
    write_part,
    write_scratch,
)


def table(n: int = 1000, d: int = 8) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "sample_id": pa.array([f"id-{i}" for i in range(n)]),
            "img_emb": vectors_to_arrow(rng.standard_normal((n, d)).astype(np.float16)),
            "score": pa.array(rng.standard_normal(n).astype(np.float32)),
        }
    )


def moved(fn) -> meter.IOCount:
    before = meter.snapshot()
    fn()
    return meter.snapshot() - before


def vector_chunks(path, groups=None) -> int:
    meta = pq.ParquetFile(path).metadata
    return sum(
        meta.row_group(g).column(c).total_compressed_size
        for g in (range(meta.num_row_groups) if groups is None else groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).path_in_schema.startswith("img_emb")
    )


def test_a_part_write_is_metered_as_its_file_split_by_column_kind(tmp_path):
    t = table()
    io = moved(lambda: write_part(t, tmp_path, "00000", row_group_rows=256))
    path = part_path(tmp_path, "00000")
    assert io.written == path.stat().st_size
    assert io.vectors_written == vector_chunks(path) >= 1000 * 8 * 2  # plain float16
    assert io.read == 0


def test_reads_meter_the_column_chunks_they_fetch(tmp_path):
    write_part(table(), tmp_path, "00000", row_group_rows=256)
    path = part_path(tmp_path, "00000")
    vectors = vector_chunks(path)
    ids_only = moved(lambda: read_table(path, columns=["sample_id"]))
    assert ids_only.vectors_read == 0 and ids_only.other_read > 0
    whole = moved(lambda: read_table(path))
    assert whole.vectors_read == vectors
    # Rows 0 and 300 lie in row groups 0 and 1 of 4: only their vector chunks are fetched.
    some = moved(lambda: read_rows(path, np.array([0, 300]), ["img_emb"]))
    assert some.vectors_read == vector_chunks(path, [0, 1]) < vectors


def test_scratch_and_arrays_are_metered_both_ways(tmp_path):
    t = table(n=500)
    path = tmp_path / "s.arrow"
    wrote = moved(lambda: write_scratch(path, [t], t.schema))
    assert wrote.written == path.stat().st_size
    assert wrote.vectors_written == t.column("img_emb").nbytes
    read = moved(lambda: read_scratch(path))
    assert read.vectors_read == t.column("img_emb").nbytes
    centroids = np.ones((10, 4), np.float32)
    npy = tmp_path / "c.npy"
    assert moved(lambda: atomic_write_npy(npy, centroids)).vectors_written == npy.stat().st_size
    assert moved(lambda: read_array(npy)).vectors_read == centroids.nbytes
