"""Mounts that browse_root() makes under the run directory (an LVM snapshot, activated
and mounted), shared by every snapmgr process that browses the snapshot at once (a
mount, a verify, a restore) and released by the last one to leave it. A process killed
while it browsed (kill -9 skips every release) leaves the mount behind: the next one to
browse the snapshot uses it, and release_unused() releases it.

Each mount's directory has a lock file beside it. Its users hold a shared flock(2) on it
for as long as they use the mount; mounting and releasing happen under an exclusive one.
Whoever gets the lock exclusively without waiting is the only one left, so it may release
the mount: that is how the last user leaves, and how a killed user's mount is found (the
kernel drops a dead process's locks). The lock files stay: removing one would let two
processes lock two different files."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from snapmgr import trust
from snapmgr.errors import SnapmgrError

LOCK_SUFFIX = ".lock"


@contextmanager
def used(directory: Path, mount: Callable[[], None], release: Callable[[], bool]) -> Iterator[Path]:
    """`directory` with the mount in it, for the duration: `mount()` mounts it there
    unless another process has it mounted already; `release()` undoes whatever of that
    is in place (after a kill, any part of it) and says whether anything was."""
    fd = _open_lock(directory)
    try:
        _share(fd, directory, mount, release)
        try:
            yield directory
        finally:
            _release_if_alone(fd, release)
    finally:
        os.close(fd)


def release_unused(directory: Path, release: Callable[[], bool]) -> bool:
    """Release the mount at `directory` if no process uses it; whether anything was left."""
    try:
        fd = os.open(lock_of(directory), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False   # never browsed
    try:
        return _release_if_alone(fd, release)
    finally:
        os.close(fd)


def lock_of(directory: Path) -> Path:
    return directory.with_name(directory.name + LOCK_SUFFIX)


def _open_lock(directory: Path) -> int:
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        trust.check(directory.parent)  # root creates lock files and mounts here
    except trust.Untrusted as e:
        raise SnapmgrError(f"{directory.parent}: {e}") from None
    return os.open(lock_of(directory), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _share(fd: int, directory: Path, mount: Callable[[], None], release: Callable[[], bool]) -> None:
    """Hold the lock shared, with the mount in place."""
    while True:
        # Waits only while another process mounts or releases it.
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.path.ismount(directory):
            return
        # Not mounted, so used by no one: mount it holding the lock alone. Taking it drops
        # the shared lock first, and so does giving it back: another process may mount or
        # release it in between, so look again each time.
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.ismount(directory):
            try:
                mount()
            except BaseException:
                release()
                raise


def _release_if_alone(fd: int, release: Callable[[], bool]) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False   # another process uses it: the last one to leave releases it
    return release()
