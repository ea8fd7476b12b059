"""Settings of the selection stages (dedup, clip band, centroid band, sample) and of export.

They are validated now so that recipe files are complete and checked; the stages that use them
come with the condensation-core and export issues.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from condense.strict import StrictModel

KeepRule = Literal["middle", "far", "near", "clip_max", "random"]


class DedupConfig(StrictModel):
    """SemDeDup-style graph dedup inside each cluster."""

    threshold: float = Field(0.86, gt=0.0, le=1.0)  # cosine similarity; edge iff sim > threshold
    thresholds: list[float] = []  # extra thresholds whose kept flags are written from the same pass
    keep: KeepRule = "middle"  # which member of each connected component is kept
    seed: int = 0  # seeds the `random` keep rule

    @model_validator(mode="after")
    def _check_thresholds(self):
        for t in self.thresholds:
            if not 0.0 < t <= 1.0:
                raise ValueError(f"dedup.thresholds: {t} is outside (0, 1]")
        return self


class BandConfig(StrictModel):
    """Keep ranks floor(lo*N) <= r < floor(hi*N) of a score sorted descending (ties by sample_id)."""

    lo: float = Field(ge=0.0, le=1.0)  # start of the kept band, as a fraction of rows
    hi: float = Field(ge=0.0, le=1.0)  # end of the kept band (exclusive), as a fraction of rows

    @model_validator(mode="after")
    def _check_order(self):
        if self.lo >= self.hi:
            raise ValueError(f"lo ({self.lo}) must be smaller than hi ({self.hi})")
        return self


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


class ExportConfig(StrictModel):
    """WebDataset export of the coreset (img2dataset layout)."""

    shard_size: int = Field(10_000, ge=1)  # samples per output tar
