"""LVM: copy-on-write snapshots of one logical volume.

A thick origin gets a classic snapshot with an exception store of its own
(`lvcreate -s -L`); when writes to the origin fill that store, LVM drops the snapshot and
marks it invalid, so list() reports it as such and retention prunes it. A thin origin gets
a thin snapshot in its pool, which shares the pool's space with every volume in it: a
full pool stops them all, so a snapshot is refused above a fill threshold.

snapmgr's metadata is a set of LV tags written by the same lvcreate that makes the
snapshot, so an LV is never listed without them. Tags may hold only [A-Za-z0-9_+.-];
volume names and tags are restricted to that alphabet already (model.NAME_RE), and the
id is stored without its volume (SnapshotId.label), dropping the one character LVM refuses, '@'."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from snapmgr import schema, sh
from snapmgr.backends import lvm_rollback, mounts, remount, shared_mounts
from snapmgr.backends.base import Backend, Progress, RollbackWay, Space
from snapmgr.backends.lvm_cli import lvm
from snapmgr.errors import SnapmgrError, quote
from snapmgr.model import Snapshot, SnapshotId, human_size

log = logging.getLogger(__name__)
TAG_OWNER = "snapmgr"
TAG_VOLUME = "snapmgr.volume."
TAG_LABEL = "snapmgr.id."
TAG_TAG = "snapmgr.tag."
REPORT = ("lv_name,vg_name,lv_attr,lv_tags,origin,pool_lv,segtype,lv_size,snap_percent,data_percent,"
          "metadata_percent,vg_free,vg_size")
# lv_attr character 5 is the state: I = invalid snapshot, S = invalid suspended snapshot.
INVALID_STATES = "IS"
# A snapshot of a mounted filesystem looks like a crashed one: its journal must not be
# replayed (the device is read-only), and XFS refuses a second copy of a mounted UUID.
MOUNT_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "xfs": "ro,norecovery,nouuid"}
LVM_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmgtp]?)", re.I)
_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}  # LVM's units are binary
_PERCENT_RE = re.compile(r"([0-9]{1,3})%ORIGIN")
MAX_LV_SIZE = 8 << 60


@dataclass(frozen=True)
class SnapshotSize:
    """`snapshot_size`: a size in LVM's units ("512M", "1G"; a bare number is MiB, as for
    lvcreate) or a share of the origin ("20%ORIGIN")."""

    text: str
    size: int | None = None      # bytes
    percent: int | None = None   # of the origin

    def bytes_for(self, origin_size: int) -> int:
        return self.size if self.size is not None else origin_size * self.percent // 100

    def lvcreate_args(self) -> list[str]:
        return ["--size", self.text] if self.size is not None else ["--extents", self.text]


def snapshot_size(value: Any) -> SnapshotSize:
    text = schema.string(value)
    if m := _SIZE_RE.fullmatch(text):
        size = float(m[1]) * 1024 ** _UNIT_POWERS[(m[2] or "m").lower()]  # inf for absurd lengths
        if size > MAX_LV_SIZE:
            raise ValueError(f"{quote(text)} is larger than LVM allows (8 EiB)")
        return SnapshotSize(text, size=int(size))
    if (m := _PERCENT_RE.fullmatch(text)) and 0 < int(m[1]) <= 100:
        return SnapshotSize(text, percent=int(m[1]))
    raise ValueError(f"{quote(text)} is not a snapshot size (e.g. 512M, 1G, or 20%ORIGIN)")


def logical_volume(value: Any) -> tuple[str, str]:
    text = schema.string(value)
    parts = text.split("/")
    if len(parts) != 2 or not all(LVM_NAME_RE.fullmatch(p) for p in parts):
        raise ValueError(f"{quote(text)} is not VG/LV (e.g. vg0/data)")
    return parts[0], parts[1]


def percent(value: Any) -> int:
    number = schema.count(value)
    if not 0 < number < 100:
        raise ValueError(f"must be a percentage between 1 and 99, got {number}")
    return number


def lvs(*selection: str) -> list[dict]:
    """LVM's own JSON report of the selected LVs; sizes in bytes."""
    out = lvm(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", REPORT, *selection],
              timeout=60).stdout
    return json.loads(out)["report"][0]["lv"]


class LvmBackend(Backend):
    name = "lvm"
    browse_mounts = True
    options = {
        "lv": schema.Field(logical_volume, required=True),
        "snapshot_size": schema.Field(snapshot_size),
        "thin_pool_threshold": schema.Field(percent, default=80),
    }

    @property
    def vg(self) -> str:
        return self.opts["lv"][0]

    @property
    def origin_name(self) -> str:
        return f"{self.vg}/{self.opts['lv'][1]}"

    # The protocol ------------------------------------------------------------------

    def plan_create(self, snapshot_id: SnapshotId) -> str:
        return shlex.join(self._create_argv(snapshot_id, self._checked_origin()))

    def create(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None = None) -> Snapshot:
        lvm(self._create_argv(snapshot_id, self._checked_origin(), tags), timeout=300)
        return self._snapshot(lvs(f"{self.vg}/{self._lv_name(snapshot_id)}")[0])

    def list(self) -> list[Snapshot]:
        rows = [r for r in lvs(f"@{TAG_VOLUME}{self.volume}") if r["vg_name"] == self.vg]
        return [s for s in map(self._snapshot, rows) if s is not None]

    def delete(self, snapshot: Snapshot) -> None:
        self._release_browsed(snapshot.id)
        lvm(["lvremove", "--yes", snapshot.meta["lv"]], timeout=300)

    def live_root(self) -> Path | None:
        try:
            device = os.stat(Path("/dev", self.vg, self.opts["lv"][1])).st_rdev
        except FileNotFoundError:
            return None  # not active
        return mounts.whole_mount(lambda m: m.device == (os.major(device), os.minor(device)))

    @contextmanager
    def browse_root(self, snapshot: Snapshot) -> Iterator[Path]:
        _refuse_invalid(snapshot)
        with self._browsed(snapshot.id, lambda: self._mount(snapshot)) as root:
            yield root

    def _take_down(self, snapshot_id: SnapshotId) -> shared_mounts.TakeDown:
        return lambda: self._release(snapshot_id)

    def rollback_way(self, target: Snapshot, snapshots: list[Snapshot], choice: str | None,
                     resuming: bool = False) -> RollbackWay:
        rows = self._rows()
        origin = rows.get(self.opts["lv"][1])
        if origin is None and resuming:   # a thin rollback cut short after renaming it aside
            origin = rows.get(self._rollback_origin.aside(target))
        if origin is None:
            raise self._missing(rows)
        room = None if _is_thin(origin) else self._size().bytes_for(int(origin["lv_size"]))
        return lvm_rollback.way(self._rollback_origin, target, snapshots, rows, origin, room, self.live_root(),
                                resuming)

    def roll_back(self, target: Snapshot, way: RollbackWay, keep: Sequence[tuple[Path, str]],
                  resuming: bool, current: Snapshot | None = None) -> str | None:
        self._release_browsed(target.id)   # a mounted snapshot would defer its merge
        return lvm_rollback.roll_back(self._rollback_origin, target, resuming)

    def consumed(self, target: SnapshotId) -> Snapshot | None:
        """A thick target whose merge has begun: LVM hides it while it merges and removes
        it once merged, so list() no longer has it. Named as _lv_name() named it."""
        name = self._lv_name(target)
        rows = lvm_rollback.everything(self.vg)
        origin, row = rows.get(self.opts["lv"][1]), rows.get(name)
        if origin is None or _is_thin(origin) or (row is not None and row["lv_merging"] != "1"):
            return None
        return Snapshot(target, Path("/dev", self.vg, name), frozenset(), {"lv": f"{self.vg}/{name}", "kind": "thick"})

    def rollback_pending(self, target: SnapshotId) -> str | None:
        return lvm_rollback.pending(self._rollback_origin, self._lv_name(target))

    def mountpoints(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys([*super().mountpoints(), *remount.recorded(self._rollback_origin.record)]))

    @property
    def _rollback_origin(self) -> lvm_rollback.Origin:
        return lvm_rollback.Origin(self.vg, self.opts["lv"][1], self.run_dir / f"{self.volume}.rollback-mounts")

    # Helpers ------------------------------------------------------------------------

    def _activated(self, snapshot_id: SnapshotId) -> Path:
        """Holds the snapshot's LV while it is active only to be browsed."""
        return self._browse_dirs / f"{snapshot_id}.activated"

    def _mount(self, snapshot: Snapshot) -> None:
        lv, directory = snapshot.meta["lv"], self._browse_dir(snapshot.id)
        # Asked now, not taken from the listing: another process may have released it
        # since, or writes to its origin filled it.
        row = lvs(lv)[0]
        _refuse_invalid(self._snapshot(row) or snapshot)
        # Only a thin snapshot is activated on its own: a thick one is active with its
        # origin, and deactivating it would deactivate the origin too (LVM asks, and a
        # --yes would take the volume away from under its users).
        state, thin = row["lv_attr"][4], _is_thin(row)
        if not thin and state == "-":
            raise SnapmgrError(f"{snapshot.id} is not active, as its origin {self.origin_name} is not: "
                               f"lvchange --activate y {self.origin_name} activates both")
        if not thin and state not in "as":   # suspended: the mount waits for it
            raise SnapmgrError(f"{snapshot.id} cannot be mounted: LVM reports its state as {state!r} "
                               f"(lv_attr {row['lv_attr']}; see lvs(8))")
        if thin and state != "a":
            # Made first, so that a release after a kill at any point deactivates it; empty,
            # so that no kill or full /run can leave it half written.
            self._activated(snapshot.id).touch()
            # Thin snapshots are created with the activation-skip flag: -K overrides it.
            lvm(["lvchange", "--activate", "y", "--ignoreactivationskip", lv], timeout=120)
        fstype = sh.run(["blkid", "-o", "value", "-s", "TYPE", snapshot.path], timeout=60).stdout.strip()
        sh.run(["mount", "-t", fstype, "-o", MOUNT_OPTIONS.get(fstype, "ro"), snapshot.path, directory], timeout=120)

    def _release(self, snapshot_id: SnapshotId) -> None:
        directory, activated = self._browse_dir(snapshot_id), self._activated(snapshot_id)
        if os.path.ismount(directory):
            sh.run(["umount", directory], timeout=120)
        if os.path.lexists(directory):
            directory.rmdir()
        if activated.exists():
            lv = f"{self.vg}/{self._lv_name(snapshot_id)}"
            try:
                thin = _is_thin(lvs(lv)[0])
            except SnapmgrError:   # removed by hand: nothing left to deactivate
                log.debug("%s", lv, exc_info=True)
                thin = False
            if thin:   # an older snapmgr marked thick ones too
                lvm(["lvchange", "--activate", "n", lv], timeout=120)
            activated.unlink()

    def free_space(self) -> Space:
        return self._space(*self._report(), None)

    def space(self, snapshots: list[Snapshot]) -> Space:
        return self._space(*self._report(), snapshots)

    def _space(self, rows: dict[str, dict], origin: dict, snapshots: list[Snapshot] | None) -> Space:
        """A thick origin's snapshots draw from the volume group: each takes its whole
        snapshot_size at once and holds what writes to the origin have used of it. A thin
        origin's draw from its pool as data changes; LVM cannot tell what a thin snapshot
        alone holds (its mapped blocks are mostly shared with the origin). `snapshots`
        None: the free space only."""
        if _is_thin(origin):
            pool = rows[origin["pool_lv"]]
            size = int(pool["lv_size"])
            return Space(f"thin pool {self.vg}/{pool['lv_name']}", size,
                         int(size * (100 - _pool_percent(self.vg, pool, "data_percent")) / 100),
                         note="held: unknown, LVM cannot tell what a thin snapshot alone holds")
        by_name = {s.meta["lv"].split("/", 1)[1]: s for s in snapshots or ()}
        taken = [(rows[name], s) for name, s in by_name.items() if name in rows]
        # An overflowed snapshot reports no use: it is full.
        held_each = {s.id: int(int(row["lv_size"]) * float(row["snap_percent"] or 100) / 100) for row, s in taken}
        size = self.opts["snapshot_size"]
        return Space(f"volume group {self.vg}", int(origin["vg_size"]), int(origin["vg_free"]),
                     held=None if snapshots is None else sum(int(row["lv_size"]) for row, _ in taken),
                     held_each=held_each, needs=size.bytes_for(int(origin["lv_size"])) if size else 0,
                     note="held: the space the snapshots take from the volume group; each: how much of it "
                          "writes have used")

    def _checked_origin(self) -> dict:
        """The origin's report row, once the space guard has passed."""
        rows, origin = self._report()
        if origin["lv_attr"][0] == "O":
            raise SnapmgrError(f"refusing to snapshot {self.origin_name}: a snapshot is being merged into it (a "
                               f"rollback), which completes at its next activation (a reboot, or unmount it and run "
                               f"lvchange --refresh {self.origin_name}); LVM cannot snapshot it until then")
        if _is_thin(origin):
            self._check_pool(rows[origin["pool_lv"]])
        else:
            self._check_free(origin)
        return origin

    def _report(self) -> tuple[dict[str, dict], dict]:
        """Every LV of the VG by name, and the origin's row. One report of the whole VG
        has all the space figures: the origin, its thin pool, the VG's free space."""
        rows = self._rows()
        origin = rows.get(self.opts["lv"][1])
        if origin is None:
            raise self._missing(rows)
        return rows, origin

    def _rows(self) -> dict[str, dict]:
        try:
            return {r["lv_name"]: r for r in lvs(self.vg)}
        except sh.CommandError as e:
            raise SnapmgrError(f"volume {self.volume}: cannot read volume group {self.vg}: {e}") from None

    def _missing(self, rows: dict[str, dict]) -> SnapmgrError:
        why = lvm_rollback.interrupted(self._rollback_origin, rows)
        return SnapmgrError(f"volume {self.volume}: {why or f'logical volume {self.origin_name} does not exist'}")

    def _lv_name(self, snapshot_id: SnapshotId) -> str:
        return f"{self.opts['lv'][1]}-{snapshot_id.label}"

    def _create_argv(self, snapshot_id: SnapshotId, origin: dict, tags: frozenset[str] = frozenset()) -> list[str]:
        labels = [TAG_OWNER, TAG_VOLUME + self.volume, TAG_LABEL + snapshot_id.label,
                  *(TAG_TAG + t for t in sorted(tags))]
        argv = ["lvcreate", "--snapshot", "--name", self._lv_name(snapshot_id)]
        if not _is_thin(origin):
            argv += self._size().lvcreate_args()
        for label in labels:
            argv += ["--addtag", label]
        return argv + [self.origin_name]

    def _size(self) -> SnapshotSize:
        size = self.opts["snapshot_size"]
        if size is None:
            raise SnapmgrError(f"volume {self.volume}: {self.origin_name} is a thick LV, so its snapshots need "
                               f"space of their own: set snapshot_size (e.g. \"1G\" or \"20%ORIGIN\")")
        return size

    def _check_free(self, origin: dict) -> None:
        size = self._size()
        needed, free = size.bytes_for(int(origin["lv_size"])), int(origin["vg_free"])
        if needed > free:
            raise SnapmgrError(f"refusing to snapshot {self.origin_name}: the snapshot needs {human_size(needed)} "
                               f"(snapshot_size {size.text}) but volume group {self.vg} has {human_size(free)} free")

    def _check_pool(self, pool: dict) -> None:
        limit = self.opts["thin_pool_threshold"]
        for what, key in (("data", "data_percent"), ("metadata", "metadata_percent")):
            used = _pool_percent(self.vg, pool, key)
            if used > limit:
                raise SnapmgrError(
                    f"refusing to snapshot {self.origin_name}: thin pool {self.vg}/{pool['lv_name']} is "
                    f"{used:.1f}% full ({what}), above thin_pool_threshold {limit}%; a full pool stops "
                    f"every volume in it, so extend the pool or delete snapshots first")

    def _snapshot(self, row: dict) -> Snapshot | None:
        labels = row["lv_tags"].split(",")
        label = next((t[len(TAG_LABEL):] for t in labels if t.startswith(TAG_LABEL)), "")
        sid = SnapshotId.try_parse(f"{self.volume}@{label}")
        if sid is None:
            return None
        attr = row["lv_attr"]
        thin = _is_thin(row)
        invalid = None
        if attr[4] in INVALID_STATES:
            size = human_size(int(row["lv_size"]))
            invalid = f"overflowed: writes to {self.origin_name} filled its {size} of snapshot space"
        meta = {"lv": f"{row['vg_name']}/{row['lv_name']}", "kind": "thin" if thin else "thick",
                "active": attr[4] == "a", "origin": row["origin"],
                "use_percent": row["data_percent" if thin else "snap_percent"] or None}
        tags = frozenset(t[len(TAG_TAG):] for t in labels if t.startswith(TAG_TAG))
        return Snapshot(sid, Path("/dev", row["vg_name"], row["lv_name"]), tags, meta, invalid=invalid)


def _refuse_invalid(snapshot: Snapshot) -> None:
    if snapshot.invalid:
        raise SnapmgrError(f"{snapshot.id} is invalid ({snapshot.invalid}); it has no data to show")


def _is_thin(row: dict) -> bool:
    return row["segtype"] == "thin"


def _pool_percent(vg: str, pool: dict, key: str) -> float:
    """How full a thin pool is (`data_percent` or `metadata_percent`); an inactive pool
    reports nothing, and then how full it is cannot be told."""
    if not pool[key]:
        raise SnapmgrError(f"thin pool {vg}/{pool['lv_name']} reports no {key} (is it inactive? lvchange "
                           f"--activate y {vg}/{pool['lv_name']}), so its free space cannot be told")
    return float(pool[key])
