"""A btrfs rollback: a writable snapshot of the target made beside the live subvolume,
the live subvolume's nested subvolumes moved into it, and the two swapped in one step
(renameat2 RENAME_EXCHANGE). The swap is the commit point: killed before it, the live
subvolume is as it was; after it, it is the snapshot. The replaced subvolume is deleted
once a snapshot of it (the pre-rollback one) is found. A rollback to another snapshot
first undoes one cut short before its swap (the nested subvolumes it carried go back).

When the live subvolume is itself a mount point (mounted with subvol=), its parent is
not visible through it: the filesystem's top level is mounted in the run directory and
the swap is made there. The mount keeps showing the replaced subvolume until it is
mounted again, which is when the rollback takes effect; the replaced subvolume stays
until then, and for good if anything was written to it meanwhile.

What a killed rollback left is read from the subvolumes themselves: the temporary name
holds either the new tree (not swapped yet: it is newer than the live one) or the
replaced one (swapped: it is older), since subvolume ids only grow."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from snapmgr import sh
from snapmgr.backends import mounts, shared_mounts
from snapmgr.backends.directory import exchange, fsync_dir
from snapmgr.errors import RollbackRefused, SnapmgrError, quote

FSTAB = Path("/etc/fstab")
TOP_LEVEL = 5   # BTRFS_FS_TREE_OBJECTID: the subvolume every btrfs filesystem starts with
TEMPORARY = ".rollback"
MOUNT_TIMEOUT = 60


@dataclass(frozen=True)
class Newest:
    """A subvolume's newest snapshot: where it is, and the transaction that made it."""

    path: Path
    otransid: int


@dataclass(frozen=True)
class Layout:
    """Where the live subvolume's parent directory can be reached, for the swap."""

    live: Path                  # the subvolume as configured
    mounted: mounts.Mount | None   # its own mount, when it is a mount point (subvol=)
    inside: PurePosixPath       # its path from the filesystem's top level, when mounted

    @property
    def name(self) -> str:
        return self.inside.name if self.mounted else self.live.name

    @property
    def takes_effect(self) -> str:
        if not self.mounted:
            return "now"
        return (f"at the next mount of {quote(self.live)} (mounted with subvol=/{self.inside}, which then finds "
                f"the rolled-back subvolume; until then it shows the volume as it was)")

    @contextmanager
    def parent(self, run_dir: Path, volume: str) -> Iterator[Path]:
        """The live subvolume's parent directory, through a mount that shows both it and
        the temporary name (the top level mounted in the run directory, if need be)."""
        if not self.mounted:
            yield self.live.parent
            return
        where = run_dir / "rollback" / volume
        build = lambda: sh.run(["mount", "-t", "btrfs", "-o", f"subvolid={TOP_LEVEL}", self.mounted.source, where],
                               timeout=MOUNT_TIMEOUT)
        with shared_mounts.used(where, build) as top:
            yield top / self.inside.parent


def layout(live: Path, btrfsutil) -> Layout:
    """How the live subvolume is reached; RollbackRefused, changing nothing, where a swap
    could not take effect (a mount by subvolid= or of the default subvolume) or would
    leave something behind (a filesystem mounted inside it)."""
    live = Path(os.path.realpath(live))
    if btrfsutil.subvolume_id(live) == TOP_LEVEL:
        raise RollbackRefused(f"{quote(live)} is the top level of its btrfs filesystem, which cannot be swapped for "
                              f"another subvolume: roll back a subvolume below it, or use snapmgr restore --in-place")
    inside = [m for m in mounts.below(live) if m.mountpoint != live]
    if inside:
        raise RollbackRefused(f"{quote(inside[0].mountpoint)} is mounted inside {quote(live)} and would stay on the "
                              f"replaced subvolume: unmount it first")
    mounted = mounts.mounted_at(live)
    if mounted is None:
        return Layout(live, None, PurePosixPath())
    inside_path = PurePosixPath(btrfsutil.subvolume_path(live))
    if _is_temporary(inside_path.name):
        raise RollbackRefused(f"an earlier rollback of {quote(live)} takes effect at its next mount, which has not "
                              f"happened yet: mount it again first")
    _check_mounted_by_name(live, inside_path, btrfsutil)
    return Layout(live, mounted, inside_path)


def _check_mounted_by_name(live: Path, inside: PurePosixPath, btrfsutil) -> None:
    """A mount that finds the subvolume by its name finds the swapped-in one next time;
    one by id, or of the default subvolume, finds the replaced one forever. Without a
    line in /etc/fstab, the mount was made by hand, and its next one is taken to name
    the subvolume, unless it is the default, which a mount without subvol= finds."""
    options = fstab_options(live)
    if options is not None and "subvolid" in options:
        raise RollbackRefused(f"{quote(live)} is mounted by subvolid= ({FSTAB}), which would keep mounting the "
                              f"replaced subvolume after a rollback: use subvol=/{inside} instead of subvolid= there "
                              f"first; nothing was changed")
    if options is not None and "subvol" not in options:
        why = f"no subvol= in its {FSTAB} line"
    elif options is None and btrfsutil.get_default_subvolume(live) == btrfsutil.subvolume_id(live):
        why = f"it is the default one, and {FSTAB} has no line for it"
    else:
        return
    raise RollbackRefused(f"{quote(live)} is mounted as its filesystem's default subvolume ({why}), which a rollback "
                          f"does not change: mount it with subvol=/{inside} (in {FSTAB}) first; nothing was changed")


def fstab_options(mountpoint: Path) -> dict[str, str] | None:
    """The mount options /etc/fstab gives `mountpoint`, or None when it has no line for it."""
    try:
        lines = FSTAB.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and not fields[0].startswith("#") \
                and Path(mounts.unescaped(fields[1].encode()).decode(errors="replace")) == mountpoint:
            return dict((o.split("=", 1) + [""])[:2] for o in fields[3].split(","))
    return None


def nested(live: Path, btrfsutil) -> list[PurePosixPath]:
    """The subvolumes directly inside the live one (what is deeper moves with them), as
    paths below it: a snapshot holds an empty directory in their place."""
    live_id = btrfsutil.subvolume_id(live)
    return sorted(PurePosixPath(os.fsdecode(path)) for path, info in btrfsutil.SubvolumeIterator(live, info=True)
                  if info.parent_id == live_id)


def check_carried(target: Path, inner: Iterable[PurePosixPath], places: Iterable[tuple[Path, str]],
                  live: Path) -> None:
    """Refuse, changing nothing, what a swap would lose: a place that must stay as it is
    (the snapshots, snapmgr's own state: each with what it is) inside the live subvolume
    but not in a nested one, and a nested subvolume whose place the snapshot fills with
    something else."""
    real = Path(os.path.realpath(live))
    carried = [real / p for p in inner]
    for place, what in places:
        place = Path(os.path.realpath(place))
        if os.path.lexists(place) and place.is_relative_to(real) and not any(place.is_relative_to(c) for c in carried):
            raise RollbackRefused(f"{quote(place)}, {what}, is inside {quote(live)} but not in a subvolume of its own, "
                                  f"so a rollback would put it back as the snapshot holds it: make it a subvolume "
                                  f"(btrfs subvolume create) or keep it outside; nothing was changed")
    for path in inner:
        there = target / path
        if os.path.lexists(there) and not (there.is_dir() and not there.is_symlink() and not any(there.iterdir())):
            raise RollbackRefused(f"{quote(there)} is not the empty directory a snapshot holds in place of the nested "
                                  f"subvolume {quote(live / path)}, which a rollback carries over: move one of them "
                                  f"away first; nothing was changed")


def undo_cut_short(parent: Path, name: str, target: Path, resuming: bool, btrfsutil) -> Path:
    """Undo what a rollback to another snapshot, cut short before its swap, left: the
    new tree it made, with the nested subvolumes it carried into it, which go back into
    the live subvolume before the new tree is deleted. Such a rollback changed nothing
    the live subvolume holds but those, so any rollback may start from it (the undo
    too, to the pre-rollback snapshot). Returns where `target` is afterwards."""
    live, temporary = parent / name, parent / f".{name}{TEMPORARY}"
    if resuming or not os.path.lexists(temporary) or not _newer(temporary, live, btrfsutil):
        return target
    if not os.path.lexists(target) and target.is_relative_to(live):
        target = temporary / target.relative_to(live)
    if btrfsutil.subvolume_info(temporary).parent_uuid == btrfsutil.subvolume_info(target).uuid:
        return target   # the same rollback again: for a resume, which swap_in tells of
    back = nested(temporary, btrfsutil)
    for path in back:
        if os.path.lexists(live / path):
            raise RollbackRefused(f"{quote(temporary)}, left by a rollback cut short before the swap, holds the nested "
                                  f"subvolume {quote(temporary / path)}, but {quote(live / path)} is there too: move "
                                  f"one of them away first; nothing was changed")
    for path in back:
        os.rename(temporary / path, live / path)
    fsync_dir(parent)
    btrfsutil.delete_subvolume(temporary)
    return live / target.relative_to(temporary) if target.is_relative_to(temporary) else target


def swap_in(parent: Path, name: str, target: Path, inner: list[PurePosixPath],
            snapshots_of: Callable[[], dict[bytes, Newest]], resuming: bool, pending: str | None,
            btrfsutil) -> str | None:
    """Put `target` in place of `parent/name`, or finish doing so (see the module's
    docstring). `snapshots_of()`: the uuids of the subvolumes the volume's snapshots were
    taken of, each with its newest snapshot. Returns `pending` when the mount
    still shows the replaced subvolume."""
    live, temporary = parent / name, parent / f".{name}{TEMPORARY}"
    if not os.path.lexists(target) and target.is_relative_to(live):
        target = temporary / target.relative_to(live)   # the snapshots' subvolume, carried before a kill
    target_uuid = btrfsutil.subvolume_info(target).uuid
    if os.path.lexists(temporary):
        if _newer(temporary, live, btrfsutil):
            if not resuming:
                raise RollbackRefused(f"{quote(temporary)} was left by a rollback cut short before the swap: "
                                      f"resume it (snapmgr rollback --resume) or undo it (a rollback to its "
                                      f"pre-rollback snapshot); nothing was changed")
            if btrfsutil.subvolume_info(temporary).parent_uuid != target_uuid:
                raise RollbackRefused(f"{quote(temporary)}, left by a rollback cut short, is not a snapshot of "
                                      f"{quote(target)}: resume the rollback to the snapshot it was made of")
        else:
            left = _finish(temporary, snapshots_of(), pending, btrfsutil)
            if resuming:
                return left
            if left:
                raise RollbackRefused(f"an earlier rollback of {quote(live)} has not taken effect yet (it does "
                                      f"{left}): roll back once it has")
            btrfsutil.create_snapshot(target, temporary)
    elif resuming and _swapped(live, target_uuid, snapshots_of(), btrfsutil):
        return None
    else:
        btrfsutil.create_snapshot(target, temporary)
    for path in inner:
        _carry(live, temporary, path)
    # Those carried before a kill too: nested() finds every one in the new tree.
    _times_as_held(temporary, carried(live, target), nested(temporary, btrfsutil))
    exchange(live, temporary)
    fsync_dir(parent)
    return _finish(temporary, snapshots_of(), pending, btrfsutil)


def carried(live: Path, path: Path) -> Path:
    """Where `path`, inside the live subvolume, is while a rollback killed before its swap
    has carried it into the new tree; `path` itself otherwise."""
    if path.is_relative_to(live):
        moved = live.with_name(f".{live.name}{TEMPORARY}") / path.relative_to(live)
        if os.path.lexists(moved):
            return moved
    return path


def _newer(a: Path, b: Path, btrfsutil) -> bool:
    return btrfsutil.subvolume_id(a) > btrfsutil.subvolume_id(b)


def _swapped(live: Path, target_uuid: bytes, snapshots_of: dict[bytes, Newest], btrfsutil) -> bool:
    """With no temporary name left: whether the live subvolume is the one a rollback to
    the target made (a snapshot of it that nothing has been snapshotted from since, as
    the pre-rollback snapshot was from the subvolume it replaced)."""
    info = btrfsutil.subvolume_info(live)
    return info.parent_uuid == target_uuid and info.uuid not in snapshots_of


def _carry(live: Path, temporary: Path, path: PurePosixPath) -> None:
    """Move a nested subvolume into the new tree, into the empty directory the snapshot
    holds in its place (made, like its parents, if the snapshot has none)."""
    source, there = live / path, temporary / path
    if not os.path.lexists(source):
        return   # moved by the rollback that was cut short
    if os.path.lexists(there):
        os.rmdir(there)
    for ancestor in reversed([p for p in path.parents if p != PurePosixPath()]):
        if not os.path.lexists(temporary / ancestor):
            st = os.stat(live / ancestor)
            os.mkdir(temporary / ancestor, st.st_mode & 0o7777)
            os.chown(temporary / ancestor, st.st_uid, st.st_gid)
    os.rename(source, there)


def _times_as_held(temporary: Path, target: Path, inner: list[PurePosixPath]) -> None:
    """The deepest directory the snapshot has on the way to each carried subvolume gets
    its times back as the snapshot holds them, which a carry moved: from the snapshot
    itself, so that a resume also mends a carry a kill cut short."""
    for path in inner:
        holder = path.parent
        while holder != PurePosixPath(".") and not os.path.lexists(target / holder):
            holder = holder.parent
        held = os.stat(target / holder)
        os.utime(temporary / holder, ns=(held.st_atime_ns, held.st_mtime_ns))


def _finish(replaced: Path, snapshots_of: dict[bytes, Newest], pending: str | None, btrfsutil) -> str | None:
    """Delete the replaced subvolume, unless a mount still shows it (then what is
    pending), no snapshot holds it, or it was written to after its newest snapshot."""
    if _mounted(replaced, btrfsutil):
        if pending:
            return pending
        raise SnapmgrError(f"rolled back, but the replaced subvolume is mounted elsewhere, so it is kept as "
                           f"{quote(replaced)}: delete it (btrfs subvolume delete) once it is unmounted")
    # Only a mount that kept showing it until mounted again lets anything write to the
    # replaced subvolume after the swap (the services were stopped for it); without one,
    # carrying its nested subvolumes out changed it, which is no loss.
    if pending and _written_since(replaced, snapshots_of, btrfsutil):
        named = "/" + btrfsutil.subvolume_path(replaced)
        raise RollbackRefused(f"the subvolume a rollback replaced, {quote(named)} on "
                              f"{quote(mounts.containing(replaced.parent).source)}, was written to after its "
                              f"pre-rollback snapshot, while still mounted, so it is kept: mount the filesystem's top "
                              f"level (subvolid={TOP_LEVEL}), copy what is needed from it, then delete it (btrfs "
                              f"subvolume delete); nothing was changed")
    if btrfsutil.subvolume_info(replaced).uuid not in snapshots_of:
        raise SnapmgrError(f"rolled back, but no snapshot of the replaced subvolume was found, so it is kept as "
                           f"{quote(replaced)}: delete it (btrfs subvolume delete) once it is not needed")
    try:
        btrfsutil.delete_subvolume(replaced)
    except btrfsutil.BtrfsUtilError as e:
        if e.errno != errno.ENOENT:
            raise SnapmgrError(f"rolled back, but the replaced subvolume {quote(replaced)} could not be deleted: "
                               f"{os.strerror(e.errno)}") from None
    return None


def _written_since(subvolume: Path, snapshots_of: dict[bytes, Newest], btrfsutil) -> bool:
    """Whether `subvolume` changed after its newest snapshot. Not if its ctransid (the
    transaction that last changed it, once committed) is not later than the one that
    made the snapshot (otransid). A later one may be a read's atime only, so then each
    entry is compared with the snapshot's: a snapshot shares the inodes, whose ctime any
    write, chmod, link or rename moves (a creation or deletion that of its directory)."""
    btrfsutil.sync(subvolume)
    info = btrfsutil.subvolume_info(subvolume)
    newest = snapshots_of.get(info.uuid)
    if newest is None or info.ctransid <= newest.otransid:
        return False
    return _inodes(subvolume) != _inodes(newest.path)


def _inodes(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Each entry below `root` (the root itself is renamed by the swap): its inode,
    ctime, size and mode."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            found[os.path.relpath(os.path.join(top, name), root)] = (st.st_ino, st.st_ctime_ns, st.st_size,
                                                                     st.st_mode)
    return found


def _mounted(subvolume: Path, btrfsutil) -> bool:
    """Whether some mount shows `subvolume`: mountinfo names what each mount shows by
    its path from the top level, which the kernel updates when it is renamed."""
    device = mounts.containing(subvolume.parent).device
    at = b"/" + os.fsencode(btrfsutil.subvolume_path(subvolume))
    return any(m.device == device and m.root == at for m in mounts.mounts())


def shows_replaced(live: Path, btrfsutil) -> bool:
    """Whether the mount at `live` still shows the subvolume a rollback replaced (now
    under the temporary name), not the one swapped in."""
    return _is_temporary(PurePosixPath(btrfsutil.subvolume_path(live)).name)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMPORARY)
