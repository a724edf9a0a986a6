"""Hostile names, property-tested: whatever bytes a file name holds (newlines, bytes that
are not UTF-8, a leading '-', 255 bytes) and however deep the tree, a manifest stores its
path exactly, and the same tree scanned again compares equal."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmgr import manifest
from snapmgr.manifest import Entry, compare, scan

SID = "data@20261121T140501Z"
# Any byte but NUL and '/', with the troublesome ones often.
name_bytes = st.binary(min_size=1, max_size=255).map(lambda b: b.replace(b"\0", b"x").replace(b"/", b"y")) \
    .filter(lambda b: b not in (b".", b".."))
hostile = st.one_of(name_bytes, st.sampled_from([b"-rf", b"a\nb", b"\xff\xfe", b"\\", b"\\n", b" lead", b"x" * 255,
                                                 b"\xed\xb3\xbf", b"\xc3\xa9", b"\r", b"\x1b[31m", b"--"]))


def entry(path: bytes, target: bytes | None) -> Entry:
    return Entry(path, "l" if target else "f", 0o644, 0, 0, 1, 1, 1, 1, 1, 0, target, None, None if target else "ab")


@given(st.lists(st.tuples(st.lists(hostile, min_size=1, max_size=4), st.one_of(st.none(), hostile)),
                max_size=12))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_any_path_and_target_round_trips_through_the_file(items):
    entries = sorted({b"/".join(parts): entry(b"/".join(parts), target) for parts, target in items}.values(),
                     key=lambda e: manifest.walk_key(e.path))
    with tempfile.TemporaryDirectory() as d:
        manifest.save(Path(d), SID, "blake3", entries)
        assert list(manifest.load(Path(d), SID).entries()) == entries


@given(st.lists(hostile, min_size=1, max_size=20, unique=True), st.integers(min_value=1, max_value=60))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_hostile_tree_on_disk_scans_stores_and_rescans_identically(names, depth):
    with tempfile.TemporaryDirectory() as d:
        root = os.fsencode(d) + b"/root"
        deep = root + b"/d" * depth
        os.makedirs(deep)
        for i, name in enumerate(names):
            with open((deep if i % 2 else root) + b"/" + name, "wb") as f:
                f.write(name)
        first = list(scan(root, "blake3"))
        assert {e.path.rsplit(b"/", 1)[-1] for e in first if e.kind == "f"} == set(names)
        manifest.save(Path(d), SID, "blake3", first)
        stored = list(manifest.load(Path(d), SID).entries())
        assert stored == first
        assert list(compare(stored, scan(root, "blake3"))) == []
        shutil.rmtree(root)
