"""Snapshot backends, by the name a `[volumes.NAME]` table gives as `backend`."""

from snapmgr.backends.base import Backend
from snapmgr.backends.btrfs import BtrfsBackend
from snapmgr.backends.lvm import LvmBackend
from snapmgr.backends.rsync import RsyncBackend
from snapmgr.backends.zfs import ZfsBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (RsyncBackend, BtrfsBackend, LvmBackend, ZfsBackend)}
