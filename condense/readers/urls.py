"""input.kind urls: a Parquet of url + caption, downloaded with img2dataset into WebDataset shards.

The download goes to RUN/input/download/ in img2dataset's own layout (`{shard}.tar`, `.parquet`,
`_stats.json`), and from there the shards are embedded exactly like input.kind webdataset.
img2dataset runs in a subprocess of a Ray task: it installs signal handlers and starts its own
process pool, and its pins (webdataset<0.3, pandas<3, wandb) stay an install-time matter.
Its incremental mode makes an interrupted download resume shard by shard; a changed input or
download setting starts the folder afresh. Failed rows are counted from its `_stats.json` files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from condense.errors import InputError
from condense.readers.download_guard.sitecustomize import REFUSED
from condense.readers.shards import ShardLimits
from condense.storage.files import atomic_write_json, content_digest, read_json
from condense.storage.fs import filesystem, is_url, location, remove_tree
from condense.storage.parts import read_table
from condense.strict import StrictModel

GUARD_DIR = Path(__file__).with_name("download_guard")  # put on img2dataset's PYTHONPATH
REFUSED_PREFIXES = (REFUSED, f"<urlopen error {REFUSED}")  # as img2dataset records the errors

# Beside the download folder (img2dataset reads every *.json inside it as a shard's stats):
DONE = "download.json"  # written after img2dataset finished: the settings and its totals
STARTED = "download-started.json"  # the settings of the download in progress


class DownloadConfig(StrictModel):
    """img2dataset settings for input.kind urls (its own defaults, named as it names them), and
    condense's bounds on what a download may reach and cost (see download_guard/)."""

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
    # condense's own settings (not passed to img2dataset):
    # Networks fetched although they are not public (CIDRs, e.g. ["127.0.0.1/32"] for a server
    # on this machine); by default loopback, private, link-local and metadata addresses are not.
    allow_networks: tuple[str, ...] = ()
    max_response_bytes: int = Field(64 << 20, ge=1)  # larger responses are refused
    max_response_seconds: float = Field(60.0, gt=0)  # slower responses are refused
    max_seconds: float = Field(7 * 24 * 3600.0, gt=0)  # the whole img2dataset run; then an error

    guard_fields: ClassVar[frozenset[str]] = frozenset(
        {"allow_networks", "max_response_bytes", "max_response_seconds", "max_seconds"}
    )
    runtime_fields = frozenset({"max_seconds"})

    @field_validator("allow_networks", mode="before")
    @classmethod
    def _networks(cls, value):
        networks = tuple(value) if isinstance(value, list | tuple) else value
        for network in networks if isinstance(networks, tuple) else ():
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network (CIDR such as 10.0.0.0/8): {network!r}") from exc
        return networks

    def img2dataset_args(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in self.guard_fields}

    def guard_settings(self) -> dict:
        return {
            "allow_networks": list(self.allow_networks),
            "max_bytes": self.max_response_bytes,
            "max_seconds": self.max_response_seconds,
        }


def download_command(
    url_list: str,
    out: Path,
    cfg: DownloadConfig,
    url_col: str,
    caption_col: str,
    extra: list[str],
    limits: ShardLimits,
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
        # img2dataset checks these after decoding; OPENCV_IO_MAX_IMAGE_PIXELS (set by
        # run_download) stops OpenCV from decoding a larger image at all.
        "max_image_area": limits.max_pixels,
        "max_aspect_ratio": limits.max_aspect_ratio,
        **cfg.img2dataset_args(),
    }
    # The guard (this folder's sitecustomize) is imported at start-up by this process and by
    # every worker img2dataset spawns; refuse to download if it is not in place.
    code = (
        "import json, sys, sitecustomize; "
        "assert sitecustomize.INSTALLED, 'the condense download guard is not installed'; "
        "from img2dataset import download; download(**json.loads(sys.argv[1]))"
    )
    return [sys.executable, "-c", code, json.dumps(args)]


def run_download(input_cfg, out: str) -> dict:
    """Download input.path into `out` unless a finished download with the same settings is there.
    Returns the totals img2dataset reported: count, successes, failed_to_download, ..."""
    out_dir = location(out)
    source = location(input_cfg.path)
    if not source.is_file():
        raise InputError(f"input.path {source} is not a Parquet file of urls")
    if is_url(source):  # the store's content hash stands for the file's version
        fs, inner = filesystem(source)
        info = fs.info(inner)
        version = {
            "size": int(info["size"]),
            "digest": content_digest(fs, inner, info["size"], info),
        }
        source_name = str(source)
    else:
        version = {"size": source.stat().st_size, "mtime": source.stat().st_mtime_ns}
        source_name = str(source.resolve())
    wanted = {
        "input": source_name,
        **version,
        "download": input_cfg.download.fingerprint_dict(),
        "limits": [input_cfg.limits.max_pixels, input_cfg.limits.max_aspect_ratio],
        "columns": [input_cfg.url_column, input_cfg.caption_column, input_cfg.id_column],
    }
    done = read_json(out_dir.parent / DONE)
    if done is not None and done.get("settings") == wanted:
        return done["totals"]
    if out_dir.exists() and read_json(out_dir.parent / STARTED) != wanted:
        remove_tree(out_dir)  # a different download was here: start afresh
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir.parent / DONE).unlink(missing_ok=True)
    atomic_write_json(out_dir.parent / STARTED, wanted)
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations would check PyPI for updates
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(GUARD_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
        "CONDENSE_DOWNLOAD_GUARD": json.dumps(input_cfg.download.guard_settings()),
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(input_cfg.limits.max_pixels),
    }
    extra = [input_cfg.id_column] if input_cfg.id_column else []
    cmd = download_command(
        source_name,
        out_dir,
        input_cfg.download,
        input_cfg.url_column,
        input_cfg.caption_column,
        extra,
        input_cfg.limits,
    )
    returncode, stderr = _run_bounded(cmd, env, input_cfg.download.max_seconds, source)
    if returncode != 0:
        if "No module named 'img2dataset'" in stderr:
            raise InputError("input.kind urls needs img2dataset: pip install 'condense[urls]'")
        raise InputError(f"img2dataset failed on {source}:\n{stderr[-2000:]}")
    totals = download_totals(out_dir)
    atomic_write_json(out_dir.parent / DONE, {"settings": wanted, "totals": totals})
    return totals


def _run_bounded(cmd: list[str], env: dict, seconds: float, source: Path) -> tuple[int, str]:
    """Run img2dataset in its own process group; past `seconds`, stop the whole group."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise InputError(
            f"img2dataset on {source} ran longer than input.download.max_seconds ({seconds:g} s) "
            "and was stopped; rerun to continue (finished shards are kept)"
        ) from None
    return proc.returncode, stderr


def download_totals(out_dir: Path) -> dict:
    """Sum of img2dataset's per-shard `_stats.json` counts, with the urls the guard refused
    (`refused`, read from the shards' .parquet status files) taken out of failed_to_download."""
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for path in sorted(out_dir.glob("*_stats.json"), key=str):
        stats = json.loads(path.read_text())
        for key in totals:
            totals[key] += int(stats.get(key, 0))
    refused = 0
    for path in sorted(out_dir.glob("*.parquet"), key=str):
        table = read_table(str(path), columns=["status", "error_message"])
        messages = table.column("error_message").to_pylist()
        refused += sum(1 for m in messages if m and m.startswith(REFUSED_PREFIXES))
    totals["failed_to_download"] -= refused
    totals["refused"] = refused
    return totals
