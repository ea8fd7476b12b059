"""Stages `clip_band` and `centroid_band`: exact rank bands (DESIGN.md 2).

Over the N rows entering a band, sorted by the score descending, ties by sample_id ascending,
keep the 0-based ranks floor(lo*N) <= r < floor(hi*N) (floors exact in decimal). The clip band
ranks dedup's survivors by clip_score; the centroid band ranks only the clip band's survivors by
centroid_cos. Writes <stage>/part-*.parquet: sample_id, the score, kept; one row per entering row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from condense.cores.bands import band_bounds, descending_key
from condense.schema import (
    CENTROID_COS,
    CLIP_SCORE,
    KEPT,
    SAMPLE_ID,
)
from condense.stages.ranked import RankedStage
from condense.strict import StrictModel


class BandConfig(StrictModel):
    """Keep ranks floor(lo*N) <= r < floor(hi*N) of a score sorted descending (ties by sample_id)."""

    lo: float = Field(ge=0.0, le=1.0)  # start of the kept band, as a fraction of rows
    hi: float = Field(ge=0.0, le=1.0)  # end of the kept band (exclusive), as a fraction of rows

    @model_validator(mode="after")
    def _check_order(self):
        if self.lo >= self.hi:
            raise ValueError(f"lo ({self.lo}) must be smaller than hi ({self.hi})")
        return self


class _BandStage(RankedStage):
    score: str  # the ranked column

    def settings(self, config):
        return [getattr(config, self.name).fingerprint_dict()]

    def keys(self, rows: pa.Table, settings: dict) -> np.ndarray:
        scores = rows.column(self.score).to_numpy()
        return descending_key(scores).astype(np.uint64)

    def ranks(self, ctx, n):
        cfg = getattr(ctx.config, self.name)
        r_lo, r_hi = band_bounds(n, cfg.lo, cfg.hi)
        return r_lo, r_hi, {"above_band": r_lo, "below_band": n - r_hi}, {}


class ClipBandStage(_BandStage):
    name = "clip_band"
    score = CLIP_SCORE
    inputs = [CLIP_SCORE]
    reads = {"dedup": (SAMPLE_ID, KEPT, CLIP_SCORE)}
    writes = (SAMPLE_ID, CLIP_SCORE, KEPT)


class CentroidBandStage(_BandStage):
    name = "centroid_band"
    score = CENTROID_COS
    inputs = [CENTROID_COS]
    reads = {"dedup": (SAMPLE_ID, KEPT, CENTROID_COS), "clip_band": (SAMPLE_ID, KEPT)}
    writes = (SAMPLE_ID, CENTROID_COS, KEPT)
