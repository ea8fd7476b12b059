"""File names made from untrusted strings (sample ids, source names): safe and distinct."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")  # a key's first dot would end it (WebDataset)
MAX_LEN = 100


def _digest(text: str, salt: int = 0) -> str:
    data = text.encode("utf-8", "surrogatepass") + (b"#%d" % salt if salt else b"")
    return hashlib.sha1(data).hexdigest()[:8]


def safe_name(text: str, dots: bool = True) -> str:
    """A file name from any string: only [A-Za-z0-9._-], no leading dot, no path, never empty,
    at most MAX_LEN characters. Names that had to change get a short hash of the original, so
    two different strings never meet on the same name. `dots=False` makes a WebDataset key,
    which must not hold a dot: readers split `key.ext` at the first one."""
    name = (_UNSAFE if dots else _UNSAFE_KEY).sub("_", text).lstrip(".")[:MAX_LEN] or "_"
    if name != text:
        name = f"{name[: MAX_LEN - 9]}-{_digest(text)}"
    return name


def safe_names(texts: list[str], dots: bool = True) -> list[str]:
    """safe_name for each, made distinct also where a filesystem ignores case ("A" and "a"),
    and whatever names the inputs themselves hold: `Z`, `z` and the name the fallback gives
    `z` (`z-<hash>`) are three distinct names in any order. Distinct inputs that are already
    safe keep their names; the rest get hashes salted until they meet no other name."""
    names = [safe_name(text, dots) for text in texts]
    taken: dict[str, int] = {}
    for i, (text, name) in enumerate(zip(texts, names, strict=True)):
        if name == text:  # kept as is: it wins its name (first come among equal spellings)
            taken.setdefault(name.lower(), i)
    for i, (text, name) in enumerate(zip(texts, names, strict=True)):
        salt = 0
        while taken.get(name.lower(), i) != i:
            salt += 1
            base = (_UNSAFE if dots else _UNSAFE_KEY).sub("_", text).lstrip(".") or "_"
            name = f"{base[: MAX_LEN - 9]}-{_digest(text, salt)}"
        taken[name.lower()] = i
        names[i] = name
    return names
