"""Which processes use a volume's files: those writing to them (what a rollback must
not race once the services are stopped), and those that only keep them busy (what an
unmount waits for). Read from /proc (root sees every process), so it finds writers no
quiescer names, and a quiescer that stopped the wrong service.

A process is judged by the files its descriptors and mappings lead to, not by their
paths alone: one in another mount namespace (a container, a unit with PrivateTmp= or
ProtectSystem=) sees the volume under other paths, or a directory of it bind-mounted
elsewhere. A file is the volume's when it is on one of the volume's filesystems (its
st_dev) and, placed by the process's own mount table, inside the directory the volume
is of that filesystem: a volume can be one directory of a larger one (an rsync source),
whose other files are not its."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from snapmgr import procfs
from snapmgr.backends import mounts

WRITING = os.O_WRONLY | os.O_RDWR
DELETED = " (deleted)"   # what /proc appends to the path of a file unlinked since it was opened


@dataclass(frozen=True)
class Users:
    """pid -> command name of every other process that uses the volume."""

    writers: dict[int, str]   # a file open for writing, or mapped shared and writable (a database's)
    holders: dict[int, str]   # the others: a file open to read or mapped, a working or root directory there


@dataclass(frozen=True)
class _Place:
    """Where a file is within its filesystem, whatever it is mounted as."""

    device: tuple[int, int]   # the filesystem's, as mount tables and /proc/PID/maps give it
    path: PurePosixPath       # from the filesystem's root

    def holds(self, other: _Place) -> bool:
        return other.device == self.device and (other.path == self.path or self.path in other.path.parents)


def users(roots: Sequence[Path]) -> Users:
    """The processes but this one that use files under `roots` (a volume's live root and
    the mountpoints of its other filesystems)."""
    volume = _Volume(roots)
    writers, holders = {}, {}
    for pid in procfs.pids():
        if pid == os.getpid():
            continue
        try:
            writes, holds = volume.used_by(pid)
            if writes or holds:
                (writers if writes else holders)[pid] = procfs.command(pid)
        except OSError:   # the process ended meanwhile
            continue
    return Users(writers, holders)


class _Volume:
    def __init__(self, roots: Sequence[Path]):
        self.table = mounts.mounts()
        self.namespace = os.stat("/proc/self/ns/mnt").st_ino
        real = [os.path.realpath(r) for r in roots]
        self.devices = {os.stat(r).st_dev for r in real}
        self.places = [p for r in real if (p := _place(r, self.table))]
        self.filesystems = {p.device for p in self.places}

    def used_by(self, pid: int) -> tuple[bool, bool]:
        """Whether process `pid` writes to the volume, and whether it otherwise uses it."""
        table = self.table if os.stat(f"/proc/{pid}/ns/mnt").st_ino == self.namespace else None

        def inside(path: str) -> bool:
            nonlocal table
            if table is None:   # read once needed: most processes have nothing on these filesystems
                table = mounts.mounts(pid)
            place = _place(path.removesuffix(DELETED), table)
            return place is not None and any(p.holds(place) for p in self.places)

        holds = False
        for fd in procfs.descriptors([pid]):
            try:
                if fd.stat().st_dev in self.devices and inside(fd.target()):
                    if fd.flags() & WRITING:
                        return True, False
                    holds = True
            except (OSError, StopIteration, ValueError):   # closed meanwhile
                continue
        for mapped in procfs.mappings(pid):
            if mapped.device in self.filesystems and inside(mapped.path):
                if mapped.writable_shared:
                    return True, False
                holds = True
        for link in ("cwd", "root"):
            where = f"/proc/{pid}/{link}"
            holds = holds or (os.stat(where).st_dev in self.devices and inside(os.readlink(where)))
        return False, holds


def _place(path: str, table: list[mounts.Mount]) -> _Place | None:
    """Where `path`, as seen through the mount table `table`, is within its filesystem:
    by the deepest mount on its way (the latest of several at one place)."""
    if not path.startswith("/"):
        return None   # a socket, a pipe: nothing on a filesystem of the volume's
    seen = PurePosixPath(path)
    mount = max((m for m in reversed(table) if m.mountpoint == seen or m.mountpoint in seen.parents),
                key=lambda m: len(m.mountpoint.parts), default=None)
    if mount is None:
        return None
    return _Place(mount.device, PurePosixPath(os.fsdecode(mount.root)) / seen.relative_to(mount.mountpoint))
