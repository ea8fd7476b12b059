"""WebDataset shards read safely (condense's own tar parser): every bad sample one counted drop,
named by reason, the rest of its shard kept; every bad file an error naming it; memory and
time bounded per sample and per shard."""

import bz2
import gzip
import io
import json
import lzma
import tarfile
import time
import tracemalloc
from collections import Counter

import pytest
from PIL import Image

from condense.errors import InputError
from condense.readers.shards import (
    ShardFile,
    ShardLimits,
    _number,
    drop_reason,
    member_key,
    read_samples,
)


def image_bytes(mode="RGB", size=(16, 12), fmt="PNG", **kw):
    color = {"RGB": (200, 10, 10), "RGBA": (0, 0, 255, 0), "L": 128, "CMYK": (0, 255, 0, 0), "P": 3}
    buf = io.BytesIO()
    Image.new(mode, size, color.get(mode, 1)).save(buf, format=fmt, **kw)
    return buf.getvalue()


PNG = image_bytes()


def make_tar(members, *, fmt=tarfile.USTAR_FORMAT, special=()) -> bytes:
    """A tar of (name, bytes) members; `special` adds (name, tarfile type) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in special:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
    return buf.getvalue()


def good(key, caption=b"a caption"):
    return [(f"{key}.jpg", PNG), (f"{key}.txt", caption)]


def samples(data, limits: ShardLimits | None = None):
    """(the usable samples, drop counts by reason, samples in all) of tar bytes or a stream."""
    kept, dropped, total = [], Counter(), 0
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    for sample in read_samples(stream, limits or ShardLimits(), "test.tar"):
        total += 1
        reason = drop_reason(sample)
        if reason is None:
            kept.append(sample)
        else:
            dropped[reason] += 1
    return kept, dropped, total


def keys(found):
    return [s.key for s in found]


# ------------------------------------------------------------------ samples and their members


def test_samples_grouped_by_key_with_caption_and_meta():
    tar = make_tar(
        [
            ("000000000.jpg", PNG),
            ("000000000.txt", b"a red square"),
            ("000000000.json", json.dumps({"url": "http://x/0"}).encode()),
            ("000000001.png", PNG),
            ("000000001.txt", "ünïcode caption".encode()),
        ]
    )
    got, dropped, total = samples(tar)
    assert keys(got) == ["000000000", "000000001"] and total == 2
    assert got[0].caption == "a red square" and got[0].meta == {"url": "http://x/0"}
    assert got[1].caption == "ünïcode caption" and got[1].image_ext == "png"
    assert not dropped
    assert [ext for ext, _ in got[0].members] == ["jpg", "txt", "json"]


def test_unsafe_members_are_one_drop_per_sample():
    tar = make_tar(
        [
            ("/abs/evil.jpg", PNG),
            ("/abs/evil.txt", b"two bad members, one sample"),
            ("../escape.jpg", PNG),
            ("a/../../b.jpg", PNG),
            *good("ok"),
        ],
        special=[
            ("link.jpg", tarfile.SYMTYPE),
            ("hard.jpg", tarfile.LNKTYPE),
            ("dev.jpg", tarfile.CHRTYPE),
            ("fifo.jpg", tarfile.FIFOTYPE),
        ],
    )
    got, dropped, total = samples(tar)
    assert keys(got) == ["ok"]
    assert dropped == {"unsafe_member": 7} and total == 8
    for bad in (
        "/x.jpg",
        "../x.jpg",
        "a/../x.jpg",
        ".hidden.jpg",
        "noext",
        "a\\b.jpg",
        "",
        "a//b.x",
    ):
        assert member_key(bad) is None
    assert member_key("sub/000.JPG") == ("sub/000", "jpg")


def test_folder_entries_are_ignored():
    tar = make_tar(good("sub/a"), special=[("sub", tarfile.DIRTYPE)])
    got, dropped, total = samples(tar)
    assert keys(got) == ["sub/a"] and not dropped and total == 1


def test_bad_captions_and_missing_parts_have_reasons():
    tar = make_tar(
        [
            ("a.jpg", PNG),  # no caption
            ("b.jpg", PNG),
            ("b.txt", b"\xff\xfe\xfa"),  # not UTF-8
            ("c.txt", b"caption without image"),
            ("d.jpg", b""),
            ("d.txt", b"empty image"),
            ("e.jpg", PNG),
            ("e.txt", b"ok"),
            ("e.json", b"{not json"),
            ("f.jpg", PNG),
            ("f.txt", b"nested"),
            ("f.json", b"[" * 100_000),  # would exhaust the parser's recursion
            ("g.jpg", PNG),
            ("g.png", PNG),
            ("g.txt", b"two images"),
        ]
    )
    reasons = {s.key: drop_reason(s) for s in read_samples(io.BytesIO(tar))}
    assert reasons == {
        "a": "missing_caption",
        "b": "caption_not_utf8",
        "c": "missing_image",
        "d": "empty_image",
        "e": "bad_json",
        "f": "bad_json",
        "g": "two_images",
    }


def test_repeated_member_and_names_differing_in_case_drop_the_sample():
    tar = make_tar(
        [
            *good("a"),
            ("a.TXT", b"the same member again, upper case"),
            *good("b"),
            ("b.jpg", PNG),  # the very same name twice
            *good("c"),
        ]
    )
    got, dropped, _ = samples(tar)
    assert keys(got) == ["c"] and dropped == {"duplicate_member": 2}


def test_samples_whose_members_are_not_consecutive():
    """A key seen again later is a split sample: the later fragment is one drop."""
    tar = make_tar([*good("a"), *good("b"), ("a.json", b"{}"), *good("c")])
    got, dropped, total = samples(tar)
    assert keys(got) == ["a", "b", "c"] and dropped == {"split_sample": 1} and total == 4


def test_member_names_that_are_not_utf8():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for name, data in [("caf\xe9.jpg", PNG), ("caf\xe9.txt", b"latin-1 name"), *good("ok")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    got, dropped, _ = samples(buf.getvalue())
    assert keys(got) == ["ok"] and dropped == {"bad_member_name": 1}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_in_pax_and_gnu_headers(fmt):
    long_key = "d" * 120 + "/" + "k" * 150
    tar = make_tar([*good(long_key), *good("é" * 80)], fmt=fmt)
    got, dropped, _ = samples(tar)
    assert keys(got) == [long_key, "é" * 80] and not dropped


def _pax_entry(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def _record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def test_headers_larger_than_the_limit_cost_one_drop_and_bounded_memory():
    huge_path = _record(b"path", b"x" * 30_000_000 + b".jpg")
    pax = _pax_entry(huge_path + _record(b"comment", b"y" * 10_000_000))
    member = tarfile.TarInfo("placeholder.jpg")
    member.size = len(PNG)
    body = member.tobuf(tarfile.USTAR_FORMAT) + PNG + bytes(-len(PNG) % 512)
    stream = io.BytesIO(pax + body + make_tar(good("after")))
    tracemalloc.start()
    got, dropped, _ = samples(stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys(got) == ["after"] and dropped == {"oversized_header": 1}
    assert peak < 8_000_000  # the 40 MB header streamed past in 1 MiB reads, never held
    # A GNU long name over the limit likewise.
    tar = make_tar([*good("n" * 70_000), *good("after")], fmt=tarfile.GNU_FORMAT)
    got, dropped, _ = samples(tar)
    assert keys(got) == ["after"] and dropped == {"oversized_header": 1}


def test_pax_size_record_overrides_the_header():
    data = b"x" * 700
    member = tarfile.TarInfo("big.txt")
    member.size = 1  # wrong on purpose: the pax record is authoritative
    tar = (
        make_tar([("big.jpg", PNG)])[:-1024]
        + _pax_entry(_record(b"size", b"700"))
        + member.tobuf(tarfile.USTAR_FORMAT)
        + data
        + bytes(-len(data) % 512)
        + make_tar(good("next"))
    )
    got, dropped, _ = samples(tar)
    assert keys(got) == ["big", "next"] and got[0].caption == "x" * 700 and not dropped


def test_oversized_members_are_one_drop_and_never_read():
    limits = ShardLimits(max_image_bytes=1000, max_text_bytes=100)
    tar = make_tar(
        [
            ("a.jpg", bytes(5000)),
            ("a.png", bytes(5000)),  # two oversized members: still one sample dropped
            ("a.txt", b"cap"),
            ("b.jpg", PNG[:900]),
            ("b.txt", b"c" * 200),  # an oversized caption
            ("c.jpg", PNG[:900]),
            ("c.txt", b"fine"),
            ("c.cls", bytes(10_000)),  # a member condense does not keep: skipped unread
        ]
    )
    got, dropped, total = samples(tar, limits)
    assert keys(got) == ["c"] and dropped == {"oversized_member": 2} and total == 3
    assert got[0].members == [("jpg", PNG[:900]), ("txt", b"fine")]


def test_millions_of_tiny_members_in_one_sample_keep_memory_flat():
    def peak(members: int) -> int:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("k.jpg")
            info.size = len(PNG)
            tar.addfile(info, io.BytesIO(PNG))
            for i in range(members):
                tar.addfile(tarfile.TarInfo(f"k.{i}"))  # empty members of one key
            for name, data in good("next"):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        tracemalloc.start()
        got, dropped, total = samples(buf, ShardLimits(max_members_per_sample=8))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert keys(got) == ["next"] and dropped == {"too_many_members": 1} and total == 2
        return peak

    # Ten times the members, the same memory: no list of headers, no set of member names.
    assert peak(20_000) - peak(2_000) < 200_000


def test_many_samples_per_shard_are_bounded():
    tar = make_tar([(f"{i}.txt", b"x") for i in range(20)])
    with pytest.raises(InputError, match="test.tar: more than input.limits.max_samples_per_shard"):
        samples(tar, ShardLimits(max_samples_per_shard=10))


# ------------------------------------------------------------------ damage, compression, joins


def test_truncated_tar_keeps_what_came_before():
    png = image_bytes(size=(64, 64))
    members = []
    for i in range(5):
        members += [(f"{i:03d}.png", png + bytes(2000)), (f"{i:03d}.txt", b"cap")]
    data = make_tar(members)
    got, dropped, _ = samples(data[: len(data) * 3 // 5])  # cut in the middle of a member
    assert 1 <= len(got) < 5
    assert keys(got) == [f"{i:03d}" for i in range(len(got))]
    assert dropped == {"truncated_tar": 1}


def test_truncation_right_after_a_member_ending_in_zeros_is_seen():
    zeros = bytes(1024)  # the member's data ends in zero blocks, like an end-of-archive marker
    data = make_tar([*good("a"), ("b.jpg", PNG), ("b.txt", b"c"), ("b.npy", zeros), *good("c")])
    end_of_b = data.index(b"c.jpg")  # the header of c starts here
    got, dropped, _ = samples(data[:end_of_b])
    assert keys(got) == ["a"] and dropped == {"truncated_tar": 1}


def test_truncation_between_two_samples_is_seen():
    data = make_tar([*good("a"), *good("b")])
    got, dropped, _ = samples(data[: data.index(b"b.jpg")])
    assert keys(got) == [] and dropped == {"truncated_tar": 1}  # a may have lost a member


def test_garbage_and_corrupt_headers():
    assert samples(b"not a tar at all" * 100)[1] == {"corrupt_tar": 1}
    assert samples(b"")[1] == {"truncated_tar": 1}
    data = bytearray(make_tar([*good("a"), *good("b"), *good("c")]))
    header_c = data.index(b"c.jpg")
    data[header_c + 130] ^= 0x11  # flip bits in c's size: its checksum no longer matches
    got, dropped, _ = samples(bytes(data))
    assert keys(got) == ["a"] and dropped == {"corrupt_tar": 1}


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_shards_named_tar_read_every_sample(compress):
    data = make_tar([*good("a"), *good("b"), *good("c")])
    got, dropped, _ = samples(compress(data))
    assert keys(got) == ["a", "b", "c"] and not dropped
    packed = compress(data)
    got, dropped, _ = samples(packed[: len(packed) - 40])  # cut inside the compressed stream
    assert dropped in ({"truncated_tar": 1}, {"corrupt_tar": 1}) and len(got) <= 3


def test_two_tars_concatenated_read_both_halves():
    first, second = make_tar([*good("a"), *good("b")]), make_tar([*good("c"), *good("d")])
    got, dropped, _ = samples(first + second)
    assert keys(got) == ["a", "b", "c", "d"] and not dropped
    got, _, _ = samples(gzip.compress(first) + gzip.compress(second))  # `cat a.tar.gz b.tar.gz`
    assert keys(got) == ["a", "b", "c", "d"]


def test_numbers_in_headers():
    assert _number(b"0000644\x00") == 0o644
    assert _number(b"\x80" + (12345).to_bytes(11, "big")) == 12345  # GNU base-256
    assert _number(b"\xff" * 12) is None and _number(b"12x4") is None


# ------------------------------------------------------------------ shards that do not end, read errors


class Endless(io.RawIOBase):
    """A stream that never ends: zeros, or a block pattern repeated forever."""

    def __init__(self, pattern: bytes = bytes(512), delay: float = 0.0):
        self.pattern, self.delay, self.pos = pattern, delay, 0

    def readable(self):
        return True

    def read(self, size=-1):
        if self.delay:
            time.sleep(self.delay)
        size = 1 << 16 if size < 0 else size
        out = bytearray()
        while len(out) < size:
            start = self.pos % len(self.pattern)
            piece = self.pattern[start : start + size - len(out)]
            out += piece
            self.pos += len(piece)
        return bytes(out)


def test_a_stream_of_zeros_stops_with_a_named_error():
    start = time.monotonic()
    with pytest.raises(InputError, match="zero.tar: more than 1,048,576 zero bytes"):
        list(read_samples(Endless(), ShardLimits(), "zero.tar"))
    assert time.monotonic() - start < 5


def test_an_endless_shard_stops_at_its_byte_and_time_bounds():
    sample = make_tar(good("x"))[:-1024]  # one sample, no end marker: repeated it has no end
    with pytest.raises(InputError, match="endless.tar: more than input.limits.max_shard_bytes"):
        for _ in read_samples(Endless(sample), ShardLimits(max_shard_bytes=1 << 20), "endless.tar"):
            pass
    with pytest.raises(InputError, match="slow.tar: reading took more than"):
        for _ in read_samples(
            Endless(sample, delay=0.01), ShardLimits(max_shard_seconds=0.3), "slow.tar"
        ):
            pass


def test_a_symlink_to_a_device_is_refused(tmp_path):
    link = tmp_path / "00000.tar"
    link.symlink_to("/dev/zero")
    with pytest.raises(InputError, match="00000.tar is not a regular file"):
        ShardFile(str(link))


class Flaky(io.BytesIO):
    """A file whose reads fail with OSError `failures` times in all (a transient network error)."""

    failures = 0

    def read(self, size=-1):
        if Flaky.failures > 0 and self.tell() > 600:
            Flaky.failures -= 1
            raise OSError("connection reset by peer")
        return super().read(size)


def test_read_errors_are_retried_then_named_never_counted_as_truncation(monkeypatch):
    import condense.readers.shards as shards

    monkeypatch.setattr(shards.time, "sleep", lambda s: None)
    data = make_tar([*good("a"), *good("b"), *good("c")])
    Flaky.failures = 2
    with ShardFile("s3://bucket/x.tar", retries=3, opener=lambda p: Flaky(data)) as f:
        got = [s.key for s in read_samples(f) if drop_reason(s) is None]
    assert got == ["a", "b", "c"] and Flaky.failures == 0
    Flaky.failures = 10
    failing = ShardFile("s3://bucket/x.tar", retries=3, opener=lambda p: Flaky(data))
    with pytest.raises(
        InputError, match=r"shard s3://bucket/x.tar: read failed at byte .* 4 attempts"
    ):
        list(read_samples(failing))


def test_shards_listed_and_streamed_through_fsspec():
    """input.path may be any fsspec URL: shards are found below it and streamed from it."""
    import fsspec

    from condense.readers.shards import open_shard
    from condense.readers.webdataset import list_shards

    fs = fsspec.filesystem("memory")
    data = make_tar([("k1.jpg", PNG), ("k1.txt", b"one"), ("k2.txt", b"two")])
    fs.pipe("/bucket/laion/00000.tar", data)
    fs.pipe("/bucket/laion/sub/00001.tar", data)
    fs.pipe("/bucket/laion/readme.md", b"not a shard")
    items = list_shards("memory://bucket/laion")
    assert [i.source for i in items] == ["00000.tar", "sub/00001.tar"]
    assert [i.path for i in items] == [
        "memory://bucket/laion/00000.tar",
        "memory://bucket/laion/sub/00001.tar",
    ]
    with open_shard(items[1].path) as f:
        got = [(s.key, s.caption) for s in read_samples(f)]
    assert got == [("k1", "one"), ("k2", "two")]


def test_malformed_pax_records_are_damage_not_a_crash():
    for records in (b" path=a.txt\n", b"99 path=a.txt\n", b"12 pathx.txt\n", b"abc path=x\n"):
        tar = make_tar(good("a"))[:-1024] + _pax_entry(records) + make_tar(good("b"))
        got, dropped, _ = samples(tar)
        assert keys(got) == [] and dropped == {"corrupt_tar": 1}, records


def test_large_pax_headers_are_skipped_in_chunks():
    tiny = b"".join(_record(b"c%d" % i, b"v") for i in range(400_000))  # 4 MB of records
    start = time.monotonic()
    got, dropped, _ = samples(
        _pax_entry(tiny) + make_tar([("x.jpg", PNG)])[:-1024] + make_tar(good("b"))
    )
    assert time.monotonic() - start < 1.0
    assert keys(got) == ["b"] and dropped == {"oversized_header": 1}


def test_an_extended_header_left_pending_at_an_archives_end_is_damage():
    first = make_tar(good("a"))[:-1024] + _pax_entry(_record(b"path", b"x.txt")) + bytes(1024)
    got, dropped, _ = samples(first + make_tar(good("b")))
    assert keys(got) == [] and dropped == {"truncated_tar": 1}  # b.jpg is never renamed x.txt


def test_junk_after_a_complete_archive_keeps_its_last_sample():
    got, dropped, total = samples(make_tar([*good("a"), *good("b")]) + b"\x01" * 512)
    assert keys(got) == ["a", "b"] and dropped == {"corrupt_tar": 1} and total == 3


def test_folders_links_and_devices_store_no_data_whatever_their_size_field():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE):
            info = tarfile.TarInfo("sub" if kind == tarfile.DIRTYPE else f"l{kind.decode()}.jpg")
            info.type, info.size = kind, 512  # a size, but no data follows (as tar writes)
            tar.addfile(info)
        for name, data in good("ok"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got, dropped, _ = samples(buf.getvalue())
    assert keys(got) == ["ok"] and dropped == {"unsafe_member": 2}


def test_a_sample_never_holds_two_images():
    big = bytes(4 << 20)
    members = [(f"k.{ext}", big) for ext in ("jpg", "jpeg", "png", "webp", "gif", "bmp")]
    stream = io.BytesIO(make_tar([*members, ("k.txt", b"c"), *good("next")]))
    tracemalloc.start()
    got, dropped, _ = samples(stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys(got) == ["next"] and dropped == {"two_images": 1}
    assert peak < 12 << 20  # one 4 MiB image at a time, never six
