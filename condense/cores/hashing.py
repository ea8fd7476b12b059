"""Seeded 64-bit hashes of sample ids: the basis of every order- and partition-free random choice.

A row's hash depends only on (seed, sample_id), so "the n rows with the smallest hash" is the same
set however the data are split into files, blocks or workers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_ids(ids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """uint64 hash of each id (FNV-1a over its UTF-8 bytes, then mixed with the seed by splitmix64)."""
    if isinstance(ids, list):
        ids = pa.array(ids, type=pa.string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if ids.null_count:
        raise ValueError("cannot hash null sample ids")
    ids = ids.cast(pa.large_string())
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset : ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if n else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    max_len = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        for j in range(max_len):
            live = lengths > j
            byte = data[offsets[:-1][live] + j].astype(np.uint64)
            h[live] = (h[live] ^ byte) * _FNV_PRIME
        seed_mix = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
        return _splitmix64(h ^ seed_mix)


def smallest_hash_order(hashes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices ordering rows by (key, sample_id), keys being hashes or ring offsets: a total
    order, so key collisions stay deterministic."""
    return np.lexsort((ids, hashes))


def repeated(sorted_values: np.ndarray) -> np.ndarray:
    """Mask of the entries of a sorted array whose value occurs more than once."""
    if len(sorted_values) < 2:
        return np.zeros(len(sorted_values), dtype=bool)
    same_as_next = sorted_values[1:] == sorted_values[:-1]
    mask = np.zeros(len(sorted_values), dtype=bool)
    mask[:-1] |= same_as_next
    mask[1:] |= same_as_next
    return mask
