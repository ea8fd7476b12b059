"""Exact rank bands (DESIGN.md 2): over N rows sorted by score descending, ties by sample_id
ascending, keep 0-based ranks r with floor(lo*N) <= r < floor(hi*N).

The floors are exact: 0.35 means 35/100, so floor(0.35 * 180) is 63, although the binary
double nearest 0.35 times 180 is just below 63.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def band_bounds(n: int, lo: float, hi: float) -> tuple[int, int]:
    """[floor(lo*N), floor(hi*N)) with lo and hi read as the decimals they were written as."""
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"a band needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    lo_exact, hi_exact = Fraction(repr(float(lo))), Fraction(repr(float(hi)))
    return int(lo_exact * n), int(hi_exact * n)  # int() floors a non-negative Fraction


def descending_key(scores: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the float32 scores' descending order (exact, total:
    -0.0 sorts with 0.0's neighbours, NaN is rejected)."""
    s = np.ascontiguousarray(scores, dtype=np.float32)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    s = s + np.float32(0.0)  # -0.0 -> +0.0, so equal scores get equal keys
    bits = s.view(np.uint32)
    # Standard order-preserving map of IEEE floats onto unsigned ints, then reversed.
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    return ~ascending


def band_mask(scores: np.ndarray, sample_id: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Single-machine reference: the rows whose rank falls in the band."""
    n = len(scores)
    r_lo, r_hi = band_bounds(n, lo, hi)
    order = np.lexsort((np.asarray(sample_id, dtype=object), descending_key(scores)))
    mask = np.zeros(n, dtype=bool)
    mask[order[r_lo:r_hi]] = True
    return mask
