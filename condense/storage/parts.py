"""Part files: how every stage stores its output, and the records that commit it.

A stage's output is a set of `part-*.parquet` files. Each part is written atomically (in an
object store: under its final name, no rename) and then recorded in `_parts/<part>.json` with
its counts and its files' sizes; a part is finished only while its record is there and its
files are intact, so an interrupted stage resumed with `--resume` keeps the recorded parts and
does only the rest. Stages also keep scratch files (uncompressed Arrow IPC: memory-mapped on a
local disk, read by byte ranges from a store) while they work, removed when they finish.
Every path here may be local or a URL (`storage/fs.py`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from condense.storage import meter
from condense.storage.files import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    file_sizes,
    files_intact,
    read_json,
)
from condense.storage.fs import (
    arrow_filesystem,
    is_url,
    location,
    open_random_access,
    remove_tree,
    sizes_under,
)

PARTS_DIR = "_parts"  # in a stage folder: one record per finished part


def part_path(folder: Path, part: str) -> Path:
    """Where a stage keeps one part."""
    return location(folder) / f"part-{part}.parquet"


def part_name(path: Path) -> str:
    """The part a part file holds (`part-00003.parquet` -> `00003`)."""
    return location(path).stem.removeprefix("part-")


def part_files(folder: Path) -> list[Path]:
    """The stage's part files in a stable order."""
    folder = location(folder)
    if is_url(folder) and not folder.exists():
        return []
    return sorted(folder.glob("part-*.parquet"), key=str)


def _source(path):
    """What pyarrow opens for `path`: the local path, or a file of the store's filesystem."""
    if not is_url(path):
        return str(location(path))
    fs, inner = arrow_filesystem(path)
    return fs.open_input_file(inner)


def parquet_file(path) -> pq.ParquetFile:
    """A Parquet file opened for footer and row-group reads (by byte ranges in a store); its
    footer is metered here, the row groups by `read_groups`."""
    f = pq.ParquetFile(_source(path))
    meter.count_parquet(f.metadata, [], None)
    return f


def read_groups(f: pq.ParquetFile, groups: list[int], columns: list[str] | None) -> pa.Table:
    """Row groups of an open Parquet file (metered by their column chunks' stored bytes)."""
    table = f.read_row_groups(groups, columns=columns, use_threads=False)
    meter.count_parquet(f.metadata, groups, columns, footer=False)
    return table


def write_part(table: pa.Table, folder: Path, part: str, row_group_rows: int | None = None) -> Path:
    """Write one part file atomically.

    Text and key columns are zstd-compressed; float vectors are stored plain (their mantissas do
    not compress, and decompressing them would cost every later stage CPU time).
    """
    buf = io.BytesIO()
    compression = {
        f.name: "none" if pa.types.is_fixed_size_list(f.type) else "zstd" for f in table.schema
    }
    levels = {name: 1 for name, codec in compression.items() if codec == "zstd"}
    pq.write_table(
        table,
        buf,
        compression=compression,
        compression_level=levels or None,
        use_dictionary=[name for name, codec in compression.items() if codec == "zstd"],
        row_group_size=row_group_rows,
    )
    path = part_path(folder, part)
    data = buf.getvalue()
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    vectors = meter.parquet_bytes(meta, range(meta.num_row_groups), None)[0]
    meter.count(written=vectors, kind=meter.VECTORS)
    meter.count(written=len(data) - vectors)
    atomic_write_bytes(path, data, kind=None)  # metered above, by column kind
    return path


def part_rows(folder: Path) -> dict[str, int]:
    """Row count of each part file (from the Parquet footers), by part name."""
    paths = part_files(folder)
    counts = _each(lambda p: parquet_file(p).metadata.num_rows, paths, remote=is_url(folder))
    return {part_name(p): n for p, n in zip(paths, counts, strict=True)}


STORE_THREADS = 16  # requests in flight when the driver reads many small objects of a store


def _each(fn, items: list, remote: bool) -> list:
    """fn over items, in order; `remote` (an object store, or reads that release the GIL) with
    STORE_THREADS in flight at once, else one after the other."""
    if not remote or len(items) < 2:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=STORE_THREADS) as pool:
        return list(pool.map(fn, items))


def write_scratch(path: Path, tables: Iterator[pa.Table] | list[pa.Table], schema: pa.Schema):
    """Write tables to one uncompressed Arrow IPC file, atomically: the stages' scratch format
    (memory-mappable, so readers page in only the slices they touch)."""
    with atomic_file(path, counted=False) as f:
        vectors = 0
        with pa.ipc.new_file(f, schema) as writer:
            for table in tables:
                writer.write_table(table)
                vectors += meter.vector_bytes(table)
        meter.count(written=vectors, kind=meter.VECTORS)
        meter.count(written=f.tell() - vectors)


def read_scratch(path: Path | str, first: int = 0, stop: int | None = None) -> pa.Table:
    """A scratch file's record batches `first` to `stop` (default: all), memory-mapped
    (zero-copy: only the pages of those batches are ever read)."""
    reader = pa.ipc.open_file(open_random_access(path))
    stop = reader.num_record_batches if stop is None else stop
    table = pa.Table.from_batches(
        [reader.get_batch(i) for i in range(first, stop)], schema=reader.schema
    )
    meter.count_table(table)
    return table


class ScratchFiles:
    """Scratch files read by record-batch ranges, again and again (a dedup worker's scatter).
    Local files are memory-mapped per read and let go after it (no map outlives the stage's
    scratch); files in a store stay open between reads (no map, no repeated footer request)
    and the ranges of one read are fetched with STORE_THREADS requests in flight."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.remote = any(is_url(p) for p in self.paths)
        self.readers: dict[int, pa.ipc.RecordBatchFileReader] = {}

    def _reader(self, i: int) -> pa.ipc.RecordBatchFileReader:
        if i not in self.readers:
            self.readers[i] = pa.ipc.open_file(open_random_access(self.paths[i]))
        return self.readers[i]

    def schemas(self) -> list[pa.Schema]:
        if self.remote:
            return _each(lambda i: self._reader(i).schema, list(range(len(self.paths))), True)
        return [scratch_schema(p) for p in self.paths]

    def read(self, ranges: list[tuple[int, int, int]]) -> list[pa.Table]:
        """Batches [first, stop) of file i, for each (i, first, stop)."""
        if not self.remote:
            return [read_scratch(self.paths[i], first, stop) for i, first, stop in ranges]

        def batches(r):
            i, first, stop = r
            reader = self._reader(i)
            table = pa.Table.from_batches(
                [reader.get_batch(b) for b in range(first, stop)], schema=reader.schema
            )
            meter.count_table(table)
            return table

        return _each(batches, ranges, True)


def iter_row_groups(path: str | Path, columns: list[str]) -> Iterator[pa.Table]:
    """Yield a part file's row groups in order (wrap in `read_ahead` to overlap disk and CPU)."""
    f = parquet_file(path)
    for g in range(f.metadata.num_row_groups):
        yield read_groups(f, [g], columns)


def read_ahead(items: Iterator) -> Iterator:
    """Yield what `items` yields, producing the next one in a thread while the caller works on
    the current (Arrow and numpy release the GIL, so a worker's reads and its CPU overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(max_workers=1) as io:
        pending = io.submit(next, items, done)
        while True:
            item = pending.result()
            if item is done:
                return
            pending = io.submit(next, items, done)
            yield item


def record_part(folder: Path, part: str, stats: dict) -> None:
    """Mark a part as finished: written after its Parquet file, so a record means a whole part."""
    atomic_write_json(location(folder) / PARTS_DIR / f"{part}.json", stats)


def discard_scratch(folder: Path, scratch: str, prefix: str) -> None:
    """Remove a stage's scratch folder and the records of the parts that wrote it, records
    first: a run killed in between redoes those parts on resume instead of trusting files that
    are gone."""
    for record in _records(folder, f"{prefix}*.json"):
        record.unlink()
    remove_tree(location(folder) / scratch)


def _records(folder: Path, pattern: str) -> list:
    records = location(folder) / PARTS_DIR
    if is_url(records) and not records.exists():
        return []
    return sorted(records.glob(pattern), key=str)


def discard_parts(folder: Path) -> None:
    """Remove a stage's part files and every part record, records first (see discard_scratch)."""
    for record in _records(folder, "*.json"):
        record.unlink()
    for path in part_files(folder):
        path.unlink()


def finished_parts(folder: Path, parts: list[str]) -> dict[str, dict]:
    """{part: record} of the given parts that are finished (see finished_part), from one
    listing of the records: a stage starting afresh reads nothing more."""
    present = {name.removesuffix(".json") for name in sizes_under(location(folder) / PARTS_DIR)}
    wanted = [p for p in parts if p in present]
    records = _each(lambda p: finished_part(folder, p), wanted, remote=is_url(folder))
    return {p: r for p, r in zip(wanted, records, strict=True) if r is not None}


def finished_part(folder: Path, part: str) -> dict | None:
    """A part's record, or None unless the part is finished: its record is there and valid,
    and every file it lists is there with its recorded size."""
    stats = read_json(location(folder) / PARTS_DIR / f"{part}.json")
    if isinstance(stats, dict) and files_intact(folder, stats.get("files")):
        return stats
    return None


def commit_part(folder: Path, stats: dict) -> dict:
    """Record a part a worker wrote (its `files` turned into sizes): the part is now finished."""
    stats = {**stats, "files": file_sizes(folder, stats.get("files", []))}
    record_part(folder, stats["part"], stats)
    return stats


def read_table(path: Path | str | list, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file (a part, a shard index), a list of them, or a stage folder's parts."""
    paths = path if isinstance(path, list) else [path]
    if len(paths) == 1 and location(paths[0]).suffix != ".parquet":  # a stage folder
        paths = part_files(paths[0])
        if not paths:
            raise FileNotFoundError(f"{path}: no part files")

    def read(p) -> pa.Table:
        f = parquet_file(p)
        return read_groups(f, list(range(f.metadata.num_row_groups)), columns)

    tables = _each(read, paths, remote=True)  # files in flight at once, in a store or not
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def write_table(table: pa.Table, path: Path | str) -> None:
    """A Parquet file that is not a part (a shard's index), written atomically."""
    with atomic_file(path) as f:
        pq.write_table(table, f)


def read_schema(path: Path | str) -> pa.Schema:
    """The schema of a Parquet file (its footer only)."""
    return parquet_file(path).schema_arrow


def read_rows(path: Path | str, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """The given rows (sorted) of a Parquet file, reading only the row groups that hold them."""
    f = parquet_file(path)
    sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    if not len(groups):
        return f.schema_arrow.empty_table().select(columns)
    table = read_groups(f, groups.tolist(), columns)
    read_starts = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
    group_of = np.searchsorted(groups, np.searchsorted(starts, rows, side="right") - 1)
    positions = read_starts[group_of] + (rows - starts[groups[group_of]])
    return table.take(pa.array(positions))


def read_array(path: Path | str, mmap: bool = False) -> np.ndarray:
    """A `.npy` file a stage wrote (memory-mapped on request, on a local disk); nothing is
    unpickled."""
    if is_url(path):
        data = location(path).read_bytes()
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    vectors = array.ndim == 2 and array.dtype.kind == "f"
    meter.count(read=array.nbytes, kind=meter.VECTORS if vectors else meter.OTHER)
    return array


def npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of the `.npy` file open as `f` (its header alone: nothing
    is unpickled)."""
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, _fortran, dtype = read(f)
    return tuple(shape), dtype, f.tell()


def array_shape(path: Path | str) -> tuple[int, ...]:
    """The shape of a `.npy` file from its header alone (one small read in a store)."""
    with location(path).open("rb") as f:
        shape, _dtype, offset = npy_header(f)
    meter.count(read=offset)
    return shape


def scratch_schema(path: Path | str) -> pa.Schema:
    """The schema of a scratch file (its footer only)."""
    with pa.ipc.open_file(open_random_access(path)) as reader:
        return reader.schema
