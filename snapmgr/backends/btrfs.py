"""btrfs: read-only snapshots of a subvolume, side by side in a snapshot directory on the
same filesystem. A snapshot appears whole or not at all (one btrfs transaction).

Snapshots are made in this process through libbtrfsutil (Debian's python3-btrfsutil):
inside a quiesce window no program has to be started while the services wait."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from snapmgr import schema, sh
from snapmgr.backends import btrfs_rollback, mounts
from snapmgr.backends.base import Progress, RollbackWay, Space
from snapmgr.backends.directory import DirectoryBackend
from snapmgr.errors import SnapmgrError, as_error, quote
from snapmgr.model import Snapshot, SnapshotId

# The root directory of every btrfs subvolume has this inode number.
SUBVOLUME_ROOT_INODE = 256
# A level-0 qgroup (one per subvolume, named by its id): id, referenced, exclusive bytes.
_QGROUP_RE = re.compile(r"^0/(\d+)\s+(\d+)\s+(\d+)\b", re.M)


class BtrfsBackend(DirectoryBackend):
    name = "btrfs"
    options = {
        "subvolume": schema.Field(schema.existing_dir, required=True),
        "snapshot_dir": schema.Field(schema.path(), required=True),
    }

    @property
    def snapshot_dir(self) -> Path:
        configured = self.opts["snapshot_dir"]
        if os.path.lexists(configured):
            return configured
        # A rollback killed between carrying them into the new tree and the swap leaves
        # them there: listed from there, a resume finds its target.
        return btrfs_rollback.carried(self.opts["subvolume"], configured)

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

    def free_space(self) -> Space:
        """The filesystem's free space as the kernel estimates it for df (statfs): it
        counts the data profile (RAID1 halves it) and unallocated space, and drops to 0
        when metadata space runs out, which is what a copy-on-write snapshot needs."""
        return self._filesystem_space()

    def space(self, snapshots: list[Snapshot]) -> Space:
        """What each snapshot alone holds is its qgroup's exclusive bytes, when quotas are on."""
        space = self._filesystem_space()
        result = sh.run(["btrfs", "qgroup", "show", "--raw", self.snapshot_dir], check=False, timeout=120)
        if "quotas not enabled" in result.stderr:
            return replace(space, note="held: unknown, quotas are off (btrfs quota enable)")
        if result.returncode != 0:
            raise sh.CommandError(result.argv, result.returncode, result.stderr)
        exclusive = {int(m[1]): int(m[3]) for m in _QGROUP_RE.finditer(result.stdout)}
        btrfsutil = _btrfsutil()
        held_each = {s.id: exclusive[sid] for s in snapshots
                     if (sid := btrfsutil.subvolume_id(s.path)) in exclusive}
        # btrfs warns when its accounting is out of date (a rescan is due or running).
        stale = "inconsistent" in result.stderr or "rescan" in result.stderr
        return replace(space, held=sum(held_each.values()), held_each=held_each,
                       note="held: each snapshot's qgroup exclusive bytes"
                            + ("; btrfs says they are out of date (btrfs quota rescan)" if stale else ""))

    # Rollback: see snapmgr.backends.btrfs_rollback ----------------------------------

    def rollback_way(self, target: Snapshot, snapshots: list[Snapshot], choice: str | None,
                     resuming: bool = False) -> RollbackWay:
        btrfsutil = _btrfsutil()
        where = btrfs_rollback.layout(self.opts["subvolume"], btrfsutil)
        inner = btrfs_rollback.nested(where.live, btrfsutil)
        if where.mounted and inner:
            # Moved into the new tree before the swap, they would be gone from the mount
            # that keeps showing the old one until it is mounted again.
            raise SnapmgrError(f"{quote(where.live)} is mounted with subvol= and holds nested subvolumes "
                               f"({', '.join(quote(p) for p in inner[:5])}), which would be missing from it until "
                               f"it is mounted again: roll back with it unmounted (subvolume = its path through a "
                               f"mount of the filesystem's top level); nothing was changed")
        btrfs_rollback.check_carried(target.path, inner, [(self.snapshot_dir, "where the snapshots are")],
                                     where.live)
        carried = (f"; the nested subvolumes {', '.join(quote(p) for p in inner)} moved into it first"
                   if inner else "")
        return RollbackWay(f"a writable snapshot of {target.id} swapped in for {quote(where.live)} in one step "
                           f"(renameat2 RENAME_EXCHANGE){carried}; the replaced subvolume is deleted once the "
                           f"pre-rollback snapshot holds it" + (" and it is no longer mounted" if where.mounted else ""),
                           takes_effect=where.takes_effect)

    def roll_back(self, target: Snapshot, way: RollbackWay, keep: Sequence[tuple[Path, str]],
                  resuming: bool, current: Snapshot | None = None) -> str | None:
        """`way` is not needed: what to do is read again from the subvolumes and mounts
        (a resume may come after a remount). `resuming` takes the pre-rollback snapshot
        to be there, as the orchestration takes it before any roll_back(): it is how a
        swap already made is told from one not begun, once the temporary name is gone."""
        btrfsutil = _btrfsutil()
        live = self.opts["subvolume"]
        if resuming and mounts.mounted_at(Path(os.path.realpath(live))) \
                and btrfs_rollback.shows_replaced(live, btrfsutil):
            return self.rollback_pending(target.id)   # swapped: the mount shows the new one once mounted again
        where = btrfs_rollback.layout(live, btrfsutil)
        try:
            with where.parent(self.run_dir, self.volume) as parent:
                target_path = btrfs_rollback.undo_cut_short(parent, where.name, target.path, resuming, btrfsutil)
                # The snapshots' own subvolume moves last: until the swap, they are not listed.
                snapshots = Path(os.path.realpath(self.snapshot_dir))
                inner = sorted(btrfs_rollback.nested(where.live, btrfsutil),
                               key=lambda p: snapshots.is_relative_to(where.live / p))
                btrfs_rollback.check_carried(target_path, inner, keep, where.live)
                return btrfs_rollback.swap_in(parent, where.name, target_path, inner, self._snapshotted,
                                              resuming, where.takes_effect if where.mounted else None, btrfsutil)
        except OSError as e:   # BtrfsUtilError too: the orchestration words what a SnapmgrError cut short
            raise as_error(e) from None

    def _snapshotted(self) -> dict[bytes, btrfs_rollback.Newest]:
        """The uuid of each subvolume the snapshots were taken of, with its newest one."""
        btrfsutil = _btrfsutil()
        newest: dict[bytes, btrfs_rollback.Newest] = {}
        for _, path in self._snapshot_dirs():
            info = btrfsutil.subvolume_info(path)
            if info.parent_uuid not in newest or newest[info.parent_uuid].otransid < info.otransid:
                newest[info.parent_uuid] = btrfs_rollback.Newest(path, info.otransid)
        return newest

    def rollback_pending(self, target: SnapshotId) -> str | None:
        live = self.opts["subvolume"]
        if btrfs_rollback.shows_replaced(live, _btrfsutil()):
            return f"at the next mount of {quote(live)}, which still shows the subvolume it replaced"
        return None


def _btrfsutil():
    """libbtrfsutil, imported when first needed so that the other backends work without it."""
    try:
        import btrfsutil
    except ImportError:
        raise SnapmgrError("the btrfs backend needs the libbtrfsutil Python bindings: "
                           "apt install python3-btrfsutil") from None
    return btrfsutil
