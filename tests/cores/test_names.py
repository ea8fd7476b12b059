"""File names from untrusted strings."""

from condense.cores.names import safe_name, safe_names


def test_safe_names_cannot_escape_or_collide():
    for bad in ("../../etc/passwd", "/abs/path", ".hidden", "a b\tc", "", "..", "ключ", "x" * 300):
        name = safe_name(bad)
        assert name and "/" not in name and not name.startswith(".") and len(name) <= 100
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert safe_name("00012.tar") == "00012.tar"  # safe names are kept as they are
    # Strings that sanitise alike still get different names, also on case-folding filesystems.
    names = safe_names(["a/b", "a_b", "a?b", "A", "a"])
    assert len({n.lower() for n in names}) == 5
    assert names[1] == "a_b" and names[3] == "A"


def test_keys_never_hold_a_dot():
    """A WebDataset key ends at its first dot, so keys made from ids lose theirs (distinctly)."""
    keys = safe_names(["a.b", "a_b", "v1.2/000", "1.0", "plain"], dots=False)
    assert all("." not in k for k in keys) and len(set(keys)) == 5
    assert keys[1] == "a_b" and keys[4] == "plain" and keys[0].startswith("a_b-")
