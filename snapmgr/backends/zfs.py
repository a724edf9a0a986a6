"""ZFS: snapshots through libzfs_core (Debian's python3-pyzfs).

One snapmgr snapshot is one `lzc_snapshot` call over every dataset of the volume (and,
with `recursive`, every dataset below them): ZFS takes them all in one transaction group
or none. snapmgr's metadata goes into user properties of the same call, so no snapshot is
ever seen without them. libzfs_core cannot list, so listing reads `zfs list`.

A snapshot without snapmgr's properties was made by someone else (sanoid, an admin): it
is listed as foreign and never touched."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from snapmgr import schema, sh
from snapmgr.backends.base import Backend, Progress
from snapmgr.errors import SnapmgrError, quote
from snapmgr.model import ForeignSnapshot, Snapshot, SnapshotId

log = logging.getLogger(__name__)

PREFIX = "snapmgr-"             # ZFS snapshot names: <dataset>@snapmgr-<id label>
PROP_VOLUME = "snapmgr:volume"
PROP_ID = "snapmgr:id"
PROP_TAGS = "snapmgr:tags"
UNSET = "-"                     # how `zfs list` shows a property that is not set
DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*(/[A-Za-z0-9_.:-]+)*")
INSTALL_HINT = "install Debian's python3-pyzfs (contrib): apt install python3-pyzfs"


def dataset(value: Any) -> str:
    text = schema.string(value)
    if not DATASET_RE.fullmatch(text):
        raise ValueError(f"{quote(text)} is not a ZFS dataset name (e.g. tank/data)")
    return text


def _lzc():
    """libzfs_core, imported when first needed so that the other backends work without it."""
    try:
        import libzfs_core
    except ImportError:
        raise SnapmgrError(f"the zfs backend needs the libzfs_core Python bindings: {INSTALL_HINT}") from None
    return libzfs_core


def _zfs_error(action: str, e: Exception) -> SnapmgrError:
    details = [str(err) for err in getattr(e, "errors", ())] or [str(e)]
    return SnapmgrError(f"{action}: {'; '.join(details)}")


class ZfsBackend(Backend):
    name = "zfs"
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
        lzc = _lzc()
        names = self._snapshot_names(snapshot_id)
        props = {PROP_VOLUME: self.volume, PROP_ID: str(snapshot_id), PROP_TAGS: ",".join(sorted(tags))}
        try:
            lzc.lzc_snapshot([n.encode() for n in names], {k.encode(): v.encode() for k, v in props.items()})
        except lzc.exceptions.ZFSError as e:
            raise _zfs_error(f"zfs snapshot of {', '.join(names)} failed", e) from None
        return Snapshot(snapshot_id, Path(names[0]), tags, {"snapshots": names})

    def list(self) -> list[Snapshot]:
        ours: dict[str, list[str]] = {}
        tags: dict[str, str] = {}
        for name, _, volume, sid, labels in self._rows():
            if volume == self.volume:
                ours.setdefault(sid, []).append(name)
                tags[sid] = labels
        snapshots = []
        for text, names in ours.items():
            sid = SnapshotId.try_parse(text)
            if sid is None:
                log.warning("%s: snapmgr:id '%s' is not a snapshot id; leaving it alone", names[0], text)
                continue
            expected = [f"{d}@{PREFIX}{sid.label}" for d in self.datasets]
            missing = [n for n in expected if n not in names]
            invalid = f"incomplete: {', '.join(missing)} no longer exist(s)" if missing else None
            snapshots.append(Snapshot(sid, Path(expected[0]), frozenset(filter(None, tags[text].split(","))),
                                      {"snapshots": sorted(names)}, invalid=invalid))
        return snapshots

    def foreign(self) -> list[ForeignSnapshot]:
        return [ForeignSnapshot(self.volume, name, _from_epoch(created))
                for name, created, volume, _, _ in self._rows() if volume == UNSET]

    def delete(self, snapshot: Snapshot) -> None:
        lzc = _lzc()
        names = snapshot.meta["snapshots"]
        try:
            lzc.lzc_destroy_snaps([n.encode() for n in names], defer=False)
        except lzc.exceptions.ZFSError as e:
            raise _zfs_error(f"zfs destroy of {', '.join(names)} failed", e) from None

    @contextmanager
    def browse_root(self, snapshot: Snapshot) -> Iterator[Path]:
        first = self.datasets[0]
        mountpoint = sh.run(["zfs", "get", "-H", "-o", "value", "mountpoint", first], timeout=60).stdout.strip()
        if not mountpoint.startswith("/"):
            raise SnapmgrError(f"{first} has mountpoint={mountpoint}: its snapshots have no .zfs directory to browse")
        # ZFS mounts the snapshot on first access and unmounts it when idle by itself.
        yield Path(mountpoint, ".zfs", "snapshot", PREFIX + snapshot.id.label)

    # Helpers ------------------------------------------------------------------------

    def _snapshot_names(self, snapshot_id: SnapshotId) -> list[str]:
        targets = self.datasets
        if self.opts["recursive"]:
            out = sh.run(["zfs", "list", "-H", "-o", "name", "-t", "filesystem,volume", "-r", *self.datasets],
                         timeout=60).stdout
            targets = list(dict.fromkeys(out.split()))
        return [f"{t}@{PREFIX}{snapshot_id.label}" for t in targets]

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        """(name, creation, snapmgr:volume, snapmgr:id, snapmgr:tags) of every snapshot of
        the volume's datasets (and those below them, if recursive)."""
        depth = [] if self.opts["recursive"] else ["-d", "1"]
        out = sh.run(["zfs", "list", "-H", "-p", "-t", "snapshot", "-o",
                      f"name,creation,{PROP_VOLUME},{PROP_ID},{PROP_TAGS}", "-r", *depth, *self.datasets],
                     timeout=120).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]


def _from_epoch(seconds: str) -> datetime:
    return datetime.fromtimestamp(int(seconds), timezone.utc)
