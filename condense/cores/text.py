"""Text from untrusted samples: what can be stored, and what a sample id may be.

The rules (docs/robustness.md states them for users):

- a caption must be valid UTF-8 (else the sample is dropped: `caption_not_utf8`); it is stored
  whole (within the member size limit) and cut to `max_caption_chars` characters only for the
  tokenizer, which would otherwise spend minutes on a 60 MiB caption;
- a sample id must be a non-empty string that UTF-8 can encode (no lone surrogates) and that
  holds no control character (no newline, tab or NUL: ids are written one per line in the key
  lists and appear in file names); otherwise the sample is dropped (`bad_sample_id`);
- a field condense keeps but does not need (the url) is nulled when it cannot be stored (not a
  string, a lone surrogate, longer than MAX_URL_CHARS) and the nulling is counted.
"""

from __future__ import annotations

import re

DROP_BAD_ID = "bad_sample_id"
MAX_URL_CHARS = 8192
MAX_ID_CHARS = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def storable(text: str) -> bool:
    """Whether UTF-8 can encode `text` (Arrow and Parquet store nothing else)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def id_problem(value) -> str | None:
    """Why `value` cannot be a sample id (a drop reason), or None when it can."""
    if value is None or value == "":
        return "missing_sample_id"
    if (
        not isinstance(value, str)
        or len(value) > MAX_ID_CHARS
        or _CONTROL.search(value)
        or not storable(value)
    ):
        return DROP_BAD_ID
    return None


def storable_url(value) -> str | None:
    """The url as stored: the value itself, or None when it cannot be stored."""
    if isinstance(value, str) and len(value) <= MAX_URL_CHARS and storable(value):
        return value
    return None


def for_tokenizer(caption: str | None, max_chars: int) -> str:
    """The part of a caption a tokenizer sees: its first `max_chars` characters."""
    return (caption or "")[:max_chars]
