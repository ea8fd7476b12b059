"""The distributed duplicate-id check finds every repeat whatever the number of hash buckets."""

import numpy as np
import pyarrow as pa
import pytest

from condense.cores.hashing import hash_ids, repeated
from condense.errors import InputError
from condense.runtime.local import LocalExecutor
from condense.runtime.ray import RayExecutor
from condense.stages.embed.ids import ID_HASH_SEED, check_unique_ids, write_id_hashes
from condense.storage.parts import write_part


def test_repeated_marks_every_copy():
    assert repeated(np.array([1, 2, 2, 3, 5, 5, 5], np.uint64)).tolist() == [0, 1, 1, 0, 1, 1, 1]
    assert repeated(np.array([], np.uint64)).tolist() == []
    assert repeated(np.array([4], np.uint64)).tolist() == [False]


def _write(folder, parts):
    """Parts as embed writes them: rows in id-hash order; source rows 100 + input position."""
    for name, ids in parts.items():
        hashes = hash_ids(ids, ID_HASH_SEED) if ids else np.zeros(0, np.uint64)
        order = np.argsort(hashes, kind="stable")
        table = pa.table(
            {"sample_id": [ids[i] for i in order], "source": [f"{name}.src"] * len(ids)}
        )
        write_part(table, folder, name)
        write_id_hashes(folder, name, hashes[order], order + 100)


@pytest.mark.parametrize("rows_per_bucket", [1, 3, 1000])
def test_repeats_found_at_any_bucket_count(ray_session, tmp_path, rows_per_bucket):
    parts = {
        "a": [f"id{i}" for i in range(0, 20)],
        "b": [f"id{i}" for i in range(20, 40)] + ["id7"],
        "c": ["id33", "x", "y"],
    }
    _write(tmp_path, parts)
    executor = RayExecutor() if rows_per_bucket == 3 else LocalExecutor()  # both executors
    with pytest.raises(InputError) as err:
        check_unique_ids(executor, tmp_path, list(parts), 44, rows_per_bucket=rows_per_bucket)
    msg = str(err.value)
    assert "'id7' in a.src row 107, b.src row 120" in msg
    assert "'id33' in b.src row 113, c.src row 100" in msg


def test_unique_ids_pass(tmp_path):
    parts = {"a": [f"id{i}" for i in range(50)], "b": [f"j{i}" for i in range(50)], "e": []}
    _write(tmp_path, parts)
    check_unique_ids(LocalExecutor(), tmp_path, list(parts), 100, rows_per_bucket=7)
