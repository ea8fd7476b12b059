import numpy as np

from condense.cores.vectors import (
    DROP_NONFINITE_IMG,
    DROP_NONFINITE_TXT,
    DROP_UNNORMALIZABLE_IMG,
    DROP_UNNORMALIZABLE_TXT,
    DROP_ZERO_IMG,
    DROP_ZERO_TXT,
    clip_scores,
    invalid_rows,
    normalize,
    to_unit_float32,
)


def test_invalid_rows_one_reason_per_row():
    img = np.ones((5, 4), np.float32)
    txt = np.ones((5, 4), np.float32)
    img[0, 1] = np.nan
    txt[0, 0] = np.inf  # also bad, but the image reason comes first
    txt[1, 2] = -np.inf
    img[2] = 0
    txt[3] = 0
    masks = invalid_rows(img, txt)
    assert np.flatnonzero(masks[DROP_NONFINITE_IMG]).tolist() == [0]
    assert np.flatnonzero(masks[DROP_NONFINITE_TXT]).tolist() == [1]
    assert np.flatnonzero(masks[DROP_ZERO_IMG]).tolist() == [2]
    assert np.flatnonzero(masks[DROP_ZERO_TXT]).tolist() == [3]
    assert sum(int(m.sum()) for m in masks.values()) == 4


def test_vectors_whose_float32_norm_underflows_or_overflows_are_dropped():
    """All components 1e-30: the squares underflow to 0 (0/0 = NaN); one component 1e20: its
    square overflows (x/inf = 0). Neither may reach embed/ as NaN or a zero vector."""
    img = np.ones((4, 8), np.float32)
    txt = np.ones((4, 8), np.float32)
    img[0] = 1e-30
    img[1, 3] = 1e20
    txt[2] = 1e-30
    masks = invalid_rows(img, txt)
    assert np.flatnonzero(masks[DROP_UNNORMALIZABLE_IMG]).tolist() == [0, 1]
    assert np.flatnonzero(masks[DROP_UNNORMALIZABLE_TXT]).tolist() == [2]
    kept = ~(masks[DROP_UNNORMALIZABLE_IMG] | masks[DROP_UNNORMALIZABLE_TXT])
    assert np.isfinite(normalize(img[kept])).all() and kept.tolist() == [False, False, False, True]


def test_normalize_float16_large_values_without_overflow():
    x = np.full((2, 8), 60000, np.float16)  # squares overflow float16
    unit = normalize(x)
    assert unit.dtype == np.float32
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)


def test_clip_score_is_cosine_of_unit_vectors():
    img = normalize(np.array([[3.0, 4.0], [1.0, 0.0]]))
    txt = normalize(np.array([[4.0, 3.0], [0.0, 2.0]]))
    assert np.allclose(clip_scores(img, txt), [24 / 25, 0.0], atol=1e-7)


def test_float16_storage_is_renormalised_on_read():
    x = normalize(np.random.default_rng(0).standard_normal((100, 768)))
    stored = x.astype(np.float16)
    back = to_unit_float32(stored)
    assert back.dtype == np.float32
    assert np.allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-6)
    assert to_unit_float32(x) is x  # float32 rows are used as stored
