"""One digest of an entry's extended attributes, every name and value (POSIX ACLs are
xattrs too), so that a manifest tells when any of them changed without storing them."""

from __future__ import annotations

import errno
import hashlib
import os

from snapmgr.manifest import longpath


def of_path(path: bytes) -> str | None:
    """The digest of the entry at `path` (a symlink's own), None when it has none."""
    if len(path) < longpath.LIMIT:
        return _digest(path, follow=False)
    fd = longpath.open_entry(path)
    try:
        return _digest(b"/proc/self/fd/%d" % fd, follow=True)
    finally:
        os.close(fd)


def of_fd(fd: int) -> str | None:
    """The digest of an open file's, read while it is open for hashing: one path lookup
    less per file, and off the walk's process."""
    return _digest(fd, follow=True)


def _digest(entry: bytes | int, follow: bool) -> str | None:
    try:
        names = os.listxattr(entry, follow_symlinks=follow)
    except OSError as e:
        if e.errno == errno.ENOTSUP:  # a filesystem without xattrs
            return None
        raise
    if not names:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        value = os.getxattr(entry, name, follow_symlinks=follow)
        encoded = name.encode("utf-8", "surrogateescape")
        h.update(b"%d:%s%d:%s" % (len(encoded), encoded, len(value), value))
    return h.hexdigest()
