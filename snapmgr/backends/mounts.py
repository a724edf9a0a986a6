"""Where a filesystem is mounted, read from /proc/self/mountinfo (the kernel's own table,
so a mount made by hand, by fstab or by `zfs mount` is found alike); and browse mounts
under snapmgr's run directory that several users share and a killed one cannot strand."""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from snapmgr import sh

MOUNTINFO = Path("/proc/self/mountinfo")
GUARD = ".lock"
USERS = ".users"
UMOUNT_TIMEOUT = 60
_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_OCTAL_RE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    device: tuple[int, int]   # major, minor
    root: bytes               # the directory of the filesystem mounted here ("/": all of it)
    mountpoint: Path
    fstype: str
    source: str


def mounts() -> list[Mount]:
    found = []
    for line in MOUNTINFO.read_bytes().splitlines():
        fields = line.split(b" ")
        sep = fields.index(b"-")
        major, minor = fields[2].split(b":")
        found.append(Mount((int(major), int(minor)), _unescaped(fields[3]), Path(_unescaped(fields[4]).decode(
            errors="surrogateescape")), fields[sep + 1].decode(), _unescaped(fields[sep + 2]).decode(errors="replace")))
    return found


def whole_mount(match) -> Path | None:
    """The mountpoint of the first mount for which `match(mount)` holds that shows the whole
    filesystem (not a bind mount of a directory inside it)."""
    return next((m.mountpoint for m in mounts() if m.root == b"/" and match(m)), None)


def mounted_at(path: Path) -> Mount | None:
    """The topmost mount at `path` (the one a lookup of `path` reaches), if any."""
    return next((m for m in reversed(mounts()) if m.mountpoint == path), None)


def below(path: Path) -> list[Mount]:
    """The mounts at `path` and below it, in the order they were made."""
    real = Path(os.path.realpath(path))
    return [m for m in mounts() if m.mountpoint == real or real in m.mountpoint.parents]


# Shared browse mounts -------------------------------------------------------------------
#
# Whoever uses a browse mount holds a shared flock on a file beside it for as long, and
# the kernel drops it however its holder dies: a mount with no holder was left by a killed
# process. Who builds, joins, leaves or clears one decides under one exclusive flock of the
# directory's, so the first user builds it and the last one takes it down.

@contextmanager
def shared(target: Path, build: Callable[[], None]) -> Iterator[Path]:
    """`target`, a directory in which build() mounts what is to be browsed, shared by all
    who browse it at the same time, in this process or another. What a killed process
    left mounted there is unmounted before it is built again; the last user unmounts it
    all, innermost first, and removes it."""
    users = _users(target)
    with _guard(target.parent):
        fd = os.open(users, _OPEN, 0o600)
        try:
            if _alone(fd):
                _unmount(target)
                target.mkdir(exist_ok=True)
                try:
                    build()
                except BaseException:
                    _remove(target)
                    raise
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
    try:
        yield target
    finally:
        with _guard(target.parent):
            try:
                if _alone(fd):
                    _remove(target)
            finally:
                os.close(fd)


def release_unused(target: Path) -> None:
    """Unmount and remove a shared browse mount that no one uses: what a killed process
    left behind (it keeps what it shows busy)."""
    users = _users(target)
    if not users.exists():
        return  # never built, or taken down
    with _guard(target.parent):
        try:
            fd = os.open(users, _OPEN & ~os.O_CREAT)
        except FileNotFoundError:
            return
        try:
            if _alone(fd):
                _remove(target)
        finally:
            os.close(fd)


@contextmanager
def _guard(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / GUARD, _OPEN, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _users(target: Path) -> Path:
    return target.with_name(target.name + USERS)


def _alone(fd: int) -> bool:
    """Whether no one else holds the users' lock; if so, this descriptor now holds it alone."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unmount(target: Path) -> None:
    # Innermost first (of two at one place, the later), and lazily: a file still open in
    # the tree must not stop its release.
    for m in sorted(reversed(below(target)), key=lambda m: len(m.mountpoint.parts), reverse=True):
        sh.run(["umount", "--lazy", m.mountpoint], timeout=UMOUNT_TIMEOUT)


def _remove(target: Path) -> None:
    """Under the guard, by the users' lock's only holder: the users' file goes last, since
    whoever finds it may find the mount too."""
    _unmount(target)
    try:
        target.rmdir()
    except FileNotFoundError:
        pass
    _users(target).unlink()


def _unescaped(field: bytes) -> bytes:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL_RE.sub(lambda m: bytes([int(m[1], 8)]), field)
