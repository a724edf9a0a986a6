"""`snapmgr rollback`: put a volume back as one of its snapshots holds it, boringly.

First the plan (how, what the volume loses, what becomes of the newer snapshots, what
happens to the services), which a dry run stops at and a person confirms. Then, under the
volume's lock, with its services stopped for the whole of it (their restart guaranteed by
the watchdog): a protected pre-rollback snapshot of the volume as it is, which a rollback
to it undoes; the rollback itself; the services back; the volume compared with the
snapshot. Only rsync volumes roll back so far, by copying the snapshot back over the
source with deletion; the other backends' own ways come next."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from snapmgr import compare_jobs
from snapmgr.backends.base import Backend, RollbackWay
from snapmgr.config import Volume
from snapmgr.engine import Engine
from snapmgr.errors import Interrupted, SnapmgrError, UsageError, as_error
from snapmgr.model import Snapshot
from snapmgr.restore_job import own_places
from snapmgr.volume_paths import shown
from snapmgr.writers import users

SHOWN_PATHS = 5   # of each kind of loss, in the plan


@dataclass(frozen=True)
class Losses:
    """What the live volume has that the snapshot has not: the rollback takes it away."""

    added: int        # entries made since the snapshot: deleted
    removed: int      # entries deleted since: brought back
    changed: int      # entries changed since (a directory too): put back as they were
    shown: tuple[str, ...]   # some of them, "+ path", "- path", "~ path"


@dataclass(frozen=True)
class Plan:
    volume: str
    target: str
    method: str
    takes_effect: str
    losses: Losses
    newer: tuple[tuple[str, str], ...]   # each newer snapshot, and what becomes of it
    services: tuple[str, ...]            # what is done to each quiescer's service


@dataclass(frozen=True)
class RolledBack:
    plan: Plan
    dry_run: bool
    pre_rollback: str | None = None
    seconds: float | None = None
    check: str | None = None    # how the volume compares with the snapshot afterwards


def plan(engine: Engine, target_text: str, choice: str | None = None) -> tuple[Volume, Backend, Snapshot,
                                                                          RollbackWay, Plan]:
    volume, backend, target = engine.snapshot_of(target_text)
    if choice is not None and choice not in backend.rollback_choices:
        raise UsageError(f"--{choice} is for volumes whose rollback would otherwise lose newer snapshots (ZFS); "
                         f"a rollback of {volume.backend} volume {volume.name} keeps them anyway")
    if backend.live_root() is None:
        raise SnapmgrError(f"volume {volume.name} is not mounted now: there is nothing to roll back")
    snapshots = sorted(backend.list(), key=lambda s: s.id)
    way = backend.rollback_way(target, snapshots, choice)
    newer = tuple((str(s.id), way.fates.get(s.id, "kept")) for s in snapshots if s.id > target.id)
    return volume, backend, target, way, Plan(
        volume.name, str(target.id), way.method, way.takes_effect, _losses(engine, target), newer,
        tuple(engine.rollback_quiescers(volume)))


def rollback(engine: Engine, target_text: str, dry_run: bool, confirm: Callable[[Plan], bool],
             choice: str | None = None) -> RolledBack:
    """The plan, and unless `dry_run` and once `confirm(plan)` says yes, the rollback."""
    volume, backend, target, way, planned = plan(engine, target_text, choice)
    if dry_run:
        return RolledBack(planned, True)
    if not confirm(planned):
        raise UsageError("not confirmed: nothing was changed")
    started = time.monotonic()
    live = backend.live_root()
    with engine.locked(volume), engine.journal.run(volume.name, "rollback", os.getpid()):
        def roll_back() -> tuple[str, str]:
            if still := users([live, *backend.own_mounts()]).writers:
                raise SnapmgrError(f"{live} is still written by " + ", ".join(f"{name} (pid {pid})" for pid, name in
                                                                               sorted(still.items()))
                                   + f" with the services stopped: stop it first (a systemd quiescer of volume "
                                     f"{volume.name} that names its unit does it for every rollback); nothing "
                                     f"was changed")
            pre_rollback = engine.pre_rollback(volume, quiesce=False)
            try:
                backend.roll_back(target, way, own_places(engine), resuming=False)
            except (SnapmgrError, KeyboardInterrupt) as e:
                # Raised inside the journal's run, so the journal keeps this line too; a
                # stop (Ctrl-C, SIGTERM) stays one, for its exit code.
                told = (f"{e or 'interrupted'}; the rollback was cut short and the volume may be part way: as it "
                        f"was before, it is in {pre_rollback} (snapmgr rollback {pre_rollback} puts it back)")
                raise (SnapmgrError if isinstance(e, SnapmgrError) and not isinstance(e, Interrupted)
                       else Interrupted)(told) from None
            return pre_rollback, _compared(engine, target)   # before the services write again
        pre_rollback, check = engine.held_for_rollback(volume, roll_back)
    return RolledBack(planned, False, pre_rollback, round(time.monotonic() - started, 3), check)


def _compared(engine: Engine, target: Snapshot) -> str:
    """How the volume compares with the snapshot, by size and mtime as the copy went (the
    services wait for it; `snapmgr diff` reads the files): what a finished rollback says,
    whatever stops the comparison."""
    try:
        after = compare_jobs.diff(engine, str(target.id), compare_jobs.LIVE, quick=True)
    except (Exception, KeyboardInterrupt) as e:
        return f"the volume was not compared with {target.id} ({as_error(e) if isinstance(e, Exception) else 'interrupted'})"
    if not after.changes:
        return f"the volume matches {target.id} by size and mtime (snapmgr diff {target.id} live reads the files)"
    return f"the volume differs from {target.id} in {len(after.changes)} entries (snapmgr diff {target.id} live)"


def _losses(engine: Engine, target: Snapshot) -> Losses:
    changes = compare_jobs.diff(engine, str(target.id), compare_jobs.LIVE, quick=True).changes
    count = {status: sum(1 for c in changes if c.status == status) for status in ("added", "removed", "changed")}
    marks = {"added": "+", "removed": "-", "changed": "~"}
    listed = tuple(f"{marks[c.status]} {shown(c.path)}" for c in changes[:SHOWN_PATHS])
    return Losses(count["added"], count["removed"], count["changed"], listed)
