"""Paths of any length. A snapshot (btrfs, ZFS, LVM) can hold a tree deeper than PATH_MAX,
which the kernel refuses in a path name (ENAMETOOLONG). Such a path is reached through
a descriptor of its directory, opened a piece at a time; a shorter one, nearly always,
is used as it is, so the walk pays nothing for the rare deep tree."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

# PATH_MAX is 4096 bytes with the closing NUL; a margin below it.
LIMIT = 4000
_PIECE = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


@contextmanager
def located(path: bytes) -> Iterator[tuple[int, bytes]]:
    """(directory descriptor, name) to reach a long `path` by."""
    head, name = path.rsplit(b"/", 1)
    fd = open_directory(head, _PIECE)
    try:
        yield fd, name
    finally:
        os.close(fd)


def open_directory(path: bytes, flags: int = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) -> int:
    """A descriptor of the directory `path`, however long (os.listdir takes it)."""
    if len(path) < LIMIT:
        return os.open(path, flags)
    pieces, piece = [], b"/" if path.startswith(b"/") else b""
    for component in filter(None, path.split(b"/")):
        if len(piece) + 1 + len(component) >= LIMIT:
            pieces.append(piece)
            piece = component
        else:
            piece = piece + component if piece in (b"", b"/") else piece + b"/" + component
    fd = os.open(pieces[0], _PIECE)
    try:
        for middle in pieces[1:]:
            fd = _replace(fd, os.open(middle, _PIECE, dir_fd=fd))
        return _replace(fd, os.open(piece, flags, dir_fd=fd))
    except BaseException:
        os.close(fd)
        raise


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new


# The short path first, in each: a generator-based context manager per entry would cost
# the walk a third of its time.

def lstat(path: bytes) -> os.stat_result:
    if len(path) < LIMIT:
        return os.lstat(path)
    with located(path) as (fd, name):
        return os.lstat(name, dir_fd=fd)


def readlink(path: bytes) -> bytes:
    if len(path) < LIMIT:
        return os.readlink(path)
    with located(path) as (fd, name):
        return os.readlink(name, dir_fd=fd)


def listdir(path: bytes) -> list[bytes]:
    if len(path) < LIMIT:
        return os.listdir(path)
    fd = open_directory(path)
    try:
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


def open_file(path: bytes, flags: int) -> int:
    if len(path) < LIMIT:
        return os.open(path, flags)
    with located(path) as (fd, name):
        return os.open(name, flags, dir_fd=fd)


def open_entry(path: bytes) -> int:
    """An O_PATH descriptor of the entry itself (a symlink not followed), for a long path:
    its /proc/self/fd link is a path os.listxattr/getxattr take (they have no dir_fd),
    and follow to the entry and no further."""
    return open_file(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
