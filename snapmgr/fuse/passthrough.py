"""The snapshots' contents, served as stored: attributes, directories, symlinks, xattrs
(ACLs included) and file data, read from the browse root's path.

The only state per file is its path, kept from the kernel's lookup until its forget, so
memory follows what the kernel holds, not the size of the snapshots. Everything below a
snapshot is immutable: the kernel may keep entries, attributes and pages for long."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

import pyfuse3

from snapmgr.fuse.inodes import Inodes
from snapmgr.fuse.roots import Roots

LONG_TIMEOUT = 24 * 3600.0
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def attributes(ino: int, st: os.stat_result, timeout: float) -> pyfuse3.EntryAttributes:
    """The attributes of a stored file, as the kernel may cache them for `timeout` seconds."""
    # Spelt out, not a loop over field names: this runs for every entry of every listing.
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.entry_timeout = a.attr_timeout = timeout
    a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
    a.st_rdev, a.st_size, a.st_blksize, a.st_blocks = st.st_rdev, st.st_size, st.st_blksize, st.st_blocks
    a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return a


def made_up(ino: int, mode: int, size: int, time_ns: int, timeout: float) -> pyfuse3.EntryAttributes:
    """The attributes of something that is not stored: a virtual node, a placeholder.
    Owned by root, as is everything snapmgr makes."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.entry_timeout = a.attr_timeout = timeout
    a.st_mode = mode
    a.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    a.st_size = size
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time_ns
    return a


@dataclass
class Entry:
    """One entry of a listed directory: its name, attributes and path in the snapshot."""

    name: bytes
    attributes: pyfuse3.EntryAttributes
    path: bytes | None = None   # None for the virtual top levels


class Passthrough:
    def __init__(self, inodes: Inodes, roots: Roots):
        self.inodes = inodes
        self.roots = roots
        self._paths: dict[int, list] = {}   # inode -> [path in its snapshot, kernel lookups]

    # Inode bookkeeping ------------------------------------------------------------------

    def remember(self, ino: int, path: bytes) -> None:
        """The kernel looked `ino` up once more (lookup, or readdirplus) under `path`."""
        if self.inodes.is_snapshot_root(ino):
            return
        known = self._paths.get(ino)
        if known is None:
            self._paths[ino] = [path, 1]
        else:
            known[1] += 1

    def forget(self, ino: int, lookups: int) -> None:
        known = self._paths.get(ino)
        if known is not None:
            known[1] -= lookups
            if known[1] <= 0:
                del self._paths[ino]

    def _located(self, ino: int) -> tuple[int, bytes]:
        slot = self.inodes.slot_of(ino)
        if self.inodes.is_snapshot_root(ino):
            return slot, b""
        known = self._paths.get(ino)
        if slot is None or known is None:
            raise pyfuse3.FUSEError(errno.ESTALE)  # forgotten by the kernel: it cannot ask
        return slot, known[0]

    async def where(self, ino: int) -> tuple[int, bytes, bytes]:
        """(slot, path in the snapshot, path on this machine) of a file inode."""
        slot, path = self._located(ino)
        root = await self.roots.enter(slot)
        return slot, path, root + b"/" + path if path else root

    def _attributes(self, slot: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        place = self.roots.place(slot, st.st_dev)
        if place:
            ino = self.inodes.of_file(self.inodes.inner_slot(slot, place), st.st_ino, None)
        else:
            ino = self.inodes.of_file(slot, st.st_ino, self.roots.known_stat(slot).st_ino)
        return attributes(ino, st, LONG_TIMEOUT)

    # Operations ---------------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        slot, path, full = await self.where(parent)
        st = os.lstat(full + b"/" + name)
        a = self._attributes(slot, st)
        self.remember(a.st_ino, path + b"/" + name if path else name)
        return a

    async def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        slot, _, full = await self.where(ino)
        return self._attributes(slot, os.lstat(full))

    async def readlink(self, ino: int) -> bytes:
        return os.readlink((await self.where(ino))[2])

    async def listdir(self, ino: int) -> list[Entry]:
        slot, path, full = await self.where(ino)
        # In the loop, not a worker thread: a `find` asks for one directory at a time, and
        # the thread hop per directory cost more (25% of a warm find) than it overlapped.
        named = _lstat_all(full)
        prefix = path + b"/" if path else b""
        return [Entry(name, self._attributes(slot, st), prefix + name) for name, st in named]

    async def open(self, ino: int, flags: int) -> tuple[int, int]:
        """(slot, descriptor) of the file opened for reading."""
        if flags & WRITING:
            raise pyfuse3.FUSEError(errno.EROFS)
        slot, _, full = await self.where(ino)
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.roots.opened(slot)
        return slot, fd

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return os.getxattr((await self.where(ino))[2], name, follow_symlinks=False)

    async def listxattr(self, ino: int) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr((await self.where(ino))[2], follow_symlinks=False)]


def _lstat_all(directory: bytes) -> list[tuple[bytes, os.stat_result]]:
    """Each entry of a directory with its attributes."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        named = []
        for name in os.listdir(fd):
            try:
                named.append((os.fsencode(name), os.lstat(name, dir_fd=fd)))
            except FileNotFoundError:
                continue
        return named
    finally:
        os.close(fd)
