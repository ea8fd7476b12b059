"""WebDataset shards read safely: unsafe members skipped, damage contained, captions checked;
image bytes decoded to RGB whatever their mode, bad ones dropped by reason."""

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from condense.cores.images import decode_rgb
from condense.readers.shards import member_key, read_shard, usable


def image_bytes(mode="RGB", size=(16, 12), fmt="PNG", **kw):
    color = {"RGB": (200, 10, 10), "RGBA": (0, 0, 255, 0), "L": 128, "CMYK": (0, 255, 0, 0), "P": 3}
    buf = io.BytesIO()
    Image.new(mode, size, color.get(mode, 1)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_tar(members, *, symlink=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def samples(data: bytes):
    dropped = Counter()
    return list(read_shard(io.BytesIO(data), dropped)), dropped


def test_samples_grouped_by_key_with_caption_and_meta():
    png = image_bytes()
    tar = make_tar(
        [
            ("000000000.jpg", png),
            ("000000000.txt", b"a red square"),
            ("000000000.json", json.dumps({"url": "http://x/0"}).encode()),
            ("000000001.png", png),
            ("000000001.txt", "ünïcode caption".encode()),
        ]
    )
    got, dropped = samples(tar)
    assert [s.key for s in got] == ["000000000", "000000001"]
    assert got[0].caption == "a red square" and got[0].meta == {"url": "http://x/0"}
    assert got[1].caption == "ünïcode caption" and got[1].image_ext == "png"
    assert all(usable(s) is None for s in got) and not dropped


def test_unsafe_members_are_skipped_and_counted():
    png = image_bytes()
    tar = make_tar(
        [
            ("/abs/evil.jpg", png),
            ("../escape.jpg", png),
            ("a/../../b.jpg", png),
            ("ok.jpg", png),
            ("ok.txt", b"fine"),
        ],
        symlink="link.jpg",
    )
    got, dropped = samples(tar)
    assert [s.key for s in got] == ["ok"]
    assert dropped["unsafe_member"] == 4
    for bad in ("/x.jpg", "../x.jpg", "a/../x.jpg", ".hidden.jpg", "noext", "a\\b.jpg", ""):
        assert member_key(bad) is None
    assert member_key("sub/000.JPG") == ("sub/000", "jpg")


def test_truncated_tar_keeps_what_came_before():
    png = image_bytes(size=(64, 64))
    members = []
    for i in range(5):
        members += [(f"{i:03d}.png", png + bytes(2000)), (f"{i:03d}.txt", b"cap")]
    data = make_tar(members)
    got, dropped = samples(data[: len(data) * 3 // 5])  # cut in the middle of a member
    assert 1 <= len(got) < 5
    assert [s.key for s in got] == [f"{i:03d}" for i in range(len(got))]
    assert all(usable(s) is None for s in got)
    assert dropped["truncated_tar"] == 1
    assert samples(b"not a tar at all" * 10)[0] == []  # garbage: nothing, no exception


def test_bad_captions_and_missing_parts_have_reasons():
    png = image_bytes()
    tar = make_tar(
        [
            ("a.jpg", png),  # no caption
            ("b.jpg", png),
            ("b.txt", b"\xff\xfe\xfa"),  # not UTF-8
            ("c.txt", b"caption without image"),
            ("d.jpg", b""),
            ("d.txt", b"empty image"),
            ("e.jpg", png),
            ("e.txt", b"ok"),
            ("e.json", b"{not json"),
        ]
    )
    got, _ = samples(tar)
    assert {s.key: usable(s) for s in got} == {
        "a": "missing_caption",
        "b": "caption_not_utf8",
        "c": "missing_image",
        "d": "empty_image",
        "e": "bad_json",
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"\x89PNG\r\n\x1a\n garbage", "corrupt_image"),
        (image_bytes(fmt="JPEG")[:200], "corrupt_image"),  # truncated JPEG
    ],
)
def test_bad_image_bytes_are_dropped_by_reason(data, reason):
    assert decode_rgb(data) == (None, reason)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "JPEG"),
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("RGB", "WEBP"),
    ],
)
def test_every_mode_becomes_rgb(mode, fmt):
    image, reason = decode_rgb(image_bytes(mode=mode, fmt=fmt))
    assert reason is None and image.mode == "RGB" and image.size == (16, 12)
    if mode == "RGBA":  # fully transparent blue: composited on white
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_guard():
    assert decode_rgb(image_bytes(size=(200, 200)), max_pixels=10_000) == (None, "too_large")
    huge = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(huge, format="PNG")  # 400M pixels, tiny file
    assert decode_rgb(huge.getvalue()) == (None, "too_large")


def test_shards_listed_and_streamed_through_fsspec():
    """input.path may be any fsspec URL: shards are found below it and streamed from it."""
    import fsspec

    from condense.readers.webdataset import list_shards, open_shard

    fs = fsspec.filesystem("memory")
    data = make_tar([("k1.jpg", image_bytes()), ("k1.txt", b"one"), ("k2.txt", b"two")])
    fs.pipe("/bucket/laion/00000.tar", data)
    fs.pipe("/bucket/laion/sub/00001.tar", data)
    fs.pipe("/bucket/laion/readme.md", b"not a shard")
    items = list_shards("memory://bucket/laion")
    assert [i["source"] for i in items] == ["00000.tar", "sub/00001.tar"]
    assert [i["path"] for i in items] == [
        "memory://bucket/laion/00000.tar",
        "memory://bucket/laion/sub/00001.tar",
    ]
    with open_shard(items[1]["path"]) as f:
        got = [(s.key, s.caption) for s in read_shard(f, Counter())]
    assert got == [("k1", "one"), ("k2", "two")]
