"""Where a snapshot's manifest lives: `<id>.manifest.gz` beside its record
(Backend.records_dir: beside the snapshots for rsync and btrfs, under the state
directory for LVM and ZFS)."""

from __future__ import annotations

import contextlib
import glob
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from snapmgr.errors import quote
from snapmgr.manifest import fileformat
from snapmgr.manifest.entry import Entry
from snapmgr.manifest.fileformat import ManifestDamaged
from snapmgr.model import SnapshotId

SUFFIX = ".manifest.gz"


def manifest_path(records_dir: Path, snapshot_id: SnapshotId | str) -> Path:
    return records_dir / f"{snapshot_id}{SUFFIX}"


class Manifest:
    """A stored manifest, read on demand: entries() streams it, lookup() indexes it once."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.algorithm: str = header.get("algorithm")
        self.snapshot: str | None = header.get("snapshot")
        self.created: str | None = header.get("created")
        self._index: dict[bytes, Entry] | None = None

    def entries(self) -> Iterator[Entry]:
        with _reading(self.path) as f:
            fileformat.read_header(f, self.path)
            yield from fileformat.read_entries(f, self.path)

    def lookup(self, path: bytes) -> Entry | None:
        if self._index is None:
            self._index = {e.path: e for e in self.entries()}
        return self._index.get(path)


def load(records_dir: Path, snapshot_id: SnapshotId | str) -> Manifest | None:
    """The snapshot's manifest, None when it has none; ManifestDamaged when it cannot be read."""
    path = manifest_path(records_dir, snapshot_id)
    try:
        with _reading(path) as f:
            return Manifest(path, fileformat.read_header(f, path))
    except FileNotFoundError:
        return None


def save(records_dir: Path, snapshot_id: SnapshotId | str, algorithm: str, entries: Iterable[Entry]) -> int:
    """Write the manifest; the number of entries. The caller holds the volume's lock, so a
    temporary file of the volume's found here was left by a killed run: removed."""
    records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    volume = str(snapshot_id).split("@", 1)[0]
    for leftover in records_dir.glob(f"{glob.escape(volume)}@*{SUFFIX}.tmp"):
        leftover.unlink(missing_ok=True)
    header = {"algorithm": algorithm, "snapshot": str(snapshot_id),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return fileformat.write(manifest_path(records_dir, snapshot_id), header, entries)


def delete(records_dir: Path, snapshot_id: SnapshotId | str) -> None:
    manifest_path(records_dir, snapshot_id).unlink(missing_ok=True)


@contextlib.contextmanager
def _reading(path: Path):
    """The file opened for reading; gzip's errors (a damaged or truncated file) as
    ManifestDamaged. FileNotFoundError passes through."""
    try:
        with fileformat.opened(path) as f:
            yield f
    except (EOFError, zlib.error) as e:
        raise ManifestDamaged(f"manifest {quote(path)} is damaged: {e}") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ManifestDamaged(f"manifest {quote(path)} cannot be read: {e.strerror or e}") from None
