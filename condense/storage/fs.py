"""Where a file lives: a local path, or a URL in an object store (`s3://`, `gs://`, or any
filesystem fsspec can open).

`location(path)` gives a `pathlib.Path` for a local path and a `UPath` (pathlib's interface over
fsspec) for a URL, so `folder / name`, `.name`, `.parent`, `.glob`, `.exists()` and `.open()`
read the same for both. What differs lives in the storage layer, keyed on `is_url`:

- object stores have no rename: a file is written under its final name (an object appears
  whole when its upload completes, or not at all) and committed by the record that lists it;
- marks and the run lock are created with a create-only write (`If-None-Match: *` on S3);
- nothing is memory-mapped: scratch files are read by byte ranges.

Credentials and endpoints come from the environment as boto3, gcsfs and pyarrow read them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS):
condense never takes them in a config file and never writes them anywhere.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any


def is_url(path: Any) -> bool:
    """Whether `path` names an object in a store (`scheme://...`) rather than a local file."""
    return "://" in str(path) and not str(path).startswith("file://")


RUN_STORES = ("s3", "gs")  # run directories: stores with create-only writes


def unreachable(path: Any, exc: Exception) -> str:
    """Why a store could not be reached, and where its credentials come from."""
    where = (
        "GOOGLE_APPLICATION_CREDENTIALS (or gcloud's login)"
        if str(path).startswith(("gs://", "gcs://"))
        else "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (or an instance role)"
    )
    return f"{type(exc).__name__}: {exc}; object stores take their credentials from the environment: {where}"


def storage_options(protocol: str) -> dict:
    """fsspec options condense opens a store with. Listings are never cached: workers on other
    machines add parts while the driver watches, and a cached listing would miss them."""
    if protocol in ("s3", "s3a", "gs", "gcs"):
        return {"use_listings_cache": False}
    return {}


def location(path: Any):
    """`path` as a Path (local) or a UPath (a URL); a location passes through unchanged."""
    if not is_url(path):
        return Path(str(path).removeprefix("file://")) if isinstance(path, str) else Path(path)
    from upath import UPath

    if isinstance(path, UPath):
        return path
    text = str(path)
    return UPath(text, **storage_options(text.split("://", 1)[0]))


def filesystem(path: Any):
    """The fsspec filesystem holding `path`, and the path inside it."""
    where = location(path)
    if is_url(where):
        return where.fs, where.path
    import fsspec

    return fsspec.filesystem("file"), str(where)


@lru_cache(maxsize=16)
def _arrow_filesystem(scheme: str, netloc: str):
    import pyarrow.fs as pafs

    if scheme in ("s3", "gs", "gcs"):
        # pyarrow's own clients (they read the same environment as boto3 and gcsfs).
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return fs
    fs, _ = filesystem(f"{scheme}://{netloc}/")
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def arrow_filesystem(path: Any):
    """A pyarrow filesystem for `path` and the path inside it: pyarrow's native S3 and GCS
    clients for those stores, fsspec's for any other, the local one for a local path."""
    if not is_url(path):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(location(path))
    scheme, rest = str(path).split("://", 1)
    netloc = rest.split("/", 1)[0]
    return _arrow_filesystem(scheme, netloc), rest


def open_random_access(path: Any):
    """A pyarrow file that reads by byte ranges (local: memory-mapped, zero-copy)."""
    import pyarrow as pa

    if not is_url(path):
        return pa.memory_map(str(location(path)))
    fs, inner = arrow_filesystem(path)
    return fs.open_input_file(inner)


def remove_tree(path: Any) -> None:
    """Remove a folder and everything under it (nothing when it is not there)."""
    where = location(path)
    if is_url(where):
        fs, inner = filesystem(where)
        if fs.exists(inner):
            fs.rm(inner, recursive=True)
        return
    import shutil

    shutil.rmtree(where, ignore_errors=True)


def sizes_under(folder: Any) -> dict[str, int]:
    """{path relative to `folder`: size} of every file under it (one listing on a store)."""
    where = location(folder)
    if is_url(where):
        fs, inner = filesystem(where)
        inner = inner.rstrip("/")
        try:
            found = fs.find(inner, detail=True)
        except FileNotFoundError:
            return {}
        return {
            name[len(inner) + 1 :]: int(info["size"])
            for name, info in found.items()
            if info.get("type") != "directory" and name.startswith(inner + "/")
        }
    out = {}
    for dirpath, _dirs, names in os.walk(where):
        for name in names:
            path = Path(dirpath) / name
            try:
                out[str(path.relative_to(where))] = path.stat().st_size
            except FileNotFoundError:  # removed while listed (a temporary file)
                continue
    return out


def relative(path: Any, root: Any) -> str:
    """`path` relative to the folder `root` (both local, or both URLs), with `/` separators."""
    if is_url(path):
        base = str(root).rstrip("/") + "/"
        if not str(path).startswith(base):
            raise ValueError(f"{path} is not inside {root}")
        return str(path)[len(base) :]
    return Path(path).relative_to(Path(root)).as_posix()


def file_size(path: Any) -> int:
    """A file's size in bytes (FileNotFoundError when it is not there)."""
    where = location(path)
    if is_url(where):
        fs, inner = filesystem(where)
        return int(fs.info(inner)["size"])
    return where.stat().st_size


def put_tree(local: Any, url: Any) -> None:
    """Upload a local folder's files under the URL `url` (same relative paths)."""
    fs, inner = filesystem(url)
    for name in sorted(sizes_under(local)):
        fs.put_file(str(Path(local) / name), f"{inner.rstrip('/')}/{name}")
