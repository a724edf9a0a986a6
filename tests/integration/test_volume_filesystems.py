"""A volume whose tree spans several filesystems (a ZFS volume's child datasets, which only
the lab has): the pieces that do not need ZFS, on real mounts here. The FUSE mount's
inode numbers for filesystems mounted inside a snapshot's tree, and diff and restore
against a live tree holding the volume's own mounts and foreign ones (the shared browse
mounts that bind such a tree: test_shared_mounts)."""

from __future__ import annotations

import os
import subprocess
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from snapmgr import diff, restore, sh
from snapmgr.backends import mounts, zfs
from snapmgr.errors import SnapmgrError
from snapmgr.manifest import Change
from snapmgr.model import Snapshot, SnapshotId
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
def stored(tmp_path) -> Iterator[Path]:
    """The tree a snapshot of `live` shows: own/ a filesystem of its own there too (as a
    dataset's snapshot bound into the tree), the foreign mount's directory empty."""
    root = tmp_path / "snapshot"
    (root / "foreign").mkdir(parents=True)
    (root / "top").write_text("top")
    with tmpfs(root / "own") as own:
        (own / "kept").write_text("as it was")
        yield root


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


def test_restore_delete_goes_into_the_volumes_own_mounts_and_no_others(live, stored, monkeypatch):
    (live / "own" / "stray").write_text("made since")
    for d in ("late", "own/late"):
        (live / d).mkdir()
    argvs = []
    real_run = sh.run

    def run(argv, **kwargs):
        # Filesystems mounted below DEST once the restore runs (a container's overlay, an
        # sshfs), in the live root's filesystem and in an own one: no list of mounts read
        # beforehand has them.
        if not argvs:
            for d in ("late", "own/late"):
                stack.enter_context(tmpfs(live / d))
                (live / d / "theirs").write_text("mounted meanwhile")
        argvs.append(argv)
        return real_run(argv, **kwargs)

    monkeypatch.setattr(sh, "run", run)
    with ExitStack() as stack:
        restore.copy(stored, [b""], live, delete=True, own_mounts=[live / "own"])
        assert sorted(os.listdir(live / "own")) == ["kept", "late"]
        assert (live / "own" / "kept").read_text() == "as it was"
        assert [(live / d / "theirs").read_text() for d in ("foreign", "late", "own/late")] == \
            ["foreign", "mounted meanwhile", "mounted meanwhile"]
    # The live root's filesystem, then the own one, each stopping at every other.
    assert [argv[-2:] for argv in argvs] == [[f"{stored}/./.", f"{live}/"], [f"{stored}/./own", f"{live}/"]]
    assert all("--one-file-system" in argv for argv in argvs)

    # Without own mounts, the deletion stays on the live root's filesystem alone.
    (live / "own" / "stray").write_text("made since")
    restore.copy(stored, [b""], live, delete=True)
    assert sorted(os.listdir(live / "own")) == ["kept", "late", "stray"]


def test_restore_delete_leaves_alone_an_own_mount_the_snapshot_does_not_hold(live, stored):
    """A dataset made since the snapshot: there, its place is an empty directory of the
    live root's snapshot, and a deletion into it would empty the dataset."""
    (stored / "own" / "newer").mkdir()
    with tmpfs(live / "own" / "newer") as newer:
        (newer / "data").write_text("made since")
        restore.copy(stored, [b"own"], live, delete=True, own_mounts=[live / "own", newer])
        assert (newer / "data").read_text() == "made since"


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_child_datasets_place_that_is_no_directory_in_the_snapshot_is_refused(tmp_path, kind):
    """A ZFS tree of several datasets' snapshots, here of plain directories: where the
    child is mounted now, the parent's snapshot held a symlink (to a directory outside,
    standing for /etc), which mount would follow, or a file. Nothing is bound, outside
    the tree or in it."""
    sid = SnapshotId.parse("data@20261121T140501Z")
    name = zfs.PREFIX + sid.label
    parent, child, outside = tmp_path / "parent", tmp_path / "child", tmp_path / "outside"
    (outside / "db").mkdir(parents=True)
    (outside / "db" / "precious").write_text("the host's")
    parent_snapshot = parent / ".zfs" / "snapshot" / name
    parent_snapshot.mkdir(parents=True)
    if kind == "symlink":
        (parent_snapshot / "sub").symlink_to(outside)
    else:
        (parent_snapshot / "sub").write_text("a file")
    (child / ".zfs" / "snapshot" / name).mkdir(parents=True)

    class Backend(zfs.ZfsBackend):
        def _places(self, datasets):   # as mountinfo would say: tank/data/db is at sub/db
            return [("tank/data", parent, Path(".")), ("tank/data/db", child, Path("sub/db"))]

    backend = Backend("data", {"datasets": ("tank/data",), "recursive": True}, tmp_path / "run")
    snap = Snapshot(sid, Path(f"tank/data@{name}"), meta={"snapshots": [f"tank/data@{name}", f"tank/data/db@{name}"]})
    with pytest.raises(SnapmgrError) as e:
        with backend.browse_root(snap):
            pass
    what = "a symlink" if kind == "symlink" else "not a directory"
    assert str(e.value) == f"tank/data/db has no place in the snapshot's tree: 'sub' is {what} in the snapshot, " \
                           f"where tank/data/db is mounted at 'sub/db'"
    assert mounts.below(tmp_path) == [] and os.listdir(outside / "db") == ["precious"]
