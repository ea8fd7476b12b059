"""The k-means training sample: a window of the ring of id hashes.

A seed's sample is the `size` rows that follow window_start(seed) on the ring of 64-bit id
hashes (ties by sample_id): a uniform random sample, the same rows however they are split into
parts or workers. Embed parts are stored in id-hash order, so a part's share of a window is a
run of its rows, found by binary search in its `_ids/` hashes.
"""

from __future__ import annotations

import math

import numpy as np

from condense.cores.hashing import hash_ids, smallest_hash_order
from condense.cores.vectors import to_unit_float32
from condense.schema import IMG_EMB, SAMPLE_ID, arrow_to_vectors
from condense.stages.embed.ids import id_hash_file
from condense.stages.embed.vectors import EmbedVectors
from condense.storage.parts import read_array

RING = 1 << 64  # id hashes are points on a ring of this size


def ring_offset(hashes: np.ndarray, start: int) -> np.ndarray:
    """(hash - start) mod 2^64: a row's position on the id-hash ring counted from `start`."""
    with np.errstate(over="ignore"):
        return np.asarray(hashes, dtype=np.uint64) - np.uint64(start)


def window_rows(sorted_hashes: np.ndarray, start: int, width: int) -> np.ndarray:
    """Rows whose hash lies in [start, start + width) on the ring (width 2^64: every row)."""
    n = len(sorted_hashes)
    if width >= RING:
        return np.arange(n)
    lo = int(np.searchsorted(sorted_hashes, np.uint64(start), side="left"))
    end = start + width
    if end <= RING - 1:
        hi = int(np.searchsorted(sorted_hashes, np.uint64(end), side="left"))
        return np.arange(lo, hi)
    hi = int(np.searchsorted(sorted_hashes, np.uint64(end - RING), side="left"))
    return np.concatenate([np.arange(lo, n), np.arange(0, hi)])


def window_fraction(size: int, rows: int) -> float:
    """The share of the ring to read for a sample of `size` of `rows` rows: a few standard
    deviations wider than needed (trimmed after), doubled on a rare shortfall."""
    return 1.0 if size >= rows else min(1.0, (size + 6 * math.sqrt(size) + 64) / rows)


def window_width(fraction: float) -> int:
    return RING if fraction >= 1.0 else int(fraction * float(RING))


def window_keys(vectors: EmbedVectors, part: str, start: int, width: int):
    """The positions in one part of its rows inside [start, start + width), and their ring
    offsets from `start`."""
    hashes = read_array(id_hash_file(vectors.embed_dir, part), mmap=True)["hash"]
    picked = window_rows(hashes, start, width)
    return picked, ring_offset(np.asarray(hashes[picked]), start)


def window_start(seed: int) -> int:
    """Where a seed's sample starts on the id-hash ring."""
    return int(hash_ids([f"condense-sample-{seed}"], seed)[0])


def draw_sample(
    parts: list[str], vectors: EmbedVectors, rows: int, size: int, seed: int
) -> np.ndarray:
    """The training sample of one seed, as unit float32 vectors.

    It is the `size` rows that follow window_start(seed) on the ring of id hashes (ties by
    sample_id): a uniform random sample, the same however the rows are split into parts.
    Embed parts are stored in id-hash order, so each part's share of the window is a run of
    rows and only the row groups holding it are read (a 1% sample reads ~1% of embed/'s
    vectors). Read in place, the input's rows at those positions are fetched: locally only
    their pages; in a store, rows less than 1 MiB apart in one range, so a sparse sample of
    small rows may fetch much of each part's span. The window is set a few standard
    deviations wider than needed, then trimmed.
    """
    from concurrent.futures import ThreadPoolExecutor

    fraction = window_fraction(size, rows)
    start = window_start(seed)
    while True:
        width = window_width(fraction)

        with ThreadPoolExecutor(max_workers=4) as pool:  # overlap the parts' disk reads
            got = list(pool.map(lambda p, w=width: _window_of_part(vectors, p, start, w), parts))
        keys = np.concatenate([g[0] for g in got]) if got else np.zeros(0, np.uint64)
        if len(keys) >= size or fraction >= 1.0:
            break
        fraction = min(1.0, fraction * 2)  # a rare shortfall: widen the window and read again
    ids = np.asarray([i for g in got for i in g[1]], dtype=object)
    order = smallest_hash_order(keys, ids)[:size]
    return to_unit_float32(np.concatenate([g[2] for g in got])[order])


def _window_of_part(vectors: EmbedVectors, part: str, start: int, width: int):
    """Ring keys, ids and stored vectors of one part's rows inside [start, start + width)."""
    picked, keys = window_keys(vectors, part, start, width)
    table = vectors.read(part, [SAMPLE_ID, IMG_EMB], picked)
    return keys, table.column(SAMPLE_ID).to_pylist(), arrow_to_vectors(table.column(IMG_EMB))
