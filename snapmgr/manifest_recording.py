"""A snapshot's manifest, recorded once the snapshot is taken: read from the snapshot
itself, taking the hashes of files not written since from the newest older snapshot's
manifest, and what that took (or why the snapshot stays unverified) kept in the
snapshot's record, which is also what tells later why a snapshot has no manifest.

Outside the manifest package: it reads snapshots through their backend and writes their
records, which that package knows nothing of."""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Sequence

from snapmgr import manifest
from snapmgr.backends.base import Backend
from snapmgr.errors import Interrupted, SnapmgrError, as_error
from snapmgr.model import Snapshot, SnapshotId
from snapmgr.records import Records

log = logging.getLogger(__name__)
OFF = {"unverified": 'manifests are off for this volume (manifest = "off")'}


@dataclass(frozen=True)
class Taken:
    """A snapshot just taken, and where its manifest and record go."""

    snapshot: Snapshot
    backend: Backend
    records: Records
    algorithm: str     # the volume's `manifest`: blake3, sha256 or off
    record: dict       # the snapshot's record, whose "manifest" entry is filled in here


def pending(algorithm: str) -> dict:
    """What a snapshot's record says of its manifest until it is written, in case snapmgr
    is stopped first."""
    return OFF if algorithm == "off" else {"unverified": "its run was stopped before its manifest was written"}


def record_all(taken: Sequence[Taken]) -> list[SnapmgrError | None]:
    """Write each snapshot's manifest and say in its record how that went; for each, why
    its record could not be written, if it could not. Stopped (SIGTERM, Ctrl-C): the
    records of this one and of those not reached say so."""
    errors: list[SnapmgrError | None] = []
    for i, t in enumerate(taken):
        try:
            t.record["manifest"] = _write(t)
        except Interrupted:
            for later in taken[i:]:
                later.record["manifest"] = {"unverified": "interrupted before its manifest was complete"}
                with suppress(OSError):  # the record of the snapshot itself is written already
                    later.records.write(later.snapshot.id, later.record)
            raise
        errors.append(t.records.write_taken(t.snapshot.id, t.record))
    return errors


def was_written(record: dict | None) -> bool:
    """Whether the record says a manifest was written (so one missing now was lost)."""
    return "algorithm" in ((record or {}).get("manifest") or {})


def why_none(record: dict | None) -> str:
    """Why a snapshot with this record has no manifest to read."""
    state = (record or {}).get("manifest")
    if state is None:
        return ("it has no manifest: it was taken before snapmgr recorded manifests, or its run "
                "was stopped before the manifest was written")
    return state.get("unverified") or "its manifest file is missing (deleted by hand?)"


def _write(t: Taken) -> dict:
    """Write the snapshot's manifest, read from the snapshot itself; for its record, what
    that took, or why the snapshot is unverified."""
    if t.algorithm == "off":
        return OFF
    snapshot, backend = t.snapshot, t.backend
    previous = _previous(t)
    stats = manifest.ScanStats()
    started = time.monotonic()
    try:
        with backend.browse_root(snapshot) as root:
            try:
                manifest.save(t.records.directory, snapshot.id, t.algorithm, manifest.stream(
                    root, t.algorithm, previous.entries() if previous else None,
                    shares_inodes=backend.shares_inodes, stats=stats,
                    previous_taken=previous and SnapshotId.parse(previous.snapshot).created.timestamp()))
            except manifest.ManifestDamaged as e:  # the previous one, found damaged past its first line
                log.warning("%s: %s; hashing every file", snapshot.id, e)
                previous, stats = None, manifest.ScanStats()
                manifest.save(t.records.directory, snapshot.id, t.algorithm,
                              manifest.stream(root, t.algorithm, stats=stats))
    except Interrupted:
        raise
    except (SnapmgrError, OSError) as e:
        log.debug("manifest of %s failed", snapshot.id, exc_info=True)
        reason = f"its manifest could not be written: {as_error(e)}"
        log.warning("%s is unverified: %s", snapshot.id, reason)
        return {"unverified": reason}
    return {"algorithm": t.algorithm, "previous": previous.snapshot if previous else None,
            **stats.as_record(), "seconds": round(time.monotonic() - started, 3)}  # the file written too


def _previous(t: Taken) -> manifest.Manifest | None:
    """The manifest of the newest older snapshot that still exists (so that, where
    snapshots share inodes, its inode numbers are still its files') and has one."""
    for older in sorted((s for s in t.backend.list() if s.id < t.snapshot.id), key=lambda s: s.id, reverse=True):
        try:
            found = manifest.load(t.records.directory, older.id)
        except manifest.ManifestDamaged as e:
            log.warning("%s: %s; not reused", older.id, e)
            continue
        if found is not None and found.algorithm == t.algorithm:
            return found
    return None
