"""File names made from untrusted strings (sample ids, source names): safe and distinct."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")  # a key's first dot would end it (WebDataset)
MAX_LEN = 100


def safe_name(text: str, dots: bool = True) -> str:
    """A file name from any string: only [A-Za-z0-9._-], no leading dot, no path, never empty,
    at most MAX_LEN characters. Names that had to change get a short hash of the original, so
    two different strings never meet on the same name. `dots=False` makes a WebDataset key,
    which must not hold a dot: readers split `key.ext` at the first one."""
    name = (_UNSAFE if dots else _UNSAFE_KEY).sub("_", text).lstrip(".")[:MAX_LEN] or "_"
    if name != text:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{name[: MAX_LEN - 9]}-{digest}"
    return name


def safe_names(texts: list[str], dots: bool = True) -> list[str]:
    """safe_name for each, made distinct also where a filesystem ignores case ("A" and "a")."""
    names, seen = [], set()
    for text in texts:
        name = safe_name(text, dots)
        if name.lower() in seen:
            digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            name = f"{name[: MAX_LEN - 9]}-{digest}"
        seen.add(name.lower())
        names.append(name)
    return names
