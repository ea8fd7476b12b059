"""Both embedding layouts, float16 and float32, and every malformed input named in the error."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condense.errors import InputError
from condense.readers import InputConfig, open_reader
from condense.schema import vectors_to_arrow
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
    assert [(i.file, i.start, i.stop) for i in items] == [
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
        img_col, txt_col = vectors_to_arrow(img), vectors_to_arrow(txt)
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


def test_two_names_for_one_file_number_are_an_error(tmp_path):
    write_clip_retrieval(tmp_path, _files(np.random.default_rng(0), [3, 3]))
    img = tmp_path / "img_emb"
    (img / "img_emb_01.npy").write_bytes((img / "img_emb_1.npy").read_bytes())
    with pytest.raises(
        InputError, match=r"img_emb_01\.npy and .*img_emb_1\.npy both claim file number 1"
    ):
        open_reader(InputConfig(path=str(tmp_path)))


def spoiled_corpus(root, payload: str) -> None:
    """A one-file clip-retrieval corpus whose img_emb_0.npy is spoiled as `payload` says."""
    write_clip_retrieval(root, _files(np.random.default_rng(0), [3]))
    path = root / "img_emb" / "img_emb_0.npy"
    good = np.load(path)
    if payload == "zip":
        with open(path, "wb") as f:
            np.savez(f, a=good)
    elif payload == "object":
        np.save(path, np.array([[object()] * 8] * 3, dtype=object), allow_pickle=True)
    elif payload == "big-endian":
        np.save(path, good.astype(">f4"))
    elif payload == "float64":
        np.save(path, good.astype(np.float64))
    else:
        path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("zip", r"a zip archive \(\.npz\)"),
        ("object", "holds Python objects"),
        ("big-endian", "big-endian >f4"),
        ("float64", "expected float16 or float32, got float64"),
        ("truncated", "truncated"),
    ],
)
def test_npy_files_that_cannot_be_memory_mapped_are_named(tmp_path, payload, message):
    spoiled_corpus(tmp_path, payload)
    with pytest.raises(InputError, match=rf"img_emb_0\.npy: .*{message}"):
        open_reader(InputConfig(path=str(tmp_path)))


def _parquet(tmp_path, ids, img, txt=None):
    folder = tmp_path / "pq"
    folder.mkdir(exist_ok=True)
    txt = img if txt is None else txt
    pq.write_table(
        pa.table({"sample_id": ids, "img_emb": img, "txt_emb": txt}), folder / "x.parquet"
    )
    return InputConfig(path=str(folder))


def test_parquet_null_vectors_are_dropped_rows_even_the_first(tmp_path):
    vectors = pa.array([None, [1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32()))
    reader = open_reader(_parquet(tmp_path, ["a", "b", "c"], vectors))
    assert reader.dim == 2
    rows = reader.read(reader.plan(10)[0])
    assert np.isnan(rows.img[0]).all() and np.array_equal(rows.img[1:], [[1, 0], [0, 1]])


def test_parquet_ragged_vectors_are_an_error_naming_the_file(tmp_path):
    vectors = pa.array([[1.0, 0.0], [0.0, 1.0, 0.0]], pa.list_(pa.float32()))
    reader = open_reader(_parquet(tmp_path, ["a", "b"], vectors))
    with pytest.raises(
        InputError, match=r"x\.parquet: column 'img_emb': embedding rows have different lengths"
    ):
        reader.read(reader.plan(10)[0])


def test_binary_or_non_utf8_ids_are_errors_naming_the_file(tmp_path):
    vectors = pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32()))
    with pytest.raises(InputError, match=r"x\.parquet: id column 'sample_id' holds binary"):
        open_reader(_parquet(tmp_path, pa.array([b"a", b"b"], pa.binary()), vectors))
    bad = pa.array([b"ok", b"\xff\xfe"], pa.binary()).view(pa.string())
    reader = open_reader(_parquet(tmp_path, bad, vectors))
    with pytest.raises(InputError, match=r"x\.parquet: column 'sample_id' is not valid UTF-8"):
        reader.read(reader.plan(10)[0])
    reader = open_reader(_parquet(tmp_path, pa.array([7, 8], pa.int64()), vectors))
    assert reader.read(reader.plan(10)[0]).sample_id == ["7", "8"]  # integers are fine
