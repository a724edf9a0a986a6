"""What a user types as PATH, mapped into a volume: never above its root, never absolute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from snapmgr.errors import UsageError
from snapmgr.volume_paths import relative, under

LIVE = Path("/srv/data")
pieces = st.sampled_from(["..", ".", "", "/", "srv", "data", "srv/data", "a", "-rf", "\n", "\udcff", "x/../y"])
paths = st.lists(pieces | st.text(max_size=8), max_size=6).map("/".join)


@given(text=paths | paths.map(lambda p: "/" + p) | paths.map(lambda p: f"{LIVE}/{p}"))
@example(text="//srv/data")
def test_a_mapped_path_stays_inside_the_volume(text):
    try:
        mapped = relative(text, LIVE, "data")
    except UsageError as e:
        assert "\n" not in str(e)
        return
    parts = mapped.split(b"/") if mapped else []
    assert not mapped.startswith(b"/") and b".." not in parts and b"" not in parts and b"." not in parts
    if text.startswith("/"):   # it named the same place
        # normpath keeps a leading '//' (POSIX leaves its meaning open; Linux reads it as '/').
        named = b"/" + os.fsencode(text).lstrip(b"/")
        assert os.path.normpath(named) == os.path.normpath(os.fsencode(LIVE) + b"/" + mapped)


@pytest.mark.parametrize("text, expected", [
    ("docs/a.txt", b"docs/a.txt"), ("./docs//a.txt", b"docs/a.txt"), (".", b""), ("/srv/data", b""),
    ("/srv/data/", b""), ("//srv/./data/x", b"x"), ("-rf", b"-rf"), ("caf\udce9", b"caf\xe9"),
])
def test_mapping(text, expected):
    assert relative(text, LIVE, "data") == expected


@pytest.mark.parametrize("text, message", [
    ("../x", "'..' is not allowed"), ("/srv/data/../etc", "'..' is not allowed"), ("/srv/database/x", "is outside"),
    ("/srv", "is outside"), ("", "PATH is empty"),
])
def test_refusals(text, message):
    with pytest.raises(UsageError, match=message):
        relative(text, LIVE, "data")


def test_no_absolute_paths_without_a_live_root():
    assert relative("a/b", None, "data") == b"a/b"
    with pytest.raises(UsageError, match="volume data is not mounted now"):
        relative("/srv/data/a", None, "data")


def test_under():
    assert under(b"a/b", b"a") and under(b"a", b"a") and under(b"x", b"") and not under(b"ab", b"a")
