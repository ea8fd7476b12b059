"""The run directory never loses or deletes what it should not: foreign folders are refused
untouched, one driver holds a run, damaged marks mean the work is redone, and fingerprints see
the inputs' content."""

import json
import os
import socket

import numpy as np
import pytest

from condense.errors import CondenseError, ConfigError
from condense.pipeline.runner import run_pipeline, stage_fingerprints
from condense.storage.rundir import MANIFEST, RunDir, RunLock, claim
from condense.synth import SynthConfig, generate
from tests.conftest import make_config, quiet_log


def snapshot(folder):
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
    )


def test_a_foreign_folder_is_refused_before_anything_is_touched(tmp_path):
    foreign = tmp_path / "mine"
    (foreign / "embed").mkdir(parents=True)
    (foreign / "embed" / "thesis.tex").write_text("years of work")
    (foreign / "notes.txt").write_text("keep me")
    before = snapshot(foreign)
    with pytest.raises(ConfigError, match="is not empty and is not a condense run"):
        run_pipeline(make_config(tmp_path / "in"), foreign, log=quiet_log)
    assert snapshot(foreign) == before
    with pytest.raises(ConfigError, match="is a file"):
        claim(foreign / "notes.txt")
    assert claim(tmp_path / "new").is_dir() and (tmp_path / "new" / MANIFEST).exists()
    assert claim(tmp_path / "new") == tmp_path / "new"  # a condense run is claimed again


def test_a_run_directory_inside_the_input_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="is inside the input"):
        run_pipeline(make_config(tmp_path / "in"), tmp_path / "in" / "run", log=quiet_log)
    assert not (tmp_path / "in" / "run").exists()


def test_one_driver_per_run_directory_and_stale_locks_are_taken_over(tmp_path):
    claim(tmp_path / "run")
    with (
        RunLock(tmp_path / "run"),
        pytest.raises(
            CondenseError, match=rf"in use by host {socket.gethostname()} pid {os.getpid()}"
        ),
    ):
        RunLock(tmp_path / "run").acquire()
    # A driver killed with its lock held leaves its record; nobody holds the flock any more.
    (tmp_path / "run" / "_lock.json").write_text(json.dumps({"host": "h", "pid": 4242}))
    log = []
    with RunLock(tmp_path / "run", log=log.append):
        assert json.loads((tmp_path / "run" / "_lock.json").read_text())["pid"] == os.getpid()
    assert log == [
        "[run] taking over the lock of host h pid 4242, which is gone (it was stopped or killed)"
    ]
    assert (tmp_path / "run" / "_lock.json").read_text() == ""  # a clean exit leaves no holder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    generate(out, SynthConfig(n=1200, dim=16, seed=3, rows_per_file=600))
    return out


def test_damaged_marks_and_records_mean_the_work_is_redone(small, tmp_path):
    # Scatter groups of one part each: one cluster record per part.
    cfg = make_config(
        small, embed={"rows_per_part": 300}, cluster={"k": 4}, dedup={"scatter_rows": 300}
    )
    run_pipeline(cfg, tmp_path, until="cluster", log=quiet_log, progress=False)
    run = RunDir(tmp_path)
    assert run.stage_mark("embed") and run.stage_mark("cluster")

    part = sorted((tmp_path / "cluster").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-100])  # a part no longer what its mark recorded
    assert run.stage_mark("cluster") is None
    (tmp_path / MANIFEST).write_text("{ not json")
    log = []
    run_pipeline(cfg, tmp_path, until="cluster", log=log.append, progress=False)
    assert any("[embed] complete with these settings: skipped" in line for line in log)
    assert "[cluster] running" in log and run.stage_mark("cluster")["rows_out"] == 1200
    assert set(json.loads((tmp_path / MANIFEST).read_text())["stages"]) == {"embed", "cluster"}

    # Resuming an interrupted stage: a damaged part record, or one whose part changed, is redone.
    (tmp_path / "cluster" / "_stage.json").unlink()
    (tmp_path / "cluster" / "_progress.json").write_text(
        json.dumps({"fingerprint": stage_fingerprints(cfg)["cluster"]})
    )
    records = sorted((tmp_path / "cluster" / "_parts").glob("*.json"))
    records[0].write_text("")
    parts = sorted((tmp_path / "cluster").glob("part-*.parquet"))
    parts[1].write_bytes(parts[1].read_bytes() + b"x")
    log = []
    run_pipeline(cfg, tmp_path, until="cluster", log=log.append, progress=False, resume=True)
    assert f"[cluster] resuming: {len(records) - 2} of {len(records)} parts already written" in log

    (tmp_path / "embed" / "_stage.json").write_text('{"rows_out": 12')  # cut short on a full disk
    assert run.stage_mark("embed") is None
    log = []
    run_pipeline(cfg, tmp_path, until="embed", log=log.append, progress=False)
    assert "[embed] running" in log and run.stage_mark("embed")["rows_out"] == 1200


def test_fingerprints_see_the_content_of_inputs_and_model_files(tmp_path):
    generate(tmp_path / "in", SynthConfig(n=400, dim=8, seed=0, rows_per_file=200))
    cfg = make_config(tmp_path / "in")
    before = stage_fingerprints(cfg)["embed"]
    path = tmp_path / "in" / "img_emb" / "img_emb_0.npy"
    stat = path.stat()
    values = np.load(path)
    np.save(path, values[::-1].copy())  # other values, the same shape and size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same mtime
    assert path.stat().st_size == stat.st_size
    assert stage_fingerprints(cfg)["embed"] != before

    model = tmp_path / "model.json"
    model.write_text(json.dumps({"embed_dim": 8, "width": 1}))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "0.tar").write_bytes(bytes(1024))
    images = make_config(
        shards, input={"kind": "webdataset"}, embed={"model": {"name": str(model)}}
    )
    before = stage_fingerprints(images)["embed"]
    stat = model.stat()
    model.write_text(json.dumps({"embed_dim": 8, "width": 2}))
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stage_fingerprints(images)["embed"] != before


def test_a_live_holder_on_this_host_is_refused_even_where_locks_are_not_shared(tmp_path):
    """NFS mounted with local_lock=flock gives every host its own locks: the holder's record
    still names a live process of this host, which is not taken over."""
    import subprocess
    import sys

    claim(tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": socket.gethostname(), "pid": other.pid, "started": 0}
        (tmp_path / "run" / "_lock.json").write_text(json.dumps(record))
        with pytest.raises(CondenseError, match=f"in use by host .* pid {other.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        other.kill()
        other.wait()
    with RunLock(tmp_path / "run", log=lambda _: None):  # gone now: taken over
        pass


def test_a_relative_run_directory_means_the_same_to_every_worker(small, tmp_path, monkeypatch):
    """`condense run ... --run-dir runs/x` (make demo does so): the run directory is made
    absolute before any worker, whose working directory is Ray's, sees a path."""
    monkeypatch.chdir(tmp_path)
    cfg = make_config(small, embed={"rows_per_part": 600})
    run_pipeline(cfg, "runs/rel", until="embed", log=quiet_log, progress=False)
    mark = RunDir(tmp_path / "runs" / "rel").stage_mark("embed")
    assert mark is not None and mark["rows_out"] == 1200
    assert sorted(mark["files"])[0].startswith("_ids/")  # recorded relative to the stage


def test_a_store_without_credentials_is_one_clear_error(monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # clients made earlier hold the test server's keys
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match=r"run directory s3://bucket/run: cannot reach it"):
        claim("s3://bucket/run")
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_run_directory_in_a_store_without_create_only_writes_is_refused():
    with pytest.raises(ConfigError, match=r"memory://runs/x: .* needs create-only writes.*s3://"):
        claim("memory://runs/x")
