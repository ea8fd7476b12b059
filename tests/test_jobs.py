"""A real `ray start --head` on 127.0.0.1 and a real `ray job submit` of jobs/condense.py."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, free_ports


@pytest.fixture(scope="module")
def head_env():
    """The environment of the head and the ray CLI: the venv first on PATH (a job's `python` is
    the head's), Ray's token authentication on (both use the token in ~/.ray)."""
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def ray_head(head_env):
    """Start one head node on 127.0.0.1 with its own ports and temp dir for this module's jobs;
    stop only it afterwards (its process group: SIGTERM, then SIGKILL after 3 s)."""
    venv_env = head_env
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="cr-")  # short: Ray's socket paths must fit in 107 bytes
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        cmd,
        env=venv_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert head.poll() is None, head.stdout.read()
            probe = subprocess.run(
                ["ray", "job", "list", "--address", address],
                env=venv_env,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray job server did not come up on 127.0.0.1")
        yield address
    finally:
        # `ray start --block` stops the processes it started, and only those; they share its
        # process group, which is killed if they take longer than 3 s to stop.
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_submit(address, env, *command, options=()):
    """`ray job submit` of `python *command` with the repo as the working dir (again while the
    head's job agent is still starting: the job server answers before it is up)."""
    return submit_entrypoint(address, env, ["python", *command], options)


def submit_entrypoint(address, env, entrypoint, options=()):
    deadline = time.time() + 120
    while True:
        done = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", ".", *options, "--"]
            + list(entrypoint),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if "No available agent to submit job" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(2)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(ray_head, head_env, tmp_path):
    run_dir = tmp_path / "run"
    submit = job_submit(
        ray_head,
        head_env,
        "jobs/condense.py",
        "configs/demo.yaml",
        "--run-dir",
        str(run_dir),
        "--set",
        "input.synth.n=3000",
        "--set",
        "cluster.k=8",
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    assert "embed" in submit.stdout and "cluster" in submit.stdout  # the funnel, from the job's log
    for stage in ("embed", "cluster"):
        mark = json.loads((run_dir / stage / "_stage.json").read_text())
        assert mark["status"] == "complete" and mark["rows_out"] == 3000
    clusters = pq.read_table(sorted((run_dir / "cluster").glob("part-*.parquet"))).to_pandas()
    assert len(clusters) == 3000 and clusters.cluster_id.nunique() == 8
    assert Path(run_dir / "config.yaml").exists() and Path(run_dir / "manifest.json").exists()
    # A relative run directory would land in the job's temporary copy of the repo: refused.
    submit = job_submit(ray_head, head_env, "jobs/condense.py", "configs/demo.yaml")
    assert submit.returncode != 0
    assert "a relative run directory would be written into the job's temporary copy" in (
        submit.stdout + submit.stderr
    )


@pytest.mark.slow
def test_the_deploy_examples_entrypoint_runs_on_a_head(ray_head, head_env, tmp_path):
    """The entrypoint of deploy/ (RayJob, cluster launcher, Slurm), as they submit it: its
    config and run directory from the job's environment variables."""
    from tests.test_deploy import ENTRYPOINT

    config = tmp_path / "small.yaml"
    config.write_text(
        "input: {kind: synth, synth: {n: 2000, dim: 32}}\n"
        "embed: {rows_per_part: 500}\ncluster: {k: 4}\nsample: {n: 100}\n"
    )
    run_dir = tmp_path / "run"
    env_vars = {"CONDENSE_CONFIG": str(config), "CONDENSE_RUN_DIR": str(run_dir)}
    submit = submit_entrypoint(
        ray_head,
        head_env,
        ENTRYPOINT.split(),
        options=["--runtime-env-json", json.dumps({"env_vars": env_vars})],
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["embed"]["rows_out"] == 2000
    assert 0 < stages["export"]["rows_out"] == stages["sample"]["rows_out"] <= 100


@pytest.mark.slow
def test_ray_job_submit_trains_on_two_workers(ray_head, head_env, tmp_path):
    """jobs/train.py under `ray job submit`: stage 1 on two Ray Train workers (DDP, gloo)."""
    from tests.train.test_distributed import caption_json

    data = caption_json(tmp_path, 6)
    run_dir = tmp_path / "run"
    submit = job_submit(
        ray_head,
        head_env,
        "jobs/train.py",
        "stage1",
        "configs/train/stage1-tiny.yaml",
        "--run-dir",
        str(run_dir),
        "--workers",
        "2",
        "--set",
        "cpus_per_worker=0.5",
        "--set",
        f"data.llava_json={data}",
        "--set",
        f"data.image_folder={data.parent / 'images'}",
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    assert "[train] stage1 on 2 Ray Train workers (ddp, CPU)" in submit.stdout
    state = json.loads((run_dir / "train" / "stage1" / "trainer_state.json").read_text())
    assert state["workers"] == 2 and state["samples"] == 6 and state["steps"] == 2
    assert (run_dir / "train" / "stage1" / "mm_projector.safetensors").exists()
