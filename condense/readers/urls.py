"""input.kind urls: a Parquet of url + caption, downloaded with img2dataset into WebDataset shards.

The download goes to RUN/input/download/ in img2dataset's own layout (`{shard}.tar`, `.parquet`,
`_stats.json`), and from there the shards are embedded exactly like input.kind webdataset.
img2dataset runs in a subprocess of a Ray task: it installs signal handlers and starts its own
process pool, and its pins (webdataset<0.3, pandas<3, wandb) stay an install-time matter.
Its incremental mode makes an interrupted download resume shard by shard; a changed input or
download setting starts the folder afresh. Failed rows are counted from its `_stats.json` files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from condense.errors import InputError
from condense.pipeline.rundir import atomic_write_json, read_json
from condense.strict import StrictModel

# Beside the download folder (img2dataset reads every *.json inside it as a shard's stats):
DONE = "download.json"  # written after img2dataset finished: the settings and its totals
STARTED = "download-started.json"  # the settings of the download in progress


class DownloadConfig(StrictModel):
    """img2dataset settings for input.kind urls (its own defaults, named as it names them)."""

    processes_count: int = Field(1, ge=1)
    thread_count: int = Field(32, ge=1)
    number_sample_per_shard: int = Field(10_000, ge=1)
    image_size: int = Field(256, ge=8)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = (
        "border"
    )
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    timeout: float = Field(10, gt=0)  # seconds per request
    retries: int = Field(0, ge=0)


def download_command(
    url_list: str, out: Path, cfg: DownloadConfig, url_col: str, caption_col: str, extra: list[str]
) -> list[str]:
    args = {
        "url_list": url_list,
        "output_folder": str(out),
        "input_format": "parquet",
        "output_format": "webdataset",
        "url_col": url_col,
        "caption_col": caption_col,
        "save_additional_columns": extra or None,
        "enable_wandb": False,
        "incremental_mode": "incremental",
        **cfg.model_dump(),
    }
    code = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"
    return [sys.executable, "-c", code, json.dumps(args)]


def run_download(input_cfg, out: str) -> dict:
    """Download input.path into `out` unless a finished download with the same settings is there.
    Returns the totals img2dataset reported: count, successes, failed_to_download, ..."""
    out_dir = Path(out)
    source = Path(input_cfg.path)
    if not source.is_file():
        raise InputError(f"input.path {source} is not a Parquet file of urls")
    wanted = {
        "input": str(source.resolve()),
        "size": source.stat().st_size,
        "mtime": source.stat().st_mtime_ns,
        "download": input_cfg.download.model_dump(),
        "columns": [input_cfg.url_column, input_cfg.caption_column, input_cfg.id_column],
    }
    done = read_json(out_dir.parent / DONE)
    if done is not None and done.get("settings") == wanted:
        return done["totals"]
    if out_dir.exists() and read_json(out_dir.parent / STARTED) != wanted:
        shutil.rmtree(out_dir)  # a different download was here: start afresh
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir.parent / DONE).unlink(missing_ok=True)
    atomic_write_json(out_dir.parent / STARTED, wanted)
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations would check PyPI for updates
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
    }
    extra = [input_cfg.id_column] if input_cfg.id_column else []
    cmd = download_command(
        str(source.resolve()),
        out_dir,
        input_cfg.download,
        input_cfg.url_column,
        input_cfg.caption_column,
        extra,
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        if "No module named 'img2dataset'" in proc.stderr:
            raise InputError("input.kind urls needs img2dataset: pip install 'condense[urls]'")
        raise InputError(f"img2dataset failed on {source}:\n{proc.stderr[-2000:]}")
    totals = download_totals(out_dir)
    atomic_write_json(out_dir.parent / DONE, {"settings": wanted, "totals": totals})
    return totals


def download_totals(out_dir: Path) -> dict:
    """Sum of img2dataset's per-shard `_stats.json` counts."""
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for path in sorted(out_dir.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        for key in totals:
            totals[key] += int(stats.get(key, 0))
    return totals
