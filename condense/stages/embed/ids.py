"""Distributed check that every sample_id of embed/ is unique (rows are joined by id).

Each embed part stores its rows in id-hash order and writes `_ids/<part>.npy`: the rows'
64-bit id hashes (so, sorted) with their row numbers. The check splits the hash range into buckets; one worker per bucket slices every
part's sorted hashes to its range (binary search on a memory map, so each byte is read once),
and reports hashes that repeat. Only those few candidates reach the driver, which confirms them
against the real ids (a 64-bit collision is not a duplicate) and names file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from condense.cores.hashing import repeated
from condense.errors import InputError
from condense.runtime.processor import Processor, WorkItem
from condense.schema import SAMPLE_ID, SOURCE
from condense.storage.files import atomic_write_npy
from condense.storage.fs import location
from condense.storage.parts import part_path, read_array, read_table

IDS_DIR = "_ids"  # in embed/: each part's sorted id hashes (cluster's training samples read them)
ID_HASH_SEED = 0x5EED
ID_RECORD = np.dtype([("hash", "<u8"), ("part_row", "<i8"), ("source_row", "<i8")])
ROWS_PER_BUCKET = 50_000_000  # hashes one worker sorts at once (1.2 GB of records)


def write_id_hashes(folder: Path, part: str, hashes: np.ndarray, source_rows: np.ndarray) -> Path:
    """Write one part's id hashes, in part order, which the embed writer makes hash order."""
    if len(hashes) > 1 and not np.all(hashes[1:] >= hashes[:-1]):
        raise ValueError("write_id_hashes expects the part's rows in hash order")
    records = np.empty(len(hashes), dtype=ID_RECORD)
    records["hash"] = hashes
    records["part_row"] = np.arange(len(hashes))
    records["source_row"] = source_rows
    path = id_hash_file(folder, part)
    atomic_write_npy(path, records)
    return path


def id_hash_file(folder: Path, part: str) -> Path:
    """Where embed keeps a part's sorted id hashes."""
    return location(folder) / IDS_DIR / f"{part}.npy"


@dataclass(frozen=True, kw_only=True)
class HashBucket(WorkItem):
    """A range [lo, hi) of id hashes, checked by one worker (hi None: to the end)."""

    lo: int
    hi: int | None
    limit: int  # at most this many repeats reported


@dataclass
class RepeatFinder(Processor):
    """For one hash bucket: the records of every part whose hash occurs more than once."""

    stage = "embed"
    id_files: list[str]

    def process(self, item: HashBucket) -> dict:
        lo, hi = np.uint64(item.lo), item.hi
        chunks, owners = [], []
        for index, path in enumerate(self.id_files):
            records = read_array(path, mmap=True)
            hashes = records["hash"]
            start = np.searchsorted(hashes, lo, side="left")
            stop = (
                len(hashes) if hi is None else np.searchsorted(hashes, np.uint64(hi), side="left")
            )
            if stop > start:
                chunks.append(np.asarray(records[start:stop]))
                owners.append(np.full(stop - start, index, dtype=np.int32))
        if not chunks:
            return {"part": item.part, "rows_in": 0, "repeats": []}
        records = np.concatenate(chunks)
        owner = np.concatenate(owners)
        order = np.argsort(records["hash"], kind="stable")
        records, owner = records[order], owner[order]
        mask = repeated(records["hash"])
        found = [
            (int(r["hash"]), int(o), int(r["part_row"]), int(r["source_row"]))
            for r, o in zip(records[mask][: item.limit], owner[mask][: item.limit], strict=True)
        ]
        return {"part": item.part, "rows_in": len(records), "repeats": found}


def check_unique_ids(
    executor,
    folder: Path,
    parts: list[str],
    total_rows: int,
    *,
    limit: int = 5,
    rows_per_bucket: int = ROWS_PER_BUCKET,
) -> None:
    """Raise InputError naming ids, files and rows when a sample_id occurs more than once."""
    id_files = [str(id_hash_file(folder, part)) for part in parts]
    buckets = max(1, -(-total_rows // rows_per_bucket))
    edges = [int(b * (1 << 64) // buckets) for b in range(buckets)] + [None]
    items = [
        HashBucket(part=f"bucket-{b}", lo=edges[b], hi=edges[b + 1], limit=1000)
        for b in range(buckets)
    ]
    candidates = []
    for _item, result, _node in executor.map(RepeatFinder(id_files), items):
        candidates += result["repeats"]
    if not candidates:
        return
    # Confirm against the real ids: read only the parts that hold candidates.
    by_id: dict[str, list[tuple[str, int]]] = {}
    tables: dict[int, dict] = {}
    for _hash, owner, part_row, source_row in candidates:
        if owner not in tables:
            path = part_path(folder, parts[owner])
            tables[owner] = read_table(path, columns=[SAMPLE_ID, SOURCE]).to_pydict()
        sid = tables[owner][SAMPLE_ID][part_row]
        by_id.setdefault(sid, []).append((tables[owner][SOURCE][part_row], source_row))
    dupes = sorted((sid, places) for sid, places in by_id.items() if len(places) > 1)
    if dupes:
        lines = [
            f"  {sid!r} in " + ", ".join(f"{src} row {row}" for src, row in sorted(places))
            for sid, places in dupes[:limit]
        ]
        more = f"\n  ... and {len(dupes) - limit} more" if len(dupes) > limit else ""
        raise InputError(
            "duplicate sample_id values in the input (rows are joined by sample_id, so each must be unique):\n"
            + "\n".join(lines)
            + more
        )
