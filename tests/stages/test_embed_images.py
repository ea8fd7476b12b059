"""Stage embed from WebDataset shards with a (tiny, random-weight) open_clip model on Ray actors:
bad samples dropped by reason, never losing the rest of their shard; the pipeline runs on."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import REPO, make_config, quiet_log

TINY = str(REPO / "configs" / "models" / "tiny-clip.json")


def picture(i: int, mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (24 + i % 7, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path, samples, cut=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)


def sample(key, i, **override):
    members = {
        "jpg": picture(i),
        "txt": f"a photo number {i}".encode(),
        "json": json.dumps({"url": f"http://127.0.0.1/{key}.jpg", "key": key}).encode(),
    }
    members.update(override)
    return key, {k: v for k, v in members.items() if v is not None}


def embed_only(shards, run, batch_size, resume=False, log=quiet_log, executor=None, decode="auto"):
    from condense.pipeline.runner import compute_stage
    from condense.runtime.local import LocalExecutor
    from condense.stages.base import StageContext
    from condense.stages.embed import EmbedStage
    from condense.storage.rundir import RunDir
    from tests.readers.test_bad_sample_mixes import LIMITS

    cfg = make_config(
        shards,
        input={"kind": "webdataset", "limits": LIMITS},
        embed={"model": {"name": TINY, "batch_size": batch_size, "decode": decode}},
    )
    ctx = StageContext(
        run=RunDir(run), config=cfg, executor=executor or LocalExecutor(), progress=False
    )
    ctx.log = log
    compute_stage(ctx, EmbedStage(), "test", resume=resume)
    return pq.read_table(run / "embed").to_pandas().sort_values("sample_id").reset_index()


def mixed_shards(folder, seed: int, count: int = 3):
    """`count` shards of random good and bad samples: (the good keys, the drops by reason)."""
    from collections import Counter

    from tests.readers.test_bad_sample_mixes import random_shard

    folder.mkdir()
    rng = np.random.default_rng(seed)
    good, dropped = [], Counter()
    for s in range(count):
        data, keys, drops, _ = random_shard(rng, s)
        (folder / f"{s:05d}.tar").write_bytes(data)
        good += keys
        dropped += drops
    return good, dropped


def test_embeddings_do_not_depend_on_batch_size_and_resume_redoes_one_shard(ray_session, tmp_path):
    """Random mixes of good and bad samples over three shards, through Ray and in one process:
    the rows are exactly the good samples and every bad one is counted, at any batch size."""

    from condense.runtime.ray import RayExecutor

    shards = tmp_path / "shards"
    good, dropped = mixed_shards(shards, seed=7)
    # CMYK, palette, grayscale and alpha images become RGB; urls and captions come along.
    modes = [
        sample("30000", 103, jpg=picture(103, "CMYK")),
        sample("30001", 104, jpg=None, png=picture(104, "RGBA", "PNG")),
        sample("30002", 105, jpg=None, png=picture(105, "P", "PNG")),
        sample("30003", 106, jpg=picture(106, "L")),
    ]
    write_shard(shards / "00003.tar", modes)
    good += [key for key, _ in modes]
    # A truncated shard: cut where sample 4's header starts, samples 0-2 are whole, 3 is lost.
    write_shard(tmp_path / "whole.tar", [sample(f"4{i:04d}", 300 + i) for i in range(6)])
    data = (tmp_path / "whole.tar").read_bytes()
    (shards / "00004.tar").write_bytes(data[: data.index(b"40004.jpg")])
    good += ["40000", "40001", "40002"]
    dropped["truncated_tar"] += 1
    a = embed_only(shards, tmp_path / "a", batch_size=3, executor=RayExecutor())
    b = embed_only(shards, tmp_path / "b", batch_size=64)
    assert list(a.sample_id) == list(b.sample_id) == sorted(good)
    mark = json.loads((tmp_path / "a" / "embed" / "_stage.json").read_text())
    assert mark["dropped"] == dict(sorted(dropped.items())) and len(dropped) >= 5
    assert mark["rows_in"] == mark["rows_out"] + sum(mark["dropped"].values())
    row = a.set_index("sample_id").loc["30002"]
    assert row.caption == "a photo number 105" and row.url == "http://127.0.0.1/30002.jpg"
    assert list(a.source) == list(b.source) and list(a.caption) == list(b.caption)
    for column in ("img_emb", "txt_emb"):
        x, y = np.stack(a[column].to_numpy()), np.stack(b[column].to_numpy())
        assert np.allclose(x, y, atol=1e-5)
    assert not (tmp_path / "a" / "embed" / "_guard").exists()  # poison marks removed
    # Lose one part: a resumed run re-encodes that shard only and ends with the same rows.
    part = tmp_path / "a" / "embed" / "part-00001.parquet"
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "embed").glob("part-*.parquet")}
    part.unlink()
    (tmp_path / "a" / "embed" / "_parts" / "00001.json").unlink()
    (tmp_path / "a" / "embed" / "_stage.json").unlink()
    (tmp_path / "a" / "embed" / "_progress.json").write_text('{"fingerprint": "test"}')
    log = []
    again = embed_only(shards, tmp_path / "a", batch_size=3, resume=True, log=log.append)
    assert any("[embed] 1 shards: " in line for line in log)
    assert list(again.sample_id) == list(a.sample_id)
    for p, mtime in kept.items():
        if p != part:
            assert p.stat().st_mtime_ns == mtime


def test_device_decode_keeps_the_same_samples_as_pillow(tmp_path):
    """The bad-sample mixes decoded by torchvision (the device path, on the CPU here): the same
    rows kept and dropped as with Pillow, the same captions, embeddings within decoder
    tolerance."""

    shards = tmp_path / "shards"
    good, dropped = mixed_shards(shards, seed=11)
    log = []
    a = embed_only(shards, tmp_path / "a", batch_size=4, decode="device", log=log.append)
    b = embed_only(shards, tmp_path / "b", batch_size=4, decode="pil")
    assert any("decoded by the device (Pillow for the rest)" in line for line in log)
    assert list(a.sample_id) == list(b.sample_id) == sorted(good)
    marks = [json.loads((tmp_path / r / "embed" / "_stage.json").read_text()) for r in "ab"]
    assert marks[0]["dropped"] == marks[1]["dropped"] == dict(sorted(dropped.items()))
    assert list(a.caption) == list(b.caption)
    x, y = np.stack(a.img_emb.to_numpy()), np.stack(b.img_emb.to_numpy())
    assert (x * y).sum(axis=1).min() > 0.99
    assert not np.array_equal(x, y)  # the JPEGs went through torchvision's decoder
    assert np.array_equal(np.stack(a.txt_emb.to_numpy()), np.stack(b.txt_emb.to_numpy()))
