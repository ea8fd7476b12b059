"""The pipeline's config: YAML files validated strictly into typed sections (DESIGN.md 7).

    cfg = load_config("configs/demo.yaml", ["cluster.k=32", "input.path=/data/emb"])

An unknown key, a wrong type or a bad value fails at once with the key's dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from condense.readers import InputConfig
from condense.runtime import EXECUTORS, RayConfig
from condense.stages.bands import BandConfig
from condense.stages.cluster import ClusterConfig
from condense.stages.dedup import DedupConfig
from condense.stages.embed import EmbedConfig
from condense.stages.export import ExportConfig
from condense.stages.sample import SampleConfig
from condense.strict import StrictModel, load_yaml, validate


class PipelineConfig(StrictModel):
    """A whole condense run."""

    input: InputConfig
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    dedup: DedupConfig = DedupConfig()
    clip_band: BandConfig = Field(default_factory=lambda: BandConfig(lo=0.40, hi=0.60))
    centroid_band: BandConfig = Field(default_factory=lambda: BandConfig(lo=0.15, hi=0.35))
    sample: SampleConfig = SampleConfig()
    export: ExportConfig = ExportConfig()
    ray: RayConfig = RayConfig()
    # ray: stages run on Ray (local or a cluster); local: in this process, no Ray (for pdb and
    # unit tests). Both write the same data files, byte for byte.
    executor: Literal[EXECUTORS] = "ray"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def config_from_dict(data: dict[str, Any], origin: str = "config", model=None) -> PipelineConfig:
    """Validate a config mapping (a PipelineConfig unless `model` names another config class);
    errors name each bad key by its dotted path."""
    return validate(data, model or PipelineConfig, origin)


def load_config(path: str | Path, overrides: list[str] | None = None, model=None) -> PipelineConfig:
    """Load a YAML config and apply --set overrides (a PipelineConfig unless `model` says)."""
    return load_yaml(path, model or PipelineConfig, overrides)
