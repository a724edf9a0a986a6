"""Rolling an LVM volume back to one of its snapshots.

A thick origin takes the snapshot back with `lvconvert --merge`, which consumes the
snapshot. The merge starts at once only when neither LV is open, so the origin is
unmounted first (snapmgr.backends.remount); when it cannot be, LVM defers the merge to the
origin's next activation and still exits 0: what happened is read from LVM's report
afterwards, never from the exit status. While the merge runs, the kernel copies each
chunk it rewrites into every other snapshot of the origin first, the pre-rollback one
included: a snapshot whose store fills is invalidated, so a pre-rollback snapshot too
small to hold the merge is refused before anything changes.

A thin origin cannot be merged into without losing the snapshot: a merge always goes
into the snapshot's own origin and removes the snapshot (a snapshot of the snapshot would
merge into the snapshot, not the volume). Instead a thin snapshot of the target takes the
volume's name, which is what LVM's thin merge does inside, minus the deletion: the old
LV is renamed aside, the new one made under the volume's name, with the old one's tags
and autoactivation and without the activation-skip flag thin snapshots get (else it
would not come up at boot), and the old LV removed, the pre-rollback snapshot holding
what it held. Every snapshot survives: the backend finds them by their tags, never by
their origin, which now names a removed LV."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from snapmgr.backends import remount
from snapmgr.backends.base import RollbackWay
from snapmgr.backends.lvm_cli import lvm
from snapmgr.errors import RollbackRefused, SnapmgrError
from snapmgr.model import Snapshot, human_size

ASIDE = "_rb_"   # the old LV of a thin volume, renamed aside: <lv>_rb_<label of the target>
REPORT = "lv_name,lv_attr,lv_tags,origin,segtype,lv_merging,lv_autoactivation,lv_size,snap_percent"
OWN_TAGS = "snapmgr"   # the prefix of every tag the backend gives its snapshots
# The pre-rollback snapshot's store holds what the merge rewrites plus its own bookkeeping
# (16 bytes an exception, a header chunk): a margin well above that.
MARGIN_SHARE = 32
MARGIN = 1 << 20
MERGE_POLL = 1.0   # seconds between two looks at a merge started by an activation


@dataclass(frozen=True)
class Origin:
    """The volume's LV, and where its rollback writes down what it unmounted."""

    vg: str
    lv: str
    record: Path

    @property
    def name(self) -> str:
        return f"{self.vg}/{self.lv}"

    @property
    def device(self) -> Path:
        return Path("/dev", self.vg, self.lv)

    def aside(self, target: Snapshot) -> str:
        return f"{self.lv}{ASIDE}{target.id.label}"

    def deferred(self, snapshot_lv: str) -> str:
        return (f"merge pending: {snapshot_lv} is merged into {self.name} at its next activation (a reboot, or "
                f"unmount it and run lvchange --refresh {self.name}); until then it shows the volume as it was, and "
                f"what is written to it meanwhile is partly overwritten by the merge")


def everything(vg: str) -> dict[str, dict]:
    """Every LV of the VG by name, hidden ones too (a snapshot being merged is); binary
    flags as "1" / "0"."""
    out = lvm(["lvs", "-a", "--reportformat", "json", "--binary", "--units", "b", "--nosuffix", "-o", REPORT, vg],
              timeout=60).stdout
    return {r["lv_name"].strip("[]"): r for r in json.loads(out)["report"][0]["lv"]}


def way(origin: Origin, target: Snapshot, snapshots: list[Snapshot], rows: dict[str, dict], row: dict,
        room: int | None, live: Path | None, resuming: bool) -> RollbackWay:
    """`rows`: the VG's visible LVs by name; `row`: the volume's LV (renamed aside by a
    thin rollback cut short); `room`: the bytes a thick pre-rollback snapshot gets;
    `live`: where the volume is mounted; `resuming`: a rollback to `target` was cut short."""
    if target.invalid:
        raise SnapmgrError(f"{target.id} is invalid ({target.invalid}): there is nothing to roll back to")
    thin = row["segtype"] == "thin"
    if thin != (target.meta["kind"] == "thin"):
        raise SnapmgrError(f"{target.id} is a {target.meta['kind']} snapshot but {origin.name} is "
                           f"{'a thin' if thin else 'a thick'} LV: it cannot be rolled back to; nothing was changed")
    if thin:
        return _thin_way(origin, target, live)
    return _thick_way(origin, target, snapshots, rows, row["lv_attr"][0] == "O", room, live, resuming)


def _thick_way(origin: Origin, target: Snapshot, snapshots: list[Snapshot], rows: dict[str, dict], merging: bool,
               room: int, live: Path | None, resuming: bool) -> RollbackWay:
    takes_effect = "now" if live != Path("/") else f"at the next activation of {origin.name} (a reboot: it is /)"
    fates = {target.id: "consumed by the merge"}
    if resuming and (merging or _name(target) not in rows):   # hidden while it merges, gone once merged
        return RollbackWay(f"the merge of {target.meta['lv']} into {origin.name} that the rollback cut short began "
                           f"is finished, {origin.name} unmounted meanwhile: {target.id} is consumed by it",
                           takes_effect=takes_effect, fates=fates)
    if merging:
        raise SnapmgrError(f"{origin.name} has a merge pending already (an earlier rollback): it completes at its "
                           f"next activation (a reboot, or unmount it and run lvchange --refresh {origin.name}); "
                           f"nothing was changed")
    used = _used(rows[_name(target)])
    needed = used + used // MARGIN_SHARE + MARGIN
    if room < needed:
        raise SnapmgrError(f"the merge of {target.id} rewrites up to {human_size(used)} of {origin.name}, first "
                           f"copied into the pre-rollback snapshot, which snapshot_size makes {human_size(room)}: it "
                           f"would be invalidated; set snapshot_size to at least {human_size(needed)} for the "
                           f"rollback; nothing was changed")
    for s in snapshots:
        row = rows.get(_name(s))
        if s.id == target.id or s.invalid or row is None:
            continue
        if (free := int(row["lv_size"]) - _used(row)) < needed:
            fates[s.id] = (f"at risk: the merge copies up to {human_size(used)} into its snapshot space, which has "
                           f"{human_size(free)} free; it is invalidated if that fills")
    return RollbackWay(f"lvconvert --merge {target.meta['lv']} into {origin.name}, unmounted meanwhile: "
                       f"{target.id} is consumed by the merge (the pre-rollback snapshot undoes the rollback)",
                       takes_effect=takes_effect, fates=fates)


def _thin_way(origin: Origin, target: Snapshot, live: Path | None) -> RollbackWay:
    if live == Path("/"):
        raise SnapmgrError(f"{origin.name} is mounted at /: a thin LV is rolled back by putting a snapshot in its "
                           f"place, which is not built for a mounted root yet; nothing was changed")
    aside = f"{origin.vg}/{origin.aside(target)}"
    return RollbackWay(f"a thin snapshot of {target.meta['lv']} takes the place of {origin.name}, unmounted "
                       f"meanwhile (lvrename to {aside}, lvcreate --snapshot --setactivationskip n, lvremove "
                       f"{aside}): every snapshot is kept, {target.id} included, and the volume as it is now is in "
                       f"the pre-rollback snapshot; {origin.name} gets a new LV UUID")


def roll_back(origin: Origin, target: Snapshot, resuming: bool) -> str | None:
    if target.meta["kind"] == "thick":
        return _merge(origin, target, resuming)
    _swap(origin, target, resuming)
    return None


def pending(origin: Origin, snapshot_name: str) -> str | None:
    """What is left of a deferred merge of the snapshot LV `snapshot_name`, or None."""
    row = everything(origin.vg).get(snapshot_name)
    return origin.deferred(f"{origin.vg}/{snapshot_name}") if row and row["lv_merging"] == "1" else None


def interrupted(origin: Origin, rows: dict[str, dict]) -> str | None:
    """Why the volume's LV is missing, if a thin rollback cut short renamed it aside."""
    aside = next((name for name in rows if name.startswith(origin.lv + ASIDE)), None)
    if aside is None:
        return None
    return (f"logical volume {origin.name} does not exist: a rollback was cut short after renaming it to "
            f"{origin.vg}/{aside}; snapmgr rollback --resume finishes it (or lvrename {origin.vg}/{aside} "
            f"{origin.name} puts it back as it was)")


def _merge(origin: Origin, target: Snapshot, resuming: bool) -> str | None:
    name = _name(target)
    row = everything(origin.vg).get(name)
    if row is None:
        if not resuming:
            raise RollbackRefused(f"{target.meta['lv']} does not exist (any more); nothing was changed")
        remount.put_back(origin.device, origin.record)   # merged before the cut
        return None
    busy = remount.taken_off(origin.device, origin.record, resuming)
    if row["lv_merging"] != "1":
        # Returns when the merge is done, or at once when it is deferred (something holds an LV open).
        lvm(["lvconvert", "--merge", "--interval", "1", target.meta["lv"]], timeout=None)
    elif busy is None:
        # Flagged by a call cut short (or deferred): an activation starts it, now that nothing holds the origin.
        lvm(["lvchange", "--refresh", origin.name], timeout=300)
        _wait_merged(origin, name)
    remount.put_back(origin.device, origin.record)
    if name not in everything(origin.vg):
        return None
    return origin.deferred(target.meta["lv"]) + (f" ({busy})" if busy else "")


def _wait_merged(origin: Origin, name: str) -> None:
    """Until the merge the activation started is done (the snapshot is gone), or seen not
    to have started: a merging origin reports what is left to merge, a waiting one nothing."""
    while (rows := everything(origin.vg)).get(name) and rows[origin.lv]["snap_percent"]:
        time.sleep(MERGE_POLL)


def _swap(origin: Origin, target: Snapshot, resuming: bool) -> None:
    rows = everything(origin.vg)
    aside = origin.aside(target)
    live, old = rows.get(origin.lv), rows.get(aside)
    if live is not None and old is None:
        if resuming and live["origin"] == _name(target):
            remount.put_back(origin.device, origin.record)   # swapped before the cut
            return
        if busy := remount.taken_off(origin.device, origin.record, resuming):
            raise RollbackRefused(f"{busy}: stop what uses it and roll back again; nothing was changed but the "
                               f"pre-rollback snapshot")
        lvm(["lvrename", origin.name, f"{origin.vg}/{aside}"], timeout=120)
        live, old = None, live
    if live is None:
        if old is None:
            raise RollbackRefused(f"neither {origin.name} nor {origin.vg}/{aside} exists: make the volume again from "
                                  f"its pre-rollback snapshot by hand (lvcreate --snapshot --setactivationskip n "
                                  f"--name {origin.lv} {origin.vg}/SNAPSHOT)")
        try:
            lvm(_successor(origin, target, old), timeout=300)
        except SnapmgrError as e:
            lvm(["lvrename", f"{origin.vg}/{aside}", origin.name], timeout=120)
            remount.put_back(origin.device, origin.record)
            raise SnapmgrError(f"{e}; {origin.name} was put back as it was") from None
    if old["lv_autoactivation"] == "0":   # lvcreate cannot set it on a snapshot
        lvm(["lvchange", "--setautoactivation", "n", origin.name], timeout=120)
    lvm(["lvremove", "--yes", f"{origin.vg}/{aside}"], timeout=300)
    remount.put_back(origin.device, origin.record)


def _successor(origin: Origin, target: Snapshot, old: dict) -> list[str]:
    """The lvcreate that makes a thin snapshot of the target the volume's LV, with the
    old one's tags (snapmgr's own excepted: they would list it as a snapshot)."""
    argv = ["lvcreate", "--snapshot", "--setactivationskip", "n", "--activate", "y", "--name", origin.lv]
    for tag in old["lv_tags"].split(","):
        if tag and not tag.startswith(OWN_TAGS):
            argv += ["--addtag", tag]
    return argv + [target.meta["lv"]]


def _name(snapshot: Snapshot) -> str:
    return snapshot.meta["lv"].split("/", 1)[1]


def _used(row: dict) -> int:
    """The bytes of a thick snapshot's store in use."""
    return int(int(row["lv_size"]) * float(row["snap_percent"] or 0) / 100)
