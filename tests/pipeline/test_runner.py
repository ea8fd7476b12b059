"""Run-directory contract: skip what is done, rerun what changed and everything after it,
never trust a half-written stage, resume a killed run to the same output."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from condense.pipeline.runner import STAGE_NAMES, run_pipeline
from condense.synth import SynthConfig, generate
from tests.conftest import REPO, assert_second_driver_refused, make_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate(out, SynthConfig(n=3000, dim=32, seed=2, rows_per_file=1500))
    return out


class Log(list):
    def __call__(self, line):
        self.append(line)


def run(cfg, run_dir, **kw):
    log = Log()
    run_pipeline(cfg, run_dir, log=log, progress=False, **kw)
    return log


def marks(run_dir):
    return {
        s: json.loads((run_dir / s / "_stage.json").read_text())
        for s in STAGE_NAMES
        if (run_dir / s / "_stage.json").exists()
    }


def table(run_dir, stage):
    files = sorted((run_dir / stage).glob("part-*.parquet"))
    return pq.read_table(files).to_pandas().sort_values("sample_id").reset_index(drop=True)


def test_rerun_skips_and_changes_rerun_downstream(corpus, tmp_path):
    cfg = make_config(corpus, cluster={"k": 6})
    run(cfg, tmp_path)
    first = marks(tmp_path)
    assert list(first) == STAGE_NAMES
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["cluster"]["rows_out"] == 3000
    assert manifest["stages"]["embed"]["config_hash"] == first["embed"]["config_hash"]

    log = run(cfg, tmp_path)  # same settings: nothing runs
    assert marks(tmp_path) == first
    assert sum("skipped" in line for line in log) == len(STAGE_NAMES)

    log = run(make_config(corpus, cluster={"k": 6, "workers": 1}), tmp_path)  # runtime-only change
    assert marks(tmp_path) == first

    log = run(make_config(corpus, cluster={"k": 5}), tmp_path)  # cluster changes, embed does not
    now = marks(tmp_path)
    assert now["embed"] == first["embed"]
    for stage in STAGE_NAMES[1:]:  # cluster and everything after it ran again
        assert now[stage]["config_hash"] != first[stage]["config_hash"]
    assert table(tmp_path, "cluster").cluster_id.max() == 4

    run(
        make_config(corpus, cluster={"k": 5}, embed={"dtype": "float16"}), tmp_path
    )  # upstream change
    again = marks(tmp_path)
    assert again["embed"]["config_hash"] != first["embed"]["config_hash"]
    assert again["cluster"]["config_hash"] != now["cluster"]["config_hash"]


def test_new_input_files_rerun_embed(tmp_path):
    import shutil

    generate(tmp_path / "in", SynthConfig(n=600, dim=16, seed=1, rows_per_file=300))
    cfg = make_config(tmp_path / "in", cluster={"k": 3})
    run(cfg, tmp_path / "run")
    assert marks(tmp_path / "run")["embed"]["rows_out"] == 600
    # Another file number appears under the same path: same config, different input.
    generate(tmp_path / "more", SynthConfig(n=300, dim=16, seed=9, rows_per_file=300))
    for sub, name in (
        ("img_emb", "img_emb_{}.npy"),
        ("text_emb", "text_emb_{}.npy"),
        ("metadata", "metadata_{}.parquet"),
    ):
        shutil.copy(
            tmp_path / "more" / sub / name.format(0), tmp_path / "in" / sub / name.format(2)
        )
    import pyarrow as pa

    meta = pq.read_table(tmp_path / "in" / "metadata" / "metadata_2.parquet")
    meta = meta.set_column(0, "key", pa.array([f"new{i}" for i in range(300)]))
    pq.write_table(meta, tmp_path / "in" / "metadata" / "metadata_2.parquet")
    log = run(cfg, tmp_path / "run")
    assert not any("skipped" in line for line in log)
    assert marks(tmp_path / "run")["embed"]["rows_out"] == 900
    assert marks(tmp_path / "run")["cluster"]["rows_out"] == 900


def test_until_stops_and_upstream_rerun_clears_downstream(corpus, tmp_path):
    run(make_config(corpus), tmp_path, until="embed")
    assert set(marks(tmp_path)) == {"embed"} and not (tmp_path / "cluster").exists()
    run(make_config(corpus), tmp_path)
    assert list(marks(tmp_path)) == STAGE_NAMES
    # Rerunning embed alone (--until) must not leave the old cluster output looking valid.
    run(make_config(corpus, embed={"rows_per_part": 700}), tmp_path, until="embed")
    assert not (tmp_path / "cluster").exists()
    assert "cluster" not in json.loads((tmp_path / "manifest.json").read_text())["stages"]


def test_half_written_stage_is_not_trusted(corpus, tmp_path):
    cfg = make_config(corpus)
    run(cfg, tmp_path, until="embed")
    reference = table(tmp_path, "embed")
    # Simulate a crash: the completion mark is gone and a stray partial file is left behind.
    (tmp_path / "embed" / "_stage.json").unlink()
    (tmp_path / "embed" / "part-99999-0000.parquet").write_bytes(b"half a file")
    run(cfg, tmp_path, until="embed")
    assert not (tmp_path / "embed" / "part-99999-0000.parquet").exists()
    pd.testing.assert_frame_equal(table(tmp_path, "embed"), reference)


def test_resume_with_other_settings_starts_over(corpus, tmp_path):
    run(make_config(corpus), tmp_path, until="embed")
    (tmp_path / "embed" / "_stage.json").unlink()
    progress = {"fingerprint": "something-else"}
    (tmp_path / "embed" / "_progress.json").write_text(json.dumps(progress))
    log = run(make_config(corpus), tmp_path, until="embed", resume=True)
    assert not any("resuming" in line for line in log)
    assert marks(tmp_path)["embed"]["rows_out"] == 3000


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(ray_session, corpus, tmp_path, venv_env):
    # One part per scatter group: the cluster stage's unit of work (and of resume) is a group.
    overrides = [
        "embed.rows_per_part=60",
        "dedup.scatter_rows=60",
        "cluster.k=6",
        "ray.num_cpus=2",
        "ray.progress=false",
    ]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": {"kind": "embeddings", "path": str(corpus)}}))
    killed = tmp_path / "killed"
    spec = tmp_path / "failpoints"
    spec.write_text("driver_pause:cluster:3")  # the driver holds after 3 cluster parts
    driver_env = {**venv_env, "CONDENSE_FAILPOINTS_FILE": str(spec)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "condense.cli",
            "run",
            str(config),
            "--run-dir",
            str(killed),
            *sum((["--set", o] for o in overrides), []),
        ],
        cwd=REPO,
        env=driver_env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = killed / "cluster" / "_parts"

    def recorded():  # finished parts only: an atomic write's temporary file does not count
        return sorted(parts.glob("[!.]*.json")) if parts.exists() else []

    deadline = time.time() + 240
    lock = killed / "_lock.json"
    try:
        while time.time() < deadline and not (lock.exists() and lock.stat().st_size):
            time.sleep(0.01)
        # A second real driver on the same run directory is refused, naming the first.
        command = [sys.executable, "-m", "condense.cli", "run", str(config)]
        assert_second_driver_refused([*command, "--run-dir", str(killed)], venv_env, proc.pid)
        while time.time() < deadline and len(recorded()) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        time.sleep(0.5)  # held there: no further part is recorded
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    finally:
        proc.wait(timeout=60)
    assert parts.exists(), "the cluster stage never started"
    done_before = len(recorded())
    assert done_before == 3, done_before  # 3,000 rows in parts of 60: killed mid-stage
    assert not (killed / "cluster" / "_stage.json").exists()

    from condense.config import load_config

    cfg = load_config(config, overrides)
    log = run(cfg, killed, resume=True)
    assert f"[cluster] resuming: {done_before} of 50 parts already written" in log
    assert f"[run] taking over the lock of host {socket.gethostname()} pid {proc.pid}" in log[0]
    reference = tmp_path / "reference"
    run(cfg, reference)
    for stage in ("embed", "cluster", "dedup"):  # dedup read the scatter the kill left
        pd.testing.assert_frame_equal(
            table(killed, stage), table(reference, stage), check_exact=True
        )
    assert marks(killed)["cluster"]["rows_out"] == 3000


def test_a_stage_whose_rows_in_differs_from_the_stage_before_stops(tmp_path):
    from condense.errors import StageError
    from condense.pipeline.runner import STAGES, check_chain
    from condense.storage.rundir import RunDir

    run = RunDir(tmp_path)
    run.stage_dir("embed").mkdir()
    run.finish_stage("embed", {"rows_out": 10, "config_hash": "x"})
    check_chain(run, STAGES[1], 10)
    with pytest.raises(StageError, match="cluster read 9 rows but embed wrote 10"):
        check_chain(run, STAGES[1], 9)
