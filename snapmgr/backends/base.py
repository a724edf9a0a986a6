"""The backend protocol: what the engine may ask of any snapshot technology.

A backend instance serves one volume. It knows nothing of other backends, the engine,
the journal or the CLI; the snapshot storage itself is the source of truth for what
exists."""

from __future__ import annotations

import abc
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Sequence

from snapmgr.backends import mounts, shared_mounts
from snapmgr.model import ForeignSnapshot, MinFree, Snapshot, SnapshotId, human_size
from snapmgr.errors import SnapmgrError
from snapmgr.schema import Field

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Space:
    """The storage a volume's snapshots draw from, as its backend sees it: what a space
    guard (min_free) compares with, what status and the metrics show."""

    where: str                   # what it is, for people: "thin pool vg0/pool", "pool tank", "/srv (btrfs)"
    size: int                    # bytes in all
    free: int                    # bytes a new snapshot can still consume
    held: int | None = None      # bytes the volume's snapshots hold, where the backend can tell
    # Per snapshot, where the backend can tell: the bytes it alone holds (ZFS `written`,
    # rsync's newly copied bytes, an LVM snapshot's used share).
    held_each: Mapping[SnapshotId, int] = field(default_factory=dict)
    # Bytes a new snapshot takes from `free` the moment it is made (a thick LVM snapshot's
    # whole snapshot_size); 0 where a snapshot grows only as data changes.
    needs: int = 0
    note: str | None = None      # why `held` is unknown or only approximate, for people

    def shortfall(self, min_free: MinFree) -> str | None:
        """How the floor is not met, with the figures, or None when it is: what stays
        free once a new snapshot has taken what it needs at once is below min_free."""
        floor = min_free.bytes_of(self.size)
        if self.free - self.needs >= floor:
            return None
        taken = f" and the snapshot would take {human_size(self.needs)} of it at once" if self.needs else ""
        return (f"{self.where} has {human_size(self.free)} free{taken}, below min_free {min_free.text} "
                f"({human_size(floor)}{' of ' + human_size(self.size) if min_free.percent is not None else ''})")


class Backend(abc.ABC):
    name: ClassVar[str]
    # The backend's own keys of a `[volumes.NAME]` table, checked by the config loader.
    options: ClassVar[Mapping[str, Field]]
    # Whether a snapshot captures the whole volume at one instant, as a crash would.
    atomic: ClassVar[bool] = True
    # Whether the snapshots live on one filesystem and an unchanged file is the very same
    # inode in each (rsync's hardlinks): then an inode number alone says a file is
    # unchanged, though its ctime moved. Otherwise (copy-on-write snapshots) a file is
    # unchanged when its inode number and its ctime are. See snapmgr.manifest.walk.
    shares_inodes: ClassVar[bool] = False
    # Whether browse_root() mounts something (slow, and holding resources until left):
    # then the FUSE mount enters a snapshot only when someone walks into it.
    browse_mounts: ClassVar[bool] = False

    @classmethod
    def check_options(cls, options: Mapping) -> None:
        """Check what no single field can: how the volume's keys fit together. Raise
        schema.InvalidKey naming the key to change."""

    def __init__(self, volume: str, options: Mapping, run_dir: Path, min_free: MinFree | None = None):
        self.volume = volume
        self.opts = options
        self.run_dir = run_dir   # where browse_root may mount things
        # The volume's free-space floor: the engine checks it before a snapshot; a backend
        # whose copy can fill its storage while it runs (rsync) watches it meanwhile.
        self.min_free = min_free

    @abc.abstractmethod
    def create(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None = None) -> Snapshot:
        """Take the snapshot. It must not be listed until it is complete."""

    def stage(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None,
              prepass: bool) -> Callable[[], Snapshot]:
        """Do what can be done before the services are paused; return the step that
        takes the snapshot, which runs inside the quiesce window. `prepass`: services
        will be paused, so copying most of the data beforehand shortens the pause."""
        return lambda: self.create(snapshot_id, tags, progress)

    @classmethod
    def join(cls, takes: list[Callable[[], Snapshot]]) -> None:
        """Given the steps stage() returned for one window, all from backends of this
        class, make those that can be taken as one (ZFS: in one transaction group) be
        taken together. By default each is taken on its own."""

    def written_paths(self) -> tuple[Path, ...]:
        """Where create() writes: never to be frozen while it runs."""
        return ()

    def records_dir(self, state_dir: Path) -> Path:
        """Where the snapshots' records live (snapmgr.records)."""
        return state_dir / "records" / self.volume

    @abc.abstractmethod
    def list(self) -> list[Snapshot]:
        """Complete snapshots of this volume, in any order."""

    def foreign(self) -> list[ForeignSnapshot]:
        """Snapshots of the volume's storage that snapmgr did not make, for display only."""
        return []

    @abc.abstractmethod
    def delete(self, snapshot: Snapshot) -> None:
        """Remove the snapshot; once this starts, it is no longer listed."""

    @abc.abstractmethod
    def browse_root(self, snapshot: Snapshot) -> AbstractContextManager[Path]:
        """A read-only directory showing the snapshot's files, for as long as the context lasts."""

    def release_abandoned(self) -> list[SnapshotId]:
        """Release what browse_root() left mounted when its process was killed, as far as
        no live process uses it: the snapshots released."""
        released = []
        for target in shared_mounts.in_place(self._browse_dirs, f"{self.volume}@"):
            sid = SnapshotId.try_parse(target.name)
            if sid is not None and self._release_browsed(sid):
                released.append(sid)
        return released

    @abc.abstractmethod
    def live_root(self) -> Path | None:
        """Where the volume's files are as it is now (what its snapshots are taken of), or
        None when they are nowhere to be seen (an unmounted LV or dataset)."""

    def left_out(self) -> tuple[str, ...]:
        """rsync filter rules (relative to live_root) of what the volume's snapshots leave
        out on purpose: restoring or comparing must not touch or count those."""
        return ()

    def crosses_mounts(self) -> bool:
        """Whether a snapshot holds what other filesystems mounted below live_root hold;
        a copy-on-write snapshot shows their mountpoints empty."""
        return False

    def own_mounts(self) -> tuple[Path, ...]:
        """Where the volume's other filesystems are mounted below live_root (a ZFS
        volume's datasets below the first one): its snapshots hold them as they hold
        live_root, so comparing and restoring go into them, as into no other mount."""
        return ()

    def browse_problem(self) -> str | None:
        """Why, with things mounted as they are now, a snapshot taken now could not be
        browsed whole (see browse_root), or None."""
        return None

    def free_space(self) -> Space | None:
        """Where the snapshots draw space from and how much is free there, without what
        they hold: what a space guard needs, read without listing the snapshots. None
        when the backend cannot tell. Raises SnapmgrError or OSError when it cannot be read."""
        return None

    def space(self, snapshots: list[Snapshot]) -> Space | None:
        """free_space() with what the snapshots hold, where the backend can tell, worked
        out from `snapshots`: the volume's listing, just made (never listed again)."""
        return self.free_space()

    # Rollback -----------------------------------------------------------------------------

    # What a rollback may be told to do with the snapshots newer than its target, where
    # the backend's own way would otherwise lose them (ZFS: "destroy-newer", "keep-newer").
    rollback_choices: ClassVar[tuple[str, ...]] = ()

    def mountpoints(self) -> tuple[Path, ...]:
        """Where the volume is mounted, and where a rollback cut short took it off: a
        rollback's window starts the services again only once each is mounted."""
        return tuple(p for p in (self.live_root(), *self.own_mounts())
                     if p is not None and mounts.mounted_at(Path(os.path.realpath(p))))

    def rollback_way(self, target: Snapshot, snapshots: list[Snapshot], choice: str | None,
                     resuming: bool = False) -> RollbackWay:
        """How roll_back() would put the volume back as `target` holds it, `snapshots`
        being all of the volume's; SnapmgrError saying why it will not (and what to ask
        instead) when it cannot be done safely as asked. `resuming`: for a roll_back()
        cut short, whose storage may be part way (the volume's own part renamed, a merge
        begun), which this one is to accept."""
        raise SnapmgrError(f"rolling back a {self.name} volume is not built yet; snapmgr restore {target.id} / "
                           f"--in-place --delete copies the snapshot back file by file")

    def roll_back(self, target: Snapshot, way: RollbackWay, keep: Sequence[tuple[Path, str]],
                  resuming: bool, current: Snapshot | None = None) -> str | None:
        """Put the volume back as `target` holds it, the way rollback_way() told, once the
        services are stopped and the pre-rollback snapshot is taken. `keep`: places under
        live_root() never touched, each with what it is (other volumes' storage). `resuming`: an earlier call
        was cut short (killed, or failed part way), and this one finishes what it began.
        `current`: that pre-rollback snapshot when it was taken just now, in this window:
        the volume exactly as it is, which a copy need not compare again.
        Returns what is still to happen and when (a merge deferred to the next
        activation), None once the volume is the snapshot."""
        raise SnapmgrError(f"rolling back a {self.name} volume is not built yet")

    def consumed(self, target: SnapshotId) -> Snapshot | None:
        """The target of a roll_back() cut short that consumed it (a merge): what
        roll_back(resuming=True) is to be given for it, no longer listed; None when the
        backend's rollbacks consume no snapshot or this one was not."""
        return None

    def rollback_pending(self, target: SnapshotId) -> str | None:
        """For a roll_back() that left something to happen later: what still is, or None
        once it has happened."""
        return None

    @abc.abstractmethod
    def plan_create(self, snapshot_id: SnapshotId) -> str:
        """One line saying what create() would do, for --dry-run."""

    # For a browse_root() that mounts ----------------------------------------------------

    @property
    def _browse_dirs(self) -> Path:
        return self.run_dir / "mounts"

    def _browse_dir(self, snapshot_id: SnapshotId) -> Path:
        return self._browse_dirs / str(snapshot_id)

    def _browsed(self, snapshot_id: SnapshotId, build: Callable[[], None]) -> AbstractContextManager[Path]:
        """The snapshot's browse directory, with what build() mounts there, shared with
        every snapmgr process that browses the snapshot meanwhile (shared_mounts)."""
        return shared_mounts.used(self._browse_dir(snapshot_id), build, self._take_down(snapshot_id))

    def _release_browsed(self, snapshot_id: SnapshotId) -> bool:
        """Take down the snapshot's browse directory if no process uses it (a killed one
        left it): before a deletion, which what is mounted would keep busy."""
        return shared_mounts.release_unused(self._browse_dir(snapshot_id), self._take_down(snapshot_id))

    def _take_down(self, snapshot_id: SnapshotId) -> shared_mounts.TakeDown | None:
        """What undoes a build of the snapshot's browse directory; None: unmounting
        everything in it."""
        return None


@dataclass(frozen=True)
class RollbackWay:
    """How a backend would put its volume back as a snapshot holds it: what the plan tells
    before anything changes, and what roll_back() is given to do it."""

    method: str                    # what is done, for people
    choice: str | None = None      # one of the backend's rollback_choices, as asked
    takes_effect: str = "now"      # or when it does: "at the next activation of vg0/data"
    # What becomes of the snapshots that are not simply kept: "consumed by the merge".
    fates: Mapping[SnapshotId, str] = field(default_factory=dict)


def taken_with_another(step: Callable[[], Snapshot]) -> Snapshot | None:
    """The snapshot a staged step's backend already took as part of another step's batch
    (see Backend.join), if it did: a step that never ran may still have its snapshot."""
    outcome = getattr(step, "outcome", None)
    return outcome if isinstance(outcome, Snapshot) else None
