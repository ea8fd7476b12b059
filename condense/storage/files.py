"""Files that are never seen half-written, and what a record of them says.

Every file condense writes goes through `atomic_file`, so a reader sees the old file or the
whole new one: on a local disk a temporary file beside the target, fsynced, then renamed over
it; in an object store (no rename there) a local temporary file uploaded under the final name
once it is complete (an object appears whole when its upload completes, or not at all).
In a store, completion marks and the lock are `create_once`: a create-only write
(`If-None-Match: *` on S3); locally they are renamed into place like every file. Records list files with their sizes (`file_sizes`), and a record is trusted only
while they are intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from condense.storage import meter
from condense.storage.fs import file_size, filesystem, is_url, location, relative, sizes_under


@contextmanager
def atomic_file(path: Path, counted: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for writing; on success it replaces `path`
    (fsynced first), so readers see either the old file or the whole new one. In an object
    store the temporary file is local and uploaded under `path` on success. Its bytes are
    metered as `other` unless `counted` is False (the caller counts them by kind)."""
    if is_url(path):
        with tempfile.NamedTemporaryFile(prefix=".condense-", suffix=".tmp") as tmp:
            yield tmp
            tmp.flush()
            fs, inner = filesystem(path)
            fs.put_file(tmp.name, inner)
            if counted:
                meter.count(written=tmp.tell())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if counted:
                meter.count(written=f.tell())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, kind: str | None = meter.OTHER) -> None:
    """Write `data` to `path` atomically (see `atomic_file`), metered as `kind` (None: the
    caller has metered it)."""
    if kind is not None:
        meter.count(written=len(data), kind=kind)
    if is_url(path):  # one upload of bytes already in memory
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return
    with atomic_file(path, counted=False) as f:
        f.write(data)


def create_once(path: Path, data: bytes) -> bool:
    """Create the object `path` holding `data` unless it exists; returns whether this call
    created it. One create-only PUT (`If-None-Match: *`), so of two writers exactly one wins;
    an object already holding exactly `data` is this writer's own (a PUT the client retried
    after it had succeeded). Object stores only: local marks are renamed into place."""
    if not is_url(path):
        raise ValueError(f"create_once writes to object stores, not to {path}")
    fs, inner = filesystem(path)
    meter.count(written=len(data))
    try:
        with fs.open(inner, "xb") as f:
            f.write(data)
    except (FileExistsError, OSError) as exc:
        if not (isinstance(exc, FileExistsError) or fs.exists(inner)):
            raise
        try:
            return fs.cat_file(inner) == data
        except FileNotFoundError:
            return False
    return True


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_write_npy(path: Path, array) -> None:
    """Save a numpy array atomically (np.save format)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    vectors = array.ndim == 2 and array.dtype.kind == "f"  # centroids; records are `other`
    atomic_write_bytes(path, buf.getvalue(), meter.VECTORS if vectors else meter.OTHER)


def read_json(path: Path) -> Any | None:
    """A JSON file's value; None when it is missing, truncated or not JSON."""
    try:
        data = location(path).read_bytes()
        meter.count(read=len(data))
        return json.loads(data)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def file_sizes(folder: Path, paths: list[str]) -> dict[str, int]:
    """{path relative to `folder`: size} of files a part or a stage wrote (their paths as the
    workers gave them: absolute, or relative to the same working directory as `folder`; URLs
    in an object store)."""
    if is_url(folder):
        return {relative(path, folder): file_size(path) for path in paths}
    base = Path(folder).resolve()
    out = {}
    for path in paths:
        full = Path(path).resolve()
        out[str(full.relative_to(base))] = full.stat().st_size
    return out


FEW_FILES = 8  # up to this many files are checked one by one, more by one listing


def files_intact(folder: Path, files: Any) -> bool:
    """Whether every recorded file is there with its recorded size."""
    if not isinstance(files, dict):
        return False
    if is_url(folder) and len(files) > FEW_FILES:  # one listing, not a request per file
        found = sizes_under(folder)
        return all(found.get(name) == size for name, size in files.items())
    for name, size in files.items():
        try:
            if file_size(location(folder) / name) != size:
                return False
        except OSError:
            return False
    return True


DIGEST_WHOLE = 1 << 20  # files up to this size are hashed whole
DIGEST_BLOCKS, DIGEST_BLOCK = 16, 4096  # larger ones: this many blocks, evenly spaced


def content_digest(fs, path: str, size: int, info: dict | None = None) -> str:
    """A digest of a file's content, cheap at any size: the store's own content hash where it
    has one (an S3 ETag, a GCS md5), else sha256 of the whole file up to DIGEST_WHOLE bytes,
    else of DIGEST_BLOCKS blocks spread from its first to its last byte. With the file's size
    and mtime it tells a rewritten input from the same one without reading terabytes."""
    import hashlib

    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info and info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        if size <= DIGEST_WHOLE:
            digest.update(f.read())
        else:
            step = (size - DIGEST_BLOCK) // (DIGEST_BLOCKS - 1)
            for i in range(DIGEST_BLOCKS):
                f.seek(i * step)
                digest.update(f.read(DIGEST_BLOCK))
    return digest.hexdigest()[:32]
