"""What a manifest holds about one entry of a snapshot, and how two manifests differ.

Paths are bytes, relative to the snapshot's root, components joined by b"/" (b"" is the
root itself): a file name may be any bytes but NUL and '/', so nothing here decodes them.
Entries always come in walk order, sorted by their path's components (the root first,
every directory before its contents), so two manifests compare in one merge pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

from snapmgr.errors import quote

KINDS = {"f": "file", "d": "directory", "l": "symlink", "c": "character device", "b": "block device",
         "p": "fifo", "s": "socket"}


class Entry(NamedTuple):
    """A tuple, not a dataclass: a manifest makes one per entry, read or written, and a
    frozen dataclass took a fifth of the time a manifest of small files costs."""
    path: bytes
    kind: str
    mode: int          # st_mode & 0o7777
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    nlink: int
    rdev: int
    target: bytes | None = None    # a symlink's target
    xattrs: str | None = None      # digest of every xattr name and value (ACLs too); None: none
    digest: str | None = None      # a regular file's content hash (hex)


@dataclass(frozen=True)
class Change:
    path: bytes
    status: str                    # added, removed, changed
    what: frozenset[str] = frozenset()


def path_text(path: bytes) -> str:
    """A path as text, bytes that are not UTF-8 shown as \\xNN: for reading, not exact
    (base64 is, where a script needs the bytes)."""
    return path.decode("utf-8", "backslashreplace")


def display(path: bytes) -> str:
    """A snapshot-relative path as one quoted line, control characters escaped."""
    return quote("/" + path_text(path))


def walk_key(path: bytes) -> list[bytes]:
    return path.split(b"/") if path else []


def differences(old: Entry, new: Entry) -> frozenset[str]:
    """Which of an entry's properties differ between two states of the same path."""
    if old.kind != new.kind:
        return frozenset({"type"})
    what = set()
    if old.digest != new.digest and old.digest is not None and new.digest is not None:
        what.add("content")
    for name, a, b in (("size", old.size, new.size), ("mode", old.mode, new.mode), ("owner", old.uid, new.uid),
                       ("group", old.gid, new.gid), ("mtime", old.mtime_ns, new.mtime_ns),
                       ("xattrs", old.xattrs, new.xattrs), ("target", old.target, new.target),
                       ("rdev", old.rdev, new.rdev)):
        if a != b:
            what.add(name)
    return frozenset(what)


def compare(old: Iterable[Entry], new: Iterable[Entry]) -> Iterator[Change]:
    """The changes from `old` to `new`, both in walk order, in walk order."""
    olds, news = iter(old), iter(new)
    a, b = next(olds, None), next(news, None)
    while a is not None or b is not None:
        if b is None or (a is not None and walk_key(a.path) < walk_key(b.path)):
            yield Change(a.path, "removed")
            a = next(olds, None)
        elif a is None or walk_key(b.path) < walk_key(a.path):
            yield Change(b.path, "added")
            b = next(news, None)
        else:
            what = differences(a, b)
            if what:
                yield Change(a.path, "changed", what)
            a, b = next(olds, None), next(news, None)
