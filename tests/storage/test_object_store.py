"""Run directories and inputs in an object store: a real S3 server (SeaweedFS) on 127.0.0.1.

What differs from a local disk (storage/fs.py): no rename (files are uploaded under their final
name when complete), create-only marks and lock, scratch read by byte ranges. What must not
differ: the output, resume, the one-driver rule and every bad-input rule."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from condense.errors import CondenseError
from condense.pipeline.runner import run_pipeline
from condense.storage.files import atomic_file, create_once, read_json
from condense.storage.fs import location, sizes_under
from condense.storage.parts import part_files, read_table
from condense.storage.rundir import RunLock
from tests.conftest import assert_second_driver_refused, make_config, quiet_log
from tests.readers.test_urls import server  # noqa: F401 (a fixture)

STAGES = ("embed", "cluster", "dedup", "clip_band", "centroid_band", "sample", "export")


def test_create_once_lets_exactly_one_writer_win(s3_prefix):
    path = location(s3_prefix) / "mark.json"
    assert create_once(path, b'{"a": 1}')
    assert not create_once(path, b'{"a": 2}')
    assert read_json(path) == {"a": 1}
    assert create_once(path, b'{"a": 1}')  # its own bytes: a retried PUT that had succeeded


def test_an_upload_that_fails_leaves_nothing(s3_prefix):
    path = location(s3_prefix) / "part-00000.parquet"
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half a part")
        raise RuntimeError("killed mid-write")
    assert not path.exists()


def small_config(dedup=None, **sections):
    return make_config(
        None,
        input={"kind": "synth", "synth": {"n": 3000, "dim": 32, "rows_per_file": 1000}},
        cluster={"k": 6},
        dedup={"rows_per_task": 400, "scatter_rows": 1000, **(dedup or {})},
        sample={"n": 300},
        **sections,
    )


def stage_tables(root) -> dict:
    return {s: read_table(part_files(location(root) / s)) for s in STAGES}


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_the_pipeline_on_s3_writes_what_it_writes_locally(executor, s3_prefix, tmp_path, request):
    if executor == "ray":
        request.getfixturevalue("ray_session")  # workers reach the store from the environment
    config = small_config()
    expected = run_pipeline(config, tmp_path / "run", log=quiet_log, progress=False)
    manifest = run_pipeline(config, s3_prefix, executor=executor, log=quiet_log, progress=False)
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
    if executor == "local":  # the report reads the run (and the planted truth) from the store
        from condense.pipeline.report import dedup_quality, funnel

        assert [row["stage"] for row in funnel(s3_prefix)] == list(STAGES)
        assert dedup_quality(s3_prefix) == dedup_quality(tmp_path / "run") is not None
        # A changed setting reruns its stage and every later one, in the store as on a disk.
        changed = small_config(dedup={"threshold": 0.9})
        log = []
        run_pipeline(changed, s3_prefix, log=log.append, progress=False)
        assert sum("skipped" in line for line in log) == 2  # embed, cluster
        run_pipeline(changed, tmp_path / "run", log=quiet_log, progress=False)
        local, remote = stage_tables(tmp_path / "run"), stage_tables(s3_prefix)
        for stage in STAGES:
            assert remote[stage].equals(local[stage]), stage


def test_a_second_driver_is_refused_on_s3(s3_prefix):
    with RunLock(s3_prefix, log=quiet_log):
        other = RunLock(s3_prefix, log=quiet_log)
        other.token = None
        with pytest.raises(CondenseError, match="is in use by host"):
            run_pipeline(small_config(), s3_prefix, log=quiet_log, progress=False)
    run_pipeline(small_config(), s3_prefix, until="embed", log=quiet_log, progress=False)


@pytest.mark.slow
def test_a_killed_driver_resumes_on_s3_to_the_same_output(s3_prefix, tmp_path, venv_env):
    """A real driver (`condense run --executor local`) held mid-stage by a failpoint, a second
    driver refused while it lives, then killed: --resume takes its lock over, keeps its parts
    and writes what an uninterrupted run writes."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import REPO

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"kind": "synth", "synth": {"n": 3000, "dim": 32, "rows_per_file": 1000}},
                "embed": {"rows_per_part": 100},
                "cluster": {"k": 6},
                "ray": {"progress": False},
            }
        )
    )
    spec = tmp_path / "failpoints"
    spec.write_text("driver_pause:embed:5")  # the driver holds after 5 embed parts
    command = [sys.executable, "-m", "condense.cli", "run", str(config), "--run-dir", s3_prefix]
    driver = subprocess.Popen(
        [*command, "--executor", "local"],
        cwd=REPO,
        env={**venv_env, "CONDENSE_FAILPOINTS_FILE": str(spec)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = location(s3_prefix) / "embed" / "_parts"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(sizes_under(records)) < 5:
            assert driver.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        assert_second_driver_refused([*command, "--executor", "local"], venv_env, driver.pid)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    assert len(sizes_under(records)) == 5
    assert read_json(location(s3_prefix) / "embed" / "_stage.json") is None

    from condense.config import load_config

    cfg = load_config(config, ["executor=local"])
    log = []
    run_pipeline(cfg, s3_prefix, resume=True, until="cluster", log=log.append, progress=False)
    assert f"[run] taking over the lock of host {socket.gethostname()} pid {driver.pid}" in log[0]
    assert any("[embed] resuming: 5 of 30 parts already written" in line for line in log)
    run_pipeline(cfg, tmp_path / "reference", until="cluster", log=quiet_log, progress=False)
    for stage in ("embed", "cluster"):
        assert read_table(part_files(location(s3_prefix) / stage)).equals(
            read_table(part_files(tmp_path / "reference" / stage))
        ), stage


def image_config(shards: str):
    from tests.readers.test_bad_sample_mixes import LIMITS
    from tests.stages.test_embed_images import TINY

    return make_config(
        shards,
        input={"kind": "webdataset", "limits": LIMITS},
        embed={"model": {"name": TINY, "batch_size": 4}},
        cluster={"k": 3, "sample_size": 1000},
        dedup={"threshold": 1.0},  # a random-weight model: keep every row through the funnel
        clip_band={"lo": 0.0, "hi": 1.0},
        centroid_band={"lo": 0.0, "hi": 1.0},
        sample={"n": 12},
        export={"shard_size": 5},
    )


def test_images_from_s3_to_a_coreset_on_s3(s3_prefix, tmp_path):
    """WebDataset shards in the store, the run directory in the store: the image embed streams
    the tars, export copies the coreset's samples into tars in the store, and `webdataset`
    reads them back from there; all of it as a local run over the same shards writes it."""
    import sys

    import webdataset as wds

    from condense.storage.fs import put_tree
    from tests.stages.test_embed_images import sample, write_shard

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        samples = [sample(f"{s}{i:04d}", 10 * s + i) for i in range(10)]
        samples.append(sample(f"{s}9999", 99, jpg=b"not an image"))  # one bad sample a shard
        write_shard(shards / f"{s:05d}.tar", samples)
    put_tree(shards, f"{s3_prefix}/shards")
    run = f"{s3_prefix}/run"
    expected = run_pipeline(image_config(str(shards)), tmp_path / "run", log=quiet_log)
    manifest = run_pipeline(image_config(f"{s3_prefix}/shards"), run, log=quiet_log)
    for stage in STAGES:
        for key in ("rows_in", "rows_out", "dropped"):
            assert manifest["stages"][stage][key] == expected["stages"][stage][key], (stage, key)
    assert manifest["stages"]["embed"]["dropped"] == {"corrupt_image": 3}
    local, remote = stage_tables(tmp_path / "run"), stage_tables(run)
    assert remote["embed"].drop_columns(["source"]).equals(local["embed"].drop_columns(["source"]))
    for stage in STAGES[1:]:
        assert remote[stage].equals(local[stage]), stage
    tars = sorted(n for n in sizes_under(f"{run}/export/shards") if n.endswith(".tar"))
    assert tars == ["00000.tar", "00001.tar", "00002.tar"]
    # webdataset reads the store's shards as its users do: through a pipe.
    read = (
        "import fsspec,sys; sys.stdout.buffer.write(fsspec.open(sys.argv[1], 'rb').open().read())"
    )
    urls = [f'pipe:{sys.executable} -c "{read}" {run}/export/shards/{t}' for t in tars]
    got = sorted(s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False))
    kept = remote["sample"].filter(remote["sample"].column("kept")).column("sample_id")
    assert got == sorted(kept.to_pylist()) and len(got) == 12
    # Stage 1 training streams those shards from the store.
    from condense.cli import main
    from tests.conftest import REPO

    tiny = str(REPO / "configs" / "train" / "stage1-tiny.yaml")
    shards = ["--set", f"data.shards={run}/export/shards", "--set", "global_batch=4"]
    assert main(["train", "stage1", tiny, "--run-dir", str(tmp_path / "train"), *shards]) == 0
    state = read_json(tmp_path / "train" / "train" / "stage1" / "trainer_state.json")
    assert state["samples"] == 12 and state["steps"] == 3
    # Its outputs (checkpoints, weights) go to a local or shared folder, said at once.
    assert main(["train", "stage1", tiny, "--run-dir", run, *shards]) == 2


def read_all(path: str):
    from condense.readers import InputConfig, open_reader

    reader = open_reader(InputConfig(path=path))
    return reader.dim, [reader.read(item) for item in reader.plan(rows_per_part=4)]


def test_both_embedding_layouts_read_the_same_rows_from_s3(s3_prefix, tmp_path):
    import numpy as np
    import pyarrow as pa

    from condense.schema import vectors_to_arrow
    from condense.storage.fs import put_tree
    from tests.conftest import random_unit, write_clip_retrieval
    from tests.readers.test_readers import _files

    rng = np.random.default_rng(3)
    write_clip_retrieval(tmp_path / "clip", _files(rng, [7, 5]))
    img, txt = random_unit(rng, 9, 4), random_unit(rng, 9, 4)
    (tmp_path / "pq" / "sub").mkdir(parents=True)
    table = pa.table(
        {"sample_id": [f"p{i}" for i in range(9)], "img_emb": vectors_to_arrow(img)}
    ).append_column("txt_emb", vectors_to_arrow(txt))
    pq.write_table(table, tmp_path / "pq" / "sub" / "a.parquet", row_group_size=3)
    for layout in ("clip", "pq"):
        put_tree(tmp_path / layout, f"{s3_prefix}/{layout}")
        (dim, local), (dim_s3, remote) = (
            read_all(str(tmp_path / layout)),
            read_all(f"{s3_prefix}/{layout}"),
        )
        assert dim == dim_s3 and len(local) == len(remote) > 2
        for a, b in zip(local, remote, strict=True):
            assert (a.sample_id, a.caption, a.url, a.source) == (
                b.sample_id,
                b.caption,
                b.url,
                b.source,
            )
            assert np.array_equal(a.img, b.img) and np.array_equal(a.txt, b.txt)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("zip", r"a zip archive \(\.npz\)"),
        ("big-endian", "big-endian >f4"),
        ("truncated", "truncated"),
    ],
)
def test_bad_npy_files_in_s3_are_named(s3_prefix, tmp_path, payload, message):

    from condense.errors import InputError
    from condense.readers import InputConfig, open_reader
    from condense.storage.fs import put_tree
    from tests.readers.test_readers import spoiled_corpus

    spoiled_corpus(tmp_path, payload)
    put_tree(tmp_path, s3_prefix)
    where = re.escape(f"{s3_prefix}/img_emb/img_emb_0.npy")
    with pytest.raises(InputError, match=rf"^{where}: .*{message}"):
        open_reader(InputConfig(path=s3_prefix))


@pytest.mark.slow
def test_urls_downloaded_into_a_run_on_s3(s3_prefix, tmp_path, server):  # noqa: F811
    """input.kind urls with the url list and the run directory in the store: img2dataset
    writes its shards there (the guard refusing what it refuses), and the run goes on."""
    from condense.storage.fs import put_tree
    from tests.readers.test_urls import sample_id, url_list, urls_config

    (tmp_path / "in").mkdir()
    kinds = url_list(tmp_path / "in" / "urls.parquet", server, tmp_path / "secret.jpg")
    put_tree(tmp_path / "in", f"{s3_prefix}/in")
    cfg = urls_config(f"{s3_prefix}/in/urls.parquet")
    run = f"{s3_prefix}/run"
    manifest = run_pipeline(cfg, run, log=quiet_log, progress=False)
    mark = read_json(location(run) / "embed" / "_stage.json")
    assert mark["rows_in"] == len(kinds) == 36 and mark["rows_out"] == 24
    assert mark["dropped"] == {"download_failed": 5, "download_refused": 5, "resize_failed": 2}
    downloaded = sizes_under(f"{run}/input/download")
    assert len([n for n in downloaded if n.endswith(".tar")]) == 4
    assert sorted(
        read_table(part_files(location(run) / "embed")).column("sample_id").to_pylist()
    ) == sorted(sample_id(i) for i in range(24))
    assert manifest["stages"]["export"]["rows_out"] == 24
    assert len([n for n in sizes_under(f"{run}/export/shards") if n.endswith(".tar")]) >= 1


def test_a_store_lock_is_taken_over_by_age_and_a_lost_lock_stops_its_driver(s3_prefix, monkeypatch):
    import json
    import time

    from condense.storage import rundir

    lock = location(s3_prefix) / "_lock.json"
    other = {"host": "another-host", "pid": 1, "token": "theirs", "started": time.time()}
    lock.write_bytes(json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(CondenseError, match="another-host pid 1 .* refreshed 0 s ago"):
        RunLock(s3_prefix, log=quiet_log).acquire()
    lock.write_bytes(json.dumps({**other, "heartbeat": time.time() - 120}).encode())
    log = []
    monkeypatch.setattr(rundir, "LOCK_HEARTBEAT", 0.2)
    mine = RunLock(s3_prefix, log=log.append)
    mine.acquire()
    try:
        assert "taking over the lock of host another-host pid 1" in log[0]
        mine.check()  # held
        lock.write_bytes(json.dumps({**other, "heartbeat": time.time()}).encode())  # taken over
        deadline = time.time() + 10
        while not mine.lost and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(CondenseError, match="another driver took this run directory over"):
            mine.check()
    finally:
        mine.release()
    assert read_json(lock)["token"] == "theirs"  # a lost lock is not deleted on release
