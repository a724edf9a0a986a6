"""The distinct versions of one path across a volume's snapshots.

Two snapshots hold the same version when the content is the same: the same hash for a
regular file, the same target for a symlink. A snapshot's manifest gives the hash without
reading anything; without a manifest the file is read, once per inode (an rsync
snapshot's unchanged file is a hardlink to the previous one, and btrfs, ZFS and LVM keep
inode numbers and ctimes), so a thousand snapshots of an unchanged file cost one read.
Where snapshots do not share inodes, an unchanged ctime proves nothing within the
racy-clean margin of the older state's time (manifest.settled_before), as for manifests
and diff: a file written in that clock tick is read again."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from snapmgr import volume_paths
from snapmgr.errors import SnapmgrError
from snapmgr.manifest import Entry, hash_file, settled_before


@dataclass(frozen=True)
class State:
    """What one snapshot (or the live volume) holds at the path."""

    kind: str            # as in a manifest: f, d, l, ...
    size: int
    mtime_ns: int
    content: str | bytes | None   # a file's hash, a symlink's target

    @property
    def key(self) -> tuple:
        return (self.kind, self.content) if self.content is not None else (self.kind, self.size, self.mtime_ns)

    @classmethod
    def of(cls, entry: Entry) -> State:
        return cls(entry.kind, entry.size, entry.mtime_ns, entry.digest if entry.kind == "f" else entry.target)


@dataclass(frozen=True)
class Version:
    state: State
    snapshots: tuple[str, ...]    # newest first
    current: bool                 # the live volume holds it now


@dataclass(frozen=True)
class History:
    volume: str
    path: bytes
    live: State | None            # None: not in the live volume (deleted)
    versions: tuple[Version, ...]  # newest first


class Reader:
    """States read from directories, each newer than the next (the live volume first),
    hashing each inode once."""

    def __init__(self, algorithm: str, shares_inodes: bool):
        self.algorithm = algorithm
        self.shares_inodes = shares_inodes
        self._hashes: dict[tuple[int, int, int, int], str] = {}

    def state(self, root: Path, path: bytes, where: str, taken: float | None = None) -> State | None:
        """taken: when the state at `root` was taken (seconds since the epoch); None: live."""
        try:
            st = volume_paths.located(root, path, where)
        except SnapmgrError:
            return None   # not there, or not reachable without a symlink
        absolute = volume_paths.joined(root, path)
        if stat.S_ISREG(st.st_mode):
            return State("f", st.st_size, st.st_mtime_ns, self._hash(absolute, st, taken))
        if stat.S_ISLNK(st.st_mode):
            return State("l", st.st_size, st.st_mtime_ns, os.readlink(absolute))
        return State("d" if stat.S_ISDIR(st.st_mode) else "?", st.st_size, st.st_mtime_ns, None)

    def _hash(self, absolute: bytes, st: os.stat_result, taken: float | None) -> str:
        inode = (st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)
        # Every hash known is of a newer state: this one is the older of the two.
        if inode not in self._hashes or not (self.shares_inodes or st.st_ctime_ns < settled_before(taken)):
            self._hashes[inode] = hash_file(absolute, self.algorithm)
        return self._hashes[inode]


def distinct(found: Iterable[tuple[str, State]], live: State | None) -> tuple[Version, ...]:
    """Group (snapshot id, state), given newest first, into versions, newest first."""
    groups: dict[tuple, list[tuple[str, State]]] = {}
    for sid, state in found:
        groups.setdefault(state.key, []).append((sid, state))
    return tuple(Version(members[0][1], tuple(sid for sid, _ in members), live is not None and live.key == key)
                 for key, members in groups.items())
