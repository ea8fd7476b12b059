"""Run directories and inputs in an object store: a real S3 server (SeaweedFS) on 127.0.0.1.

What differs from a local disk (storage/fs.py): no rename (files are uploaded under their final
name when complete), create-only marks and lock, scratch read by byte ranges. What must not
differ: the output, resume, the one-driver rule and every bad-input rule."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from condense.errors import CondenseError
from condense.pipeline.runner import run_pipeline
from condense.storage.files import atomic_file, create_once, read_json
from condense.storage.fs import location, sizes_under
from condense.storage.parts import part_files, read_table
from condense.storage.rundir import RunLock
from tests.conftest import make_config, quiet_log

STAGES = ("embed", "cluster", "dedup", "clip_band", "centroid_band", "sample", "export")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_once_lets_exactly_one_writer_win(where, tmp_path, request):
    root = request.getfixturevalue("s3_prefix") if where == "s3" else str(tmp_path)
    path = location(root) / "mark.json"
    assert create_once(path, b'{"a": 1}')
    assert not create_once(path, b'{"a": 2}')
    assert read_json(path) == {"a": 1}


def test_an_upload_that_fails_leaves_nothing(s3_prefix):
    path = location(s3_prefix) / "part-00000.parquet"
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half a part")
        raise RuntimeError("killed mid-write")
    assert not path.exists()


def small_config(**sections):
    return make_config(
        None,
        input={"kind": "synth", "synth": {"n": 3000, "dim": 32, "rows_per_file": 1000}},
        cluster={"k": 6},
        dedup={"rows_per_task": 400, "scatter_rows": 1000},
        sample={"n": 300},
        **sections,
    )


def stage_tables(root) -> dict:
    return {s: read_table(part_files(location(root) / s)) for s in STAGES}


def test_the_pipeline_on_s3_writes_what_it_writes_locally(s3_prefix, tmp_path):
    config = small_config()
    expected = run_pipeline(config, tmp_path / "run", log=quiet_log, progress=False)
    manifest = run_pipeline(config, s3_prefix, log=quiet_log, progress=False)
    for stage in STAGES:
        for key in ("rows_in", "rows_out", "dropped", "config_hash"):
            assert manifest["stages"][stage][key] == expected["stages"][stage][key], (stage, key)
    assert manifest["stages"]["dedup"]["rows_out"] < 3000
    local, remote = stage_tables(tmp_path / "run"), stage_tables(s3_prefix)
    for stage in STAGES:
        assert remote[stage].equals(local[stage]), stage
    names = sizes_under(s3_prefix)
    assert not [n for n in names if "_by_cluster" in n or n.endswith(".tmp")]  # scratch gone
    assert "_lock.json" not in names  # released
    mark = read_json(location(s3_prefix) / "dedup" / "_stage.json")
    assert mark["status"] == "complete" and "_plan.json" in mark["files"]
    # A rerun skips every stage; the coreset is readable straight from the store.
    log = []
    run_pipeline(config, s3_prefix, log=log.append, progress=False)
    assert sum("skipped" in line for line in log) == len(STAGES)
    first = str(part_files(location(s3_prefix) / "export")[0])
    assert first.startswith("s3://") and pq.read_table(first).num_rows > 0


def test_a_second_driver_is_refused_on_s3(s3_prefix):
    with RunLock(s3_prefix, log=quiet_log):
        other = RunLock(s3_prefix, log=quiet_log)
        other.token = None
        with pytest.raises(CondenseError, match="is in use by host"):
            run_pipeline(small_config(), s3_prefix, log=quiet_log, progress=False)
    run_pipeline(small_config(), s3_prefix, until="embed", log=quiet_log, progress=False)
