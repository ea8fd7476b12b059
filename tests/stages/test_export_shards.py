"""Stage export for image inputs: the coreset as WebDataset shards in img2dataset's layout,
copied byte for byte, coreset.json in the LLaVA format, and everything read back."""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from condense.pipeline.runner import run_pipeline
from tests.conftest import make_config, quiet_log
from tests.stages.test_embed_images import TINY, sample, write_shard


def members_of(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-shards")
    shards = tmp / "shards"
    (shards / "sub").mkdir(parents=True)
    write_shard(shards / "00000.tar", [sample(f"a{i:03d}", i) for i in range(12)])
    odd = [sample("b 000", 100), sample("b001", 101, pickle=b"\x80\x04evil")]
    write_shard(shards / "00001.tar", odd + [sample(f"b{i:03d}", 100 + i) for i in range(2, 12)])
    write_shard(shards / "sub" / "00002.tar", [sample(f"c{i:03d}", 200 + i) for i in range(12)])
    cfg = make_config(
        shards,
        input={"kind": "webdataset"},
        embed={"model": {"name": TINY, "batch_size": 8}},
        cluster={"k": 2, "sample_size": 1000},
        # Keep every row through the selection, so the coreset spans every source shard.
        dedup={"threshold": 0.9999},
        clip_band={"lo": 0.0, "hi": 1.0},
        centroid_band={"lo": 0.0, "hi": 1.0},
        sample={"n": 13, "seed": 3},
        export={"shard_size": 5},
    )
    run = tmp / "run"
    run_pipeline(cfg, run, log=quiet_log, progress=False)
    return cfg, shards, run


def coreset_of(run):
    rows = pq.read_table(run / "sample", columns=["sample_id", "kept"]).to_pandas()
    return set(rows.sample_id[rows.kept])


def test_shards_hold_exactly_the_coreset_byte_for_byte(exported):
    _, shards, run = exported
    coreset = coreset_of(run)
    assert len(coreset) == 13
    out = run / "export" / "shards"
    assert sorted(p.name for p in out.iterdir()) == [
        f"{i:05d}{suffix}" for i in range(3) for suffix in (".parquet", ".tar", "_stats.json")
    ]
    sources = {}
    for path in sorted(shards.rglob("*.tar")):
        for name, data in members_of(path).items():
            sources[name] = data
    seen = []
    for i, count in enumerate((5, 5, 3)):
        index = pq.read_table(out / f"{i:05d}.parquet").to_pandas()
        stats = json.loads((out / f"{i:05d}_stats.json").read_text())
        assert len(index) == count == stats["count"] == stats["successes"]
        tar = members_of(out / f"{i:05d}.tar")
        assert len(tar) == 3 * count  # jpg, txt, json per sample; never the .pickle
        for row in index.itertuples():
            seen.append(row.sample_id)
            for ext in ("jpg", "txt", "json"):
                assert tar[f"{row.key}.{ext}"] == sources[f"{row.sample_id}.{ext}"]
            assert row.caption == sources[f"{row.sample_id}.txt"].decode()
            assert row.image_ext == "jpg" and row.status == "success"
    assert sorted(seen) == sorted(coreset) and len(seen) == len(set(seen))
    # The key with a space became a safe member name; the original id stays in the index.
    keys = pq.read_table(sorted(out.glob("*.parquet"))).to_pandas().set_index("sample_id").key
    if "b 000" in coreset:
        assert " " not in keys["b 000"] and keys["b 000"].startswith("b_000-")


def test_shards_read_back_with_webdataset(exported):
    import webdataset as wds

    _, _, run = exported
    urls = [str(p) for p in sorted((run / "export" / "shards").glob("*.tar"))]
    count = 0
    for item in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        assert isinstance(item["jpg"], Image.Image) and item["jpg"].size[0] > 0
        assert item["txt"].startswith("a photo number")
        assert item["json"]["url"].startswith("http://127.0.0.1/")
        count += 1
    assert count == 13


def test_coreset_json_is_llava_pretrain_format(exported):
    _, _, run = exported
    entries = json.loads((run / "export" / "coreset.json").read_text())
    assert {e["id"] for e in entries} == coreset_of(run) and len(entries) == 13
    out = run / "export" / "shards"
    for e in entries:
        shard, member = e["image"].split("/")
        data = members_of(out / f"{shard}.tar")[member]
        Image.open(io.BytesIO(data)).load()
        human, gpt = e["conversations"]
        assert human == {"from": "human", "value": "<image>\n"}
        assert (
            gpt["from"] == "gpt"
            and gpt["value"]
            == members_of(out / f"{shard}.tar")[member.replace(".jpg", ".txt")].decode()
        )
    mark = json.loads((run / "export" / "_stage.json").read_text())
    assert mark["rows_out"] == 13 and mark["shards"] == 3 and mark["kind"] == "webdataset"
    lists = {p.name: p.read_text().split("\n")[:-1] for p in (run / "export" / "keys").glob("*")}
    assert set(lists) <= {"00000.txt", "00001.txt", "00002.txt"}  # one per source tar
    assert sorted(k for keys in lists.values() for k in keys) == sorted(coreset_of(run))
    assert all(k.startswith("abc"[int(name[4])]) for name, keys in lists.items() for k in keys)


def test_order_does_not_depend_on_shard_size(exported):
    cfg, _, run = exported
    first = [
        k
        for p in sorted((run / "export" / "shards").glob("*.parquet"))
        for k in pq.read_table(p).column("sample_id").to_pylist()
    ]
    tars = b"".join(p.read_bytes() for p in sorted((run / "export" / "shards").glob("*.tar")))
    cfg2 = cfg.model_copy(update={"export": cfg.export.model_copy(update={"shard_size": 100})})
    run_pipeline(cfg2, run, log=quiet_log, progress=False)
    out = run / "export" / "shards"
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    assert pq.read_table(out / "00000.parquet").column("sample_id").to_pylist() == first
    # Back to 5 per shard: byte-identical tars (fixed member metadata).
    run_pipeline(cfg, run, log=quiet_log, progress=False)
    again = b"".join(p.read_bytes() for p in sorted((run / "export" / "shards").glob("*.tar")))
    assert again == tars


def test_workers_killed_mid_shard_leave_what_an_uninterrupted_run_leaves(
    exported, tmp_path, failpoints
):
    """A decode task, the encoder actor and an export copier SIGKILLed mid-shard: Ray retries
    them, and embed/, sample/, export/, the shards' bytes and coreset.json are the
    uninterrupted run's."""
    import pandas as pd

    cfg, _, reference = exported
    marks = failpoints("decode_kill_once:a003", "encode_kill:00001", "export_kill:00001")
    killed = tmp_path / "killed"
    run_pipeline(cfg, killed, log=quiet_log, progress=False, executor="ray")
    assert sorted(p.name for p in marks.iterdir() if p.name != "spec") == [
        "decode_kill_once-a003",
        "encode_kill-00001",
        "export_kill-00001",
    ]  # each worker really was killed once
    for stage in ("embed", "sample", "export"):
        a, b = (
            pq.read_table(sorted((run / stage).glob("part-*.parquet")))
            .to_pandas()
            .sort_values("sample_id")
            .reset_index(drop=True)
            for run in (reference, killed)
        )
        pd.testing.assert_frame_equal(a, b)
    ours = sorted((reference / "export" / "shards").glob("*.tar"))
    theirs = sorted((killed / "export" / "shards").glob("*.tar"))
    assert [p.name for p in ours] == [p.name for p in theirs] and len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.read_bytes() == b.read_bytes()  # no sample missing, none twice, the same bytes
    for name in ("coreset.json",):
        assert (reference / "export" / name).read_bytes() == (killed / "export" / name).read_bytes()
