"""A property of the image decode step: for random mixes of good samples and every kind of bad
one in random order, what comes out of a shard is exactly its good samples, in shard order, and
every bad one is one drop under its own reason, whatever the batch size.

The decode step (`decode_shard`) is the function the embed actors run; here it runs in
this process on 30 random shards. tests/stages/test_embed_images.py runs a mix through Ray."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from condense.readers import InputConfig
from condense.readers.webdataset import Shard
from condense.stages.embed.clip import ModelConfig
from condense.stages.embed.images import decode_shard
from tests.stages.test_embed_images import TINY, picture

LIMITS = {"max_text_bytes": 2000, "max_members_per_sample": 6}


def _png(size):
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


THIN = _png((1, 3000))
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"


def bad_kinds(key: str, i: int) -> dict[str, tuple[list, str]]:
    """Bad samples by kind: (members, the drop reason condense must give)."""
    jpg, txt = picture(i), f"caption {i}".encode()
    return {
        "corrupt": ([(f"{key}.jpg", b"\xff\xd8garbage"), (f"{key}.txt", txt)], "corrupt_image"),
        "no_caption": ([(f"{key}.jpg", jpg)], "missing_caption"),
        "not_utf8": ([(f"{key}.jpg", jpg), (f"{key}.txt", b"\xff\xfe")], "caption_not_utf8"),
        "empty": ([(f"{key}.jpg", b""), (f"{key}.txt", txt)], "empty_image"),
        "no_image": ([(f"{key}.txt", txt)], "missing_image"),
        "bad_json": (
            [(f"{key}.jpg", jpg), (f"{key}.txt", txt), (f"{key}.json", b"{")],
            "bad_json",
        ),
        "two_images": (
            [(f"{key}.jpg", jpg), (f"{key}.png", picture(i, fmt="PNG")), (f"{key}.txt", txt)],
            "two_images",
        ),
        "repeated": (
            [(f"{key}.jpg", jpg), (f"{key}.txt", txt), (f"{key}.TXT", txt)],
            "duplicate_member",
        ),
        "eps": ([(f"{key}.jpg", EPS), (f"{key}.txt", txt)], "unsupported_format"),
        "thin": ([(f"{key}.png", THIN), (f"{key}.txt", txt)], "extreme_aspect"),
        "unsafe": ([(f"../{key}.jpg", jpg), (f"../{key}.txt", txt)], "unsafe_member"),
        "long_caption": ([(f"{key}.jpg", jpg), (f"{key}.txt", b"x" * 3000)], "oversized_member"),
        "many_members": (
            [(f"{key}.jpg", jpg), (f"{key}.txt", txt)] + [(f"{key}.m{j}", b"") for j in range(6)],
            "too_many_members",
        ),
        "bad_name": ([(f"{key}\udce9.jpg", jpg), (f"{key}\udce9.txt", txt)], "bad_member_name"),
    }


def random_shard(rng, shard: int):
    """(tar bytes, good keys in order, expected drops, urls nulled) of one random shard."""
    members, good, dropped, nulled = [], [], Counter(), 0
    kinds = list(bad_kinds("k", 0))
    for i in range(int(rng.integers(5, 25))):
        key = f"{shard:02d}{i:04d}"
        if rng.random() < 0.5:
            url = "http://x/\udcff" if rng.random() < 0.2 else f"http://x/{key}"
            meta = json.dumps({"url": url}).encode()
            entry = [(f"{key}.jpg", picture(i)), (f"{key}.txt", f"c{i}".encode())]
            if rng.random() < 0.7:  # most samples have a .json; a lone surrogate url is nulled
                entry.append((f"{key}.json", meta))
                nulled += "\udcff" in url
            members += entry
            good.append(key)
        else:
            kind = kinds[int(rng.integers(len(kinds)))]
            entry, reason = bad_kinds(key, i)[kind]
            members += entry
            dropped[reason] += 1
    if good and rng.random() < 0.3:  # a member of an earlier good sample comes back later
        members.append((f"{good[0]}.cls", b"7"))
        dropped["split_sample"] += 1
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape"
    ) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue(), good, dropped, nulled


@pytest.mark.parametrize("seed", range(30))
def test_only_the_good_samples_come_out_and_every_bad_one_is_counted(tmp_path, seed):
    rng = np.random.default_rng(seed)
    data, good, dropped, nulled = random_shard(rng, seed)
    (tmp_path / "s.tar").write_bytes(data)
    item = Shard(part="s", source="s.tar", path=str(tmp_path / "s.tar"))
    limits = InputConfig(kind="webdataset", path=str(tmp_path), limits=LIMITS).limits
    outputs = []
    for batch_size in (1, int(rng.integers(2, 9)), 64):
        model = ModelConfig(name=TINY, batch_size=batch_size)
        decoded: dict = {}
        batches = list(decode_shard(item, model, None, str(tmp_path / "guard"), limits, decoded))
        assert all(len(b["sample_id"]) <= batch_size for b in batches)
        ids = [i for b in batches for i in b["sample_id"].tolist()]
        urls = [u for b in batches for u in b["url"].tolist()]
        pixels = np.concatenate([b["pixels"] for b in batches]) if batches else None
        outputs.append((ids, urls, pixels))
        assert ids == good  # exactly the good samples, in shard order
        assert decoded["dropped"] == dict(dropped)
        assert decoded["nulled"] == ({"url": nulled} if nulled else {})
        assert decoded["rows"] == len(good)
    for ids, urls, pixels in outputs[1:]:  # the same rows at every batch size
        assert ids == outputs[0][0] and urls == outputs[0][1]
        if pixels is not None:
            assert np.array_equal(pixels, outputs[0][2])


def test_an_id_repeated_within_a_shard_stops_it_at_once_naming_both_samples(tmp_path):
    """With input.id_column the ids come from each sample's .json: a repeat is caught as the
    shard is read, before anything is encoded (across shards, embed's id check catches it)."""
    from condense.errors import InputError

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for key, sid in (("a", "x1"), ("b", "x2"), ("c", "x1")):
            for ext, data in (
                ("jpg", picture(1)),
                ("txt", b"c"),
                ("json", json.dumps({"sid": sid}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    item = Shard(part="s", source="s.tar", path=str(tmp_path / "s.tar"))
    limits = InputConfig(kind="webdataset", path=str(tmp_path)).limits
    model = ModelConfig(name=TINY, batch_size=64)
    with pytest.raises(InputError, match="shard s.tar: sample_id 'x1' .* in samples 'a' and 'c'"):
        list(decode_shard(item, model, "sid", str(tmp_path / "guard"), limits))
