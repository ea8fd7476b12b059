import numpy as np
import pytest

from condense.cores.bands import band_bounds, band_mask, descending_key


def test_floors_are_exact_decimals():
    assert band_bounds(180, 0.15, 0.35) == (27, 63)  # 0.35 * 180 is 62.99999... in binary
    assert int(0.35 * 180) == 62  # the trap the exact floor avoids
    assert band_bounds(10, 0.40, 0.60) == (4, 6)
    assert band_bounds(7, 0.4, 0.6) == (2, 4)
    assert band_bounds(0, 0.4, 0.6) == (0, 0)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        band_bounds(10, 0.6, 0.4)


def test_descending_key_orders_floats_exactly():
    s = np.array([0.5, -1.0, 0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 0.25], np.float32)
    order = np.argsort(descending_key(s), kind="stable")
    assert s[order].tolist() == sorted(s.tolist(), reverse=True)
    k = descending_key(s)
    assert k[2] == k[3]  # 0.0 and -0.0 are the same score
    with pytest.raises(ValueError, match="NaN"):
        descending_key(np.array([np.nan], np.float32))


def test_band_mask_ties_by_sample_id():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1], np.float32)
    ids = np.array(["e", "c", "a", "b", "d"], dtype=object)
    # Ranks: e(0.9), a, b, c (0.5 by id), d(0.1); band 0.2-0.6 of 5 -> ranks 1, 2 -> a, b.
    assert ids[band_mask(scores, ids, 0.2, 0.6)].tolist() == ["a", "b"]
