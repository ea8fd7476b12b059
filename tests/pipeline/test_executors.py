"""The local executor writes the run directory the Ray executor writes: the same part files,
shards, centroids and coreset, byte for byte; the same counts in every `_stage.json`."""

from __future__ import annotations

import json
from pathlib import Path

from condense.pipeline.runner import STAGE_NAMES, run_pipeline
from tests.conftest import make_config, quiet_log

TIMING = ("finished", "nodes", "node", "rows_per_second", "duration", "start_time", "end_time")
# All bytes moved include the part records', which hold seconds and node ids; the vector
# bytes (vector_bytes_read, vector_bytes_written) are compared exactly.
TIMING += ("bytes_read", "bytes_written")


TIMED_FILES = ("_parts/", "_stats.json")  # files that record seconds (their sizes vary)
# Files that name the input: where each run's own copy of a generated corpus lies, and when
# it was written (embed/_vectors.json); what they point at is compared through the vectors.
TIMED_FILES += ("_vectors.json",)


def untimed(value):
    """A record without what depends on the clock or the machine: seconds, node ids, and the
    sizes of the files that record them."""
    if isinstance(value, dict):
        return {
            k: untimed(v)
            for k, v in value.items()
            if k not in TIMING
            and not k.endswith("seconds")
            and not any(t in k for t in TIMED_FILES)
        }
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def stage_files(run: Path) -> dict[str, Path]:
    out = {}
    for stage in STAGE_NAMES:
        for path in sorted((run / stage).rglob("*")):
            rel = path.relative_to(run)
            if path.is_file() and "_parts" not in rel.parts and path.name not in TIMED_FILES:
                out[str(rel)] = path
    return out


def assert_same_run(a: Path, b: Path) -> int:
    """Every stage file equal (records compared without their timings); returns how many."""
    files_a, files_b = stage_files(a), stage_files(b)
    assert sorted(files_a) == sorted(files_b)
    for name, path in files_a.items():
        if name.endswith(".json") and not name.endswith("coreset.json"):
            got, want = json.loads(path.read_text()), json.loads(files_b[name].read_text())
            assert untimed(got) == untimed(want), name
        else:
            assert path.read_bytes() == files_b[name].read_bytes(), name
    return len(files_a)


def test_local_and_ray_executors_write_the_same_run_on_planted_data(ray_session, tmp_path):
    cfg = make_config(
        input={"kind": "synth", "synth": {"n": 3000, "dim": 32, "rows_per_file": 1000}},
        cluster={"k": 6},
        sample={"n": 50},
    )
    run_pipeline(cfg, tmp_path / "ray", log=quiet_log, executor="ray")
    run_pipeline(cfg, tmp_path / "local", log=quiet_log, executor="local")
    assert assert_same_run(tmp_path / "ray", tmp_path / "local") > 20
    manifest = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert manifest["stages"]["sample"]["rows_out"] == 50
    # The Ray workers' bytes reach the driver's records: the same vectors moved as locally.
    ray_embed = json.loads((tmp_path / "ray" / "embed" / "_stage.json").read_text())
    assert ray_embed["vector_bytes_read"] == 3000 * 2 * 32 * 2  # img + txt, float16 input


def test_local_and_ray_executors_write_the_same_run_on_the_image_demo(demo_run, tmp_path):
    """The demo's own config on the shards its Ray run downloaded (a second download would
    order their members differently), run again on the local executor."""
    import shutil

    from condense.config import load_config
    from condense.readers.urls import DONE, STARTED
    from condense.storage.rundir import claim

    local = claim(tmp_path / "local")
    for name in (DONE, STARTED):
        (local / "input").mkdir(exist_ok=True)
        shutil.copy(demo_run / "input" / name, local / "input" / name)
    shutil.copytree(demo_run / "input" / "download", local / "input" / "download")
    config = load_config(demo_run / "config.yaml")
    run_pipeline(config, local, log=quiet_log, progress=False, executor="local")
    n = assert_same_run(demo_run, local)
    assert (local / "export" / "coreset.json").exists() and n > 20
