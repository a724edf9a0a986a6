"""Snapshot backends, by the name a `[volumes.NAME]` table gives as `backend`."""

from snapmgr.backends.base import Backend
from snapmgr.backends.btrfs import BtrfsBackend
from snapmgr.backends.rsync import RsyncBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (RsyncBackend, BtrfsBackend)}
