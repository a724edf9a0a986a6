"""`snapmgr rollback`: put a volume back as one of its snapshots holds it, boringly.

First the plan (how, what the volume loses, what becomes of the newer snapshots, what
happens to the services), which a dry run stops at and a person confirms. Then, under the
volume's lock, with its services stopped for the whole of it (their restart guaranteed by
the watchdog): a protected pre-rollback snapshot of the volume as it is, which a rollback
to it undoes; the rollback itself, each backend its own way (Backend.roll_back); the
services back; the volume compared with the snapshot.

Each step is kept in the journal's rollbacks: a rollback cut short (killed, stopped,
failed part way) leaves the volume part way, which every later run tells of (the check
is critical) until `rollback --resume` finishes it or a rollback to the pre-rollback
snapshot undoes it. The watchdog still starts the services again meanwhile: nothing is
ever left stopped, and the snapshots hold both states whole."""

from __future__ import annotations

import logging
import os
import stat
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from snapmgr import compare_jobs
from snapmgr.backends import rsync_filters
from snapmgr.backends.base import Backend, RollbackWay
from snapmgr.backends.changes import Held, Listing, held, held_now
from snapmgr.config import Volume
from snapmgr.engine import Engine
from snapmgr.errors import Interrupted, RollbackRefused, SnapmgrError, UsageError, as_error, quote
from snapmgr.journal import UNFINISHED, RollbackRecord, Run
from snapmgr.manifest import Change
from snapmgr.model import Snapshot, SnapshotId, stamp
from snapmgr.quiesce.window import WindowOverrun
from snapmgr.restore_job import own_places
from snapmgr.volume_paths import children, joined, shown, under
from snapmgr.writers import users

log = logging.getLogger(__name__)
SHOWN_PATHS = 5   # of each kind of loss, in the plan
# How long the services wait once the volume's ctimes are listed, so that whatever they
# change gets another ctime than the one listed: the kernel stamps ctimes from a clock
# that moves once a tick (every 10 ms at HZ=100).
CLOCK_LAG_S = 0.02

# Of the properties a comparison finds differing, those a listing holds, by its field.
AS_LISTED = {"type": "kind", "mode": "mode", "owner": "uid", "group": "gid", "size": "size", "mtime": "mtime_ns"}

Checked = tuple[str | None, bool | None]   # how the volume compares with the target, whether they match


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
    losses: Losses | None                # None: not told (the volume is not mounted)
    newer: tuple[tuple[str, str], ...]   # each newer snapshot, and what becomes of it
    services: tuple[str, ...]            # what is done to each quiescer's service
    others: tuple[tuple[str, str], ...] = ()   # the target and older snapshots the rollback affects, and how
    resumes: str | None = None           # the rollback cut short that this one finishes, for people


@dataclass(frozen=True)
class RolledBack:
    plan: Plan
    dry_run: bool
    pre_rollback: str | None = None
    seconds: float | None = None
    check: str | None = None    # how the volume compares with the snapshot afterwards
    matches: bool | None = None  # whether it matched (None: not compared)
    pending: str | None = None  # what is still to happen, and when (a merge at the next activation)
    before_resume: str | None = None   # a resume's own pre-rollback snapshot: the volume as the cut left it


@dataclass(frozen=True)
class _Planned:
    volume: Volume
    backend: Backend
    target: Snapshot
    way: RollbackWay
    plan: Plan

    def same_as(self, other: _Planned) -> bool:
        """Whether `other`, planned later, does what this one told (its losses aside)."""
        return (self.target.id, self.way, self.plan.newer, self.plan.others, self.plan.services) == \
            (other.target.id, other.way, other.plan.newer, other.plan.others, other.plan.services)


def plan(engine: Engine, target_text: str, choice: str | None = None, resuming: RollbackRecord | None = None,
         losses: bool = True) -> _Planned:
    volume, backend, target = _target(engine, target_text, resuming is not None)
    if choice is not None and choice not in backend.rollback_choices:
        raise UsageError(f"--{choice} is for volumes whose rollback would otherwise lose newer snapshots (ZFS); "
                         f"a rollback of {volume.backend} volume {volume.name} keeps them anyway")
    mounted = backend.live_root() is not None
    if not mounted and resuming is None:   # a rollback cut short may have left it unmounted, or gone (LVM thin)
        raise SnapmgrError(f"volume {volume.name} is not mounted now: there is nothing to roll back")
    # A resumed rollback's own pre-rollback snapshot is not one whose fate it decides.
    snapshots = sorted((s for s in backend.list() if not (resuming and str(s.id) == resuming.pre_rollback)),
                       key=lambda s: s.id)
    way = backend.rollback_way(target, snapshots, choice, resuming=resuming is not None)
    newer = tuple((str(s.id), way.fates.get(s.id, "kept")) for s in snapshots if s.id > target.id)
    others = tuple((str(sid), fate) for sid, fate in sorted(way.fates.items()) if sid <= target.id)
    resumes = None if resuming is None else (
        f"it finishes the rollback to {resuming.target} begun at {stamp(resuming.started)}, which was cut short"
        + (f" ({resuming.detail})" if resuming.detail else "") + f"; {resuming.pre_rollback} holds the volume as "
        f"it was before that one")
    return _Planned(volume, backend, target, way, Plan(
        volume.name, str(target.id), way.method, way.takes_effect,
        _losses(engine, target) if losses and mounted else None, newer,
        tuple(engine.rollback_quiescers(volume)), others, resumes))


def _target(engine: Engine, text: str, resuming: bool) -> tuple[Volume, Backend, Snapshot]:
    """The snapshot to roll back to; for a resume, one the rollback cut short began to
    consume (and so no longer listed) too."""
    if resuming:
        sid = SnapshotId.parse(text)
        [volume] = engine.volumes([sid.volume])
        backend = engine.backend(volume)
        if (consumed := backend.consumed(sid)) is not None:
            return volume, backend, consumed
    return engine.snapshot_of(text)


def rollback(engine: Engine, target_text: str, dry_run: bool, confirm: Callable[[Plan], bool],
             choice: str | None = None) -> RolledBack:
    """The plan, and unless `dry_run` and once `confirm(plan)` says yes, the rollback."""
    planned = plan(engine, target_text, choice)
    if dry_run:
        return RolledBack(planned.plan, True)
    if not confirm(planned.plan):
        raise UsageError("not confirmed: nothing was changed")
    started = time.monotonic()
    volume = planned.volume
    with engine.locked(volume), engine.journal.run(volume.name, "rollback", os.getpid()) as run:
        _check_unchanged(planned, plan(engine, target_text, choice, losses=False))
        record = engine.journal.rollback_begun(run, volume.name, planned.plan.target, planned.way.method, choice)
        if record is None:
            raise SnapmgrError(f"the journal cannot record the rollback ({engine.journal.failure}), and a rollback "
                               f"cut short could not be resumed without it; nothing was changed")
        return _carried_out(engine, planned, run, record, None, started)


def resume(engine: Engine, volume_name: str, dry_run: bool, confirm: Callable[[Plan], bool]) -> RolledBack:
    """Finish the volume's rollback that was cut short (killed, stopped, failed part way):
    the same steps again, with its services stopped."""
    [volume] = engine.volumes([volume_name])
    record = _cut_short(engine, volume.name)
    planned = plan(engine, record.target, record.choice, record)
    if dry_run:
        return RolledBack(planned.plan, True)
    if not confirm(planned.plan):
        raise UsageError("not confirmed: nothing was changed")
    started = time.monotonic()
    with engine.locked(volume), engine.journal.run(volume.name, "rollback", os.getpid()) as run:
        now = _cut_short(engine, volume.name)
        if now.id != record.id:
            raise SnapmgrError(f"the rollbacks of volume {volume.name} changed since the plan was shown; nothing "
                               f"was changed: run it again")
        _check_unchanged(planned, plan(engine, record.target, record.choice, record, losses=False))
        return _carried_out(engine, planned, run, record.id, record, started)


def _cut_short(engine: Engine, volume: str) -> RollbackRecord:
    record = engine.journal.last_rollback(volume, UNFINISHED)
    if record is None or record.pre_rollback is None:
        raise UsageError(f"volume {volume} has no rollback cut short to resume")
    return record


def _check_unchanged(shown: _Planned, now: _Planned) -> None:
    # The plan was made before the lock: a snapshot taken or pruned meanwhile by another
    # run would make this another rollback than the one confirmed.
    if not shown.same_as(now):
        raise SnapmgrError(f"volume {shown.volume.name} changed while the plan was shown (another run took or "
                           f"deleted a snapshot); nothing was changed: run it again to see the plan as it is now")


def _carried_out(engine: Engine, planned: _Planned, run: Run, record: int, resuming: RollbackRecord | None,
                 started: float) -> RolledBack:
    """The rollback, with the services stopped for the whole of it: the pre-rollback
    snapshot and the backend's part, each step kept in the journal so that a rollback cut
    short can be resumed and is told of until it is; then, the services running again
    where what they write can be told from what the rollback wrote (changes.held_now),
    the comparison. A resume takes a pre-rollback snapshot too (what the services wrote since
    the cut is in no other), and the rollback keeps the one taken before it began."""
    volume, backend, target = planned.volume, planned.backend, planned.target
    live = backend.live_root()
    journal = engine.journal
    under_way = False
    # What a rollback that changed nothing leaves the record at: a resume's, as it was.
    unchanged = "cut-short" if resuming else "refused"

    def roll_back(grade: str) -> tuple[str, str | None, str | None, Callable[[], Checked]]:
        nonlocal under_way
        if live is not None and (still := users([live, *backend.own_mounts()]).writers):
            raise SnapmgrError(f"{quote(live)} is still written by " + ", ".join(
                f"{quote(name)} (pid {pid})" for pid, name in sorted(still.items()))
                + f" with the services stopped: stop it first (a systemd quiescer of volume {volume.name} that "
                  f"names its unit does it for every rollback); nothing was changed")
        current = take_pre_rollback(grade) if take_pre_rollback else None
        taken = current and str(current.id)
        pre = resuming.pre_rollback if resuming else taken
        if not journal.rollback_moved(record, "rolling-back", run=run, pre_rollback=pre):
            raise SnapmgrError(f"the journal cannot record that the rollback is under way ({journal.failure}), and a "
                               f"rollback cut short could not be resumed without it; nothing was changed but the "
                               f"pre-rollback snapshot {taken}")
        under_way = True
        try:
            left = backend.roll_back(target, planned.way, own_places(engine), resuming is not None, current)
        except RollbackRefused as e:
            journal.rollback_moved(record, unchanged, None if resuming else str(e))
            raise SnapmgrError(str(e)) from None
        except (SnapmgrError, OSError, KeyboardInterrupt) as e:
            cause = str(as_error(e)) if isinstance(e, Exception) else "interrupted"
            journal.rollback_moved(record, "cut-short", cause)
            # Raised inside the journal's run, so the journal keeps this line too; a
            # stop (Ctrl-C, SIGTERM) stays one, for its exit code.
            told = (f"{cause}; the rollback was cut short and the volume may be part way: snapmgr rollback --resume "
                    f"{volume.name} finishes it, snapmgr rollback {pre} puts the volume back as it was")
            raise (SnapmgrError if isinstance(e, Exception) and not isinstance(e, Interrupted)
                   else Interrupted)(told) from None
        # Done as soon as the volume is the target: a service that does not start again
        # after it is another matter (held_for_rollback says so).
        journal.rollback_moved(record, "pending" if left else "done", left,
                               seconds=round(time.monotonic() - started, 3))
        return pre, taken, left, _check_way(engine, planned, left, resuming is not None)

    try:
        # A volume a rollback cut short left unmounted (or without its LV) has nothing new to keep.
        with engine.pre_rollback_staged(volume) if live is not None or not resuming else nullcontext() \
                as take_pre_rollback:
            pre, taken, left, checked = engine.held_for_rollback(volume, roll_back)
    except BaseException as e:
        if not under_way and not resuming:
            journal.rollback_moved(record, "refused", str(e) or type(e).__name__)
        raise
    # The volume is in place again: what a window cut short still holds back starts now.
    for line in engine.resume_held(volume):
        log.warning("%s", line)
    if resuming and pre:   # its run was stopped before it could write it
        engine.manifest_if_missing(volume, pre)
    return RolledBack(planned.plan, False, pre, round(time.monotonic() - started, 3), *checked(), left,
                      taken if resuming else None)


def _check_way(engine: Engine, planned: _Planned, left: str | None, resuming: bool) -> Callable[[], Checked]:
    """Inside the rollback's window, once the volume is the target: what compares it with
    the target, now, or once the services run again where what they change then can be
    told apart (changes.held_now), so that they wait for the copy alone."""
    target, backend = planned.target, planned.backend
    consumed = planned.way.fates.get(target.id)
    if left:
        return lambda: (None, None)
    if consumed is not None:
        return lambda: (f"{target.id} is {consumed}, so the volume was not compared with it", None)
    live, listed = backend.live_root(), None
    if planned.plan.services and live is not None:   # else nothing waits for the check
        try:
            listed = held_now(live, backend.own_mounts(), [place for place, _ in own_places(engine)])
            if listed is not None:
                time.sleep(CLOCK_LAG_S)
        except (Interrupted, KeyboardInterrupt) as e:
            raise _check_stopped(e, target) from None
        except WindowOverrun as e:   # the services are due to start: no walk of the volume now
            return lambda: (f"the volume was not compared with {target.id} ({e})", None)
        except (SnapmgrError, OSError):
            log.debug("the volume could not be listed: compared before the services start", exc_info=True)
            listed = None
    if listed is None:
        found = _compared(engine, backend, target, resuming)
        return lambda: found
    return lambda: _compared(engine, backend, target, resuming, listed)


def _compared(engine: Engine, backend: Backend, target: Snapshot, resuming: bool,
              listed: Listing | None = None) -> Checked:
    """How the volume compares with the snapshot: every entry by its metadata, and by
    content every file written since the snapshot was taken, which holds whatever the
    rollback copied (against the snapshot's manifest where it has one); whether they
    match (None: not compared, or not judged: a resume may find what the services wrote
    after the cut, which the rollback had already put in place). `listed`: the services
    run again, and these were the volume's entries when they started: what they changed
    since is left out (_as_listed)."""
    # A clock set back since the snapshot was taken would hide what was written since.
    written_only = target.created.timestamp() <= time.time()
    try:
        after = compare_jobs.diff(engine, str(target.id), compare_jobs.LIVE, written_only=written_only,
                                  live_moving=listed is not None)
        root = _live_real(backend)
        changes, apart = _apart(root, backend, after.changes, own_places(engine))
        changes, by_services = _as_listed(root, changes, listed.entries()) if listed else (changes, 0)
    except (Interrupted, KeyboardInterrupt) as e:
        raise _check_stopped(e, target) from None
    except (SnapmgrError, OSError) as e:
        return f"the volume was not compared with {target.id} ({as_error(e)})", None
    against = "its manifest" if str(target.id) in after.from_manifests else "its files"
    which = "each file written since it was taken" if written_only else "every file"
    read = f"and by content {which} ({after.hashed} read, against {against})"
    if apart:
        read += (f"; other filesystems in it and snapmgr's own directories, which no rollback changes, left out: "
                 f"{', '.join(shown(p) for p in apart[:SHOWN_PATHS])}{', ...' if len(apart) > SHOWN_PATHS else ''}")
    if by_services:
        read += f"; {_entries(by_services)} the services changed once they ran again left out"
    if not changes:
        return f"the volume matches {target.id}: every entry by its metadata, {read}", True
    differs = (f"the volume DIFFERS from {target.id} in {_entries(len(changes))} (snapmgr diff {target.id} live "
               f"lists them), compared by metadata, {read}")
    if resuming:
        return differs + "; a resume may find what the services wrote since the cut", None
    return differs, False


def _check_stopped(e: BaseException, target: Snapshot) -> Interrupted:
    return Interrupted(f"{e or 'interrupted'}; rolled back to {target.id}, but the check was stopped (snapmgr diff "
                       f"{target.id} live compares)")


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _live_real(backend: Backend) -> Path:
    """The volume's root, resolved: one behind a symlink is on the symlink's target."""
    live = backend.live_root()
    if live is None:
        raise SnapmgrError("the volume was taken off its mountpoint since")
    return Path(os.path.realpath(live))


def _as_listed(root: Path, changes: list[Change], listed: dict[bytes, Held]) -> tuple[list[Change], int]:
    """The changes of the volume at `root` as they were when the services started again,
    as `listed` then, and how many the services made or touched since: an entry
    made since or gone since is left out; one changed since (another inode, or its ctime
    moved) keeps only the differences in what it still has as listed (its type, mode,
    owner, group, size or mtime), since those it had then too."""
    def as_then(c: Change) -> Change | None:
        then = listed.get(c.path)
        if c.status == "added":
            return c if then is not None else None
        if c.status == "removed":
            return c if then is None else None
        if then is None:
            return None
        try:
            now = held(os.lstat(joined(root, c.path)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if (now.dev, now.ino, now.ctime_ns) == (then.dev, then.ino, then.ctime_ns):
            return c
        kept = frozenset(w for w in c.what
                         if w in AS_LISTED and getattr(now, AS_LISTED[w]) == getattr(then, AS_LISTED[w]))
        return replace(c, what=kept) if kept else None
    found = [as_then(c) for c in changes]
    return [c for c in found if c is not None], sum(1 for c, f in zip(changes, found) if f != c)


def _apart(real: Path, backend: Backend, changes: Sequence[Change], kept: Sequence[tuple[Path, str]]
           ) -> tuple[list[Change], list[bytes]]:
    """The changes, without those in what each rollback keeps where it is: other
    filesystems mounted in the volume (a nested subvolume, a mount; not the volume's own)
    and snapmgr's own directories, with the directories made since to hold them or what
    the snapshots leave out. And the roots of those left out (other filesystems, snapmgr's
    directories). `real`: the real path of the volume's root."""
    devices = {os.stat(p).st_dev for p in (real, *backend.own_mounts())}
    places = [os.fsencode(place.relative_to(real)) for place, _ in kept if place != real and place.is_relative_to(real)]
    elsewhere: dict[bytes, bool] = {}

    def other(path: bytes) -> bool:   # a directory of another filesystem than the volume's
        if path not in elsewhere:
            try:
                st = os.lstat(joined(real, path))
                elsewhere[path] = stat.S_ISDIR(st.st_mode) and st.st_dev not in devices
            except (FileNotFoundError, NotADirectoryError):
                elsewhere[path] = False
        return elsewhere[path]
    roots: set[bytes] = set()
    for c in changes:
        parts = c.path.split(b"/") if c.path else []
        ancestors = [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        roots.update(p for p in places if any(a == p for a in ancestors))
        if top := next((a for a in ancestors if other(a)), None):
            roots.add(top)
    apart = {c.path for c in changes if any(under(c.path, r) for r in roots)}
    excluded = rsync_filters.matcher(backend.left_out())

    def made_to_hold(path: bytes) -> bool:
        # A directory added since the snapshot was made to hold what it holds, when that
        # is all left out here or left out of the snapshots (which a rollback keeps, and
        # so cannot delete the directory).
        inside = children(real, path)
        return bool(inside) and all(p in apart or excluded(p, is_dir) for p, is_dir in inside)
    for c in sorted(changes, key=lambda c: -c.path.count(b"/")):
        if c.status == "added" and c.path and made_to_hold(c.path):
            apart.add(c.path)
    return [c for c in changes if c.path not in apart], sorted(roots)


def _losses(engine: Engine, target: Snapshot) -> Losses:
    changes = compare_jobs.diff(engine, str(target.id), compare_jobs.LIVE, quick=True).changes
    count = {status: sum(1 for c in changes if c.status == status) for status in ("added", "removed", "changed")}
    marks = {"added": "+", "removed": "-", "changed": "~"}
    listed = tuple(f"{marks[c.status]} {shown(c.path)}" for c in changes[:SHOWN_PATHS])
    return Losses(count["added"], count["removed"], count["changed"], listed)
