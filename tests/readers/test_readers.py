"""Both embedding layouts, float16 and float32, and every malformed input named in the error."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condense import schema as S
from condense.errors import InputError
from condense.readers import InputConfig, open_reader
from tests.conftest import random_unit, write_clip_retrieval


def _files(rng, sizes, dim=8):
    out, start = [], 0
    for n in sizes:
        out.append(
            {
                "ids": [f"s{start + i}" for i in range(n)],
                "img": random_unit(rng, n, dim),
                "txt": random_unit(rng, n, dim),
            }
        )
        start += n
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_clip_retrieval_reads_aligned_rows(tmp_path, dtype):
    rng = np.random.default_rng(0)
    files = _files(rng, [7, 5])
    write_clip_retrieval(tmp_path, files, dtype=dtype)
    reader = open_reader(InputConfig(path=str(tmp_path)))
    assert (reader.dim, reader.total_rows) == (8, 12)
    items = reader.plan(rows_per_part=3)
    assert [(i["number"], i["start"], i["stop"]) for i in items] == [
        (0, 0, 3),
        (0, 3, 6),
        (0, 6, 7),
        (1, 0, 3),
        (1, 3, 5),
    ]
    rows = reader.read(items[4])
    assert rows.sample_id == ["s10", "s11"]
    assert rows.img.dtype == dtype
    assert np.array_equal(rows.img, files[1]["img"][3:5].astype(dtype))
    assert rows.caption == ["caption s10", "caption s11"]
    assert rows.source == "metadata/metadata_1.parquet"


@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_parquet_layout_reads_fixed_and_plain_lists(tmp_path, fixed, dtype):
    rng = np.random.default_rng(1)
    img, txt = random_unit(rng, 6, 4).astype(dtype), random_unit(rng, 6, 4).astype(dtype)
    if fixed:
        img_col, txt_col = S.vectors_to_arrow(img), S.vectors_to_arrow(txt)
    else:
        img_col, txt_col = (
            pa.array(img.tolist(), pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))),
            pa.array(txt.tolist(), pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))),
        )
    pq.write_table(
        pa.table(
            {"sample_id": [f"p{i}" for i in range(6)], "img_emb": img_col, "txt_emb": txt_col}
        ),
        tmp_path / "a.parquet",
        row_group_size=4,
    )
    reader = open_reader(InputConfig(path=str(tmp_path)))
    assert (reader.dim, reader.total_rows) == (4, 6)
    items = reader.plan(rows_per_part=5)
    got = [reader.read(i) for i in items]
    assert sum((g.sample_id for g in got), []) == [f"p{i}" for i in range(6)]
    assert np.array_equal(
        np.concatenate([g.img for g in got]).astype(np.float32), img.astype(np.float32)
    )
    assert got[0].caption == [None] * 5


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_reader(InputConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        open_reader(InputConfig(path=str(tmp_path / "empty")))
    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    with pytest.raises(InputError, match="missing folder text_emb/"):
        open_reader(InputConfig(path=str(tmp_path / "cr")))
    (tmp_path / "cr" / "text_emb").mkdir()
    (tmp_path / "cr" / "metadata").mkdir()
    with pytest.raises(InputError, match="no img_emb_N.npy files"):
        open_reader(InputConfig(path=str(tmp_path / "cr")))


def test_missing_file_of_a_number_is_named(tmp_path):
    write_clip_retrieval(tmp_path, _files(np.random.default_rng(0), [3, 3]))
    (tmp_path / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(InputError, match=r"text_emb_1\.npy is missing"):
        open_reader(InputConfig(path=str(tmp_path)))


def test_row_count_disagreement_is_named(tmp_path):
    files = _files(np.random.default_rng(0), [4, 4])
    files[1]["txt"] = files[1]["txt"][:3]
    write_clip_retrieval(tmp_path, files)
    with pytest.raises(
        InputError,
        match=r"file number 1 disagrees on row count \(img_emb_1.npy: 4 rows, text_emb_1.npy: 3 rows",
    ):
        open_reader(InputConfig(path=str(tmp_path)))


def test_wrong_dimension_is_named(tmp_path):
    rng = np.random.default_rng(0)
    files = _files(rng, [4, 4])
    files[1]["img"] = random_unit(rng, 4, 6)
    files[1]["txt"] = random_unit(rng, 4, 6)
    write_clip_retrieval(tmp_path, files)
    with pytest.raises(
        InputError, match=r"img_emb_1\.npy: dimension 6 differs from earlier files \(8\)"
    ):
        open_reader(InputConfig(path=str(tmp_path)))
    files[1]["img"] = random_unit(rng, 4, 8)
    write_clip_retrieval(tmp_path, files)
    with pytest.raises(
        InputError, match=r"text_emb_1\.npy: dimension 6 differs from img_emb_1.npy \(8\)"
    ):
        open_reader(InputConfig(path=str(tmp_path)))


def test_missing_id_column_and_columns_of_parquet(tmp_path):
    write_clip_retrieval(tmp_path / "cr", _files(np.random.default_rng(0), [3]))
    with pytest.raises(InputError, match="no id column 'uid'"):
        open_reader(InputConfig(path=str(tmp_path / "cr"), id_column="uid"))
    (tmp_path / "pq").mkdir()
    pq.write_table(
        pa.table({"sample_id": ["a"], "img_emb": [[1.0, 0.0]]}), tmp_path / "pq" / "x.parquet"
    )
    with pytest.raises(InputError, match=r"x\.parquet: missing column 'txt_emb'"):
        open_reader(InputConfig(path=str(tmp_path / "pq")))


def test_unreadable_files_are_named(tmp_path):
    write_clip_retrieval(tmp_path, _files(np.random.default_rng(0), [3]))
    (tmp_path / "img_emb" / "img_emb_0.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match=r"img_emb_0\.npy: not a readable \.npy file"):
        open_reader(InputConfig(path=str(tmp_path)))
