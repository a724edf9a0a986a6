"""Walk a directory tree into manifest entries, in walk order, hashing regular files in
parallel and taking unchanged files' hashes from the previous manifest.

When may a hash be reused? A file whose inode, size, mtime and ctime all match the
previous snapshot's entry at the same path has not been written since: btrfs, ZFS and LVM
snapshots keep inode numbers and ctimes. rsync snapshots do not keep ctimes: `--link-dest`
hard-links an unchanged file into the new snapshot, and link(2) sets the inode's ctime.
But there both snapshots live on one filesystem and the previous one still holds its
inodes, so the same inode number *is* the same inode, and therefore the same content:
(inode, size, mtime) is enough. The backend says which case it is (`shares_inodes`)."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from snapmgr.errors import SnapmgrError, quote
from snapmgr.manifest.entry import Entry, walk_key
from snapmgr.manifest.hashing import Unreadable, hash_many

_KIND = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
         stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


class ScanError(SnapmgrError):
    pass


@dataclass
class ScanStats:
    """What a scan did, for the snapshot's record and for verify's report."""
    entries: int = 0
    bytes: int = 0                 # the regular files' total size
    hashed: int = 0
    hashed_bytes: int = 0
    reused: int = 0
    seconds: float = 0.0
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)

    def as_record(self) -> dict:
        return {"entries": self.entries, "bytes": self.bytes, "hashed": self.hashed,
                "hashed_bytes": self.hashed_bytes, "reused": self.reused, "seconds": round(self.seconds, 3)}


def display(path: bytes) -> str:
    """A manifest path as one line of text: undecodable bytes and control characters escaped."""
    return quote("/" + path.decode("utf-8", "backslashreplace"))


def scan(root: str | os.PathLike, algorithm: str | None, previous: Iterable[Entry] | None = None, *,
         shares_inodes: bool = False, stats: ScanStats | None = None, strict: bool = True) -> Iterator[Entry]:
    """The entries under `root`, in walk order. algorithm None: no content hashes (a cheap
    walk). `previous`: an older state of the tree (walk order), whose hashes are taken for
    files that were not written since (see the module's docstring). strict: an entry that
    cannot be read stops the scan with a ScanError; otherwise it is listed in
    `stats.unreadable` and its digest is None."""
    stats = stats if stats is not None else ScanStats()
    started = time.monotonic()
    base = os.fsencode(root)
    entries = list(_walk(base, stats, strict))
    if algorithm is not None:
        _hash(base, entries, algorithm, previous, shares_inodes, stats, strict)
    stats.entries = len(entries)
    stats.seconds = time.monotonic() - started
    return iter(entries)


def _walk(base: bytes, stats: ScanStats, strict: bool) -> Iterator[Entry]:
    """Depth first, siblings sorted by name: exactly walk order. Iterative, so that no
    depth of tree reaches Python's recursion limit."""
    root = _entry(base, b"", os.lstat(base))
    yield root
    stack = [iter(_children(base, b"", stats, strict))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry.kind == "d":
            stack.append(iter(_children(base, entry.path, stats, strict)))


def _children(base: bytes, path: bytes, stats: ScanStats, strict: bool) -> list[Entry]:
    where = base + b"/" + path if path else base
    try:
        names = sorted(os.listdir(where))
    except OSError as e:
        _unreadable(stats, strict, path, e.strerror or str(e))
        return []
    children = []
    for name in names:
        rel = path + b"/" + name if path else name
        try:
            children.append(_entry(where + b"/" + name, rel, os.lstat(where + b"/" + name)))
        except FileNotFoundError:
            continue  # gone since the listing: only a live tree changes under a walk
        except OSError as e:
            _unreadable(stats, strict, rel, e.strerror or str(e))
    return children


def _unreadable(stats: ScanStats, strict: bool, path: bytes, reason: str) -> None:
    if strict:
        raise ScanError(f"{display(path)} cannot be read: {reason}")
    stats.unreadable.append((path, reason))


def _entry(absolute: bytes, rel: bytes, st: os.stat_result) -> Entry:
    kind = _KIND.get(stat.S_IFMT(st.st_mode), "?")
    return Entry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                 st.st_ino, st.st_ctime_ns, st.st_nlink, st.st_rdev,
                 os.readlink(absolute) if kind == "l" else None, xattrs_digest(absolute))


def xattrs_digest(path: bytes) -> str | None:
    """One digest of every extended attribute's name and value (POSIX ACLs are xattrs),
    or None when the entry has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return None  # a filesystem without xattrs
    if not names:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        value = os.getxattr(path, name, follow_symlinks=False)
        encoded = name.encode("utf-8", "surrogateescape")
        h.update(b"%d:%s%d:%s" % (len(encoded), encoded, len(value), value))
    return h.hexdigest()


def _hash(base: bytes, entries: list[Entry], algorithm: str, previous: Iterable[Entry] | None, shares_inodes: bool,
          stats: ScanStats, strict: bool) -> None:
    """Fill in the files' digests: taken from `previous` where allowed, hashed otherwise."""
    reusable = _reusable(entries, previous, shares_inodes) if previous is not None else {}
    todo = []
    for i, e in enumerate(entries):
        if e.kind != "f":
            continue
        stats.bytes += e.size
        if i in reusable:
            entries[i] = _with_digest(e, reusable[i])
            stats.reused += 1
        else:
            todo.append(i)
    digests = hash_many([(base + b"/" + entries[i].path, entries[i].size) for i in todo], algorithm)
    for i, digest in zip(todo, digests):
        if isinstance(digest, Unreadable):
            _unreadable(stats, strict, entries[i].path, digest.reason)
            continue
        entries[i] = _with_digest(entries[i], digest)
        stats.hashed += 1
        stats.hashed_bytes += entries[i].size


def _reusable(entries: list[Entry], previous: Iterable[Entry], shares_inodes: bool) -> dict[int, str]:
    """Index of each file whose previous hash still holds -> that hash (one merge pass)."""
    found = {}
    old = iter(previous)
    o = next(old, None)
    for i, e in enumerate(entries):
        key = walk_key(e.path)
        while o is not None and walk_key(o.path) < key:
            o = next(old, None)
        if o is None:
            break
        if (o.path == e.path and e.kind == "f" and o.kind == "f" and o.digest is not None and o.ino == e.ino
                and o.size == e.size and o.mtime_ns == e.mtime_ns and (shares_inodes or o.ctime_ns == e.ctime_ns)):
            found[i] = o.digest
    return found


def _with_digest(e: Entry, digest: str) -> Entry:
    return Entry(e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.ino, e.ctime_ns, e.nlink, e.rdev,
                 e.target, e.xattrs, digest)
