"""Mounts that browse_root() makes under the run directory (an LVM snapshot activated and
mounted, a ZFS snapshot of several datasets bound into one tree), shared by every
snapmgr process that browses the snapshot at once (a mount, a verify, a restore) and
taken down by the last one to leave. A process killed while it browsed (kill -9 skips
every release) leaves its mounts behind: the next one to browse the snapshot, or
release_unused(), takes them down.

Each mount's users hold a shared flock(2) on a file beside it (`<name>.users`) for as
long as they use it, and the kernel drops a lock however its holder dies: a users' file
whose lock nobody holds was left by a killed process. Who builds, joins, leaves or
clears a mount decides under an exclusive flock of a second file (`<name>.lock`), so the
first user builds it, after taking down what a killed one left, and the last one takes
it down. The guard files stay: removing one would let two processes lock two different
files."""

from __future__ import annotations

import fcntl
import glob
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from snapmgr import sh, trust
from snapmgr.backends import mounts
from snapmgr.errors import SnapmgrError
from snapmgr.lock import take_within

GUARD = ".lock"
USERS = ".users"
UMOUNT_TIMEOUT = 60
# Longer than any build or take-down should take (an lvchange and a mount, a few binds).
GUARD_TIMEOUT = 300
_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW

TakeDown = Callable[[], None]


@contextmanager
def used(target: Path, build: Callable[[], None], take_down: TakeDown | None = None) -> Iterator[Path]:
    """`target`, a directory in which build() mounts what is to be browsed, for the
    duration, shared with whoever browses it at the same time, in this process or
    another. take_down() undoes whatever of a build is in place, after a kill any part
    of it (by default: every mount at and below `target`, and the directory)."""
    take_down = take_down or (lambda: unmount_tree(target))
    users = _beside(target, USERS)
    with _guard(target):
        fd = os.open(users, _OPEN, 0o600)
        try:
            if _alone(fd):
                take_down()   # what a killed user left, if anything: never built upon
                target.mkdir(exist_ok=True)
                try:
                    build()
                except BaseException:
                    _finish(target, take_down)
                    raise
            elif not os.path.ismount(target):
                # Built by a process that sees other mounts than this one (a systemd unit with
                # PrivateMounts= or ProtectSystem=): here the directory is empty, and a verify
                # would call every file missing, a restore --delete delete them.
                raise SnapmgrError(f"{target} is in use by a snapmgr process in another mount namespace; "
                                   f"browse this snapshot again once it is done")
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
    try:
        yield target
    finally:
        try:
            with _guard(target):
                if _alone(fd):
                    _finish(target, take_down)
        finally:
            os.close(fd)


def release_unused(target: Path, take_down: TakeDown | None = None) -> bool:
    """Take down the mount at `target` if no process uses it (what a killed one left);
    whether there was one."""
    users = _beside(target, USERS)
    if not users.exists():
        return False   # never built, or taken down
    with _guard(target):
        try:
            fd = os.open(users, _OPEN & ~os.O_CREAT)
        except FileNotFoundError:
            return False
        try:
            if not _alone(fd):
                return False   # in use: its last user takes it down
            _finish(target, take_down or (lambda: unmount_tree(target)))
            return True
        finally:
            os.close(fd)


def in_place(directory: Path, prefix: str) -> list[Path]:
    """The targets in `directory` whose name starts with `prefix` that are built, or were
    left by a killed process."""
    return sorted(directory / p.name.removesuffix(USERS) for p in directory.glob(f"{glob.escape(prefix)}*{USERS}"))


def unmount_tree(target: Path) -> None:
    """Every mount at and below `target`, innermost first (of two at one place, the
    later), lazily, so that a file still open there cannot stop it; then the directory."""
    for m in sorted(reversed(mounts.below(target)), key=lambda m: len(m.mountpoint.parts), reverse=True):
        sh.run(["umount", "--lazy", m.mountpoint], timeout=UMOUNT_TIMEOUT)
    with suppress(FileNotFoundError):
        target.rmdir()


def _finish(target: Path, take_down: TakeDown) -> None:
    """Under the guard, by the users' lock's only holder: the users' file goes last,
    since whoever finds it may find the mount too."""
    take_down()
    _beside(target, USERS).unlink(missing_ok=True)


@contextmanager
def _guard(target: Path) -> Iterator[None]:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        trust.check(target.parent)  # root creates lock files and mounts here
    except trust.Untrusted as e:
        raise SnapmgrError(f"{target.parent}: {e}") from None
    guard = _beside(target, GUARD)
    fd = os.open(guard, _OPEN, 0o600)
    try:
        # Held only while a mount is built or taken down: a holder that takes longer is
        # stopped or stuck in the kernel, and waiting for it would stop a prune, a mount
        # or a verify with no word.
        if not take_within(fd, GUARD_TIMEOUT):
            raise SnapmgrError(f"{guard} is held by another snapmgr process for over {GUARD_TIMEOUT:g} s "
                               f"(stopped, or stuck mounting?)")
        yield
    finally:
        os.close(fd)


def _alone(fd: int) -> bool:
    """Whether no one else holds the users' lock; if so, this descriptor now holds it alone."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _beside(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)
