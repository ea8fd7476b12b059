"""Stage `sample`: a seeded uniform sample of the centroid band's survivors (DESIGN.md 2).

The sample is the n rows with the smallest hash(seed, sample_id) (ties by sample_id): it depends
only on the seed and the set of surviving ids, never on partitioning, worker count or order.
Writes sample/part-*.parquet: sample_id, kept; one row per entering row.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from condense.cores.hashing import hash_ids
from condense.schema import KEPT, SAMPLE_ID
from condense.stages.ranked import RankedStage
from condense.strict import StrictModel


class SampleConfig(StrictModel):
    """Seeded uniform sample of the survivors: exactly one of n and fraction."""

    n: int | None = Field(2_000_000, ge=0)  # rows to keep; fewer survivors: keep all and warn
    fraction: float | None = Field(None, gt=0.0, le=1.0)  # or a fraction of the survivors
    seed: int = 0  # the sample depends only on this seed and the surviving sample_ids

    @model_validator(mode="after")
    def _one_of(self):
        if (self.n is None) == (self.fraction is None):
            raise ValueError("set exactly one of sample.n and sample.fraction (the other to null)")
        return self

    def size(self, available: int) -> int:
        """Rows to keep out of `available`: n (at most all), or floor(fraction * available)
        with the fraction read as the decimal it was written as."""
        if self.n is not None:
            return min(self.n, available)
        return int(Fraction(repr(self.fraction)) * available)


class SampleStage(RankedStage):
    name = "sample"
    inputs: list[str] = []
    reads = {"centroid_band": (SAMPLE_ID, KEPT)}
    writes = (SAMPLE_ID, KEPT)

    def settings(self, config):
        return [config.sample.fingerprint_dict()]

    def keys(self, rows: pa.Table, settings: dict) -> np.ndarray:
        return hash_ids(rows.column(SAMPLE_ID), int(settings["seed"]))

    def ranks(self, ctx, n):
        cfg = ctx.config.sample
        take = cfg.size(n)
        notes = {}
        if cfg.n is not None and cfg.n > n:
            notes["warning"] = (
                f"sample.n={cfg.n:,} but only {n:,} rows survived the bands; kept all of them"
            )
            ctx.log(f"[sample] warning: {notes['warning']}")
        return 0, take, {"not_sampled": n - take}, notes
