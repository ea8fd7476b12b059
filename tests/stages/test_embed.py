"""Stage embed on a real Ray: unit vectors, exact clip scores, counted drops, clear errors."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from condense.errors import InputError
from condense.pipeline.runner import run_pipeline
from condense.schema import embed_schema
from tests.conftest import make_config, quiet_log, random_unit, write_clip_retrieval


def run(cfg, run_dir, **kw):
    return run_pipeline(cfg, run_dir, log=quiet_log, progress=False, **kw)


def read_stage(run_dir, stage):
    return pq.read_table(sorted((run_dir / stage).glob("part-*.parquet"))).to_pandas()


def _clean(rng, n, start, dim=8):
    return {
        "ids": [f"r{start + i:04d}" for i in range(n)],
        "img": random_unit(rng, n, dim) * 3,
        "txt": random_unit(rng, n, dim) * 0.5,
    }


def test_bad_vectors_are_dropped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    files = [_clean(rng, 20, 0), _clean(rng, 20, 20)]
    files[0]["img"][3, 2] = np.nan
    files[0]["txt"][5, 0] = np.inf
    files[1]["img"][7] = 0
    files[1]["txt"][8] = 0
    files[1]["txt"][9, 1] = -np.inf
    files[1]["ids"][10] = ""  # no id: the row cannot be joined later
    files[1]["ids"][11] = "r\n0031"  # a newline would break the one-id-per-line key lists
    files[1]["ids"][12] = "r\t0032"
    files[0]["img"][12] = 1e-30  # its float32 squares underflow: 0/0
    files[0]["txt"][13, 4] = 1e20  # its square overflows: x/inf would store a zero vector
    write_clip_retrieval(tmp_path / "in", files, dtype=np.float32)
    cfg = make_config(
        tmp_path / "in", embed={"rows_per_part": 7, "store_vectors": True}, sample={"n": 1000}
    )
    run(cfg, tmp_path / "run")
    mark = __import__("json").loads((tmp_path / "run" / "embed" / "_stage.json").read_text())
    assert mark["dropped"] == {
        "nonfinite_img_emb": 1,
        "nonfinite_txt_emb": 2,
        "zero_img_emb": 1,
        "zero_txt_emb": 1,
        "missing_sample_id": 1,
        "bad_sample_id": 2,
        "unnormalizable_img_emb": 1,
        "unnormalizable_txt_emb": 1,
    }
    assert mark["rows_in"] == 40 and mark["rows_out"] == 30
    assert mark["rows_in"] == mark["rows_out"] + sum(mark["dropped"].values())
    df = read_stage(tmp_path / "run", "embed")
    assert len(df) == 30 and df.sample_id.is_unique
    assert not {"r0003", "r0005", "r0012", "r0013", "r0027", "r0028", "r0029"} & set(df.sample_id)
    keys = (tmp_path / "run" / "export" / "keys").glob("*.txt")
    lines = [line for path in keys for line in path.read_text().splitlines()]
    exported = pq.read_table(sorted((tmp_path / "run" / "export").glob("part-*.parquet")))
    assert sorted(lines) == sorted(exported.column("sample_id").to_pylist()) and lines
    img = np.stack(df.img_emb.to_numpy()).astype(np.float32)
    txt = np.stack(df.txt_emb.to_numpy()).astype(np.float32)
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-6)
    assert np.array_equal(df.clip_score.to_numpy(), np.einsum("ij,ij->i", img, txt))
    assert set(df.source) == {"metadata/metadata_0.parquet", "metadata/metadata_1.parquet"}
    schema = pq.read_schema(sorted((tmp_path / "run" / "embed").glob("part-*.parquet"))[0])
    assert schema.names == list(embed_schema(8, "float32").names)


def test_float16_storage_scores_what_is_stored(tmp_path):
    rng = np.random.default_rng(1)
    write_clip_retrieval(tmp_path / "in", [_clean(rng, 30, 0, dim=16)])
    cfg = make_config(tmp_path / "in", embed={"dtype": "float16", "store_vectors": True})
    run(cfg, tmp_path / "run", until="embed")
    df = read_stage(tmp_path / "run", "embed")
    img = np.stack(df.img_emb.to_numpy())
    assert img.dtype == np.float16
    img32 = img.astype(np.float32)
    img32 /= np.linalg.norm(img32, axis=1, keepdims=True)
    txt32 = np.stack(df.txt_emb.to_numpy()).astype(np.float32)
    txt32 /= np.linalg.norm(txt32, axis=1, keepdims=True)
    assert np.allclose(df.clip_score, np.einsum("ij,ij->i", img32, txt32), atol=1e-6)


def test_duplicate_ids_across_files_stop_the_run(tmp_path):
    rng = np.random.default_rng(2)
    files = [_clean(rng, 10, 0), _clean(rng, 10, 10)]
    files[1]["ids"][4] = "r0002"
    write_clip_retrieval(tmp_path / "in", files)
    with pytest.raises(
        InputError,
        match=r"'r0002' in metadata/metadata_0.parquet row 2, metadata/metadata_1.parquet row 4",
    ):
        run(make_config(tmp_path / "in"), tmp_path / "run")
    assert not (tmp_path / "run" / "embed" / "_stage.json").exists()


def test_duplicate_ids_inside_one_file_stop_the_run(tmp_path):
    rng = np.random.default_rng(3)
    files = [_clean(rng, 10, 0)]
    files[0]["ids"][9] = "r0001"
    write_clip_retrieval(tmp_path / "in", files)
    with pytest.raises(
        InputError,
        match=r"'r0001' in metadata/metadata_0.parquet row 1, metadata/metadata_0.parquet row 9",
    ):
        run(make_config(tmp_path / "in"), tmp_path / "run")


def test_expected_dimension_is_checked(tmp_path):
    write_clip_retrieval(tmp_path / "in", [_clean(np.random.default_rng(4), 5, 0)])
    with pytest.raises(InputError, match="dimension 8, embed.dim is 768"):
        run(make_config(tmp_path / "in", embed={"dim": 768}), tmp_path / "run")


def test_all_rows_dropped_is_an_error_at_cluster(tmp_path):
    rng = np.random.default_rng(5)
    files = [_clean(rng, 6, 0)]
    files[0]["img"][:] = 0
    write_clip_retrieval(tmp_path / "in", files)
    from condense.errors import StageError

    with pytest.raises(StageError, match="no rows to cluster"):
        run(make_config(tmp_path / "in"), tmp_path / "run")
    mark = __import__("json").loads((tmp_path / "run" / "embed" / "_stage.json").read_text())
    assert mark["rows_out"] == 0 and mark["dropped"] == {"zero_img_emb": 6}
