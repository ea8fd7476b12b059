"""Stages clip_band, centroid_band and sample on a real Ray: exact ranks by the floor formula
with ties on the score, chained on the right rows, and the same rows at any part count."""

from decimal import Decimal

import numpy as np
import pytest

from condense.cores.hashing import hash_ids
from condense.schema import (
    CENTROID_COS,
    CLIP_SCORE,
    KEPT,
    SAMPLE_ID,
)
from condense.stages.bands import CentroidBandStage, ClipBandStage
from condense.stages.sample import SampleStage
from tests.conftest import make_config
from tests.stages.upstream import read_stage, run_stage, write_dedup


def dedup_rows(n=400, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"k{int(v):06d}" for v in rng.choice(10**6, n, replace=False)], dtype=object)
    return {
        SAMPLE_ID: ids,
        KEPT: rng.random(n) < 0.8,
        # Two decimals: many rows share a score, so ties must be broken by sample_id.
        CLIP_SCORE: np.round(rng.normal(0.3, 0.05, n), 2).astype(np.float32),
        CENTROID_COS: np.round(rng.uniform(0.4, 0.9, n), 2).astype(np.float32),
    }


def band_reference(ids, scores, lo, hi):
    """Sort by score descending, ties by id; keep ranks floor(lo*N) <= r < floor(hi*N)."""
    n = len(ids)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), ids[i]))
    a, b = int(Decimal(str(lo)) * n), int(Decimal(str(hi)) * n)
    return {ids[i] for i in order[a:b]}


def sample_reference(ids, n, seed):
    h = hash_ids(list(ids), seed)
    return set(np.asarray(ids)[np.lexsort((np.asarray(ids), h))[:n]].tolist())


def kept_ids(table):
    return set(table.filter(table.column(KEPT)).column(SAMPLE_ID).to_pylist())


def run_chain(run_dir, rows, parts, **sections):
    write_dedup(run_dir, rows, parts=parts, seed=parts)
    cfg = make_config("/unused", **sections)
    marks = [
        run_stage(run_dir, s, cfg) for s in (ClipBandStage(), CentroidBandStage(), SampleStage())
    ]
    return marks, [read_stage(run_dir, s) for s in ("clip_band", "centroid_band", "sample")]


def test_bands_and_sample_match_a_single_machine_sort(tmp_path):
    rows = dedup_rows()
    sections = {
        "clip_band": {"lo": 0.4, "hi": 0.6},
        "centroid_band": {"lo": 0.15, "hi": 0.35},
        "sample": {"n": 5, "seed": 3},
    }
    marks, (clip, cent, sample) = run_chain(tmp_path, rows, 3, **sections)
    survivors = rows[KEPT]
    ids, clip_score = rows[SAMPLE_ID][survivors], rows[CLIP_SCORE][survivors]
    # clip band: one row per dedup survivor, the band by the floor formula.
    assert sorted(clip.column(SAMPLE_ID).to_pylist()) == sorted(ids.tolist())
    clip_kept = band_reference(ids, clip_score, 0.4, 0.6)
    assert kept_ids(clip) == clip_kept
    # centroid band: ranks only the clip band's survivors (not every dedup survivor).
    in_band = np.isin(rows[SAMPLE_ID], list(clip_kept))
    cent_kept = band_reference(rows[SAMPLE_ID][in_band], rows[CENTROID_COS][in_band], 0.15, 0.35)
    assert len(cent) == len(clip_kept) and kept_ids(cent) == cent_kept
    wrong_set = band_reference(ids, rows[CENTROID_COS][survivors], 0.15, 0.35)
    assert kept_ids(cent) != wrong_set  # the public script's mistake would be caught
    assert kept_ids(sample) == sample_reference(sorted(cent_kept), 5, 3)
    # Scores are written beside the flags; the funnel adds up.
    assert np.allclose(sorted(clip.column(CLIP_SCORE).to_numpy()), sorted(clip_score), atol=0)
    n = int(survivors.sum())
    assert marks[0]["rows_in"] == n and marks[0]["rows_out"] == len(clip_kept)
    assert marks[0]["dropped"] == {
        "above_band": int(Decimal("0.4") * n),
        "below_band": n - int(Decimal("0.6") * n),
    }
    assert marks[2]["dropped"] == {"not_sampled": len(cent_kept) - 5}


def test_exact_floors_and_ties(tmp_path):
    # N = 180 rows: floor(0.35 * 180) is 63 (in binary floating point it would be 62).
    rows = dedup_rows(n=180, seed=1)
    rows[KEPT][:] = True
    rows[CLIP_SCORE][:] = np.float32(0.25)  # every score tied: the band is by sample_id
    rows[CLIP_SCORE][:10] = np.float32(0.9)
    _, (clip, _, _) = run_chain(
        tmp_path, rows, 4, clip_band={"lo": 0.35, "hi": 0.6}, centroid_band={"lo": 0.0, "hi": 1.0}
    )
    assert len(kept_ids(clip)) == 108 - 63
    assert kept_ids(clip) == band_reference(rows[SAMPLE_ID], rows[CLIP_SCORE], 0.35, 0.6)
    ties = sorted(rows[SAMPLE_ID][10:].tolist())
    assert kept_ids(clip) == set(ties[63 - 10 : 108 - 10])


def test_same_rows_at_any_part_count_and_seed_matters(tmp_path):
    rows = dedup_rows(seed=2)
    sections = {"sample": {"n": 5, "seed": 1}}
    results = [run_chain(tmp_path / str(p), rows, p, **sections)[1] for p in (1, 4)]
    for a, b in zip(*results, strict=True):
        assert kept_ids(a) == kept_ids(b)
        assert a.sort_by(SAMPLE_ID).equals(b.sort_by(SAMPLE_ID))
    _, other = run_chain(tmp_path / "seed", rows, 4, sample={"n": 5, "seed": 2})
    assert len(kept_ids(results[0][2])) == len(kept_ids(other[2])) == 5
    assert kept_ids(other[2]) != kept_ids(results[0][2])


@pytest.mark.parametrize(
    ("sample", "expect"),
    [({"n": 10_000}, "all"), ({"n": 0}, 0), ({"n": None, "fraction": 0.35}, "fraction")],
)
def test_sample_sizes(tmp_path, sample, expect):
    rows = dedup_rows(seed=3)
    marks, (_, cent, out) = run_chain(
        tmp_path,
        rows,
        2,
        clip_band={"lo": 0.0, "hi": 1.0},
        centroid_band={"lo": 0.0, "hi": 1.0},
        sample=sample,
    )
    n = len(cent)
    want = {"all": n, 0: 0, "fraction": int(Decimal("0.35") * n)}[expect]
    assert len(out) == n and len(kept_ids(out)) == want
    if expect == "all":
        assert "only" in marks[2]["warning"]  # more asked than available: all kept, with a warning


def test_nothing_entering_gives_empty_outputs(tmp_path):
    rows = dedup_rows(seed=4)
    rows[KEPT][:] = False  # dedup kept nothing
    marks, outputs = run_chain(tmp_path, rows, 3)
    for mark, table in zip(marks, outputs, strict=True):
        assert mark["rows_in"] == 0 and mark["rows_out"] == 0
        assert len(table) == 0
