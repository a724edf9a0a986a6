"""A volume whose tree spans several filesystems (a ZFS volume's child datasets, which only
the lab has): the pieces that do not need ZFS, on real mounts here. The FUSE mount's
inode numbers for filesystems mounted inside a snapshot's tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.integration.helpers import loop_mount, needs_root
from tests.integration.test_mount import label, mount, snapshot

pytestmark = needs_root


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
