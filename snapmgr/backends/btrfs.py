"""btrfs: read-only snapshots of a subvolume, side by side in a snapshot directory on the
same filesystem. A snapshot appears whole or not at all (one btrfs transaction).

Snapshots are made in this process through libbtrfsutil (Debian's python3-btrfsutil):
inside a quiesce window no program has to be started while the services wait."""

from __future__ import annotations

import errno
import os
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

    def live_root(self) -> Path | None:
        return self.opts["subvolume"]

    def plan_create(self, snapshot_id: SnapshotId) -> str:
        return f"read-only snapshot of {self.opts['subvolume']} as {self.snapshot_dir / str(snapshot_id)}"

    def _build(self, snapshot_id: SnapshotId, progress: Progress | None) -> dict:
        subvolume = self.opts["subvolume"]
        if os.stat(subvolume).st_ino != SUBVOLUME_ROOT_INODE:
            raise SnapmgrError(f"{subvolume} is not a btrfs subvolume")
        return {"source": str(subvolume)}

    def _publish(self, snapshot_id: SnapshotId) -> None:
        btrfsutil = _btrfsutil()
        try:
            btrfsutil.create_snapshot(self.opts["subvolume"], self.snapshot_dir / str(snapshot_id), read_only=True)
        except btrfsutil.BtrfsUtilError as e:
            hint = " (it must be on the subvolume's btrfs filesystem)" if e.errno in (errno.EXDEV, errno.ENOTTY) else ""
            raise SnapmgrError(f"cannot snapshot {self.opts['subvolume']} into {self.snapshot_dir}{hint}: "
                               f"{os.strerror(e.errno)}") from None

    def _discard(self, path: Path) -> None:
        sh.run(["btrfs", "subvolume", "delete", path], timeout=300)

    def _clean_leftovers(self) -> None:
        """Nothing to do: creating and deleting a subvolume are each one transaction."""


def _btrfsutil():
    """libbtrfsutil, imported when first needed so that the other backends work without it."""
    try:
        import btrfsutil
    except ImportError:
        raise SnapmgrError("the btrfs backend needs the libbtrfsutil Python bindings: "
                           "apt install python3-btrfsutil") from None
    return btrfsutil
