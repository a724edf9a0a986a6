"""What changed between two states of a volume (two snapshots, or a snapshot and the live
volume), path by path, from their manifests when they have them and by walking them
when not.

Which files are read: a walk records no content hashes, and reading every file on both
sides would cost as much as copying the volume. A file's content is compared only when
it can have changed unseen: both sides regular files of the same size, not the same
inode with the same ctime (btrfs, ZFS and LVM snapshots keep inode numbers and ctimes;
between two rsync snapshots, whose unchanged files are hardlinks, the same inode), and
without a hash on both sides. A ctime shows nothing where it falls in the racy-clean
margin before the older snapshot was taken (manifest.settled_before): a write in that
clock tick can leave it as it was. The mtime is not trusted (`touch -r`, `rsync -t` and
archivers set it back), so correctness costs one read of each file that was written.
`quick` reads nothing: a file whose size is the same shows its content as changed only
where both sides have a hash (a manifest); otherwise its new mtime (m) is all that shows.
`written_only` reads what a rollback's check must: of the newer side's files, only those
written since the older side was taken (by ctime, which nothing sets back: a write, a
rename or a new link of the file moves it); the others are taken as they were then. What
that misses, between a snapshot and the live volume it was taken of: a file in a
directory renamed in since, which keeps its own old ctime, where it has the size and mtime
of the file it replaced (see snapmgr.backends.changes)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from snapmgr import volume_paths
from snapmgr.backends import rsync_filters
from snapmgr.errors import SnapmgrError
from snapmgr.manifest import Change, Entry, Manifest, compare, scan, settled_before
from snapmgr.manifest.hashing import Unreadable, hash_many

# The flag columns, as `snapper status` prints them: the first says what happened to the
# path, each other one names a property that differs, '.' where it does not.
COLUMNS = (("p", "mode"), ("u", "owner"), ("g", "group"), ("x", "xattrs"), ("m", "mtime"))
# Properties that make a path's first column 'c': its content, in the wide sense.
CONTENT = frozenset({"content", "size", "target", "rdev"})


@dataclass
class Side:
    """One state of the volume: its manifest, or a directory to walk."""

    name: str
    manifest: Manifest | None
    root: Path | None
    taken: float | None            # when the snapshot was taken (seconds since the epoch); None: live
    entries: list[Entry] | None = None
    # The live volume holds more than its snapshots can: what they leave out (rsync
    # filter rules) and, unless they cross mounts, what other filesystems mounted in it
    # hold, but for the volume's own (a ZFS volume's child datasets).
    left_out: tuple[str, ...] = ()
    crosses_mounts: bool = True
    own_mounts: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Diff:
    old: str
    new: str
    path: bytes
    method: str                   # "manifests", or "walk" when a side had to be walked
    hashed: int                   # files read to compare their content
    changes: tuple[Change, ...]
    from_manifests: tuple[str, ...] = ()   # the sides read from their manifests


def flags(change: Change) -> str:
    if change.status != "changed":
        return ("+" if change.status == "added" else "-") + "." * len(COLUMNS)
    first = "t" if "type" in change.what else "c" if change.what & CONTENT else "."
    return first + "".join(flag if what in change.what else "." for flag, what in COLUMNS)


def differences(old: Side, new: Side, path: bytes, algorithm: str, quick: bool, shares_inodes: bool = False,
                written_only: bool = False, new_moving: bool = False) -> Diff:
    """`shares_inodes`: both sides are snapshots on one filesystem whose unchanged files are
    one inode (rsync's hardlinks, whose ctime every new link moves): then the same inode
    number alone shows a file unchanged. `new_moving`: the new side is a live volume whose
    services run: a file of it gone or changed before it could be read is not compared
    by content, rather than the whole comparison failing."""
    for side in (old, new):
        side.entries = list(_entries(side, path))
    if not old.entries and not new.entries:
        raise SnapmgrError(f"{volume_paths.shown(path)} exists neither in {old.name} nor in {new.name}")
    walked = old.manifest is None or new.manifest is None
    settled = settled_before(min((s.taken for s in (old, new) if s.taken is not None), default=None))
    hashed = 0 if quick else _hash_where_needed(old, new, algorithm, shares_inodes, settled, written_only,
                                                new_moving)
    return Diff(old.name, new.name, path, "walk" if walked else "manifests", hashed,
                tuple(_without_directory_sizes(compare(old.entries, new.entries), new.entries)),
                tuple(s.name for s in (old, new) if s.manifest is not None))


def _without_directory_sizes(changes: Iterator[Change], new: list[Entry]) -> Iterator[Change]:
    """A directory's size is the filesystem's bookkeeping (it grows with its entries on
    btrfs, by blocks on ext4), not a change of its own."""
    directories = {e.path for e in new if e.kind == "d"}
    for c in changes:
        if c.status == "changed" and c.path in directories and "type" not in c.what:
            c = replace(c, what=c.what - {"size"})
            if not c.what:
                continue
        yield c


def _entries(side: Side, path: bytes) -> Iterator[Entry]:
    if side.manifest is not None:
        return (e for e in side.manifest.entries() if volume_paths.under(e.path, path))
    try:
        volume_paths.located(side.root, path, side.name)
    except SnapmgrError:
        if not os.path.lexists(volume_paths.joined(side.root, path)):
            return iter(())
        raise
    entries = scan(volume_paths.joined(side.root, path), None, strict=False)
    return _as_snapshotted(side, (e._replace(path=_below(path, e.path)) for e in entries))


def _as_snapshotted(side: Side, entries: Iterator[Entry]) -> Iterator[Entry]:
    """The entries a snapshot of the tree would hold: without what the volume leaves
    out, and with other filesystems' mountpoints empty (each is kept itself: a snapshot
    shows the directory below it)."""
    if not side.left_out and side.crosses_mounts:
        yield from entries
        return
    excluded = rsync_filters.matcher(side.left_out)
    devices = {os.lstat(place).st_dev for place in (side.root, *side.own_mounts)}
    skipping: bytes | None = None
    for e in entries:
        if skipping is not None and volume_paths.under(e.path, skipping) and e.path != skipping:
            continue
        skipping = None
        if e.path and excluded(e.path, e.kind == "d"):
            skipping = e.path
            continue
        if e.kind == "d" and not side.crosses_mounts and \
                os.lstat(volume_paths.joined(side.root, e.path)).st_dev not in devices:
            skipping = e.path
        yield e


def _below(prefix: bytes, path: bytes) -> bytes:
    return prefix + b"/" + path if prefix and path else prefix or path


def _pairs(old: Side, new: Side) -> Iterator[tuple[int, int]]:
    """(old index, new index) of each path that is a regular file of the same size on
    both sides: the only ones whose content a comparison must look at."""
    files = {e.path: i for i, e in enumerate(old.entries) if e.kind == "f"}
    for j, n in enumerate(new.entries):
        i = files.get(n.path)
        if i is not None and n.kind == "f" and old.entries[i].size == n.size:
            yield i, j


def _moved(root: Path, entry: Entry) -> bool:
    """Whether the entry is gone from under `root`, or its ctime moved, since it was walked."""
    try:
        return os.lstat(volume_paths.joined(root, entry.path)).st_ctime_ns != entry.ctime_ns
    except (FileNotFoundError, NotADirectoryError):
        return True


def _hash_where_needed(old: Side, new: Side, algorithm: str, shares_inodes: bool, settled: float,
                       written_only: bool, new_moving: bool) -> int:
    jobs: list[tuple[int, int]] = []    # (side, index) of each file to read
    for i, j in _pairs(old, new):
        o, n = old.entries[i], new.entries[j]
        if o.digest is not None and n.digest is not None or written_only and n.ctime_ns < settled:
            continue
        if o.ino == n.ino and (shares_inodes or (o.ctime_ns == n.ctime_ns and o.ctime_ns < settled)):
            digest = o.digest or n.digest   # one inode, unchanged: one content
            old.entries[i], new.entries[j] = o._replace(digest=digest), n._replace(digest=digest)
            continue
        # A side read from its manifest has no directory here: a file it could not
        # hash when the snapshot was taken stays unknown.
        if o.digest is None and old.root is not None:
            jobs.append((0, i))
        if n.digest is None and new.root is not None:
            jobs.append((1, j))
    sides = (old, new)
    digests = hash_many([(volume_paths.joined(sides[s].root, sides[s].entries[k].path), sides[s].entries[k].size)
                         for s, k in jobs], algorithm)
    for (s, k), digest in zip(jobs, digests):
        entries = sides[s].entries
        if isinstance(digest, Unreadable) and s == 1 and new_moving and _moved(new.root, entries[k]):
            continue
        if isinstance(digest, Unreadable):
            raise SnapmgrError(f"cannot compare {volume_paths.shown(entries[k].path)} in {sides[s].name}: "
                               f"{digest.reason}")
        entries[k] = entries[k]._replace(digest=digest)
    return len(jobs)
