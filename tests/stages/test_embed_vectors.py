"""Precomputed vectors read in place: embed/ keeps no copy, every later stage reads the input
by its rows, and the run writes what a run with the copy writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condense.errors import StageError
from condense.pipeline.runner import run_pipeline
from condense.schema import SOURCE_ROW, embed_schema, vectors_to_arrow
from condense.stages.embed.vectors import EmbedVectors
from tests.conftest import make_config, quiet_log, random_unit, write_clip_retrieval
from tests.pipeline.test_executors import assert_same_run

SELECTION = ("cluster", "dedup", "clip_band", "centroid_band", "sample", "export")


def planted(rng, n: int, start: int, dim: int = 16) -> dict:
    """Rows in 5 tight groups (near-duplicates), a NaN image and a zero text vector."""
    centres = random_unit(rng, 5, dim)
    img = centres[rng.integers(0, 5, n)] + 0.02 * rng.standard_normal((n, dim))
    f = {"ids": [f"r{start + i:05d}" for i in range(n)], "img": img * 2.5}
    f["txt"] = random_unit(rng, n, dim)
    f["img"][3] = np.nan
    f["txt"][7] = 0
    return f


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(4)
    return write_clip_retrieval(tmp_path / "in", [planted(rng, 300, 0), planted(rng, 250, 300)])


def stage_parts(run_dir) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for stage in SELECTION
        for p in sorted((run_dir / stage).rglob("*"))
        if p.is_file() and "_parts" not in p.parts and not p.name.endswith(".json")
    }


def run(cfg, run_dir, **kw):
    return run_pipeline(cfg, run_dir, log=quiet_log, progress=False, **kw)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_in_place_writes_what_the_copy_writes_at_any_part_size(corpus, tmp_path, dtype):
    sections = dict(cluster={"k": 5}, dedup={"threshold": 0.9}, sample={"n": 40})
    copy = tmp_path / "copy"
    run(make_config(corpus, embed={"dtype": dtype, "store_vectors": True}, **sections), copy)
    want = stage_parts(copy)
    assert len(want) >= 9  # centroids and every stage's parts
    for rows_per_part in (1000, 97):
        here = tmp_path / f"in-place-{rows_per_part}"
        cfg = make_config(
            corpus, embed={"dtype": dtype, "rows_per_part": rows_per_part}, **sections
        )
        run(cfg, here)
        if rows_per_part == 1000:  # the same parts: every file of every later stage equal
            assert stage_parts(here) == want
        got = pq.read_table(sorted((here / "sample").glob("part-*.parquet")))
        ref = pq.read_table(sorted((copy / "sample").glob("part-*.parquet")))
        assert sorted(got.filter(got["kept"]).column("sample_id").to_pylist()) == sorted(
            ref.filter(ref["kept"]).column("sample_id").to_pylist()
        )
        schema = pq.read_schema(sorted((here / "embed").glob("part-*.parquet"))[0])
        assert schema.names == embed_schema(16, dtype, vectors=False).names
        mark = json.loads((here / "embed" / "_stage.json").read_text())
        assert mark["vector_bytes_written"] == 0 and mark["rows_out"] == 546
    copied = json.loads((copy / "embed" / "_stage.json").read_text())
    assert copied["vector_bytes_written"] >= 546 * 2 * 16 * np.dtype(dtype).itemsize


def test_rows_embed_dropped_are_never_read_again(corpus, tmp_path):
    """The cluster stage fetches exactly the kept rows' image vectors: once for the training
    sample (all rows here), once to assign them."""
    run(make_config(corpus, cluster={"k": 5}), tmp_path / "run", until="cluster")
    mark = json.loads((tmp_path / "run" / "cluster" / "_stage.json").read_text())
    assert mark["vector_bytes_read"] == 2 * 546 * 16 * 2  # float16 input, NaN and zero rows out


def test_parquet_input_in_place_equals_its_copy(tmp_path):
    rng = np.random.default_rng(5)
    f = planted(rng, 400, 0, dim=8)
    (tmp_path / "pq").mkdir()
    for i, lo in enumerate((0, 250)):  # two files, row groups of 64 rows
        hi = min(400, lo + 250)
        table = pa.table(
            {
                "sample_id": f["ids"][lo:hi],
                "img_emb": vectors_to_arrow(f["img"][lo:hi].astype(np.float32)),
                "txt_emb": vectors_to_arrow(f["txt"][lo:hi].astype(np.float32)),
            }
        )
        pq.write_table(table, tmp_path / "pq" / f"x{i}.parquet", row_group_size=64)
    sections = dict(cluster={"k": 4}, sample={"n": 30}, embed={"rows_per_part": 90})
    run(make_config(tmp_path / "pq", **sections), tmp_path / "a")
    store = {**sections["embed"], "store_vectors": True}
    run(make_config(tmp_path / "pq", **{**sections, "embed": store}), tmp_path / "b")
    assert stage_parts(tmp_path / "a") == stage_parts(tmp_path / "b")


def test_a_source_changed_after_embed_is_never_mixed_in(corpus, tmp_path):
    cfg = make_config(corpus, cluster={"k": 5})
    run(cfg, tmp_path / "run", until="embed")
    embed_dir = tmp_path / "run" / "embed"
    vectors = EmbedVectors.of(embed_dir)
    part = sorted(vectors.parts)[0]
    assert vectors.read(part, ["sample_id", "img_emb"]).num_rows > 0
    assert SOURCE_ROW in pq.read_schema(embed_dir / f"part-{part}.parquet").names
    # The same size, other vectors: a stage reading in place stops, naming the file.
    img = corpus / "img_emb" / "img_emb_0.npy"
    np.save(img, np.load(img)[::-1].copy())
    with pytest.raises(StageError, match=r"img_emb_0\.npy changed .* since embed read it"):
        vectors.read(part, ["sample_id", "img_emb"])
    with pytest.raises(StageError, match=r"img_emb_0\.npy changed"):
        next(vectors.chunks(part, ["img_emb"], 64))
    # The next run sees the new version in embed's fingerprint: embed reads it again, and the
    # clusters are those of a fresh run on the new input.
    run(cfg, tmp_path / "run")
    run(cfg, tmp_path / "fresh")
    a = pq.read_table(sorted((tmp_path / "run" / "cluster").glob("part-*.parquet")))
    b = pq.read_table(sorted((tmp_path / "fresh" / "cluster").glob("part-*.parquet")))
    assert a.equals(b)


def test_same_run_with_the_copy_on_ray(ray_session, corpus, tmp_path):
    """Ray workers read the input in place too, and write what the local executor writes."""
    sections = dict(cluster={"k": 5}, sample={"n": 40}, embed={"rows_per_part": 128})
    run(make_config(corpus, executor="ray", **sections), tmp_path / "ray")
    run(make_config(corpus, **sections), tmp_path / "local")
    assert assert_same_run(tmp_path / "ray", tmp_path / "local") > 20


def test_the_assignment_scatters_each_vector_in_the_same_read(corpus, tmp_path):
    """cluster/ writes dedup's scatter as it assigns; dedup reads only that. With it gone (a
    dedup rerun alone), dedup scatters from embed/ and cluster/ itself, to the same output."""
    sections = dict(cluster={"k": 5}, dedup={"rows_per_task": 200}, sample={"n": 40})
    cfg = make_config(corpus, embed={"rows_per_part": 128, "dtype": "float16"}, **sections)
    run(cfg, tmp_path / "one-pass")
    marks = {
        stage: json.loads((tmp_path / "one-pass" / stage / "_stage.json").read_text())
        for stage in ("embed", "cluster", "dedup")
    }
    assert marks["dedup"]["scatter"]["written_by"] == "cluster"
    unit = 546 * 16 * 2  # one float16 image vector per kept row
    assert marks["embed"]["vector_bytes_read"] == 2 * 550 * 16 * 2  # image and text, every row
    assert marks["cluster"]["vector_bytes_read"] == 2 * unit  # the sample (every row) and all
    centroids = (tmp_path / "one-pass" / "cluster" / "centroids.npy").stat().st_size
    assert marks["cluster"]["vector_bytes_written"] == unit + centroids  # and the scatter
    assert (
        marks["dedup"]["vector_bytes_read"] == unit and marks["dedup"]["vector_bytes_written"] == 0
    )
    assert not (tmp_path / "one-pass" / "cluster" / ".scatter").exists()  # removed by dedup
    # The same run, its scatter lost between the two stages.
    run(cfg, tmp_path / "two-pass", until="cluster")
    import shutil

    shutil.rmtree(tmp_path / "two-pass" / "cluster" / ".scatter")
    run(cfg, tmp_path / "two-pass")
    mark = json.loads((tmp_path / "two-pass" / "dedup" / "_stage.json").read_text())
    assert mark["scatter"]["written_by"] == "dedup"
    assert stage_parts(tmp_path / "two-pass") == stage_parts(tmp_path / "one-pass")
