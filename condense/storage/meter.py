"""The bytes a process moves through the storage layer, counted where they move.

Every read and write of the run directory and of the input goes through this layer (or through
a reader that calls `count`), and each one adds its bytes here: Parquet reads by the compressed
size of the column chunks they fetch, plus the footer; scratch reads by the record batches'
buffers; `.npy` reads by the rows' bytes; writes by the bytes of the file written. That is what
crosses the wire to an object store (a local memory map pages in the same ranges).

Bytes are split in two kinds: `vectors` (embedding columns, `.npy` arrays of vectors) and
`other` (ids, captions, scores, records, marks). The counters are per process and thread-safe;
the runtime takes a `snapshot()` around every work item a worker runs and sends the difference
back to the driver, which adds it to its own for the stage's `_stage.json`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

VECTORS, OTHER = "vectors", "other"


@dataclass(frozen=True)
class IOCount:
    """Bytes read and written, by kind."""

    vectors_read: int = 0
    other_read: int = 0
    vectors_written: int = 0
    other_written: int = 0

    def __add__(self, o: IOCount) -> IOCount:
        return IOCount(*(a + b for a, b in zip(self.astuple(), o.astuple(), strict=True)))

    def __sub__(self, o: IOCount) -> IOCount:
        return IOCount(*(a - b for a, b in zip(self.astuple(), o.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int, int]:
        return (self.vectors_read, self.other_read, self.vectors_written, self.other_written)

    @property
    def read(self) -> int:
        return self.vectors_read + self.other_read

    @property
    def written(self) -> int:
        return self.vectors_written + self.other_written

    def record(self) -> dict[str, int]:
        """The figures a stage's `_stage.json` holds."""
        return {
            "bytes_read": self.read,
            "bytes_written": self.written,
            "vector_bytes_read": self.vectors_read,
            "vector_bytes_written": self.vectors_written,
        }


_lock = threading.Lock()
_totals = [0, 0, 0, 0]  # vectors read, other read, vectors written, other written


def count(read: int = 0, written: int = 0, kind: str = OTHER) -> None:
    """Add bytes this process read or wrote, of one kind."""
    if not (read or written):
        return
    base = 0 if kind == VECTORS else 1
    with _lock:
        _totals[base] += int(read)
        _totals[base + 2] += int(written)


def snapshot() -> IOCount:
    """Everything this process has counted so far (subtract two snapshots for a span)."""
    with _lock:
        return IOCount(*_totals)


def is_vector_type(arrow_type) -> bool:
    """Whether an Arrow column holds embeddings: fixed-size (or plain) lists of floats."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type):
        return pa.types.is_floating(arrow_type.value_type)
    return False


def vector_bytes(table) -> int:
    """The bytes of an Arrow table's embedding columns."""
    return sum(
        table.column(i).nbytes for i, field in enumerate(table.schema) if is_vector_type(field.type)
    )


def count_table(table) -> None:
    """An Arrow table read from uncompressed scratch: its buffers, by column kind."""
    vectors = vector_bytes(table)
    count(read=vectors, kind=VECTORS)
    count(read=table.nbytes - vectors)


def parquet_bytes(metadata, row_groups, columns) -> tuple[int, int]:
    """Stored bytes of these row groups' column chunks (top-level columns; None: all), as
    (vectors, other)."""
    schema = metadata.schema.to_arrow_schema()
    vector_names = {f.name for f in schema if is_vector_type(f.type)}
    wanted = None if columns is None else set(columns)
    vectors = other = 0
    for g in row_groups:
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            name = chunk.path_in_schema.split(".", 1)[0]
            if wanted is not None and name not in wanted:
                continue
            if name in vector_names:
                vectors += chunk.total_compressed_size
            else:
                other += chunk.total_compressed_size
    return vectors, other


def count_parquet(metadata, row_groups, columns, footer: bool = True) -> None:
    """A Parquet read of these row groups and columns (None: all), by the stored size of each
    column chunk it fetches; plus the footer, which every open reads."""
    vectors, other = parquet_bytes(metadata, row_groups, columns)
    if footer:
        other += metadata.serialized_size + 8  # the footer, its length and the magic bytes
    count(read=vectors, kind=VECTORS)
    count(read=other)
