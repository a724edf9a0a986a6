"""What listing a volume's snapshots showed, as the journal keeps it between runs.

Listing snapshots needs what only root has (lvs, a repository of mode 0700, the records
under the state directory), but a monitoring user may read the journal. So every run
that changes a volume's state records what the snapshots look like afterwards, and a
reader who cannot list reads that instead, stated with its time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from snapmgr.backends.base import Space
from snapmgr.model import Snapshot, SnapshotId

# What of a snapshot's record the status of its volume uses.
RECORD_KEYS = ("grade", "degraded", "quiesce_window_s", "freeze_window_s")


@dataclass(frozen=True)
class Listing:
    """A volume's snapshots (None when they could not be listed, `problem` says why)
    and its space, as listed now (`at` None) or by a run at `at`."""

    snapshots: list[Snapshot] | None
    problem: str | None = None
    space: Space | None = None
    at: datetime | None = None
    space_problem: str | None = None  # why the space figures could not be read


def dump(listing: Listing) -> dict:
    space = listing.space
    return {"snapshots": None if listing.snapshots is None else [
                {"id": str(s.id), "invalid": s.invalid,
                 "record": {k: v for k, v in (s.record or {}).items() if k in RECORD_KEYS}}
                for s in listing.snapshots],
            "problem": listing.problem,
            "space": space and {"where": space.where, "size": space.size, "free": space.free, "held": space.held}}


def load(text: str, at: datetime) -> Listing:
    """The listing a run recorded at `at`; one that cannot be read says so as its
    problem. Its snapshots have no path: a reader of it cannot enter them anyway."""
    try:
        data = json.loads(text)
        snapshots, space = data["snapshots"], data["space"]
        return Listing(None if snapshots is None else [
                           Snapshot(SnapshotId.parse(s["id"]), Path(), invalid=s["invalid"], record=s["record"])
                           for s in snapshots],
                       data["problem"], space and Space(**space), at)
    except (ValueError, TypeError, KeyError) as e:
        return Listing(None, f"what the run at {at:%Y-%m-%d %H:%M:%S} UTC recorded of its snapshots cannot be read "
                             f"({type(e).__name__}: {e})")
