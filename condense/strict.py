"""The base of every config object: strict types, unknown keys rejected, immutable."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


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
