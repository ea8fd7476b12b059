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


def test_a_name_the_fallback_would_give_is_never_given_twice():
    """`Z`, `z` and the very name the fallback gives `z`: three distinct names, in any order."""
    import itertools

    fallback = safe_names(["Z", "z"])[1]
    assert fallback.startswith("z-")
    for order in itertools.permutations(["Z", "z", fallback]):
        names = safe_names(list(order))
        assert len({n.lower() for n in names}) == 3
        assert names[order.index(fallback)] == fallback  # a safe name is kept as it is
        assert names[order.index("Z")] == "Z" or names[order.index("z")] == "z"
    for order in itertools.permutations(["Z.tar", "z.tar", safe_names(["Z.tar", "z.tar"])[1]]):
        assert len({n.lower() for n in safe_names(list(order))}) == 3
    same = safe_names(["dup", "dup", "dup"])  # equal inputs still get distinct names
    assert len({n.lower() for n in same}) == 3 and same[0] == "dup"
