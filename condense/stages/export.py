"""Settings of the export stage (WebDataset shards of the coreset); the stage comes with the
images issue."""

from __future__ import annotations

from pydantic import Field

from condense.strict import StrictModel


class ExportConfig(StrictModel):
    """WebDataset export of the coreset (img2dataset layout)."""

    shard_size: int = Field(10_000, ge=1)  # samples per output tar
