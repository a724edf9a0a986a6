"""snapmgr.writers on real processes: who writes to a volume's files and who only keeps
them busy, also from another mount namespace, where the volume has other paths."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from snapmgr.writers import users
from tests.integration.helpers import loop_mount, needs_root, open_paths

# Maps the first 4 KiB of argv[1], shared or private (argv[2]), read and write, and
# closes its descriptor: only the mapping is left. (Python's mmap keeps a descriptor of
# its own; mmap(2) through ctypes does not.)
MAPS = ("import ctypes, mmap, os, sys; libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p; "
        "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, "
        "ctypes.c_long]; fd = os.open(sys.argv[1], os.O_RDWR); "
        "at = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, "
        "mmap.MAP_SHARED if sys.argv[2] == 'shared' else mmap.MAP_PRIVATE, fd, 0); "
        "assert at != ctypes.c_void_p(-1).value; os.close(fd)")


@contextmanager
def running(code: str, *argv: str, prefix: tuple[str, ...] = (), cwd: Path | None = None) -> Iterator[int]:
    """A Python process running `code` until the test is done, once it said "ready"."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", code + "\nprint('ready', flush=True)\n"
                             "import time; time.sleep(120)", *argv], stdout=subprocess.PIPE, cwd=cwd)
    try:
        assert proc.stdout.readline() == b"ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def volume(tmp_path) -> Path:
    root = tmp_path / "volume"
    (root / "sub").mkdir(parents=True)
    (root / "a").write_text("a")
    (root / "sub" / "b").write_bytes(b"\0" * 4096)
    return root


def test_a_process_with_a_file_open_for_writing_is_a_writer_and_one_reading_a_holder(volume):
    with running("import sys; f = open(sys.argv[1], 'a')", str(volume / "a")) as writer, \
            running("import sys; f = open(sys.argv[1])", str(volume / "sub" / "b")) as reader:
        found = users([volume])
    assert writer in found.writers and writer not in found.holders
    assert reader in found.holders and reader not in found.writers


def test_a_writer_elsewhere_on_the_same_filesystem_is_not_the_volumes(volume, tmp_path):
    # An rsync source is a directory of a larger filesystem: its other files are not the volume's.
    beside = tmp_path / "volume-beside"
    beside.mkdir()
    with running("import sys; f = open(sys.argv[1], 'a')", str(beside / "log")) as writer:
        found = users([volume])
    assert writer not in found.writers and writer not in found.holders


@needs_root
@pytest.mark.parametrize("shown", ["", "sub"])
def test_a_writer_in_another_mount_namespace_seeing_the_volume_elsewhere_is_found(volume, tmp_path, shown):
    # As a container, or a unit with PrivateTmp=: the volume (or one directory of it) is
    # bind-mounted under another path, in a mount namespace of its own.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import subprocess, sys; subprocess.run(['mount', '--bind', sys.argv[1], sys.argv[2]], check=True); "
            "f = open(sys.argv[2] + '/' + sys.argv[3], 'a')")
    name = "sub/b" if not shown else "b"
    with running(code, str(volume / shown), str(elsewhere), name, prefix=("unshare", "--mount")) as writer:
        seen_as = open_paths(writer)
        found = users([volume])
    assert f"{elsewhere}/{name}" in seen_as   # not a path under the volume's
    assert not os.path.ismount(elsewhere)     # the bind mount is the other namespace's alone
    assert writer in found.writers


def test_a_writable_shared_mapping_is_a_writer_and_a_private_one_a_holder(volume):
    # A database that maps its files (LMDB, SQLite's WAL index): the descriptor may be
    # closed, the mapping still writes to the file.
    with running(MAPS, str(volume / "sub" / "b"), "shared") as shared, \
            running(MAPS, str(volume / "sub" / "b"), "private") as private:
        assert not [path for pid in (shared, private) for path in open_paths(pid) if path.startswith(str(volume))]
        found = users([volume])
    assert shared in found.writers
    assert private in found.holders and private not in found.writers


def test_a_working_directory_in_the_volume_holds_it_without_writing(volume):
    with running("", cwd=volume / "sub") as inside:
        found = users([volume])
    assert inside in found.holders and inside not in found.writers


@needs_root
def test_a_filesystem_mounted_below_the_volume_is_its_own_only_when_named_with_it(volume):
    # A ZFS volume's datasets below the first one are the volume's; a filesystem mounted
    # below it that its snapshots do not hold is not.
    with loop_mount(volume, "ext4", 32) as below:
        with running("import sys; f = open(sys.argv[1], 'a')", str(below / "x")) as writer:
            assert writer not in users([volume]).writers
            assert writer in users([volume, below]).writers


@needs_root
def test_on_btrfs_the_subvolume_is_the_volume_and_the_rest_of_the_filesystem_not(tmp_path):
    # A subvolume has a device number of its own (st_dev), its filesystem's another (the
    # mount table's and /proc/PID/maps'): both lead to it.
    with loop_mount(tmp_path, "btrfs", 300) as top:
        subprocess.run(["btrfs", "-q", "subvolume", "create", top / "data"], check=True)
        (top / "data" / "db").write_bytes(b"\0" * 4096)
        (top / "other").write_text("")
        with running("import sys; f = open(sys.argv[1], 'a')", str(top / "data" / "db")) as writer, \
                running(MAPS, str(top / "data" / "db"), "shared") as mapper, \
                running("import sys; f = open(sys.argv[1], 'a')", str(top / "other")) as beside:
            found = users([top / "data"])
        assert writer in found.writers and mapper in found.writers
        assert beside not in found.writers and beside not in found.holders


@needs_root
def test_a_rollback_is_refused_while_a_process_in_another_mount_namespace_writes_to_the_volume(ws):
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo}})
    (ws.source / "a").write_text("one")
    ws.ok("snapshot")
    [target] = ws.snapshots()
    (ws.source / "a").write_text("two")
    elsewhere = ws.root / "elsewhere"
    elsewhere.mkdir()
    code = ("import subprocess, sys; subprocess.run(['mount', '--bind', sys.argv[1], sys.argv[2]], check=True); "
            "f = open(sys.argv[2] + '/a', 'a')")
    with running(code, str(ws.source), str(elsewhere), prefix=("unshare", "--mount")) as writer:
        refused = ws.run("rollback", target, "--yes")
    assert refused.returncode != 0 and f"(pid {writer}) with the services stopped" in refused.stderr, refused.stderr
    assert (ws.source / "a").read_text() == "two" and ws.snapshots() == [target]
