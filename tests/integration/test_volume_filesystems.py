"""A volume whose tree spans several filesystems (a ZFS volume's child datasets, which only
the lab has): the pieces that do not need ZFS, on real mounts here. The FUSE mount's
inode numbers for filesystems mounted inside a snapshot's tree, and diff and restore
against a live tree holding the volume's own mounts and foreign ones (the shared browse
mounts that bind such a tree: test_shared_mounts)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from snapmgr import diff, restore
from snapmgr.manifest import Change
from tests.integration.helpers import loop_mount, needs_root
from tests.integration.test_mount import label, mount, snapshot

pytestmark = needs_root


@contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", path], check=True)


def test_filesystems_inside_a_snapshots_tree_get_inode_numbers_of_their_own(ws, tmp_path):
    """Two filesystems made alike number their files alike, and a btrfs filesystem's root
    has the number of the btrfs snapshot's root: each must still be a file of its own."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_mount(tmp_path, "btrfs") as fs:
        subprocess.run(["btrfs", "subvolume", "create", fs / "data"], check=True, capture_output=True)
        for name in ("one", "two"):
            (fs / "data" / name).mkdir()
        ws.write_config({"data": {"backend": "btrfs", "subvolume": fs / "data", "snapshot_dir": fs / ".snapshots"}})
        sid = snapshot(ws)
        inner = []
        try:
            content = tmp_path / "content"
            content.mkdir()
            for name in ("one", "two"):
                (content / "file").write_text(name)   # rewritten in place: mkfs keeps its inode number
                image = tmp_path / f"{name}.img"
                with open(image, "wb") as f:
                    f.truncate(128 << 20)
                subprocess.run(["mkfs.btrfs", "-q", "--rootdir", content, image], check=True, capture_output=True)
                subprocess.run(["mount", "-o", "loop,ro", image, fs / ".snapshots" / sid / name], check=True)
                inner.append(fs / ".snapshots" / sid / name)
            assert os.stat(inner[0] / "file").st_ino == os.stat(inner[1] / "file").st_ino
            assert os.stat(inner[0]).st_ino == os.stat(fs / ".snapshots" / sid).st_ino

            with mount(ws, mnt):
                root = mnt / "data" / label(sid)
                paths = [root, root / "one", root / "two", root / "one" / "file", root / "two" / "file"]
                assert [(root / n / "file").read_text() for n in ("one", "two")] == ["one", "two"]
                assert os.listdir(root / "one") == ["file"]
                numbers = [os.stat(p).st_ino for p in paths]
                assert len(set(numbers)) == len(paths)
                Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets them: asked again
                assert [os.stat(p).st_ino for p in paths] == numbers
        finally:
            for path in reversed(inner):
                subprocess.run(["umount", path], check=True)   # the loop device detaches with it


@pytest.fixture
def live(tmp_path) -> Iterator[Path]:
    """A live tree holding one of the volume's own filesystems (own/) and a foreign one
    (foreign/), each with a file."""
    root = tmp_path / "live"
    root.mkdir()
    (root / "top").write_text("top")
    with tmpfs(root / "own") as own, tmpfs(root / "foreign") as foreign:
        (own / "kept").write_text("own")
        (foreign / "theirs").write_text("foreign")
        yield root


@pytest.fixture
def stored(tmp_path) -> Path:
    """The tree a snapshot of `live` shows: the foreign mount's directory empty."""
    root = tmp_path / "snapshot"
    for d in ("own", "foreign"):
        (root / d).mkdir(parents=True)
    (root / "top").write_text("top")
    (root / "own" / "kept").write_text("as it was")
    return root


def test_diff_against_live_goes_into_the_volumes_own_mounts_only(live, stored):
    old = diff.Side("old", None, stored, stored.stat().st_mtime)
    new = diff.Side("live", None, live, None, crosses_mounts=False, own_mounts=(live / "own",))
    found = diff.differences(old, new, b"", "blake3", quick=False)
    assert {c.path for c in found.changes if c.status != "changed"} == set()
    assert b"foreign/theirs" not in {e.path for e in new.entries}
    assert b"own/kept" in {e.path for e in new.entries}

    (live / "own" / "new").write_text("new")
    new = diff.Side("live", None, live, None, crosses_mounts=False, own_mounts=(live / "own",))
    added = [c for c in diff.differences(old, new, b"", "blake3", quick=False).changes if c.status == "added"]
    assert added == [Change(b"own/new", "added", frozenset())]


def test_restore_delete_goes_into_the_volumes_own_mounts_and_no_others(live, stored):
    (live / "own" / "stray").write_text("made since")
    restore.copy(stored, [b""], live, delete=True, own_mounts=[live / "own"])
    assert sorted(os.listdir(live / "own")) == ["kept"] and (live / "own" / "kept").read_text() == "as it was"
    assert (live / "foreign" / "theirs").read_text() == "foreign"

    # Without own mounts, the deletion stays on the live root's filesystem alone.
    (live / "own" / "stray").write_text("made since")
    restore.copy(stored, [b""], live, delete=True)
    assert sorted(os.listdir(live / "own")) == ["kept", "stray"]
