"""btrfs: read-only snapshots of a subvolume, side by side in a snapshot directory on the
same filesystem. A snapshot appears whole or not at all (one btrfs transaction)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from snapmgr import schema, sh
from snapmgr.backends.base import Progress
from snapmgr.backends.directory import DirectoryBackend
from snapmgr.errors import SnapmgrError
from snapmgr.model import SnapshotId

# The root directory of every btrfs subvolume has this inode number.
SUBVOLUME_ROOT_INODE = 256


class BtrfsBackend(DirectoryBackend):
    name = "btrfs"
    options = {
        "subvolume": schema.Field(schema.existing_dir, required=True),
        "snapshot_dir": schema.Field(schema.path(), required=True),
    }

    @property
    def snapshot_dir(self) -> Path:
        return self.opts["snapshot_dir"]

    def _is_snapshot(self, path: Path) -> bool:
        return os.stat(path).st_ino == SUBVOLUME_ROOT_INODE

    def plan_create(self, snapshot_id: SnapshotId) -> str:
        return shlex.join(self._snapshot_argv(snapshot_id))

    def _build(self, snapshot_id: SnapshotId, progress: Progress | None) -> dict:
        subvolume = self.opts["subvolume"]
        if os.stat(subvolume).st_ino != SUBVOLUME_ROOT_INODE:
            raise SnapmgrError(f"{subvolume} is not a btrfs subvolume")
        return {"source": str(subvolume)}

    def _publish(self, snapshot_id: SnapshotId) -> None:
        sh.run(self._snapshot_argv(snapshot_id), timeout=300)

    def _discard(self, path: Path) -> None:
        sh.run(["btrfs", "subvolume", "delete", path], timeout=300)

    def _clean_leftovers(self) -> None:
        """Nothing to do: creating and deleting a subvolume are each one transaction."""

    def _snapshot_argv(self, snapshot_id: SnapshotId) -> list:
        return ["btrfs", "subvolume", "snapshot", "-r", self.opts["subvolume"], self.snapshot_dir / str(snapshot_id)]
