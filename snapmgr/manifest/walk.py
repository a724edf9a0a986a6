"""Walk a directory tree into manifest entries, in walk order, hashing regular files in
parallel while the walk goes on, and taking what has not changed from the previous
manifest.

What may be taken from the previous manifest? An inode's content, xattrs and ACLs can
only change together with its ctime, so an entry at the same path with the same inode
number and ctime keeps its xattrs digest, and, a file whose size and mtime match too, its
content hash: btrfs, ZFS and LVM snapshots keep inode numbers and ctimes. rsync snapshots
do not keep ctimes: `--link-dest` hard-links an unchanged file into the new snapshot, and
link(2) sets the inode's ctime. But there both snapshots live on one filesystem and the
previous one still holds its inodes, so the same inode number *is* the same inode, and
therefore has the same content and xattrs: the inode number is enough (with size and
mtime, in case the previous snapshot was damaged in place since), but not for the xattrs,
whose change moves neither size nor mtime: they are read again. The backend says which
case it is (`shares_inodes`).

Timestamps are coarse on some filesystems (ext4 with 128-byte inodes: one second), so a
file rewritten in place in the same tick as the previous snapshot was taken keeps its
ctime, and would keep its stale hash forever. As git does with its index ("racy clean"),
an entry whose ctime is not older than the previous snapshot's creation by a margin is
never taken from it (`previous_taken`, settled_before()). diff trusts an unchanged inode
and ctime under the same rule."""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from snapmgr.manifest import longpath, xattrs
from snapmgr.manifest.entry import Entry, display, walk_key
from snapmgr.manifest.hashing import Content, Hashing, ScanError, Unreadable

PATH, SIZE, XATTRS, DIGEST = (Entry._fields.index(n) for n in ("path", "size", "xattrs", "digest"))
PROGRESS_EVERY = 4096
PENDING = object()   # a digest being computed (and the xattrs read with it)
GIVE_OUT_EVERY = 512  # entries walked between two looks at what the pool has hashed
# Coarser than any timestamp granularity Linux filesystems have (FAT's 2 s).
RACY_MARGIN_NS = 2_000_000_000
KIND_OF = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
         stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


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


def scan(root: str | os.PathLike, algorithm: str | None, previous: Iterable[Entry] | None = None, *,
         shares_inodes: bool = False, previous_taken: float | None = None, stats: ScanStats | None = None,
         strict: bool = True, progress: Callable[[str], None] | None = None) -> Iterator[Entry]:
    """The entries under `root`, in walk order. algorithm None: no content hashes (a cheap
    walk). `previous`: an older state of the tree, in walk order, hashed with the same
    algorithm, whose hashes are taken for files not written since (see the module's
    docstring). previous_taken: when that state was taken (seconds since the epoch), so
    that what was written in its last moments is hashed again; None: no such guard, for a
    `previous` not taken from this tree. strict: an entry that cannot be read stops the scan with a ScanError;
    otherwise it is listed in `stats.unreadable` (and a file's digest is None). progress:
    told now and then how far it got. The work is done by the time this returns."""
    return iter(list(stream(root, algorithm, previous, shares_inodes=shares_inodes, previous_taken=previous_taken,
                            stats=stats, strict=strict, progress=progress)))


def stream(root: str | os.PathLike, algorithm: str | None, previous: Iterable[Entry] | None = None, *,
           shares_inodes: bool = False, previous_taken: float | None = None, stats: ScanStats | None = None,
           strict: bool = True, progress: Callable[[str], None] | None = None) -> Iterator[Entry]:
    """As scan(), lazily: each entry comes out as soon as it and those before it have their
    hashes, so that whoever takes them (the manifest being written) works while the pool
    hashes. The tree is read while the entries are taken, and `stats` is complete once
    they all are."""
    stats = stats if stats is not None else ScanStats()
    started = time.monotonic()
    base = os.fsencode(root)
    before = _Cursor(previous or ())
    settled = settled_before(previous_taken)
    rows: deque[list] = deque()   # Entry's fields, in walk order, of the entries not given out yet
    waiting: dict[int, list] = {}  # the rows whose digest is PENDING, by the key hashing knows them by
    walked = 0
    with Hashing(algorithm) as hashing:
        for absolute, rel, st in _walk(base, stats, strict):
            old = before.at(rel)
            unchanged = old is not None and (old.ino, old.size, old.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns) \
                and (shares_inodes or (old.ctime_ns == st.st_ctime_ns and old.ctime_ns < settled))
            kind = KIND_OF.get(stat.S_IFMT(st.st_mode), "?")
            if kind == "f":
                stats.bytes += st.st_size
            row = _row(absolute, rel, kind, st)
            if kind == "f" and algorithm and not (unchanged and old.kind == "f" and old.digest):
                row[XATTRS] = row[DIGEST] = PENDING
                waiting[walked] = row
                hashing.add(walked, absolute, st.st_size)
            else:
                if kind == "f" and algorithm:
                    row[DIGEST] = old.digest
                    stats.reused += 1
                # Where inodes are shared their ctime says nothing, nor do size and mtime
                # of an xattr's change: the xattrs are read again.
                row[XATTRS] = old.xattrs if unchanged and not shares_inodes else _xattrs(absolute, rel, stats, strict)
            rows.append(row)
            walked += 1
            if walked % GIVE_OUT_EVERY == 0:
                if progress and walked % PROGRESS_EVERY == 0:
                    progress(f"{walked:,} entries found")
                for key, digest in hashing.results(wait=False):
                    _put(waiting.pop(key), digest, stats, strict, progress)
                yield from _ready(rows)
        for key, digest in hashing.results(wait=True):
            _put(waiting.pop(key), digest, stats, strict, progress)
            if rows[0][DIGEST] is not PENDING:
                yield from _ready(rows)
        yield from _ready(rows)
    stats.entries = walked
    stats.seconds = time.monotonic() - started


def settled_before(taken: float | None) -> float:
    """The ctime (ns) below which an inode's ctime, found as it was in a state taken at
    `taken` (seconds since the epoch), shows the inode unwritten since: a write in the
    clock tick that state was taken in can leave the ctime as it was. None: no such
    state (nothing taken from this tree), so no guard."""
    return float("inf") if taken is None else int(taken * 1e9) - RACY_MARGIN_NS


def _put(row: list, found: Content | Unreadable, stats: ScanStats, strict: bool,
         progress: Callable[[str], None] | None) -> None:
    row[XATTRS] = found.xattrs
    if isinstance(found, Unreadable):
        row[DIGEST] = None
        _unreadable(stats, strict, row[PATH], found.reason)
        return
    row[DIGEST] = found.digest
    stats.hashed += 1
    stats.hashed_bytes += row[SIZE]
    if progress and stats.hashed % PROGRESS_EVERY == 0:
        progress(f"{stats.hashed:,} files hashed")


def _ready(rows: deque[list]) -> Iterator[Entry]:
    """The entries at the head of `rows` that have their digest."""
    while rows and rows[0][DIGEST] is not PENDING:
        yield Entry._make(rows.popleft())


class _Cursor:
    """The previous entries, looked up at ever later paths in one pass."""

    def __init__(self, entries: Iterable[Entry]):
        self._entries = iter(entries)
        self._current = next(self._entries, None)

    def at(self, path: bytes) -> Entry | None:
        current = self._current
        if current is not None and current.path != path:   # else: the usual case, a hit
            key = walk_key(path)
            while current is not None and walk_key(current.path) < key:
                current = next(self._entries, None)
            if current is None or current.path != path:
                self._current = current
                return None
        if current is not None:
            self._current = next(self._entries, None)
        return current


def _walk(base: bytes, stats: ScanStats, strict: bool) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(absolute path, relative path, lstat) of each entry: depth first, siblings sorted
    by name, which is exactly walk order. Iterative, so no depth reaches Python's
    recursion limit; through longpath, so none reaches PATH_MAX."""
    st = os.lstat(base)
    yield base, b"", st
    stack = [iter(_children(base, b"", stats, strict))]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        yield child
        absolute, rel, st = child
        if stat.S_ISDIR(st.st_mode):
            stack.append(iter(_children(absolute, rel, stats, strict)))


def _children(directory: bytes, rel: bytes, stats: ScanStats, strict: bool
              ) -> list[tuple[bytes, bytes, os.stat_result]]:
    try:
        names = sorted(longpath.listdir(directory))
    except OSError as e:
        _unreadable(stats, strict, rel, e.strerror or str(e))
        return []
    children = []
    prefix = rel + b"/" if rel else b""
    for name in names:
        absolute = directory + b"/" + name
        try:
            children.append((absolute, prefix + name, longpath.lstat(absolute)))
        except FileNotFoundError:
            continue  # gone since the listing: only a live tree changes under a walk
        except OSError as e:
            _unreadable(stats, strict, prefix + name, e.strerror or str(e))
    return children


def _unreadable(stats: ScanStats, strict: bool, path: bytes, reason: str) -> None:
    if strict:
        raise ScanError(f"{display(path)} cannot be read: {reason}")
    stats.unreadable.append((path, reason))


def _row(absolute: bytes, rel: bytes, kind: str, st: os.stat_result) -> list:
    """An Entry's fields, without the xattrs and the digest yet."""
    return [rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
            st.st_ino, st.st_ctime_ns, st.st_nlink, st.st_rdev, longpath.readlink(absolute) if kind == "l" else None,
            None, None]


def _xattrs(absolute: bytes, rel: bytes, stats: ScanStats, strict: bool) -> str | None:
    try:
        return xattrs.of_path(absolute)
    except FileNotFoundError:
        return None
    except OSError as e:
        _unreadable(stats, strict, rel, f"extended attributes: {e.strerror or e}")
        return None

