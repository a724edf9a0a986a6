"""ZFS: snapshots through libzfs_core (Debian's python3-pyzfs).

One snapmgr snapshot is one `lzc_snapshot` call over every dataset of the volume (and,
with `recursive`, every dataset below them): ZFS takes them all in one transaction group
or none. snapmgr's metadata goes into user properties of the same call, so no snapshot is
ever seen without them. The volumes of a group that live in one pool are taken together,
in one channel program (lzc_snapshot gives every snapshot the same properties, and each
volume needs its own): one transaction group for all of them, or none. libzfs_core
cannot list, so listing reads `zfs list`.

A snapshot without snapmgr's properties was made by someone else (sanoid, an admin): it
is listed as foreign and never touched.

A snapshot is browsed as the live tree looks: each dataset's snapshot (in its own .zfs
directory) where the dataset is mounted, relative to the first dataset's mountpoint. A
snapshot of one dataset is its .zfs directory itself; one of several is a tree of
read-only bind mounts under the run directory. A ZFS volume (a block device) and a
dataset with canmount=off have no files anyone sees live: the tree leaves them out. A
dataset mounted anywhere else, or mountable but not mounted, has no place in that tree:
browsing the snapshot is then an error naming it, so that no manifest, verify or
restore silently leaves its files out.

A rollback (zfs_rollback) swaps a clone of the target snapshot in for each dataset and
keeps the dataset it replaces beside it, as <dataset>.pre-rollback-<label>, with the
snapshots newer than the target: those stay the volume's, listed, browsed (mounted
directly, since the dataset is not) and deleted as the others are. A snapshot a clone
still depends on is destroyed deferred: ZFS destroys it once the clone is gone, and it is
no longer listed meanwhile."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from snapmgr import schema, sh
from snapmgr.backends import mounts
from snapmgr.signals import signals_held
from snapmgr.backends.base import Backend, Progress, RollbackWay, Space
from snapmgr.backends.rsync_filters import anchored
from snapmgr.errors import SnapmgrError, quote
from snapmgr.model import PRE_ROLLBACK_TAG, ForeignSnapshot, Snapshot, SnapshotId

log = logging.getLogger(__name__)

PREFIX = "snapmgr-"             # ZFS snapshot names: <dataset>@snapmgr-<id label>
PROP_VOLUME = "snapmgr:volume"
PROP_ID = "snapmgr:id"
PROP_TAGS = "snapmgr:tags"
UNSET = "-"                     # how `zfs list` shows a property that is not set
# Beside a dataset, during a rollback of it: the clone built to replace it; after one: the
# dataset it replaced, <dataset>.pre-rollback-<label of the pre-rollback snapshot>.
TMP = ".rollback-tmp"
KEPT = ".pre-rollback-"
DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*(/[A-Za-z0-9_.:-]+)*")
MOUNT_TIMEOUT = 60
INSTALL_HINT = "install Debian's python3-pyzfs (contrib): apt install python3-pyzfs"
# What the space figures are worked out from (see _space_of), as `zfs list -H -p` prints them.
SPACE_COLUMNS = ("name", "quota", "refquota", "reservation", "used", "referenced", "available",
                 "usedbyrefreservation", "usedbysnapshots")


def dataset(value: Any) -> str:
    text = schema.string(value)
    if not DATASET_RE.fullmatch(text):
        raise ValueError(f"{quote(text)} is not a ZFS dataset name (e.g. tank/data)")
    return text


def beside(dataset: str, name: str) -> bool:
    """Whether `name` is the dataset or one a rollback of it made beside it (not one below
    those: a recursive snapshot's names sort the children's first)."""
    label = name[len(dataset + KEPT):]
    return name in (dataset, dataset + TMP) or name.startswith(dataset + KEPT) and "/" not in label


def _lzc():
    """libzfs_core, imported when first needed so that the other backends work without it."""
    try:
        import libzfs_core
    except ImportError:
        raise SnapmgrError(f"the zfs backend needs the libzfs_core Python bindings: {INSTALL_HINT}") from None
    return libzfs_core


def _zfs_error(action: str, e: Exception) -> SnapmgrError:
    details = [str(err) for err in getattr(e, "errors", ())] or [str(e)]
    if getattr(e, "details", None):  # a channel program's Lua error: its first line says it
        details.append(e.details.decode(errors="replace").splitlines()[0])
    return SnapmgrError(f"{action}: {'; '.join(details)}")


class ZfsBackend(Backend):
    name = "zfs"
    browse_mounts = True   # ZFS mounts a snapshot when its .zfs directory is entered
    options = {
        "datasets": schema.Field(schema.list_of(dataset, non_empty=True), required=True),
        "recursive": schema.Field(schema.boolean, default=False),
    }

    @property
    def datasets(self) -> tuple[str, ...]:
        return self.opts["datasets"]

    # The protocol ------------------------------------------------------------------

    def plan_create(self, snapshot_id: SnapshotId) -> str:
        names = self._snapshot_names(snapshot_id)
        return f"lzc_snapshot of {len(names)} dataset(s) in one transaction: {', '.join(names)}"

    def create(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None = None) -> Snapshot:
        return self.stage(snapshot_id, tags, progress, prepass=False)()

    def stage(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None,
              prepass: bool) -> Callable[[], Snapshot]:
        return _Pending(self, snapshot_id, tags)

    @classmethod
    def join(cls, takes: list[Callable[[], Snapshot]]) -> None:
        by_pool: dict[str, list[_Pending]] = defaultdict(list)
        for take in takes:
            by_pool[take.pool].append(take)
        for batch in by_pool.values():
            for take in batch:
                take.batch = batch

    def list(self) -> list[Snapshot]:
        ours: dict[str, list[str]] = {}
        tags: dict[str, str] = {}
        written: dict[str, int] = defaultdict(int)
        for name, _, volume, sid, labels, size, deferred in self._rows("written", "defer_destroy"):
            if volume == self.volume and deferred != "on":
                ours.setdefault(sid, []).append(name)
                tags[sid] = labels
                written[sid] += int(size) if size.isdigit() else 0
        snapshots = []
        for text, names in ours.items():
            sid = SnapshotId.try_parse(text)
            if sid is None:
                log.warning("%s: snapmgr:id '%s' is not a snapshot id; leaving it alone", names[0], text)
                continue
            found = {d: next((n for n in names if beside(d, n.split("@")[0])), None) for d in self.datasets}
            missing = [f"{d}@{PREFIX}{sid.label}" for d, n in found.items() if n is None]
            invalid = f"incomplete: {', '.join(missing)} no longer exist(s)" if missing else None
            first = found[self.datasets[0]] or f"{self.datasets[0]}@{PREFIX}{sid.label}"
            snapshots.append(Snapshot(sid, Path(first), frozenset(filter(None, tags[text].split(","))),
                                      {"snapshots": sorted(names), "written": written[text]}, invalid=invalid))
        return snapshots

    def foreign(self) -> list[ForeignSnapshot]:
        return [ForeignSnapshot(self.volume, name, _from_epoch(created))
                for name, created, volume, _, _ in self._rows() if volume == UNSET]

    def delete(self, snapshot: Snapshot) -> None:
        lzc = _lzc()
        self._release_browsed(snapshot.id)
        names = snapshot.meta["snapshots"]
        try:
            # Deferred: one a clone depends on (after a rollback, the origin of the dataset
            # kept beside) goes when the clone does; any other at once.
            lzc.lzc_destroy_snaps([n.encode() for n in names], defer=True)
        except lzc.exceptions.ZFSError as e:
            raise _zfs_error(f"zfs destroy of {', '.join(names)} failed", e) from None

    # Rollback -----------------------------------------------------------------------

    rollback_choices = ("destroy-newer", "keep-newer")

    def rollback_way(self, target: Snapshot, snapshots: list[Snapshot], choice: str | None,
                     resuming: bool = False) -> RollbackWay:
        """Every rollback is the clone-promote-swap of zfs_rollback: `zfs rollback` to the
        newest snapshot would destroy the pre-rollback one, taken just before. The
        snapmgr snapshots newer than the target that are on the live datasets leave them
        with the swap (which breaks incremental replication from them: zrepl #494), so
        that takes --keep-newer or --destroy-newer; those on datasets earlier rollbacks
        kept stay there."""
        if target.invalid:
            raise SnapmgrError(f"{target.id} is {target.invalid}: it cannot be rolled back to; nothing was changed")
        root = next((d for d in self.datasets if "/" not in d), None)
        if root is not None:
            raise SnapmgrError(f"{root} is the root dataset of its pool, which cannot be renamed, and a rollback "
                               f"swaps a clone of the snapshot in for it: only the datasets below a pool's root roll "
                               f"back; nothing was changed")
        kept = ", ".join(f"{d}{KEPT}LABEL" for d in self.datasets)
        method = (f"clone {target.id}, promote the clone and swap it in for {', '.join(self.datasets)}"
                  f"{' and every dataset below' if self.opts['recursive'] else ''}; the dataset(s) as they are now, "
                  f"with the pre-rollback snapshot, are kept unmounted as {kept} (LABEL: the pre-rollback "
                  f"snapshot's) until you destroy them")
        if self.opts["recursive"]:
            held = {self._live_name(n.split("@")[0]) for n in target.meta["snapshots"]}
            since = [d for d in self._targets() if d not in held]
            if since:
                raise SnapmgrError(f"{', '.join(since)} were made since {target.id}, which does not hold them: a "
                                   f"rollback would move them away with the datasets it replaces, where no snapshot "
                                   f"shows them in place; destroy or rename them first; nothing was changed")
        moving = [s for s in snapshots if s.id > target.id and self._on_live(s)]
        if not moving:
            return RollbackWay(method, choice)
        if choice is None:
            raise SnapmgrError(f"{target.id} is not the newest snapshot of volume {self.volume}: "
                               f"{', '.join(str(s.id) for s in moving)} would leave {', '.join(self.datasets)} "
                               f"(which breaks incremental replication from them): --keep-newer keeps them on "
                               f"{kept}, --destroy-newer destroys them; nothing was changed")
        fate = "destroyed" if choice == "destroy-newer" else f"moves to {kept}"
        return RollbackWay(method, choice, fates={s.id: fate for s in moving})

    def roll_back(self, target: Snapshot, way: RollbackWay, keep: Sequence[tuple[Path, str]], resuming: bool,
                  current: Snapshot | None = None) -> None:
        # Built on this module's helpers, so imported only here.
        from snapmgr.backends import zfs_rollback
        snapshots = self.list()
        pre = max((s for s in snapshots if PRE_ROLLBACK_TAG in s.tags and s.id > target.id), key=lambda s: s.id,
                  default=None)
        if pre is None:
            raise SnapmgrError(f"volume {self.volume} has no pre-rollback snapshot newer than {target.id}, which a "
                               f"rollback keeps the volume's datasets as they are by; nothing was changed")
        held = next((s.meta["snapshots"] for s in snapshots if s.id == target.id), None)
        if held is None:
            raise SnapmgrError(f"{target.id} no longer exists: it cannot be rolled back to")
        zfs_rollback.roll_back([zfs_rollback.Swap.of(d, held, PREFIX + target.id.label, pre.id.label,
                                                     self.opts["recursive"]) for d in self.datasets])
        doomed = [n for s in self.list() if way.fates.get(s.id) == "destroyed" for n in s.meta["snapshots"]]
        if doomed:
            lzc = _lzc()
            try:
                lzc.lzc_destroy_snaps([n.encode() for n in doomed], defer=True)
            except lzc.exceptions.ZFSError as e:
                raise _zfs_error(f"zfs destroy of {', '.join(doomed)} failed", e) from None

    def _on_live(self, snapshot: Snapshot) -> bool:
        return any(n.split("@")[0] in self.datasets for n in snapshot.meta["snapshots"])

    def live_root(self) -> Path | None:
        # Where the kernel has the first dataset mounted, whether by its mountpoint
        # property or by hand (mountpoint=legacy); None when it is not mounted.
        return _mounted().get(self.datasets[0])

    def left_out(self) -> tuple[str, ...]:
        # Each dataset's .zfs directory (listed with snapdir=visible) is in no snapshot:
        # a restore --delete would remove what it holds (rmdir in .zfs/snapshot destroys
        # a snapshot), and diff against live would list it as added.
        root = self.live_root()
        places = [PurePosixPath(), *(PurePosixPath(where.relative_to(root)) for where in self.own_mounts())]
        return tuple(anchored(place / ".zfs") for place in places)

    def own_mounts(self) -> tuple[Path, ...]:
        mounted = _mounted()
        root = mounted.get(self.datasets[0])
        return tuple(where for d in self._targets() if (where := mounted.get(d)) and root in where.parents)

    @contextmanager
    def browse_root(self, snapshot: Snapshot) -> Iterator[Path]:
        name = PREFIX + snapshot.id.label
        # Each snapshot by the live dataset it is of: one on a dataset a rollback kept
        # beside has no .zfs directory anyone sees, and is mounted itself.
        held = {self._live_name(n.split("@")[0]): n for n in snapshot.meta["snapshots"]}
        sources: list[tuple[str, Path | str, Path]] = []
        for d, where, place in self._places(held):
            if held[d].split("@")[0] != d:
                sources.append((d, held[d], place))
                continue
            source = where / ".zfs" / "snapshot" / name
            # ZFS mounts the snapshot on first access and unmounts it when idle by itself. An
            # lstat() is no access (it shows the unmounted stub's inode): opening it is.
            os.close(os.open(source, os.O_RDONLY | os.O_DIRECTORY))
            sources.append((d, source, place))
        if len(sources) == 1 and isinstance(sources[0][1], Path):
            yield sources[0][1]
            return
        # Each dataset's snapshot is a filesystem of its own: they are bound into one tree,
        # each where its dataset is in the live one.
        tree = self._browse_dir(snapshot.id)

        def build() -> None:
            for d, source, place in sources:
                _check_place(tree, place, d)
                how = ["--bind", "-o", "ro"] if isinstance(source, Path) else ["-t", "zfs", "-o", "ro"]
                sh.run(["mount", *how, source, tree / place], timeout=MOUNT_TIMEOUT)

        with self._browsed(snapshot.id, build) as root:
            yield root

    def free_space(self) -> Space:
        return self._space()[0]

    def space(self, snapshots: list[Snapshot]) -> Space:
        """Held: usedbysnapshots summed over the volume's datasets (every snapshot of them,
        snapmgr's or not); each snapshot: `written`, what was written to its datasets
        since the snapshot before it, as the listing read it."""
        space, held = self._space()
        held_each = {s.id: s.meta["written"] for s in snapshots if isinstance(s.meta.get("written"), int)}
        return replace(space, held=held, held_each=held_each,
                       note="held: usedbysnapshots of the datasets; each: what was written since the snapshot "
                            "before it")

    def _space(self) -> tuple[Space, int]:
        """The volume's Space (see _space_of), and the usedbysnapshots of its datasets,
        summed. One `zfs list` reads the datasets and all their ancestors."""
        targets = self._targets()
        ancestors = ["/".join(t.split("/")[:depth]) for t in targets for depth in range(1, t.count("/") + 1)]
        out = sh.run(["zfs", "list", "-H", "-p", "-o", ",".join(SPACE_COLUMNS),
                      *dict.fromkeys([*ancestors, *targets])], timeout=60).stdout
        rows = _space_rows(out)
        return _space_of(rows, targets), sum(rows[t].usedbysnapshots for t in targets)

    def browse_problem(self) -> str | None:
        try:
            self._places(self._targets())
        except SnapmgrError as e:
            return str(e)
        return None

    # Helpers ------------------------------------------------------------------------

    def _snapshot_names(self, snapshot_id: SnapshotId) -> list[str]:
        return [f"{t}@{PREFIX}{snapshot_id.label}" for t in self._targets()]

    def _targets(self) -> list[str]:
        """The datasets a snapshot taken now covers."""
        if not self.opts["recursive"]:
            return list(self.datasets)
        out = sh.run(["zfs", "list", "-H", "-o", "name", "-t", "filesystem,volume", "-r", *self.datasets],
                     timeout=60).stdout
        return list(dict.fromkeys(out.split()))

    def _places(self, datasets: Iterable[str]) -> list[tuple[str, Path, Path]]:
        """(the dataset, where it is mounted, where that is relative to the first
        dataset's mountpoint) of each dataset, parents first; an error naming a dataset
        that has no such place, whose files the volume's tree would leave out."""
        mounted = _mounted()
        first = self.datasets[0]
        root = mounted.get(first)
        if root is None:
            raise SnapmgrError(f"{first} is not mounted: its snapshots have no .zfs directory to browse")
        places = {root: first}
        for d in dict.fromkeys(datasets):
            if d == first:
                continue
            where = mounted.get(d)
            if where is None:
                reason = _unmounted(d)
                if reason is None:
                    continue
                raise SnapmgrError(reason)
            if where in places:
                raise SnapmgrError(f"{d} and {places[where]} are both mounted at {where}, so the files of one "
                                   f"cannot be seen")
            if root not in where.parents:
                raise SnapmgrError(f"{d} is mounted at {where}, outside {root} where {first} is, so its files "
                                   f"have no place in the volume's tree")
            places[where] = d
        return sorted(((d, where, where.relative_to(root)) for where, d in places.items()), key=lambda p: p[2].parts)

    def _rows(self, *more: str) -> list[tuple[str, ...]]:
        """(name, creation, snapmgr:volume, snapmgr:id, snapmgr:tags, and the `more`
        properties) of every snapshot of the volume's datasets (and those below them, if
        recursive)."""
        depth = [] if self.opts["recursive"] else ["-d", "1"]
        out = sh.run(["zfs", "list", "-H", "-p", "-t", "snapshot", "-o",
                      ",".join(["name", "creation", PROP_VOLUME, PROP_ID, PROP_TAGS, *more]), "-r", *depth,
                      *self._homes()], timeout=120).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def _homes(self) -> list[str]:
        """The volume's datasets and those rollbacks of them made beside them, whose
        snapshots are the volume's too; of a rollback cut short between its two renames,
        only the latter."""
        parents = sorted({d.rpartition("/")[0] for d in self.datasets if "/" in d})
        out = sh.run(["zfs", "list", "-H", "-o", "name", "-t", "filesystem,volume", "-d", "1", *parents],
                     timeout=60).stdout if parents else ""
        return list(dict.fromkeys([*(d for d in self.datasets if "/" not in d),
                                   *(n for n in out.split() if any(beside(d, n) for d in self.datasets))]))

    def _live_name(self, name: str) -> str:
        """The name under the volume's dataset of a dataset (or one below it) that a
        rollback made beside it."""
        for d in self.datasets:
            if name == d + TMP or name.startswith(d + TMP + "/"):
                return d + name[len(d + TMP):]
            if name.startswith(d + KEPT):
                rest = name[len(d + KEPT):]      # the label, then any "/child"
                return d + rest[len(rest.partition("/")[0]):]
        return name


class _Pending:
    """A snapshot staged for the window. The first of a batch to be called takes the
    whole batch; the others then only tell how it went."""

    def __init__(self, backend: ZfsBackend, snapshot_id: SnapshotId, tags: frozenset[str]):
        self.backend, self.snapshot_id, self.tags = backend, snapshot_id, tags
        self.props = {PROP_VOLUME: backend.volume, PROP_ID: str(snapshot_id), PROP_TAGS: ",".join(sorted(tags))}
        self.batch = [self]
        self.outcome: Snapshot | SnapmgrError | None = None

    @property
    def pool(self) -> str:
        return self.backend.datasets[0].split("/")[0]

    def __call__(self) -> Snapshot:
        if self.outcome is None:
            _take(self.batch)
        if isinstance(self.outcome, SnapmgrError):
            raise self.outcome
        return self.outcome


# Every name is checked before any is taken, and the program runs with nothing else
# between its steps; should a step still fail, what it took is destroyed again, so the
# batch is taken whole or not at all. set_prop came with OpenZFS 2.0.
SNAPSHOT_PROGRAM = b"""
if zfs.sync.set_prop == nil then error("this ZFS cannot set properties from a channel program (OpenZFS 2.0 or later can)") end
local snapshots = (...)["argv"]
for name, _ in pairs(snapshots) do
    local err = zfs.check.snapshot(name)
    if err ~= 0 then return {[name] = err} end
end
local taken = {}
for name, props in pairs(snapshots) do
    local err = zfs.sync.snapshot(name)
    if err == 0 then
        taken[#taken + 1] = name
        for key, value in pairs(props) do
            err = zfs.sync.set_prop(name, key, value)
            if err ~= 0 then break end
        end
    end
    if err ~= 0 then
        for _, done in ipairs(taken) do zfs.sync.destroy(done) end
        return {[name] = err}
    end
end
return {}
"""


def _take(batch: list[_Pending]) -> None:
    """Take the batch, and set every member's outcome: what it took, or why not."""
    names = {take: take.backend._snapshot_names(take.snapshot_id) for take in batch}
    # A cut of the window or a signal must not come between the snapshots and their outcomes.
    with signals_held():
        try:
            _snapshot(batch, names)
        except SnapmgrError as e:
            for take in batch:
                take.outcome = e
        else:
            for take in batch:
                take.outcome = Snapshot(take.snapshot_id, Path(names[take][0]), take.tags, {"snapshots": names[take]})


def _snapshot(batch: list[_Pending], names: dict[_Pending, list[str]]) -> None:
    lzc = _lzc()
    every = [n for take_names in names.values() for n in take_names]
    what = f"zfs snapshot of {', '.join(every)} failed"
    datasets = [n.split("@")[0] for n in every]
    twice = sorted({d for d in datasets if datasets.count(d) > 1})
    if twice:
        raise SnapmgrError(f"{what}: {', '.join(twice)} belong(s) to more than one volume of the group, and ZFS "
                           f"takes one snapshot of a dataset per transaction")
    try:
        if len(batch) == 1:
            lzc.lzc_snapshot([n.encode() for n in every], _encoded(batch[0].props))
            return
        program = {n.encode(): _encoded(take.props) for take, take_names in names.items() for n in take_names}
        # pyzfs hands back what the program returned: the name refused and why, if any.
        refused = lzc.lzc_channel_program(batch[0].pool.encode(), SNAPSHOT_PROGRAM, params=program)
    except lzc.exceptions.ZFSError as e:
        raise _zfs_error(what, e) from None
    if refused:
        [(name, errno)] = refused.items()
        raise SnapmgrError(f"{what}: {name.decode()}: {os.strerror(errno)}")


class _Figures(NamedTuple):
    """A dataset's row of SPACE_COLUMNS, in bytes. A limit that is not set is 0, as ZFS
    keeps it (`-p` prints it so; a ZFS volume, which has no quota, prints `-`)."""

    quota: int
    refquota: int
    reservation: int
    used: int
    referenced: int
    available: int
    usedbyrefreservation: int
    usedbysnapshots: int


def _space_rows(out: str) -> dict[str, _Figures]:
    rows = {}
    for line in out.splitlines():
        name, *values = line.split("\t")
        rows[name] = _Figures(*(0 if v == UNSET else int(v) for v in values))
    return rows


def _space_of(rows: dict[str, _Figures], targets: list[str]) -> Space:
    """Free: the `available` of the target that has least, which ZFS works out from
    every limit above it. Size, what a share of min_free is of: the capacity of the
    limit that leaves that target least room, so that a share names a size that can be
    met at all (5% of a pool is more than a small quota could ever leave free). The
    limits: the target's refquota (refquota - referenced: snapshots and children do not
    count under it), the quota of the target and of each ancestor (quota - used, which
    counts them), and the pool (its root's `available`; its size, the root's `used` +
    `available`). ZFS adds to the room under a limit what is reserved below it and not
    yet used (a `reservation` of a dataset between it and the target, the target's
    `refreservation`): reserved space is the target's to take whatever the pool or an
    ancestor's quota has left, so the room of each limit counts it too."""
    target = min(targets, key=lambda name: rows[name].available)
    row = rows[target]
    # (where, capacity, room the target has under it); on a tie the nearest limit binds.
    limits = [(f"refquota of {target}", row.refquota, max(row.refquota - row.referenced, 0))] if row.refquota else []
    reserved_below = row.usedbyrefreservation
    parts = target.split("/")
    pool = parts[0]
    for depth in range(len(parts), 0, -1):
        name = "/".join(parts[:depth])
        figures = rows[name]
        if figures.quota:
            limits.append((f"quota of {name}", figures.quota, max(figures.quota - figures.used, 0) + reserved_below))
        if depth > 1:   # ZFS ignores a reservation of the pool's root: there is nothing above it to take from
            reserved_below += max(figures.reservation - figures.used, 0)
    root = rows[pool]
    limits.append((f"pool {pool}", root.used + root.available, root.available + reserved_below))
    where, size, _ = min(limits, key=lambda limit: limit[2])
    return Space(where, size, row.available)


def _mounted() -> dict[str, Path]:
    """Where the kernel has each dataset mounted (the whole of it: not a bind mount of a
    directory inside it), by its mountpoint property or by hand (mountpoint=legacy)."""
    found: dict[str, Path] = {}
    for m in mounts.whole_mounts():
        if m.fstype == "zfs":
            found.setdefault(m.source, m.mountpoint)
    return found


def _check_place(tree: Path, place: Path, dataset: str) -> None:
    """Refuse to bind a dataset's snapshot at tree/place unless every component of that
    path is a directory: the parent dataset's snapshot holds whatever was there when it
    was taken, a user's symlink too, which mount would follow out of the tree (onto
    /etc), where nothing takes the bind down. Snapshots are immutable: what is checked
    stays so until the mount."""
    at = tree
    for part in place.parts:
        at = at / part
        try:
            mode = os.lstat(at).st_mode
        except FileNotFoundError:
            what = "missing"
        else:
            what = None if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else "not a directory"
        if what:
            raise SnapmgrError(f"{dataset} has no place in the snapshot's tree: {quote(str(at.relative_to(tree)))} "
                               f"is {what} in the snapshot, where {dataset} is mounted at {quote(str(place))}")


def _unmounted(dataset: str) -> str | None:
    """Why a dataset that is not mounted has no place in its volume's tree; None when it
    has no files anyone sees live, which the tree then leaves out as the live one does:
    a ZFS volume (a block device) and a dataset that cannot be mounted (canmount=off,
    there for its children to inherit from)."""
    kind, mountpoint, canmount = sh.run(["zfs", "list", "-H", "-o", "type,mountpoint,canmount", dataset],
                                        timeout=60).stdout.rstrip("\n").split("\t")
    if kind == "volume" or canmount == "off":
        return None
    return f"{dataset} is not mounted (mountpoint={mountpoint}, canmount={canmount}), so its files have no " \
           f"place in the volume's tree"


def _encoded(props: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in props.items()}


def _from_epoch(seconds: str) -> datetime:
    return datetime.fromtimestamp(int(seconds), timezone.utc)
