"""The FUSE operations: each goes to the virtual top levels (tree) or to a snapshot's
contents (passthrough). Every change is refused with EROFS, whatever the mount options.

A snapshot's LABEL entry needs attributes before anyone walks into it, and for an LVM
snapshot the real ones cost an activation and a mount. Listing a volume must not mount
every snapshot, so until a lazily mounted snapshot has been entered once, its LABEL is
shown as a placeholder (root-owned, mode 0700, never cached) in every listing, whoever
lists it, and to root's lookups: nothing more than root may do anyway. Anyone else's
lookup is answered with the real attributes, which are what the kernel's permission
check (default_permissions) must judge them by, so for them it is entered; the
placeholder a listing gave them is not cached, so the kernel looks it up before judging."""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time

import pyfuse3

from snapmgr.fuse.inodes import SLOT_SHIFT, Inodes
from snapmgr.fuse.passthrough import Entry, Passthrough, attributes, made_up
from snapmgr.fuse.roots import Roots
from snapmgr.fuse.tree import TOP_TIMEOUT, Tree
from snapmgr.fuse.verifying import Verifier

log = logging.getLogger(__name__)


def _os_errors(operation):
    """An OSError of the underlying file answers the request with its errno. Anything
    unexpected (a bug) is logged and answered with EIO: one odd file must not end the
    mount for everyone."""
    @functools.wraps(operation)
    async def answer(*args, **kwargs):
        try:
            return await operation(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            log.error("%s failed: %s: %s", operation.__name__, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            raise pyfuse3.FUSEError(errno.EIO) from None
    return answer


class Filesystem(pyfuse3.Operations):
    enable_acl = True   # the kernel reads POSIX ACLs through getxattr and enforces them

    def __init__(self, tree: Tree, roots: Roots, passthrough: Passthrough, verifier: Verifier | None = None):
        super().__init__()
        self.tree = tree
        self.roots = roots
        self.files = passthrough
        self.verifier = verifier
        self.inodes: Inodes = tree.inodes
        self._started_ns = time.time_ns()
        self._handles = itertools.count(1)
        self._dirs: dict[int, list[Entry]] = {}
        self._open: dict[int, int] = {}  # descriptor -> slot
        self._rotten: set[int] = set()   # descriptors of files that failed verification

    def _is_virtual(self, ino: int) -> bool:
        return self.inodes.key_of(ino) is not None

    # Attributes ------------------------------------------------------------------------

    async def _attributes(self, ino: int, uid: int, listing: bool = False) -> pyfuse3.EntryAttributes:
        if self._is_virtual(ino):
            return await self._virtual_attributes(ino)
        if self.inodes.is_snapshot_root(ino):
            return await self._label_attributes(ino, uid, listing)
        return await self.files.getattr(ino)

    async def _virtual_attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        t = self._started_ns
        if self.tree.is_link(ino):
            target = await self.tree.readlink(ino)
            if target is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return made_up(ino, stat.S_IFLNK | 0o777, len(target), t, TOP_TIMEOUT)
        return made_up(ino, stat.S_IFDIR | 0o555, 0, t, TOP_TIMEOUT)

    async def _label_attributes(self, ino: int, uid: int, listing: bool = False) -> pyfuse3.EntryAttributes:
        slot = ino >> SLOT_SHIFT
        listed = self.tree.snapshot(slot)
        if listed is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        st = self.roots.known_stat(slot)
        if st is None and (not listed.backend.browse_mounts or (uid != 0 and not listing)):
            await self.roots.enter(slot)
            st = self.roots.known_stat(slot)
        if st is None:
            created_ns = int(listed.snapshot.created.timestamp()) * 10**9
            return made_up(ino, stat.S_IFDIR | 0o700, 0, created_ns, 0)
        return attributes(ino, st, TOP_TIMEOUT)

    # Looking up -------------------------------------------------------------------------

    @_os_errors
    async def lookup(self, parent, name, ctx):
        if not self._is_virtual(parent):
            return await self.files.lookup(parent, name)
        ino = await self.tree.lookup(parent, name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attributes(ino, ctx.uid)

    @_os_errors
    async def getattr(self, inode, ctx):
        return await self._attributes(inode, ctx.uid)

    async def forget(self, inode_list):
        for ino, lookups in inode_list:
            self.files.forget(ino, lookups)

    @_os_errors
    async def readlink(self, inode, ctx):
        if not self._is_virtual(inode):
            return await self.files.readlink(inode)
        target = await self.tree.readlink(inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return target

    # Directories ------------------------------------------------------------------------

    @_os_errors
    async def opendir(self, inode, ctx):
        if self._is_virtual(inode):
            entries = [Entry(name, await self._attributes(ino, ctx.uid, listing=True))
                       for name, ino in await self.tree.children(inode)]
        else:
            entries = await self.files.listdir(inode)
        fh = next(self._handles)
        self._dirs[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            e = entries[index]
            if not pyfuse3.readdir_reply(token, e.name, e.attributes, index + 1):
                break
            if e.path is not None:
                self.files.remember(e.attributes.st_ino, e.path)

    async def releasedir(self, fh):
        del self._dirs[fh]

    # Files ------------------------------------------------------------------------------

    @_os_errors
    async def open(self, inode, flags, ctx):
        if self._is_virtual(inode):
            raise pyfuse3.FUSEError(errno.EROFS if flags & (os.O_WRONLY | os.O_RDWR) else errno.ELOOP)
        slot, fd = await self.files.open(inode, flags)
        self._open[fd] = slot   # open first: the descriptor keeps an LVM snapshot mounted while it is hashed
        try:
            if self.verifier is not None and await self._fails_verification(inode):
                self._rotten.add(fd)
        except BaseException:
            await self.release(fd)
            raise
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def _fails_verification(self, ino: int) -> bool:
        slot, path, full = await self.files.where(ino)
        listed = self.tree.snapshot(slot)
        if listed is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.verifier.problem(ino, listed, path, full) is not None

    @_os_errors
    async def read(self, fh, off, size):
        if fh in self._rotten:
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(fh, size, off)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(fh)
        self._rotten.discard(fh)
        self.roots.closed(self._open.pop(fh))

    def close_files(self) -> None:
        """Close what is still open (at unmount), so the browse roots can be released."""
        while self._open:
            fd, slot = self._open.popitem()
            os.close(fd)
            self.roots.closed(slot)

    # Extended attributes ---------------------------------------------------------------

    @_os_errors
    async def getxattr(self, inode, name, ctx):
        if not await self._has_contents(inode, ctx.uid):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self.files.getxattr(inode, name)

    @_os_errors
    async def listxattr(self, inode, ctx):
        if not await self._has_contents(inode, ctx.uid):
            return []
        names = await self.files.listxattr(inode)
        # Local filesystems list trusted.* names to privileged callers only; this list is
        # read as root, so it must leave them out for everyone else (their values the
        # kernel refuses by itself).
        return names if ctx.uid == 0 else [n for n in names if not n.startswith(b"trusted.")]

    async def _has_contents(self, ino: int, uid: int) -> bool:
        """Whether `ino` is a file of a snapshot, entered: not a virtual node, nor the
        placeholder of a snapshot not entered yet (whose xattrs are none, like its ACL)."""
        if self._is_virtual(ino):
            return False
        if self.inodes.is_snapshot_root(ino):
            await self._label_attributes(ino, uid)
            return self.roots.known_stat(ino >> SLOT_SHIFT) is not None
        return True

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # Changes: none, ever ----------------------------------------------------------------

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = write = create = _read_only
    setxattr = removexattr = fsync = fsyncdir = _read_only
