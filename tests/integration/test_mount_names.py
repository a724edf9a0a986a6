"""Hostile file names through the mount, property-tested: whatever bytes a name holds
(newlines, escape sequences, bytes that are not UTF-8, a leading '-', 255 bytes), the
mount lists it as stored and serves its content; so for deep paths. One mount serves
every example: each example's snapshot appears in it without remounting."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.helpers import needs_root, wait_for
from tests.integration.test_mount import label, mnt, mount, snapshot  # noqa: F401 (mnt: a fixture)

pytestmark = needs_root
HOSTILE = [b"-rf", b"--", b"new\nline", b"\x1b[2J", b"\xff\xfe", b"caf\xe9", b" lead", b"trail ", b"a" * 255,
           b"\\", b"*", b"latest", b".by-tag", b"..."]
names = st.sampled_from(HOSTILE) | st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
cases = itertools.count()


@pytest.fixture
def mounted(ws, mnt):
    with mount(ws, mnt):
        yield ws, mnt


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(names, min_size=1, max_size=6, unique=True), depth=st.integers(0, 12))
def test_any_names_and_deep_paths_are_listed_and_served_as_stored(mounted, files, depth):
    ws, mnt = mounted
    case = f"case{next(cases)}".encode()
    inside = os.path.join(os.fsencode(ws.source), case, *[b"deeper-\xff\n" + b"d" * 40] * depth)
    os.makedirs(inside)
    for i, name in enumerate(files):
        with open(os.path.join(inside, name), "wb") as f:
            f.write(name + bytes([i]))
    sid = snapshot(ws)
    stored = os.path.join(os.fsencode(ws.repo), sid.encode(), os.path.relpath(inside, os.fsencode(ws.source)))
    shown = os.path.join(os.fsencode(mnt), b"data", label(sid).encode(),
                         os.path.relpath(inside, os.fsencode(ws.source)))
    wait_for(lambda: os.path.isdir(shown), what="the example's snapshot")
    assert sorted(os.listdir(shown)) == sorted(os.listdir(stored)) == sorted(files)
    for i, name in enumerate(files):
        with open(os.path.join(shown, name), "rb") as f:
            assert f.read() == name + bytes([i])
