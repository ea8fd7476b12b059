"""The pipeline's config: YAML files validated strictly into typed sections (DESIGN.md 7).

    cfg = load_config("configs/demo.yaml", ["cluster.k=32", "input.path=/data/emb"])

An unknown key, a wrong type or a bad value fails at once with the key's dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from condense.errors import ConfigError
from condense.readers import InputConfig
from condense.runtime import RayConfig
from condense.stages.bands import BandConfig
from condense.stages.cluster import ClusterConfig
from condense.stages.dedup import DedupConfig
from condense.stages.embed import EmbedConfig
from condense.stages.export import ExportConfig
from condense.stages.sample import SampleConfig
from condense.strict import StrictModel


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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars or lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example cluster.k=1000")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is set twice with different shapes")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any], origin: str = "config", model=None) -> PipelineConfig:
    """Validate a config mapping (a PipelineConfig unless `model` names another config class);
    errors name each bad key by its dotted path."""
    try:
        return (model or PipelineConfig).model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] not in ("extra_forbidden", "missing") and "input" in err:
                msg += f" (got {err['input']!r})"
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"invalid config {origin}:\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, model=None) -> PipelineConfig:
    """Load a YAML config and apply --set overrides (a PipelineConfig unless `model` says)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data, str(path), model)
