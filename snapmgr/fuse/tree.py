"""The virtual top levels: MOUNTPOINT/VOLUME/LABEL (a snapshot's root, whose contents
passthrough serves), VOLUME/latest, VOLUME/.by-tag/TAG/LABEL.

Each volume's snapshots are listed through its backend at most once every REFRESH
seconds, and the kernel keeps these entries TOP_TIMEOUT only: new snapshots appear and
pruned ones vanish without remounting. Each snapshot gets a slot, its number for the life
of the mount (snapmgr.fuse.inodes); only the snapshots listed now are kept with it."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import trio

from snapmgr.backends.base import Backend
from snapmgr.errors import SnapmgrError, as_error
from snapmgr.fuse.inodes import Inodes
from snapmgr.model import Snapshot

log = logging.getLogger(__name__)
REFRESH = 1.0
TOP_TIMEOUT = 1.0
LATEST = b"latest"
BY_TAG = b".by-tag"


@dataclass(frozen=True)
class Listed:
    """A snapshot as the mount serves it."""

    slot: int
    snapshot: Snapshot
    backend: Backend

    @property
    def label(self) -> bytes:
        return os.fsencode(self.snapshot.id.label)


@dataclass
class _Volume:
    backend: Backend
    listed_at: float | None = None
    labels: dict[bytes, Listed] | None = None   # oldest first


class Tree:
    def __init__(self, backends: dict[str, Backend], inodes: Inodes, clock: Callable[[], float] = time.monotonic):
        self.inodes = inodes
        self._clock = clock
        self._volumes = {name: _Volume(backend) for name, backend in backends.items()}
        self._current: dict[int, Listed] = {}

    # What the filesystem asks --------------------------------------------------------

    def snapshot(self, slot: int) -> Listed | None:
        """The snapshot in `slot`, while it exists."""
        return self._current.get(slot)

    def is_link(self, ino: int) -> bool:
        return (self.inodes.key_of(ino) or ("",))[0] in ("latest", "tag-link")

    async def children(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) of each entry of a virtual directory."""
        key = self.inodes.key_of(ino)
        if key is None:
            return []
        kind, *args = key
        virtual = self.inodes.virtual
        if kind == "root":
            return [(os.fsencode(v), virtual(("volume", v))) for v in self._volumes]
        labels = await self._labels(args[0])
        if kind == "volume":
            volume = args[0]
            entries = [(name, self.inodes.snapshot_root(s.slot)) for name, s in labels.items()]
            if labels:
                entries.append((LATEST, virtual(("latest", volume))))
            return entries + [(BY_TAG, virtual(("by-tag", volume)))]
        if kind == "by-tag":
            tags = sorted({t for s in labels.values() for t in s.snapshot.tags})
            return [(os.fsencode(t), virtual(("tag", args[0], t))) for t in tags]
        if kind == "tag":
            volume, tag = args
            return [(name, virtual(("tag-link", volume, tag, name))) for name, s in labels.items()
                    if tag in s.snapshot.tags]
        return []

    async def lookup(self, parent: int, name: bytes) -> int | None:
        return dict(await self.children(parent)).get(name)

    async def readlink(self, ino: int) -> bytes | None:
        """A symlink's target; None once it points nowhere (the snapshot was pruned)."""
        kind, volume, *rest = self.inodes.key_of(ino)
        labels = await self._labels(volume)
        if kind == "latest":
            return next(reversed(labels), None)
        tag, name = rest
        return b"../../" + name if name in labels else None

    # Listing --------------------------------------------------------------------------

    async def _labels(self, volume: str) -> dict[bytes, Listed]:
        """The volume's current snapshots by label, oldest first; listed again once the
        last listing is REFRESH seconds old. A failing listing keeps the previous one."""
        v = self._volumes[volume]
        now = self._clock()
        if v.labels is None or now - v.listed_at >= REFRESH:
            try:
                snapshots = await trio.to_thread.run_sync(v.backend.list)
            except (SnapmgrError, OSError) as e:
                log.warning("volume %s: cannot list snapshots: %s", volume, as_error(e))
                snapshots = None if v.labels is None else [s.snapshot for s in v.labels.values()]
            self._relist(v, snapshots or [])
            v.listed_at = now
        return v.labels

    def _relist(self, v: _Volume, snapshots: list[Snapshot]) -> None:
        for gone in (v.labels or {}).values():
            self._current.pop(gone.slot, None)
        v.labels = {}
        for snapshot in sorted(snapshots, key=lambda s: s.id):
            if snapshot.invalid:
                continue  # an overflowed LVM snapshot has no data to show
            slot = self.inodes.slot(snapshot.id)
            listed = self._current[slot] = Listed(slot, snapshot, v.backend)
            v.labels[listed.label] = listed
