"""Per-snapshot records: what a snapshot's identity does not say (its consistency grade,
its quiesce and freeze windows, its group, what each quiescer kept: a PostgreSQL
backup_label, a binlog position).

One file per snapshot, `<id>.record.json`, written after the window has closed: beside
the snapshots for the directory backends, so a repository carries its own, and under the
state directory for LVM and ZFS (Backend.records_dir). A snapshot whose record is
missing (taken by an older snapmgr, or cut off by a crash between the snapshot and its
record) shows its grade as unknown."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from snapmgr.errors import SnapmgrError, as_error
from snapmgr.model import SnapshotId

log = logging.getLogger(__name__)
SUFFIX = ".record.json"


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` whole or not at all: a temporary file, synced, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


class Records:
    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, snapshot_id: SnapshotId) -> Path:
        return self.directory / f"{snapshot_id}{SUFFIX}"

    def write(self, snapshot_id: SnapshotId, record: dict) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json(self.path(snapshot_id), record)

    def write_taken(self, snapshot_id: SnapshotId, record: dict) -> SnapmgrError | None:
        """Write the record of a snapshot just taken; what its volume reports if it cannot
        be (the snapshot exists all the same)."""
        try:
            self.write(snapshot_id, record)
        except OSError as e:
            return SnapmgrError(f"{snapshot_id} was taken, but its record could not be written: {as_error(e)}")
        return None

    def read(self, snapshot_id: SnapshotId) -> dict | None:
        try:
            record = json.loads(self.path(snapshot_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: record unreadable (%s)", snapshot_id, e)
            return None
        return record if isinstance(record, dict) else None

    def delete(self, snapshot_id: SnapshotId) -> None:
        self.path(snapshot_id).unlink(missing_ok=True)
