"""snapmgr.backends.shared_mounts: a browse mount used by several processes at once is
mounted once, released by the last one to leave, and one left by a killed process is
released by the next to look. The mount here is a real tmpfs (an LVM snapshot's is tested
in the lab), the other users real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapmgr.backends import shared_mounts
from tests.integration.helpers import REPO, needs_root

pytestmark = needs_root

# Another process using the mount: it says "in" once inside, and leaves when told to.
USER = """
import os, subprocess, sys
from pathlib import Path
from snapmgr.backends import shared_mounts
directory = Path(sys.argv[1])
def mount():
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "shared-test", directory], check=True)
def release():
    subprocess.run(["umount", directory], check=True)
    directory.rmdir()
    return True
with shared_mounts.used(directory, mount, release):
    print("in", flush=True)
    sys.stdin.readline()
"""


class Tmpfs:
    """This process's own mount and release of `directory`, counted."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.mounted = self.released = 0

    def mount(self) -> None:
        self.directory.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "shared-test", self.directory], check=True)
        self.mounted += 1

    def release(self) -> bool:
        left = self.directory.exists()
        if os.path.ismount(self.directory):
            subprocess.run(["umount", self.directory], check=True)
        if left:
            self.directory.rmdir()
        self.released += 1
        return left


def mounts_at(path: Path) -> int:
    return sum(line.split(b" ")[4] == os.fsencode(path)
               for line in Path("/proc/self/mountinfo").read_bytes().splitlines())


def start_user(directory: Path) -> subprocess.Popen:
    user = subprocess.Popen([sys.executable, "-c", USER, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert user.stdout.readline() == "in\n"
    return user


@pytest.fixture
def directory(tmp_path):
    path = tmp_path / "mounts" / "data@20261121T140501Z"
    yield path
    while os.path.ismount(path):   # whatever a failed test left
        subprocess.run(["umount", path])


def test_users_share_one_mount_and_the_last_to_leave_releases_it(directory):
    own = Tmpfs(directory)
    user = start_user(directory)
    with shared_mounts.used(directory, own.mount, own.release) as root:
        assert root == directory and mounts_at(directory) == 1 and own.mounted == 0   # the other's, used
        user.communicate("\n")
        assert user.returncode == 0
        assert mounts_at(directory) == 1   # still in use here
    assert mounts_at(directory) == 0 and own.released == 1 and not directory.exists()


def test_a_killed_users_mount_is_used_and_released_once_unused(directory):
    own = Tmpfs(directory)
    user = start_user(directory)
    assert not shared_mounts.release_unused(directory, own.release)   # in use: left alone
    user.kill()
    user.wait()
    assert mounts_at(directory) == 1   # a killed process releases nothing
    with shared_mounts.used(directory, own.mount, own.release):
        assert mounts_at(directory) == 1 and own.mounted == 0   # not mounted over
    assert mounts_at(directory) == 0

    user = start_user(directory)
    user.kill()
    user.wait()
    assert shared_mounts.release_unused(directory, own.release)
    assert mounts_at(directory) == 0 and not directory.exists()
    assert not shared_mounts.release_unused(directory, own.release)   # nothing left
