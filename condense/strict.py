"""The base of every config object (strict types, unknown keys rejected, immutable), and how
YAML files and `--set key=value` overrides become one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from condense.errors import ConfigError


class StrictModel(BaseModel):
    """A config section. Unknown keys and wrong types fail at once, naming the key."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Fields that change how a stage runs but not what it computes (worker counts, devices):
    # they are left out of the fingerprint, so changing them does not rerun a finished stage.
    runtime_fields: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that decide this section's results."""
        data = self.model_dump(mode="json")
        return {key: value for key, value in data.items() if key not in self.runtime_fields}


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, section by section (nested mappings merged)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(data: dict[str, Any], model: type[StrictModel], origin: str = "config"):
    """Validate a config mapping into `model`; errors name each bad key by its dotted path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] not in ("extra_forbidden", "missing") and "input" in err:
                msg += f" (got {err['input']!r})"
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"invalid config {origin}:\n" + "\n".join(lines)) from None


def load_yaml(path: str | Path, model: type[StrictModel], overrides: list[str] | None = None):
    """Load a YAML config into `model`, applying --set overrides (`key.sub=value`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = merge(data, parse_overrides(overrides or []))
    return validate(data, model, str(path))
