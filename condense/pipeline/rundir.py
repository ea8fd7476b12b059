"""The run directory users inspect (DESIGN.md 3): config.yaml, manifest.json, one folder per stage.

Completion marks are written last and atomically (temporary file, fsync, rename), so a folder
without `_stage.json` is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

STAGE_MARK = "_stage.json"
PROGRESS_MARK = "_progress.json"
PARTS_DIR = "_parts"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for writing; on success it replaces `path`
    (fsynced first), so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def atomic_write_npy(path: Path, array) -> None:
    """Save a numpy array atomically (np.save format)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


class RunDir:
    """Paths and marks of one run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def stage_mark(self, stage: str) -> dict | None:
        """The stage's completion record, or None when it has not completed."""
        return read_json(self.stage_dir(stage) / STAGE_MARK)

    def write_stage_mark(self, stage: str, record: dict) -> None:
        atomic_write_json(self.stage_dir(stage) / STAGE_MARK, record)

    def progress_mark(self, stage: str) -> dict | None:
        return read_json(self.stage_dir(stage) / PROGRESS_MARK)

    def start_stage(self, stage: str, fingerprint: str, resume: bool) -> bool:
        """Prepare a stage folder; returns True when finished parts of an interrupted run are kept.

        Without `resume`, or when the leftover parts were made with other settings, the folder is
        emptied: a half-written stage is never trusted.
        """
        folder = self.stage_dir(stage)
        progress = self.progress_mark(stage)
        keep = resume and progress is not None and progress.get("fingerprint") == fingerprint
        if not keep:
            self.clear_stage(stage)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAGE_MARK).unlink(missing_ok=True)
        atomic_write_json(
            folder / PROGRESS_MARK, {"fingerprint": fingerprint, "started": time.time()}
        )
        return keep

    def clear_stage(self, stage: str) -> None:
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)

    def finish_stage(self, stage: str, record: dict) -> None:
        """Write the completion mark last, then drop the progress mark."""
        self.write_stage_mark(stage, record)
        (self.stage_dir(stage) / PROGRESS_MARK).unlink(missing_ok=True)

    def manifest(self) -> dict:
        return read_json(self.root / MANIFEST) or {"stages": {}}

    def update_manifest(self, stage: str, entry: dict | None) -> None:
        manifest = self.manifest()
        if entry is None:
            manifest["stages"].pop(stage, None)
        else:
            manifest["stages"][stage] = entry
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(self.root / MANIFEST, manifest)
