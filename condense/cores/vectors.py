"""Embedding hygiene: which rows are usable, unit normalisation and CLIP scores."""

from __future__ import annotations

import numpy as np

# Reasons a row is dropped at the embed stage, in the order they are checked.
DROP_NONFINITE_IMG = "nonfinite_img_emb"
DROP_NONFINITE_TXT = "nonfinite_txt_emb"
DROP_ZERO_IMG = "zero_img_emb"
DROP_ZERO_TXT = "zero_txt_emb"
DROP_UNNORMALIZABLE_IMG = "unnormalizable_img_emb"
DROP_UNNORMALIZABLE_TXT = "unnormalizable_txt_emb"
DROP_MISSING_ID = "missing_sample_id"


def invalid_rows(img: np.ndarray, txt: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of rows that cannot be used, one per reason; a row counts once, first reason wins.

    Besides NaN, inf and all-zero rows, a row whose float32 norm is zero or infinite cannot be
    made a unit vector (all components 1e-30: the squares underflow; one component 1e20: its
    square overflows), so no NaN, inf or zero vector ever reaches embed/."""
    taken = np.zeros(len(img), dtype=bool)
    masks: dict[str, np.ndarray] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        img_norm, txt_norm = row_norms(img), row_norms(txt)
    for reason, bad in (
        (DROP_NONFINITE_IMG, ~np.isfinite(img).all(axis=1)),
        (DROP_NONFINITE_TXT, ~np.isfinite(txt).all(axis=1)),
        (DROP_ZERO_IMG, ~np.any(img != 0, axis=1)),
        (DROP_ZERO_TXT, ~np.any(txt != 0, axis=1)),
        (DROP_UNNORMALIZABLE_IMG, ~np.isfinite(img_norm) | (img_norm == 0)),
        (DROP_UNNORMALIZABLE_TXT, ~np.isfinite(txt_norm) | (txt_norm == 0)),
    ):
        mask = bad & ~taken
        masks[reason] = mask
        taken |= mask
    return masks


def row_norms(x: np.ndarray) -> np.ndarray:
    """Each row's L2 norm as `normalize` computes it (float32)."""
    x32 = np.asarray(x, dtype=np.float32)
    # Squares in float32 (float16's range cannot overflow them), summed per row in float64:
    # each row's result depends only on that row, whatever batch it arrives in.
    return np.sqrt(np.sum(x32 * x32, axis=1, dtype=np.float64)).astype(np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (rows `invalid_rows` passes: finite, non-zero norms)."""
    x32 = np.asarray(x, dtype=np.float32)
    return x32 / row_norms(x32)[:, None]


def as_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """The unit vectors exactly as embed/ stores them (float16 halves the disk, float32 is exact)."""
    return np.asarray(x, dtype=np.dtype(dtype))


def to_unit_float32(stored: np.ndarray) -> np.ndarray:
    """Vectors read back from embed/, as every stage computes with them: float32 and unit length.

    float32 rows were normalised before they were stored and are used as they are; float16 rows
    are re-normalised after the upcast so that dot products are true cosines.
    """
    if stored.dtype == np.float32:
        return stored
    return normalize(stored)


def clip_scores(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Row-wise dot(img, txt) of unit vectors, computed in float32 (DESIGN.md 2)."""
    return np.einsum(
        "ij,ij->i", img.astype(np.float32, copy=False), txt.astype(np.float32, copy=False)
    )
