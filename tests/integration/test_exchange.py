"""directory.exchange: two names swapped in one step (renameat2 RENAME_EXCHANGE), on the
filesystems a rollback swaps on: ext4 directories and btrfs subvolumes, on loop devices."""

from __future__ import annotations

import errno
import subprocess
import threading

import pytest

from snapmgr.backends.directory import exchange
from tests.integration.helpers import loop_mount, needs_root

pytestmark = needs_root


def marked(path, mark: str, subvolume: bool):
    if subvolume:
        subprocess.run(["btrfs", "-q", "subvolume", "create", path], check=True)
    else:
        path.mkdir()
    (path / "mark").write_text(mark)
    return identity(path)


def identity(path):
    st = path.stat()
    return st.st_dev, st.st_ino   # a btrfs subvolume has a device number of its own


@pytest.mark.parametrize("fstype, subvolume", [("ext4", False), ("btrfs", True)])
def test_two_names_swap_in_one_step_and_a_reader_always_finds_both(tmp_path, fstype, subvolume):
    with loop_mount(tmp_path, fstype) as mnt:
        live, target = mnt / "live", mnt / "target"
        inodes = marked(live, "live", subvolume), marked(target, "target", subvolume)
        exchange(live, target)
        assert (live / "mark").read_text() == "target" and (target / "mark").read_text() == "live"
        assert (identity(live), identity(target)) == inodes[::-1]
        # A reader looking while the names swap back and forth never finds one missing.
        missing = []
        done = threading.Event()

        def look():
            while not done.is_set():
                for path in (live, target):
                    try:
                        (path / "mark").stat()
                    except FileNotFoundError:
                        missing.append(path)
        reader = threading.Thread(target=look)
        reader.start()
        try:
            for _ in range(2000):
                exchange(live, target)
        finally:
            done.set()
            reader.join()
        assert missing == [] and (live / "mark").read_text() == "target"


def test_a_swap_that_cannot_be_done_says_what_and_why_and_changes_nothing(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    with pytest.raises(OSError) as missing:
        exchange(live, tmp_path / "gone")
    assert missing.value.errno == errno.ENOENT and f"cannot swap {live} and {tmp_path / 'gone'}" in str(missing.value)
    with loop_mount(tmp_path, "ext4") as mnt:
        (mnt / "other").mkdir()
        with pytest.raises(OSError) as across:
            exchange(live, mnt / "other")
        assert across.value.errno == errno.EXDEV and (mnt / "other").is_dir()
    assert live.is_dir() and not (tmp_path / "gone").exists()
