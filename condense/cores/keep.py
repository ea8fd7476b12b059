"""Which member of each duplicate component is kept (DESIGN.md 2, keep rules)."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from condense.cores.hashing import hash_ids

KeepRule = Literal["middle", "far", "near", "clip_max", "random"]
KEEP_RULES: tuple[str, ...] = get_args(KeepRule)


def keep_mask(
    labels: np.ndarray,
    sample_id: np.ndarray,
    centroid_dist: np.ndarray,
    clip_score: np.ndarray,
    rule: str,
    seed: int = 0,
) -> np.ndarray:
    """Boolean mask with exactly one True per component label.

    middle: order by centroid_dist ascending, ties by sample_id; keep position floor(m/2).
    far / near: the largest / smallest centroid_dist (ties by sample_id); clip_max: the highest
    clip_score (ties by sample_id); random: the smallest hash(seed, sample_id).
    """
    if rule not in KEEP_RULES:
        raise ValueError(f"unknown keep rule {rule!r}; valid rules: {', '.join(KEEP_RULES)}")
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=bool)
    ids = np.asarray(sample_id, dtype=object)
    if rule == "random":
        key = hash_ids(ids.tolist(), seed)
    elif rule == "clip_max":
        key = -np.asarray(clip_score, dtype=np.float64)
    elif rule == "far":
        key = -np.asarray(centroid_dist, dtype=np.float64)
    else:
        key = np.asarray(centroid_dist, dtype=np.float64)
    # Within each component: by key, then sample_id.
    order = np.lexsort((ids, key, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, n])
    pick = starts + (sizes // 2 if rule == "middle" else 0)
    mask = np.zeros(n, dtype=bool)
    mask[order[pick]] = True
    return mask


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of each row's component."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse]
