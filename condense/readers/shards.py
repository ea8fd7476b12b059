"""Reading img2dataset WebDataset shards safely: one tar, streamed, grouped into samples.

A shard holds `{key}.jpg|png|webp`, `{key}.txt` and `{key}.json` members, consecutive per key.
condense parses the tar itself (POSIX ustar, pax and GNU headers) instead of trusting
`tarfile`, so that every bound holds and every problem has a name:

- memory is bounded per sample, never per shard: one header at a time, member data only for the
  members a sample keeps (one image, its `.txt` and `.json`, each under its size limit), a
  64-bit hash per key seen (to find samples whose members are not consecutive); a pax or GNU
  long-name header over `max_header_bytes` is skipped unread (its member dropped), so a
  gigabyte header costs a read, not a gigabyte;
- a problem with a member is a problem of its sample, which is then one counted drop
  (`unsafe_member`, `oversized_member`, `bad_member_name`, `duplicate_member`, ...), however many
  of its members are bad: `rows_in` is the number of samples a shard held;
- gzip, bzip2 and xz shards are decompressed whatever their name; two archives concatenated in
  one file are read as one; the end of the archive must be its two zero blocks, so a shard cut
  anywhere (also right after a member ending in zeros) is seen as truncated: the samples before
  the damage are kept and the damage is one `truncated_tar` (or `corrupt_tar`) drop;
- a shard larger than `max_shard_bytes` (decompressed), slower than `max_shard_seconds`, or
  zeros without end (a device) stops with an `InputError` naming it; a read error (`OSError`,
  such as an object store's transient failure) is retried `read_retries` times, reopening the
  file at the same offset, then named, never mistaken for a truncation;
- nothing is ever unpickled: `.json` is parsed as JSON, `.txt` decoded as UTF-8, images are
  returned as bytes for the decoder.

`read_samples` yields every `Sample` of a shard, good or bad; `drop_reason` names a sample's drop
reason. `open_shard` opens a shard with the retries and the regular-file check.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pydantic import Field

from condense.errors import InputError
from condense.storage import meter
from condense.strict import StrictModel

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
TEXT_EXTENSIONS = ("txt", "json")
KEPT_EXTENSIONS = (*IMAGE_EXTENSIONS, *TEXT_EXTENSIONS)  # the members a sample holds on to
BLOCK = 512
SEEK_OVER = 16 << 10  # unread runs at least this long are seeked over, not read
SPARSE_CHUNK = 4 << 10  # read-ahead when only some images are read (what is read ahead is read)
SPARSE_BLOCK = 256 << 10  # an object store's read-ahead then (fsspec's block size)
ZERO_BLOCK = bytes(BLOCK)
MAX_ZERO_PADDING = 1 << 20  # zero bytes allowed after an archive's end (record padding)


class ShardLimits(StrictModel):
    """Bounds on what one sample and one shard may cost (input.limits): a sample over a bound is
    one counted drop; a shard over a bound stops the run with an error naming it."""

    max_image_bytes: int = Field(64 << 20, ge=1)  # bytes per image member; larger: oversized_member
    max_text_bytes: int = Field(
        1 << 20, ge=1
    )  # bytes per .txt/.json member; larger: oversized_member
    max_header_bytes: int = Field(64 << 10, ge=512)  # bytes of a member's name in pax/GNU headers
    max_members_per_sample: int = Field(16, ge=1)  # members under one key; more: too_many_members
    max_pixels: int = Field(
        64_000_000, ge=1
    )  # width x height; larger: too_large (decompression bombs)
    # long side / short side; larger: extreme_aspect (a 1 x 200,000 image resized would be huge)
    max_aspect_ratio: float = Field(50.0, ge=1.0)
    max_caption_chars: int = Field(4096, ge=1)  # characters of a caption the tokenizer sees
    max_samples_per_shard: int = Field(1_000_000, ge=1)  # more: the shard is an error
    max_shard_bytes: int = Field(64 << 30, ge=1)  # decompressed bytes per shard; more: an error
    max_shard_seconds: float = Field(3600.0, gt=0)  # wall time reading one shard; more: an error
    read_retries: int = Field(3, ge=0)  # retries of a failed read (OSError) before it is an error
    # A sample whose decoding killed its worker this many times (an out-of-memory decode, a
    # decoder crash) is poison: the run stops naming it, or, with skip_poison, drops it
    # (poison_sample) and keeps the rest of its shard.
    poison_after: int = Field(2, ge=1)
    skip_poison: bool = False

    # How a shard is read, not what it holds: changing them reruns nothing. (A run with a
    # poison sample either stopped, or dropped it under skip_poison: turning skip_poison on
    # and resuming with --resume keeps every finished shard.)
    runtime_fields = frozenset({"max_shard_seconds", "read_retries", "poison_after", "skip_poison"})


DEFAULT_LIMITS = ShardLimits()


@dataclass
class Sample:
    """One sample of a shard: its key, image bytes and extension, caption, metadata, and the
    first problem that makes it unusable (None: no problem found while reading)."""

    key: str | None
    image: bytes | None = None
    image_ext: str | None = None
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    problem: str | None = None
    members: list[tuple[str, bytes | None]] = field(default_factory=list)  # kept, as stored
    exts: set[str] = field(default_factory=set)  # every member's extension, lower-cased
    image_skipped: bool = False  # its image's bytes were passed over unread (read_samples)

    def fail(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason


def member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, or None when the name is unsafe: absolute, with `..`
    or empty parts, a backslash, or no extension. The key is everything before the first dot of
    the file name, and keeps its folder (as webdataset does); the extension is lower-cased."""
    if not name or name.startswith("/") or "\\" in name:
        return None
    parts = name.split("/")
    if any(part in ("..", "", ".") for part in parts):
        return None
    base = parts[-1]
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return "/".join([*parts[:-1], stem]), ext.lower()


def _grouping_key(name: str) -> str:
    """The key an unusable member name would have: it still groups with its sample's members."""
    head, _, base = name.rpartition("/")
    return f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0]


class TarDamage(Exception):
    """The archive is damaged here: the samples before are kept, this is one counted drop.
    `after_end`: the damage follows a complete archive (junk after its end marker), so the
    sample read last is whole."""

    def __init__(self, reason: str, detail: str, after_end: bool = False):
        super().__init__(detail)
        self.reason, self.after_end = reason, after_end


# ---------------------------------------------------------------------------- opening a shard


class ShardFile:
    """A shard opened for streaming reads, wherever fsspec reaches it. A read that fails with
    `OSError` is retried `retries` times (after 0.5 s, 1 s, 2 s, ...), reopening the file at the
    same offset; then an `InputError` names the file. Local paths must be regular files."""

    def __init__(
        self,
        path: str,
        retries: int = 3,
        opener: Callable[[str], BinaryIO] | None = None,
        block_size: int | None = None,
    ):
        self.path, self.retries, self.pos = path, retries, 0
        self._opener = opener or (lambda p: _fsspec_open(p, block_size))
        if opener is None:
            _check_regular(path)
        self._f = self._open_with_retries()

    def _open_with_retries(self) -> BinaryIO:
        for attempt in range(self.retries + 1):
            try:
                f = self._opener(self.path)
                if self.pos:
                    _seek(f, self.pos)
                return f
            except FileNotFoundError as exc:
                raise InputError(f"shard {self.path} does not exist") from exc
            except OSError as exc:
                if attempt == self.retries:
                    raise InputError(
                        f"shard {self.path}: cannot open after {self.retries + 1} attempts: {exc}"
                    ) from exc
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def read(self, size: int = -1) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                data = self._f.read(size)
                self.pos += len(data)
                meter.count(read=len(data))
                return data
            except OSError as exc:
                if attempt == self.retries:
                    raise InputError(
                        f"shard {self.path}: read failed at byte {self.pos:,} after "
                        f"{self.retries + 1} attempts: {exc}"
                    ) from exc
                time.sleep(0.5 * 2**attempt)
                self._close_quietly()
                self._f = self._open_with_retries()
        raise AssertionError("unreachable")

    def skip(self, size: int) -> None:
        """Pass over `size` bytes: a seek where the file can (a local file, a byte-range
        reader of an object store), else read and dropped. A file that ends inside is found
        by the next read."""
        try:
            seekable = self._f.seekable()
        except (AttributeError, OSError):
            seekable = False
        if not seekable:
            while size > 0:
                chunk = self.read(min(size, 1 << 20))
                if not chunk:
                    return
                size -= len(chunk)
            return
        self.pos += size
        try:
            self._f.seek(self.pos)
        except OSError:  # retried as a read would be: reopened at the new offset
            self._close_quietly()
            self._f = self._open_with_retries()

    def _close_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsspec_open(path: str, block_size: int | None = None) -> BinaryIO:
    import fsspec

    options = {"block_size": block_size} if block_size else {}
    return fsspec.open(path, "rb", **options).open()


def _seek(f: BinaryIO, pos: int) -> None:
    """Move a freshly opened file to `pos`: seek where it can, else read up to there."""
    try:
        if f.seekable():
            f.seek(pos)
            return
    except (AttributeError, OSError):
        pass
    left = pos
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise OSError(f"file ended at byte {pos - left:,} while reopening it at {pos:,}")
        left -= len(chunk)


def _check_regular(path: str) -> None:
    """A local shard must be a regular file: a symlink to a device or a pipe would never end."""
    if "://" in path and not path.startswith("file://"):
        return
    local = path.removeprefix("file://")
    try:
        mode = os.stat(local).st_mode
    except FileNotFoundError as exc:
        raise InputError(f"shard {path} does not exist") from exc
    except OSError as exc:
        raise InputError(f"shard {path}: {exc}") from exc
    if not stat.S_ISREG(mode):
        raise InputError(f"shard {path} is not a regular file (a device, pipe or folder)")


def open_shard(path: str, limits: ShardLimits = DEFAULT_LIMITS, sparse: bool = False) -> ShardFile:
    """A shard opened for streaming reads, with `limits.read_retries` retries; `sparse`: for
    reading only some of its images (a small read-ahead, so that skipping saves bytes)."""
    return ShardFile(path, limits.read_retries, block_size=SPARSE_BLOCK if sparse else None)


# ---------------------------------------------------------------------------- the tar stream


class _Prefixed:
    """A reader that returns `head` first, then the rest of `raw` (a peek at the magic bytes)."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size < 0:
                out, self.head = self.head + self.raw.read(), b""
                return out
            out, self.head = self.head[:size], self.head[size:]
            if len(out) < size:
                out += self.raw.read(size - len(out))
            return out
        return self.raw.read(size)

    def skip(self, size: int) -> bool:
        """Pass over `size` bytes without reading them, if the file can; else False."""
        if self.head or not hasattr(self.raw, "skip"):
            return False
        self.raw.skip(size)
        return True


_CORRUPT_STREAM = (zlib.error, lzma.LZMAError, gzip.BadGzipFile)


class _Bytes:
    """The shard's (decompressed) bytes, read ahead in chunks of CHUNK bytes (a header costs a
    slice, not four layers of calls), counted against the shard's byte and time bounds."""

    CHUNK = 1 << 20

    def __init__(self, raw, name: str, limits: ShardLimits, sparse: bool = False):
        self.name, self.limits = name, limits
        # Reading only some members (a training worker's share), read ahead little: what is
        # read ahead cannot be seeked over.
        self.chunk = SPARSE_CHUNK if sparse else self.CHUNK
        self.pos, self.start = 0, time.monotonic()
        self.buf, self.off = b"", 0
        head = _read_full(raw, 6)
        source = _Prefixed(head, raw)
        # The decompressors wrap the shard's own file, which its owner closes.
        if head.startswith(b"\x1f\x8b"):
            self.f = gzip.GzipFile(fileobj=source, mode="rb")
        elif head.startswith(b"BZh"):
            self.f = bz2.BZ2File(source)  # noqa: SIM115
        elif head.startswith(b"\xfd7zXZ\x00"):
            self.f = lzma.LZMAFile(source)  # noqa: SIM115
        else:
            self.f = source

    def read(self, size: int) -> bytes:
        """Up to `size` bytes (fewer only at the end of the stream)."""
        if self.off + size <= len(self.buf):
            data = self.buf[self.off : self.off + size]
            self.off += size
            self.pos += size
            return data
        head = self.buf[self.off :]
        self.buf, self.off = b"", 0
        need = size - len(head)
        if need >= self.chunk:  # a large member: read it directly
            data = head + self._source(need)
        else:
            self.buf = self._source(self.chunk)
            take = min(need, len(self.buf))
            data, self.off = head + self.buf[:take], take
        return self._count(data)

    def _source(self, size: int) -> bytes:
        try:
            return _read_full(self.f, size)
        except EOFError as exc:
            raise TarDamage("truncated_tar", f"the compressed stream ends early: {exc}") from exc
        except _CORRUPT_STREAM as exc:
            raise TarDamage("corrupt_tar", f"the compressed stream is corrupt: {exc}") from exc
        except OSError as exc:  # bz2 reports damage as a plain OSError
            if isinstance(self.f, bz2.BZ2File):
                raise TarDamage("corrupt_tar", f"the compressed stream is corrupt: {exc}") from exc
            raise

    def _count(self, data: bytes) -> bytes:
        self.pos += len(data)
        if self.pos > self.limits.max_shard_bytes:
            raise InputError(
                f"shard {self.name}: more than input.limits.max_shard_bytes "
                f"({self.limits.max_shard_bytes:,}) bytes: a stream that never ends?"
            )
        if time.monotonic() - self.start > self.limits.max_shard_seconds:
            raise InputError(
                f"shard {self.name}: reading took more than input.limits.max_shard_seconds "
                f"({self.limits.max_shard_seconds:g} s)"
            )
        return data

    def exact(self, size: int, what: str) -> bytes:
        data = self.read(size)
        if len(data) < size:
            raise TarDamage("truncated_tar", f"the file ends inside {what}")
        return data

    def skip(self, size: int, what: str, unread: bool = False) -> None:
        """Pass over `size` bytes; with `unread`, a large run of an uncompressed shard is
        seeked over (never fetched) and a file that ends inside it is found by the next read."""
        held = len(self.buf) - self.off
        seekable = unread and isinstance(self.f, _Prefixed) and size - held >= SEEK_OVER
        if seekable and self.f.skip(size - held):
            self.buf, self.off = b"", 0
            self.pos += size
            self._count(b"")  # the shard's byte and time bounds still hold
            return
        while size > 0:
            size -= len(self.exact(min(size, 1 << 20), what))


def _read_full(f, size: int) -> bytes:
    """`size` bytes from a stream that may return short reads (sockets, decompressors)."""
    chunks, left = [], size
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _number(field_bytes: bytes) -> int | None:
    """A header's numeric field: octal text, or GNU base-256 (high bit set); None if invalid."""
    if field_bytes[:1] and field_bytes[0] & 0x80:
        if field_bytes[0] == 0xFF:  # negative
            return None
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 32
    return stored == signed


@dataclass
class _Entry:
    """One archive member: its name (bytes), type, size, and the problem of its headers."""

    name: bytes
    kind: str  # "file", "dir", "link", "other"
    size: int
    problem: str | None = None


_REGULAR, _DIRECTORY = (b"0", b"\0", b"7"), b"5"
_LINKS_AND_DEVICES = (b"1", b"2", b"3", b"4", b"6")


def _entries(stream: _Bytes, limits: ShardLimits) -> Iterator[_Entry]:
    """The archive's members, header by header; the caller reads or skips each member's data
    (`size` bytes, then padding to the block) before asking for the next. Ends after the last
    archive's end marker; damage raises `TarDamage`."""
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    problem: str | None = None
    after_end = False  # this block follows an end marker (a second archive, or junk)
    block = stream.read(BLOCK)
    while True:
        if not block:
            raise TarDamage("truncated_tar", "the file ends where a header should be")
        if len(block) < BLOCK:
            raise TarDamage("truncated_tar", "the file ends inside a header")
        if block == ZERO_BLOCK:
            if long_name is not None or pax or problem:  # an extended header, then nothing
                raise TarDamage("truncated_tar", "the archive ends after an extended header")
            block = _after_end(stream)
            if block is None:
                return
            after_end = True
            continue  # another archive follows (two tars concatenated into one file)
        if not _checksum_ok(block):
            where = f"byte {stream.pos - BLOCK:,}"
            raise TarDamage("corrupt_tar", f"a header at {where} is corrupt", after_end)
        after_end = False
        size = _number(block[124:136])
        if size is None:
            raise TarDamage("corrupt_tar", f"a header at byte {stream.pos - BLOCK:,} has no size")
        flag = block[156:157]
        if flag in (b"x", b"g", b"L", b"K"):
            if size > limits.max_header_bytes:  # skipped unread; the member it names is dropped
                stream.skip(size, "an extended header")
                if flag in (b"x", b"L"):
                    problem = problem or "oversized_header"
            elif flag == b"x":
                pax.update(_pax_records(stream.exact(size, "a pax header")))
            elif flag == b"L":
                long_name = stream.exact(size, "a long-name header").split(b"\0", 1)[0]
            else:  # global pax headers and GNU long link names change nothing condense keeps
                stream.skip(size, "an extended header")
            stream.skip(-size % BLOCK, "header padding")
            block = stream.read(BLOCK)
            continue
        if b"size" in pax:
            size = _pax_size(pax[b"size"])
            if size is None:
                raise TarDamage("corrupt_tar", "a pax header has an invalid size")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\x00":  # POSIX ustar: a prefix holds the name's folders
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if b"path" in pax:
            name = pax[b"path"]
        if flag == b"S" and block[482]:  # old GNU sparse: extension blocks follow the header
            while stream.exact(BLOCK, "a sparse header")[504]:
                pass
        if flag in _REGULAR:
            kind = "file"
        elif flag == _DIRECTORY:
            kind = "dir"
        elif flag in _LINKS_AND_DEVICES:
            kind = "link"
        else:
            kind = "other"
        # As tar itself: folders, links and devices store no data, whatever their size field.
        yield _Entry(name, kind, size if kind in ("file", "other") else 0, problem)
        long_name, pax, problem = None, {}, None
        block = stream.read(BLOCK)


def _after_end(stream: _Bytes) -> bytes | None:
    """After a zero block: None at the end of the file, else the header of a following
    archive. Zero padding is allowed up to MAX_ZERO_PADDING bytes."""
    zeros = BLOCK
    while True:
        try:
            block = stream.read(BLOCK)
        except TarDamage as damage:  # a compressed stream damaged after the archive's end
            raise TarDamage(damage.reason, str(damage), after_end=True) from damage
        if not block:
            return None
        if block != ZERO_BLOCK[: len(block)]:
            if len(block) < BLOCK:
                raise TarDamage("corrupt_tar", "junk after the end of the archive", True)
            return block
        if len(block) < BLOCK:  # padding that is not a whole block: still only zeros
            return None
        zeros += BLOCK
        if zeros > MAX_ZERO_PADDING:
            raise InputError(
                f"shard {stream.name}: more than {MAX_ZERO_PADDING:,} zero bytes after the end "
                "of the archive: not a shard (a device?)"
            )


def _pax_size(value: bytes) -> int | None:
    try:
        size = int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return size if size >= 0 else None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header (`LEN key=value\\n`, at most max_header_bytes of them): the
    ones condense uses (path, size); damage is corrupt_tar."""
    found: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding ends the records
            break
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarDamage("corrupt_tar", "a pax header record has no length")
        end = pos + int(digits)
        record = data[space + 1 : end]
        if end > len(data) or end <= space + 1 or not record.endswith(b"\n") or b"=" not in record:
            raise TarDamage("corrupt_tar", "a pax header record is malformed")
        key, _, value = record[:-1].partition(b"=")
        if key in (b"path", b"size"):
            found[key] = value
        pos = end
    return found


# ---------------------------------------------------------------------------- samples


def read_samples(
    fileobj,
    limits: ShardLimits = DEFAULT_LIMITS,
    name: str = "<shard>",
    want_image: Callable[[], bool] | None = None,
) -> Iterator[Sample]:
    """Every sample of one tar, in order, good or bad (a bad one carries its `problem`).

    `want_image`, asked at each sample's image member, says whether its bytes are wanted: an
    image that is not is passed over unread (seeked over in an uncompressed shard) and the
    sample flagged `image_skipped`; everything else about it is read as usual.

    Damage to the archive ends it: the sample being read is yielded with the damage's reason
    (`truncated_tar`, `corrupt_tar`), or a keyless sample carries it when none was being read.
    Bounds of the whole shard (bytes, time, samples) and read errors raise `InputError`."""
    stream = _Bytes(fileobj, name, limits, sparse=want_image is not None)
    seen: set[bytes] = set()
    current: Sample | None = None
    try:
        for entry in _entries(stream, limits):
            if entry.kind == "dir":
                continue
            key, ext, problem = _name_of(entry)
            if current is None or key != current.key:
                if current is not None:
                    yield _finish(current)
                current = Sample(key)
                # A stable 8-byte hash: the same on a retry, whatever the process.
                marker = hashlib.blake2b(
                    key.encode("utf-8", "surrogateescape"), digest_size=8
                ).digest()
                if marker in seen:
                    current.fail("split_sample")  # its key was seen earlier in the shard
                seen.add(marker)
                if len(seen) > limits.max_samples_per_shard:
                    raise InputError(
                        f"shard {name}: more than input.limits.max_samples_per_shard "
                        f"({limits.max_samples_per_shard:,}) samples"
                    )
            _add_member(current, ext, entry, problem, stream, limits, want_image)
    except TarDamage as damage:
        if damage.after_end and current is not None:  # junk after a complete archive
            yield _finish(current)
            current = None
        if current is None:
            current = Sample(None)
        current.problem = damage.reason
        yield current
        return
    if current is not None:
        yield _finish(current)


def _name_of(entry: _Entry) -> tuple[str, str, str | None]:
    """(grouping key, extension, problem) of a member from its name and type."""
    problem = entry.problem
    try:
        name = entry.name.decode("utf-8")
    except UnicodeDecodeError:
        name = entry.name.decode("utf-8", "surrogateescape")
        return _grouping_key(name), "", problem or "bad_member_name"
    if entry.kind == "link":
        return _grouping_key(name), "", problem or "unsafe_member"
    parsed = member_key(name)
    if parsed is None:
        unsafe = name.startswith("/") or "\\" in name or ".." in name.split("/")
        return (
            _grouping_key(name),
            "",
            problem or ("unsafe_member" if unsafe else "bad_member_name"),
        )
    if entry.kind == "other":
        problem = problem or "unsupported_member"
    return parsed[0], parsed[1], problem


def _add_member(
    sample: Sample,
    ext: str,
    entry: _Entry,
    problem: str | None,
    stream: _Bytes,
    limits,
    want_image: Callable[[], bool] | None = None,
) -> None:
    """Read (or skip) one member's data into its sample, bounded by the limits."""
    padded = entry.size + (-entry.size % BLOCK)
    if problem is not None:
        sample.fail(problem)
    elif ext in sample.exts:
        sample.fail("duplicate_member")  # k.txt twice, or k.txt and k.TXT
    elif ext in IMAGE_EXTENSIONS and sample.exts.intersection(IMAGE_EXTENSIONS):
        sample.fail("two_images")  # at the second: a sample never holds two images' bytes
    elif len(sample.exts) >= limits.max_members_per_sample:
        sample.fail("too_many_members")
    if sample.problem is not None:  # a dropped sample holds nothing more (bounded memory)
        stream.skip(padded, "a member")
        return
    sample.exts.add(ext)
    keep = ext in KEPT_EXTENSIONS
    limit = limits.max_image_bytes if ext in IMAGE_EXTENSIONS else limits.max_text_bytes
    if keep and entry.size > limit:
        sample.fail("oversized_member")
        keep = False
    if not keep:
        stream.skip(padded, "a member")
        return
    if ext in IMAGE_EXTENSIONS and entry.size and want_image is not None and not want_image():
        stream.skip(padded, "a member", unread=True)
        sample.members.append((ext, None))
        return
    data = stream.exact(entry.size, "a member")
    stream.skip(padded - entry.size, "member padding")
    sample.members.append((ext, data))


def _finish(sample: Sample) -> Sample:
    """Fill in a sample's image, caption and metadata from its members."""
    if sample.problem is not None:
        sample.members = []
        return sample
    for ext, data in sample.members:
        if ext in IMAGE_EXTENSIONS:
            if sample.image is not None:
                sample.fail("two_images")
            sample.image, sample.image_ext = data, ext
            sample.image_skipped = data is None
        elif ext == "txt":
            try:
                sample.caption = data.decode("utf-8")
            except UnicodeDecodeError:
                sample.fail("caption_not_utf8")
        elif ext == "json":
            meta = parse_meta(data)
            if meta is None:
                sample.fail("bad_json")
            else:
                sample.meta = meta
    return sample


def parse_meta(data: bytes | None) -> dict | None:
    """A sample's .json as a dict ({} when absent or not an object); None if it is not JSON."""
    if not data:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else {}


def drop_reason(sample: Sample) -> str | None:
    """Why a sample cannot be embedded (a drop reason), or None when it can."""
    if sample.problem is not None:
        return sample.problem
    if sample.image_skipped:  # not read, but there, and not empty
        return None if sample.caption is not None else "missing_caption"
    if sample.image is None:
        return "missing_image"
    if not sample.image:
        return "empty_image"
    if sample.caption is None:
        return "missing_caption"
    return None
