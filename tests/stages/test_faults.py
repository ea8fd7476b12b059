"""Faults on real Ray processes (condense/faults.py failpoints SIGKILL them): a poison sample
that kills every decoder it meets is named, or dropped when asked. (Workers killed mid-shard:
tests/stages/test_export_shards.py, which has an uninterrupted run to compare with.)"""

import json

import pyarrow.parquet as pq
import pytest

from condense.cli import _find_condense_error
from condense.pipeline.runner import run_pipeline
from tests.conftest import make_config, quiet_log
from tests.stages.test_embed_images import TINY, sample, write_shard


def shards(tmp_path, per_shard=6):
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        write_shard(
            folder / f"{s:05d}.tar",
            [sample(f"{s}x{i:04d}", 10 * s + i) for i in range(per_shard)],
        )
    return folder


def config(folder, **limits):
    return make_config(  # on Ray: its workers are killed
        folder,
        executor="ray",
        input={"kind": "webdataset", "limits": limits},
        embed={"model": {"name": TINY, "batch_size": 4}},
        cluster={"k": 2, "sample_size": 1000},
        dedup={"threshold": 0.9999},
        clip_band={"lo": 0.0, "hi": 1.0},
        centroid_band={"lo": 0.0, "hi": 1.0},
        sample={"n": 1000},
        export={"shard_size": 5},
    )


def test_a_poison_sample_is_named_then_skipped_on_resume(ray_session, tmp_path, failpoints):
    """Every worker that decodes it dies (as on an OOM decode): Ray retries the task a bounded
    number of times, and the run stops naming the shard, the sample and the setting; resumed
    with that setting, the poison is dropped (its mark kept) and the rest of its shard kept."""
    folder = shards(tmp_path)
    failpoints("decode_kill:1x0002")
    cfg = config(folder, poison_after=1)  # the first death makes it poison: one retry
    with pytest.raises(Exception) as info:
        run_pipeline(cfg, tmp_path / "a", until="embed", log=quiet_log, progress=False)
    error = str(_find_condense_error(info.value))
    assert "shard 00001.tar: sample '1x0002'" in error
    assert "killed its decode worker 1 time (an out-of-memory decode" in error
    assert "--resume and input.limits.skip_poison: true" in error
    cfg = config(folder, poison_after=1, skip_poison=True)
    run_pipeline(cfg, tmp_path / "a", until="embed", log=quiet_log, progress=False, resume=True)
    mark = json.loads((tmp_path / "a" / "embed" / "_stage.json").read_text())
    assert mark["dropped"] == {"poison_sample": 1} and mark["rows_out"] == 17
    ids = pq.read_table(tmp_path / "a" / "embed", columns=["sample_id"]).column(0).to_pylist()
    assert "1x0002" not in ids and {"1x0001", "1x0003"} <= set(ids)


def test_a_poison_sample_is_dropped_when_asked_and_the_rest_of_its_shard_kept(tmp_path):
    """What a retried decode task finds: the mark of a predecessor that died decoding sample 2
    (once already before). In one process, the same decode step Ray runs."""
    import struct

    from condense.errors import InputError
    from condense.readers import InputConfig
    from condense.readers.webdataset import Shard
    from condense.stages.embed.clip import ModelConfig
    from condense.stages.embed.images import INFLIGHT, decode_shard

    folder = shards(tmp_path)
    item = Shard(part="00001", source="00001.tar", path=str(folder / "00001.tar"))
    scratch = tmp_path / "scratch"
    model = ModelConfig(name=TINY, batch_size=4)

    counts: dict = {}

    def decode(**limits):
        (scratch / "00001").mkdir(parents=True, exist_ok=True)
        (scratch / "00001" / INFLIGHT).write_bytes(struct.pack("<qq", 2, 1))
        cfg = InputConfig(kind="webdataset", path=str(folder), limits=limits)
        return list(decode_shard(item, model, None, str(scratch), cfg.limits, counts))

    with pytest.raises(InputError, match="sample '1x0002' .* killed its decode worker 2 times"):
        decode()
    batches = decode(skip_poison=True)
    ids = [i for b in batches for i in b["sample_id"].tolist()]
    assert ids == ["1x0000", "1x0001", "1x0003", "1x0004", "1x0005"]
    assert counts == {"rows": 5, "dropped": {"poison_sample": 1}, "nulled": {}}
    assert decode(skip_poison=True, poison_after=3)[0]["sample_id"].tolist()[2] == "1x0002"
