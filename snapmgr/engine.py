"""The engine sequences every job: lock -> (quiesce) -> snapshot -> (resume) -> record -> prune.

It is the only module that knows the order of steps. Each volume's job runs under that
volume's lock; a failure of one volume is reported and does not stop the others.

What other jobs build on is here too: the lookups (a snapshot by its id, its manifest),
the volume's lock and the protected pre-rollback snapshot. Those jobs live beside it
(restore_job, compare_jobs), as does the manifest a snapshot run records (manifest_recording)."""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, TypeVar

from snapmgr import (manifest, manifest_recording, observed, priority, procfs, quiesce, retention, scheduled_wait,
                     sh, space_guard)
from snapmgr.backends import BACKENDS
from snapmgr.backends.base import Backend, Progress, Space, taken_with_another
from snapmgr.config import Config, Group, Schedule, Volume
from snapmgr.errors import Interrupted, LockBusy, SnapmgrError, UsageError, as_error, quote
from snapmgr.journal import (UNFINISHED, Journal, JournalError, RollbackRecord, Run, RunRecord, Verify, VolumeHistory,
                             Window as StoredWindow, WindowRecord)
from snapmgr.lock import volume_lock
from snapmgr.manifest.verify import Problem, check as check_snapshot
from snapmgr.model import PRE_ROLLBACK_TAG, ForeignSnapshot, MinFree, Snapshot, SnapshotId, stamp
from snapmgr.quiesce import undo
from snapmgr.quiesce.mounted import MountedGate
from snapmgr.quiesce.watchdog import Performed, Watchdog, perform_all
from snapmgr.quiesce.window import Report, Window, WindowOverrun
from snapmgr.records import Records
from snapmgr.schema import did_you_mean

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_TAG = "manual"
RECOVERY_ATTEMPTS = 3   # tries to resume an interrupted window whose undo steps fail
# Between the tries later runs make: a `post` whose daemon is not up yet at boot fails for
# every command run meanwhile.
RETRY_AFTER = timedelta(minutes=5)
# How long a rollback may keep the services stopped before the watchdog starts them again
# whatever the rollback's state: a safety net, not a limit any rollback should meet.
ROLLBACK_WINDOW = timedelta(days=1)


@dataclass
class Outcome:
    """What one job did to one volume; `error` is set when it failed."""

    volume: str
    error: SnapmgrError | None = None
    created: Snapshot | None = None
    planned: str | None = None                 # --dry-run: what would have been done
    decisions: list[retention.Decision] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    policy: str | None = None


@dataclass
class _Staged:
    """Snapshots of volumes staged for one window: each take, run in the window, adds its
    result; then each is recorded (`recorded` holds those taken, for their manifests)."""

    volumes: list[Volume]
    backends: list[Backend]
    runs: list[Run]
    outcomes: list[Outcome]
    takes: list[Callable[[], Snapshot]] = field(default_factory=list)
    results: list[Snapshot | SnapmgrError] = field(default_factory=list)
    failure: BaseException | None = None
    recorded: list[tuple[Outcome, manifest_recording.Taken]] = field(default_factory=list)


@dataclass(frozen=True)
class VolumeStatus:
    volume: str
    backend: str
    snapshots: int | None         # None when the snapshots could not be listed
    newest: Snapshot | None
    history: VolumeHistory
    problem: str | None = None    # why they could not be listed, or which are invalid
    invalid: tuple[str, ...] = ()
    last_verify: Verify | None = None
    damaged: tuple[str, ...] = ()  # existing snapshots whose latest verify found them damaged
    newest_good: Snapshot | None = None   # the newest neither invalid nor found damaged
    space: Space | None = None
    space_problem: str | None = None      # why the space figures could not be read
    min_free: MinFree | None = None
    runs: tuple[RunRecord, ...] = ()      # per action, the latest run of each status
    last_window: WindowRecord | None = None
    unresumed_window: WindowRecord | None = None   # the latest not fully resumed, whatever came after
    observed_at: datetime | None = None   # when the snapshots were listed, if not now (status(live=False))
    rollback: RollbackRecord | None = None     # the latest, if it is not over: under way, cut short or pending
    rollback_pending: str | None = None        # what a pending one still waits for, where the backend was asked


@dataclass(frozen=True)
class Verification:
    """How verifying one snapshot went."""

    snapshot: Snapshot
    result: str                                  # intact, damaged, unverifiable, error
    problems: tuple[Problem, ...] = ()
    reason: str | None = None                    # why unverifiable, or the error
    stats: manifest.ScanStats | None = None


class Engine:
    def __init__(self, config: Config, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 read_only: bool = False):
        """`read_only`: for readers who must change nothing (monitoring): the journal is
        opened read-only."""
        self.config = config
        self.clock = clock
        self.read_only = read_only
        self._journal: Journal | None = None
        self._lock_wait: scheduled_wait.Wait | None = None    # instead of settings.lock_wait (scheduled())

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.config.settings.state_dir / "journal.db", self.read_only)
        return self._journal

    @property
    def journal_failure(self) -> JournalError | None:
        """Why what was done could not all be recorded, if it could not."""
        return self._journal.failure if self._journal else None

    def backend(self, volume: Volume) -> Backend:
        return BACKENDS[volume.backend](volume.name, volume.options, self.config.settings.run_dir,
                                        min_free=volume.min_free)

    def browse_problems(self) -> dict[str, str]:
        """The volumes whose snapshots, if taken now, could not be browsed whole (they
        would get no manifest, and could be neither verified, mounted nor restored from),
        each with why."""
        found = {}
        for volume in self.volumes():
            problem = self.backend(volume).browse_problem()
            if problem:
                found[volume.name] = problem
        return found

    def volumes(self, names: Iterable[str] = ()) -> list[Volume]:
        """The named volumes (all of them when none are named); unknown names are refused
        before anything is done."""
        names = list(dict.fromkeys(names)) or list(self.config.volumes)
        for name in names:
            if name not in self.config.volumes:
                raise UsageError(f"unknown volume {quote(name)}" + did_you_mean(name, self.config.volumes)
                                 + f" (configured in {self.config.path}: {', '.join(self.config.volumes) or 'none'})")
        return [self.config.volumes[n] for n in names]

    # Jobs ----------------------------------------------------------------------------

    def snapshot(self, names: Iterable[str], tags: Iterable[str] = (), prune: bool = False,
                 dry_run: bool = False, progress: Progress | None = None, group: str | None = None) -> list[Outcome]:
        """Snapshot each named volume in a window of its own, or every member of `group`
        inside one window."""
        tags = frozenset(tags) or frozenset({DEFAULT_TAG})
        if group is not None:
            g = self.group(group)
            return self._snapshot_together(self.volumes(g.volumes), g, tags, prune, dry_run, progress)
        return [o for v in self.volumes(names)
                for o in self._snapshot_together([v], None, tags, prune, dry_run, progress)]

    def scheduled(self, name: str, dry_run: bool = False, progress: Progress | None = None) -> list[Outcome]:
        """Run schedule `name` as its timer does: each group in one window, each volume
        named on its own in a window of its own (unless a listed group takes it), all with
        the schedule's tag; then, when the schedule prunes, prune every volume whose
        snapshot succeeded, at background CPU and I/O priority (services are paused only
        for the snapshots, which must not run slowed).

        A volume another run holds is waited for (never less than settings.lock_wait) up
        to the schedule's timeout, and without one until the schedule's next elapse: a
        timer has no one to retry for it, but once it has fired again (systemd folds that
        into this run) waiting longer only piles up. The wait is logged when it starts and
        every few minutes while it lasts; giving up is a failed run that monitoring sees."""
        schedule = self.schedule(name)
        tags = frozenset({schedule.tag})
        self._lock_wait = scheduled_wait.of(schedule, self.config.settings.lock_wait)
        try:
            outcomes = [o for g in schedule.groups for o in self.snapshot((), tags, False, dry_run, progress, g)]
            alone = self.config.volumes_of(schedule, grouped=False)
            if alone:  # none named means every volume to snapshot()
                outcomes += self.snapshot(alone, tags, False, dry_run, progress)
            self._gave_up(outcomes, "snapshot", dry_run)
            if schedule.prune:
                with nullcontext() if dry_run else priority.background():
                    for outcome in outcomes:
                        if outcome.error is None:
                            [volume] = self.volumes([outcome.volume])
                            self._each_into(outcome, lambda o, v=volume: self._prune(v, dry_run, o))
                            self._gave_up([outcome], "prune", dry_run)
        finally:
            self._lock_wait = None
        return outcomes

    def _gave_up(self, outcomes: list[Outcome], action: str, dry_run: bool) -> None:
        """A scheduled run that gave up waiting for a volume is a failed run in the journal,
        which `check` and `status` read: no one reads a timer's errors at a terminal."""
        for outcome in outcomes:
            if isinstance(outcome.error, LockBusy) and not dry_run:
                self.journal.begin(outcome.volume, action, os.getpid()).finish(outcome.error)

    def schedule(self, name: str) -> Schedule:
        if name not in self.config.schedules:
            raise UsageError(f"unknown schedule {quote(name)}" + did_you_mean(name, self.config.schedules)
                             + f" (configured in {self.config.path}: {', '.join(self.config.schedules) or 'none'})")
        return self.config.schedules[name]

    def group(self, name: str) -> Group:
        if name not in self.config.groups:
            raise UsageError(f"unknown group {quote(name)}" + did_you_mean(name, self.config.groups)
                             + f" (configured in {self.config.path}: {', '.join(self.config.groups) or 'none'})")
        return self.config.groups[name]

    def prune(self, names: Iterable[str], dry_run: bool = False) -> list[Outcome]:
        return [self._each(v, lambda o, v=v: self._prune(v, dry_run, o)) for v in self.volumes(names)]

    def delete(self, ids: Iterable[str], dry_run: bool = False) -> list[Outcome]:
        wanted: dict[str, list[SnapshotId]] = defaultdict(list)
        for text in ids:
            sid = _parsed(text)
            wanted[sid.volume].append(sid)
        volumes = self.volumes(wanted)
        return [self._each(v, lambda o, v=v: self._delete(v, wanted[v.name], dry_run, o)) for v in volumes]

    def list(self, names: Iterable[str] = ()) -> list[Snapshot]:
        return sorted((s for v in self.volumes(names) for s in self._listed(v)), key=lambda s: s.id)

    def _listed(self, volume: Volume) -> list[Snapshot]:
        """The backend's snapshots, with their records."""
        backend = self.backend(volume)
        records = self._records(backend)
        listed = [replace(s, record=records.read(s.id)) for s in backend.list()]
        if any(s.record is None for s in listed):
            # A delete removes the snapshot, then its record: one gone meanwhile is not shown.
            still = {s.id for s in backend.list()}
            listed = [s for s in listed if s.id in still]
        return listed

    def _records(self, backend: Backend) -> Records:
        return Records(backend.records_dir(self.config.settings.state_dir))

    def foreign(self, names: Iterable[str] = ()) -> list[ForeignSnapshot]:
        return sorted((f for v in self.volumes(names) for f in self.backend(v).foreign()),
                      key=lambda f: (f.volume, f.created, f.name))

    def status(self, names: Iterable[str] = (), live: bool | Collection[str] = True,
               record: bool = False) -> list[VolumeStatus]:
        """Per volume: its snapshots, and what the journal says of its runs, windows and
        verifies. `live` False: the snapshots as the last run that changed them listed
        them (snapmgr.observed), for a reader who cannot list them (a monitoring user);
        the names of volumes: those listed now, the others as recorded unless nothing of
        them is (after a run: the volumes it changed). `record`: keep what was listed in
        the journal for such readers."""
        volumes = self.volumes(names)
        if isinstance(live, bool):
            fresh = volumes if live else []
        else:
            seen = self.journal.observations()
            fresh = [v for v in volumes if v.name in live or v.name not in seen]
        listings = {}
        for volume in fresh:
            listed_at = datetime.now(timezone.utc)
            listings[volume.name] = self.listing(volume)
            if record:
                self.journal.observed(volume.name, listed_at, observed.dump(listings[volume.name]))
        # The journal is read at one moment, for a writer may be at work meanwhile.
        with self.journal.reading():
            verifies = self.journal.latest_verifies()
            recorded = self.journal.observations() if len(fresh) < len(volumes) else {}
            for volume in volumes:
                if volume.name in listings:
                    continue
                if volume.name in recorded:
                    at, text = recorded[volume.name]
                    listings[volume.name] = observed.load(text, at)
                else:
                    listings[volume.name] = observed.Listing(None, "no run has recorded its snapshots yet")
            return [self._status(volume, listings[volume.name], verifies) for volume in volumes]

    def listing(self, volume: Volume) -> observed.Listing:
        """The volume's snapshots and space as the backend lists them now."""
        try:
            snapshots = self._listed(volume)
        except Interrupted:
            raise
        except (SnapmgrError, OSError) as e:
            return observed.Listing(None, str(as_error(e)))
        try:
            space = self.backend(volume).space(snapshots)
        except Interrupted:
            raise
        except (SnapmgrError, OSError) as e:
            log.debug("volume %s: no space figures", volume.name, exc_info=True)
            return observed.Listing(snapshots, space_problem=str(as_error(e)))
        return observed.Listing(snapshots, space=space)

    def _status(self, volume: Volume, listing: observed.Listing, verifies: list[Verify]) -> VolumeStatus:
        journal = self.journal
        common = {"history": journal.history(volume.name), "space": listing.space,
                  "space_problem": listing.space_problem, "min_free": volume.min_free, "observed_at": listing.at,
                  "runs": tuple(journal.last_runs(volume.name)), "last_window": journal.last_window(volume.name),
                  "unresumed_window": journal.unresumed_window(volume.name)} | self._rollback_state(volume, listing)
        snapshots = listing.snapshots
        if snapshots is None:
            return VolumeStatus(volume.name, volume.backend, None, None, problem=listing.problem, **common)
        invalid = sorted((s for s in snapshots if s.invalid), key=lambda s: s.id)
        problem = "; ".join(f"{s.id} is invalid ({s.invalid})" for s in invalid) or None
        last_verify, damaged = _verify_state(verifies, {str(s.id) for s in snapshots})
        good = [s for s in snapshots if not s.invalid and str(s.id) not in damaged]
        newest = max(snapshots, key=lambda s: s.id, default=None)
        return VolumeStatus(volume.name, volume.backend, len(snapshots), newest, problem=problem,
                            invalid=tuple(str(s.id) for s in invalid), last_verify=last_verify, damaged=damaged,
                            newest_good=max(good, key=lambda s: s.id, default=None), **common)

    def _rollback_state(self, volume: Volume, listing: observed.Listing) -> dict:
        last = self.journal.last_rollback(volume.name, (*UNFINISHED, "pending"))
        if last is None or last.state != "pending" or listing.at is not None:
            return {"rollback": last}   # a pending one is asked about only where the backend can be
        try:
            still = self.backend(volume).rollback_pending(SnapshotId.parse(last.target))
        except (SnapmgrError, OSError) as e:
            still = f"{last.detail} (whether it still is cannot be told: {as_error(e)})"
        return {"rollback": last if still else None, "rollback_pending": still}

    def verify(self, targets: Iterable[str], progress: Progress | None = None
               ) -> tuple[list[Verification], list[str]]:
        """Re-hash snapshots against their manifests: the named ones, every snapshot of
        the named volumes, or of every volume that records manifests. Also the volumes
        passed over, each with why.

        No volume lock is taken: a verify may read for hours, and must not make a
        scheduled snapshot wait. A snapshot deleted meanwhile is reported as an error."""
        wanted: dict[str, set[SnapshotId]] = {}
        for text in targets:
            if "@" not in text:
                wanted.setdefault(text, set())
                continue
            sid = _parsed(text)
            wanted.setdefault(sid.volume, set()).add(sid)
        volumes = self.volumes(wanted)
        passed_over = []
        if not wanted:
            passed_over = [f"{v.name}: manifests are off (manifest = \"off\"); not verified"
                           for v in volumes if v.manifest == "off"]
            volumes = [v for v in volumes if v.manifest != "off"]
        # Every target is found before any is read: a typo in the last must not cost hours.
        listed = {v.name: {s.id: s for s in self._listed(v)} for v in volumes}
        missing = sorted(sid for name, ids in wanted.items() for sid in ids - set(listed[name]))
        if missing:
            raise SnapmgrError(f"no such snapshot: {', '.join(map(str, missing))}")
        passed_over += [f"{v.name}: no snapshots found; not verified" for v in volumes if not listed[v.name]]
        results = []
        for volume in volumes:
            backend, snapshots = self.backend(volume), listed[volume.name]
            for sid in sorted(wanted.get(volume.name) or snapshots):
                results.append(self._verify_one(backend, snapshots[sid], progress))
        return results, passed_over

    def _verify_one(self, backend: Backend, snapshot: Snapshot, progress: Progress | None) -> Verification:
        started = self.clock()
        try:
            stored = self.stored_manifest(snapshot)
            if stored is None:
                # Never written is no failure (an old snapshot, manifests off); lost is.
                lost = manifest_recording.was_written(snapshot.record)
                done = Verification(snapshot, "error" if lost else "unverifiable",
                                    reason=manifest_recording.why_none(snapshot.record))
            else:
                told = progress and (lambda line: progress(f"{snapshot.id}: {line}"))
                with backend.browse_root(snapshot) as root:
                    problems, stats = check_snapshot(root, stored, told)
                if problems and snapshot.id not in {s.id for s in backend.list()}:
                    # Its files vanished under the walk: a deletion, not damage.
                    done = Verification(snapshot, "error", reason="deleted during verify", stats=stats)
                else:
                    done = Verification(snapshot, "damaged" if problems else "intact", tuple(problems), stats=stats)
        except Interrupted:
            raise
        except (SnapmgrError, OSError) as e:
            log.debug("verify of %s failed", snapshot.id, exc_info=True)
            done = Verification(snapshot, "error", reason=str(as_error(e)))
        detail = [p.describe() for p in done.problems] or ([done.reason] if done.reason else [])
        self.journal.verified(str(snapshot.id), started, done.result, done.stats and done.stats.entries, detail)
        return done

    def recover(self, boot: bool = False, asked: bool = False) -> list[str]:
        """Resume what interrupted quiesce windows left paused, and tell, once, of each
        window that its snapmgr did not close itself: one line per window. Whether the
        machine restarted since is told per window by the boot it was opened in. `boot`:
        run by snapmgr-recover.service, before the paused units: their starts are queued,
        not waited for. An undo action that fails is tried again, alone (the actions done
        are marked in the window's plan: repeating them could start a unit stopped since,
        or thaw what another window froze): by a later run RETRY_AFTER after the last try
        at the soonest, or at the next boot, up to RECOVERY_ATTEMPTS tries in all; and
        whenever `asked` (`snapmgr recover`), also after the window's recovery failed."""
        told = []
        now = datetime.now(timezone.utc)
        for w in self.journal.unsettled_windows(failed=asked):
            if w.status == "open" or (asked and w.status == "recovery-failed"):
                # Not tried yet, or long enough ago (a clock stepped back is no reason to wait).
                due = not w.attempts or w.tried_at is None or not timedelta(0) <= now - w.tried_at < RETRY_AFTER
                if not (due or boot or asked):
                    continue
                try:
                    with ExitStack() as locks:
                        for volume in sorted(w.volumes):
                            locks.enter_context(volume_lock(self.config.settings.run_dir, volume, 0))
                        w = self.journal.window(w.id)   # as it stands now that no other run can change it
                        if w.status not in ("open", "recovery-failed"):
                            continue   # another run ended it, and told of it
                        detail = self._retry(w, boot)
                except LockBusy:
                    continue  # its snapmgr, or its watchdog, is still at work
            else:
                detail = w.detail or w.status
            told.append(f"the quiesce window of {', '.join(w.volumes)} opened by pid {w.pid} at "
                        f"{w.started:%Y-%m-%d %H:%M:%S} UTC was not closed by its run; {detail}")
            self.journal.window_reported(w.id)
        return told + [line for v in self.config.volumes.values() if (line := self._rollback_told(v))]

    def _rollback_told(self, volume: Volume) -> str | None:
        """What is left of the volume's last rollback that is not over, for every run to
        tell: one cut short leaves the volume part way until it is resumed or undone.
        A rollback whose run is gone (the lock is free) was cut short by a kill; a pending
        one that has taken effect since is over."""
        open_states = ("begun", *UNFINISHED, "pending")
        last = self.journal.last_rollback(volume.name, open_states)
        if last is None:
            return None
        if last.state in ("begun", "rolling-back"):
            try:
                with volume_lock(self.config.settings.run_dir, volume.name, 0):
                    # As it stands, now that no run works on it.
                    last = self.journal.last_rollback(volume.name, open_states)
                    if last is None:
                        return None
                    if last.state == "begun":
                        self.journal.rollback_moved(last.id, "refused", "its run was killed before it changed anything")
                        return None
                    if last.state == "rolling-back":
                        self.journal.rollback_moved(last.id, "cut-short", f"its run (pid {last.run.pid}) was killed"
                                                    if last.run else "its run was killed")
                        last = self.journal.last_rollback(volume.name, open_states)
            except LockBusy:
                return None   # its run is still at it
        if last.state == "cut-short":
            return (f"volume {volume.name}: the rollback to {last.target} begun at {stamp(last.started)} was cut short "
                    f"and the volume may be part way: snapmgr rollback --resume {volume.name} finishes it, snapmgr "
                    f"rollback {last.pre_rollback} puts the volume back as it was")
        if last.state == "pending":
            try:
                if self.backend(volume).rollback_pending(SnapshotId.parse(last.target)) is None:
                    self.journal.rollback_moved(last.id, "done", f"took effect by {stamp(self.clock())}")
            except (SnapmgrError, OSError):
                log.debug("volume %s: whether its rollback is still pending cannot be told", volume.name,
                          exc_info=True)
        return None

    def _retry(self, w: StoredWindow, boot: bool) -> str:
        """Try to resume the window, under the locks of its volumes; record how it went and say how."""
        # A window of an older snapmgr has no boot id: as the caller says.
        current = procfs.boot_id()
        restarted = w.boot_id != current if w.boot_id and current else boot
        return self._record_try(w, perform_all(list(reversed(w.plan)), False, restarted, queue=boot))

    def resume_held(self, volume: Volume) -> list[str]:
        """Under the volume's lock, once a rollback has put it back in place: resume what
        its windows cut short still hold (the gate of a rollback's window holds the services
        back while the volume is off its mountpoint), rather than leave it to a later run,
        which could start a unit stopped since."""
        told = []
        for w in self.journal.unsettled_windows(failed=True):
            if w.volumes == [volume.name] and w.status in ("open", "recovery-failed"):
                told.append(f"the quiesce window of {volume.name} opened by pid {w.pid} at "
                            f"{w.started:%Y-%m-%d %H:%M:%S} UTC: {self._retry(w, False)}")
                self.journal.window_reported(w.id)
        return told

    def _record_try(self, w: StoredWindow, performed: Performed) -> str:
        """Record how a try to resume the window went; say how. A try a gate held back is
        no try: it is due again at every run."""
        attempts = w.attempts if performed.held else w.attempts + 1
        done = "; ".join(performed.lines) or "nothing was left to resume"
        failed = performed.failed
        if performed.held:
            status, detail = "open", f"tried to recover it now: {done}; every run tries again"
        elif not failed:
            status, detail = "recovered", f"recovered now: {done}"
        elif attempts < RECOVERY_ATTEMPTS and w.status == "open":
            status, detail = "open", (f"tried to recover it now (try {attempts} of {RECOVERY_ATTEMPTS}): {done}; "
                                      f"a later run tries the failed steps again")
        else:
            status, detail = "recovery-failed", (f"recovery failed {attempts} times, the last now: {done}; once "
                                                 f"what failed can succeed (or was resumed by hand), snapmgr recover "
                                                 f"tries it again and ends the window")
        self.journal.window_tried(w.id, w.plan, attempts, status, detail)
        return detail

    # One volume -------------------------------------------------------------------------

    def _each(self, volume: Volume, job: Callable[[Outcome], None]) -> Outcome:
        return self._each_into(Outcome(volume.name), job)

    @staticmethod
    def _each_into(outcome: Outcome, job: Callable[[Outcome], None]) -> Outcome:
        try:
            job(outcome)
        except Interrupted:
            raise  # SIGTERM stops the whole command, as Ctrl-C does
        except (SnapmgrError, OSError) as e:
            log.debug("volume %s failed", outcome.volume, exc_info=True)
            outcome.error = as_error(e)
        return outcome

    @contextmanager
    def locked(self, volume: Volume):
        """The volume's lock, held also by every program run meanwhile, so that no
        program left running by a killed run can race the next one."""
        settings = self.config.settings
        wait, why = (settings.lock_wait.total_seconds(), scheduled_wait.LOCK_WAIT) if self._lock_wait is None \
            else self._lock_wait()
        with volume_lock(settings.run_dir, volume.name, wait, why, unattended=self._lock_wait is not None) as fd, \
                sh.holding(fd):
            yield

    def _snapshot_together(self, volumes: list[Volume], group: Group | None, tags: frozenset[str], prune: bool,
                           dry_run: bool, progress: Progress | None) -> list[Outcome]:
        outcomes = [Outcome(v.name) for v in volumes]
        try:
            with ExitStack() as locks:
                # One fixed order: two overlapping groups never wait for each other.
                for volume in sorted(volumes, key=lambda v: v.name):
                    locks.enter_context(self.locked(volume))
                self._take(volumes, group, tags, dry_run, progress, outcomes)
                if prune:
                    for volume, outcome in zip(volumes, outcomes):
                        if outcome.error is None:
                            self._each_into(outcome, lambda o, v=volume: self._prune_locked(
                                v, self.backend(v), dry_run, o))
        except Interrupted:
            raise
        except (SnapmgrError, OSError) as e:
            log.debug("snapshot of %s failed", ", ".join(v.name for v in volumes), exc_info=True)
            for outcome in outcomes:
                outcome.error = outcome.error or as_error(e)
        return outcomes

    def _take(self, volumes: list[Volume], group: Group | None, tags: frozenset[str], dry_run: bool,
              progress: Progress | None, outcomes: list[Outcome]) -> None:
        """Stage every volume, then take them all inside one quiesce window, then record."""
        backends = [self.backend(v) for v in volumes]
        ids = self._next_ids(volumes, backends)
        window = self._window(volumes, backends, ids, group, dry_run)
        if dry_run:
            if refused := space_guard.refusal(volumes, backends, group):
                raise refused
            quiesce_plan = "; ".join(f"{q.name}: {q.describe()}" for q in window.quiescers) or "none"
            for outcome, backend, sid in zip(outcomes, backends, ids):
                outcome.planned = f"would create {sid}: {backend.plan_create(sid)} (quiesce: {quiesce_plan})"
            return
        staged = self._stage(volumes, backends, ids, group, tags, progress, outcomes, bool(window.quiescers))
        if staged.failure is None:
            try:
                self._hold(window, volumes, group, staged.takes, staged.results)
            except BaseException as e:
                staged.failure = e
        self._record_staged(staged, window.report.as_meta() | {"group": group.name if group else None},
                            window.report.resume_failures)
        self._manifests(staged)
        if staged.failure is not None:
            raise staged.failure

    def _next_ids(self, volumes: list[Volume], backends: list[Backend]) -> list[SnapshotId]:
        now = self.clock()
        return [SnapshotId.next_free(v.name, now, (s.id for s in b.list())) for v, b in zip(volumes, backends)]

    def _stage(self, volumes: list[Volume], backends: list[Backend], ids: list[SnapshotId], group: Group | None,
               tags: frozenset[str], progress: Progress | None, outcomes: list[Outcome], prepass: bool) -> _Staged:
        """Begin each volume's run and stage its snapshot (prepass: the services will be
        paused, so each backend does beforehand what it can); what stopped it, kept."""
        runs = [self.journal.begin(v.name, "snapshot", os.getpid()) for v in volumes]
        staged = _Staged(volumes, backends, runs, outcomes)
        try:
            # Once the runs are begun, so that a refusal is a failed run monitoring sees;
            # before anything is copied or paused.
            if refused := space_guard.refusal(volumes, backends, group):
                raise refused
            staged.takes = [b.stage(sid, tags | v.tags, progress, prepass) for v, b, sid in zip(volumes, backends, ids)]
            for kind in {type(b) for b in backends}:
                kind.join([t for b, t in zip(backends, staged.takes) if type(b) is kind])
        except BaseException as e:
            staged.failure = e
        return staged

    def _record_staged(self, staged: _Staged, meta: dict, resume_failures: list[str]) -> None:
        """Record what was taken, and finish every run: what was taken is recorded whatever
        stopped the rest, since without its record a snapshot loses what its quiescers kept
        (a backup label, a binlog position)."""
        results, failure = staged.results, staged.failure
        if failure is not None or len(results) < len(staged.volumes):
            stopped = as_error(failure) if isinstance(failure, (SnapmgrError, OSError)) else \
                SnapmgrError(f"stopped by {failure!r}" if failure else "not taken")
            results += [taken_with_another(t) or stopped for t in staged.takes[len(results):]]
            results += [stopped] * (len(staged.volumes) - len(results))
        meta = self._part_way(staged.volumes, meta)
        for outcome, run, volume, backend, result in zip(staged.outcomes, staged.runs, staged.volumes,
                                                         staged.backends, results):
            record = dict(meta)
            outcome.error = self._record(run, volume, backend, result, record, resume_failures)
            if isinstance(result, Snapshot):
                # This very record gets the manifest's part below: the outcome shows it too.
                outcome.created = replace(result, record=record)
                staged.recorded.append((outcome, manifest_recording.Taken(result, backend, self._records(backend),
                                                                          volume.manifest, record)))

    @staticmethod
    def _manifests(staged: _Staged) -> None:
        """The manifests last, each possibly hours long: a stop meanwhile finds every
        snapshot of the group recorded and every run finished."""
        if isinstance(staged.failure, (Interrupted, KeyboardInterrupt)):
            return
        unrecorded = manifest_recording.record_all([taken for _, taken in staged.recorded])
        for (outcome, _), error in zip(staged.recorded, unrecorded):
            outcome.error = outcome.error or error

    def _part_way(self, volumes: list[Volume], meta: dict) -> dict:
        """A snapshot of a volume that a rollback cut short left part way holds a mix of
        two states, whatever its quiescers did: degraded, saying so."""
        try:
            cut = [(v.name, r) for v in volumes if (r := self.journal.last_rollback(v.name, UNFINISHED))]
        except JournalError:
            return meta   # the run's own record tells of the journal
        if not cut:
            return meta
        why = [f"{name}: taken while the rollback to {r.target} was cut short, so the volume may be part way"
               for name, r in cut]
        return meta | {"grade": "degraded", "degraded": [*meta.get("degraded", []), *why]}

    def _window(self, volumes: list[Volume], backends: list[Backend], ids: list[SnapshotId], group: Group | None,
                dry_run: bool, purpose: str = "snapshot") -> Window:
        """The quiescers of the group, then each volume's own, each once. For a rollback,
        those that have a part in it (see Quiescer.in_rollback), with no time limit: a
        rollback cut short would leave the volume half replaced."""
        groups = [group] if group else []
        if purpose == "rollback":   # whatever writes to the volume, as any snapshot of it would pause it
            groups = [g for g in self.config.groups.values() if any(v.name in g.volumes for v in volumes)]
        names = list(dict.fromkeys([*(q for g in groups for q in g.quiesce), *(q for v in volumes for q in v.quiesce)]))
        specs = [self.config.quiescers[n] for n in names]
        if purpose == "rollback":
            # Every one must stop its service: an optional one that could not would leave
            # it writing while the files are replaced.
            specs = [replace(s, required=True) for s in _stopping_for_rollback(specs, volumes)]
        settings = self.config.settings
        busy = {f"state_dir {settings.state_dir}": settings.state_dir, f"run_dir {settings.run_dir}": settings.run_dir,
                f"snapmgr's Python {sys.prefix}": Path(sys.prefix), "snapmgr itself": Path(__file__).parent}
        busy |= {f"{b.volume}'s snapshots, at {p}": p for b in backends for p in b.written_paths()}
        context = quiesce.Context(self.config.path, tuple(v.name for v in volumes), tuple(map(str, ids)), dry_run, busy,
                                  tuple(b.volume for b in backends if not b.atomic))
        limits = [s.max_window for s in specs] + ([group.max_window] if group else [])
        quiescers = [quiesce.KINDS[s.kind](s, replace(context, purpose=purpose)) for s in specs]
        if purpose == "rollback":
            limits = [ROLLBACK_WINDOW]
            mountpoints = [p for b in backends for p in b.mountpoints()]
            if quiescers and mountpoints:   # last: resumed first, it holds the services back while the volume is off
                quiescers.append(MountedGate(mountpoints, replace(context, purpose=purpose)))
        return Window(quiescers, min(limits, default=timedelta(0)).total_seconds())

    def _hold(self, window: Window, volumes: list[Volume], group: Group | None,
              takes: list[Callable[[], Snapshot]], results: list[Snapshot | SnapmgrError]) -> None:
        """Each take() inside the window; `results` gets a snapshot, or the error that
        stopped it, for each take that ran, also when something ends the window early."""
        def take_all():
            for take in takes:
                results.append(_attempt(take))
        if not window.quiescers:
            return take_all()
        try:
            window.open()
            plan = window.plan()
            watchdog = Watchdog({"main": os.getpid(), "max_window": window.max_window, "steps": plan,
                                 "journal": str(self.journal.path)}, window.descriptors(plan))
            window_id = None
            try:
                # Journaled once the watchdog runs, so that a journaled window always has a
                # watchdog or an account of how it ended.
                window_id = self.journal.window_opened([v.name for v in volumes], group and group.name,
                                                       os.getpid(), plan, procfs.boot_id())
                watchdog.tell(window=window_id)
            except BaseException:
                watchdog.close()
                raise
            try:
                window.hold(take_all, watchdog)
            except WindowOverrun as overrun:
                # Snapshots published before the cut were taken with everything paused: kept.
                results += [taken_with_another(t) or overrun for t in takes[len(results):]]
            finally:
                r = window.report
                detail = "; ".join(r.degraded + r.resume_failures) or None
                unresumed = {i for i in r.unresumed if plan[i]["undo"]}
                # The watchdog that was handed the window records how it ended; a resume that
                # failed is tried again by the next run, by its undo actions alone.
                if watchdog.abandoned:
                    pass
                elif unresumed:
                    undo.mark_done(plan, unresumed)
                    # Held back by a gate, it is due again at every run.
                    tries = 0 if any(plan[i].get("gate") for i in unresumed) else 1
                    self.journal.window_tried(window_id, plan, tries, "open", detail, r.grade, r.quiesce_s,
                                              r.freeze_s)
                else:
                    self.journal.window_ended(window_id, "closed", detail, r.grade, r.quiesce_s, r.freeze_s)
        finally:
            window.close()

    def _record(self, run: Run, volume: Volume, backend: Backend, result: Snapshot | SnapmgrError, record: dict,
                resume_failures: list[str]) -> SnapmgrError | None:
        """Record the snapshot taken (or the error), its manifest still to come, and
        finish its run; the error the volume reports."""
        if isinstance(result, SnapmgrError):
            run.finish(result)
            return result
        record["manifest"] = manifest_recording.pending(volume.manifest)
        error = self._records(backend).write_taken(result.id, record)
        if resume_failures:
            error = SnapmgrError(f"{result.id} was taken, but resuming failed: {'; '.join(resume_failures)}")
        run.created(str(result.id))
        run.finish(error)
        return error

    def _prune(self, volume: Volume, dry_run: bool, outcome: Outcome) -> None:
        with self.locked(volume):
            self._prune_locked(volume, self.backend(volume), dry_run, outcome)

    def _prune_locked(self, volume: Volume, backend: Backend, dry_run: bool, outcome: Outcome) -> None:
        if volume.retention is None:
            return
        outcome.policy = volume.retention.name
        try:
            cut_short = self.journal.last_rollback(volume.name, UNFINISHED)
        except JournalError:
            cut_short = None   # told of by the run's own record; the journal that knew of one is lost anyway
        needed = {SnapshotId.parse(cut_short.target): "the target of a rollback cut short"} if cut_short else {}
        outcome.decisions = retention.decide(backend.list(), volume.retention, self.clock(),
                                             self.config.settings.timezone, needed)
        doomed = [d.snapshot for d in outcome.decisions if not d.keep]
        if dry_run or not doomed:
            return
        with self.journal.run(volume.name, "prune", os.getpid()) as run:
            refused = []
            for snapshot in doomed:
                try:
                    self._delete_one(backend, snapshot)
                except Interrupted:
                    raise
                except (SnapmgrError, OSError) as e:
                    # One that cannot go now (a mount or a verify browsing it keeps an LVM or
                    # ZFS snapshot busy) must not keep every other: the next prune tries again.
                    refused.append(f"{snapshot.id}: {as_error(e)}")
                    continue
                run.deleted(str(snapshot.id))
                outcome.deleted.append(str(snapshot.id))
            if refused:
                raise SnapmgrError(f"{len(refused)} of {len(doomed)} snapshots to prune could not be deleted: "
                                   + "; ".join(refused))

    def _delete(self, volume: Volume, ids: list[SnapshotId], dry_run: bool, outcome: Outcome) -> None:
        backend = self.backend(volume)
        with self.locked(volume):
            existing = {s.id: s for s in backend.list()}
            missing = [str(i) for i in ids if i not in existing]
            if missing:
                raise SnapmgrError(f"no such snapshot: {', '.join(missing)}")
            cut = self.journal.last_rollback(volume.name, UNFINISHED)
            needed = [str(i) for i in ids if cut and str(i) in (cut.target, cut.pre_rollback)]
            if needed:
                raise SnapmgrError(f"{', '.join(needed)} is what settles the rollback to {cut.target} that was cut "
                                   f"short (snapmgr rollback --resume {volume.name} finishes it, snapmgr rollback "
                                   f"{cut.pre_rollback} undoes it): settle it first; nothing was deleted")
            if dry_run:
                outcome.planned = "would delete " + ", ".join(str(i) for i in ids)
                return
            with self.journal.run(volume.name, "delete", os.getpid()) as run:
                for sid in ids:
                    self._delete_one(backend, existing[sid])
                    run.deleted(str(sid))
                    outcome.deleted.append(str(sid))

    def _delete_one(self, backend: Backend, snapshot: Snapshot) -> None:
        backend.delete(snapshot)
        records = self._records(backend)
        records.delete(snapshot.id)
        manifest.delete(records.directory, snapshot.id)

    def pre_rollback(self, volume: Volume) -> str:
        """A protected snapshot of the volume as it is, taken under the lock already held:
        what a restore in place can be undone with."""
        outcome = Outcome(volume.name)
        self._take([volume], None, frozenset({PRE_ROLLBACK_TAG}), False, None, [outcome])
        return str(_pre_rollback_taken(outcome).id)

    @contextmanager
    def pre_rollback_staged(self, volume: Volume) -> Iterator[Callable[[str], Snapshot]]:
        """A rollback's protected snapshot of the volume as it is, under the lock already
        held: staged now, before its services stop (with the backend's prepass, when it
        has services to stop); yields what takes it inside the rollback's window, given the
        grade held_for_rollback gave, and returns it. Its run begins there, so a
        rollback refused before has none; its manifest is recorded on the way out, once
        the services run again."""
        backend = self.backend(volume)
        stopping = bool(self._window([volume], [backend], [], None, True, purpose="rollback").quiescers)
        [sid] = self._next_ids([volume], [backend])
        if refused := space_guard.refusal([volume], [backend], None):
            raise refused
        outcome = Outcome(volume.name)
        staged = _Staged([volume], [backend], [], [outcome],
                         [backend.stage(sid, frozenset({PRE_ROLLBACK_TAG}) | volume.tags, None, stopping)])

        def take(grade: str) -> Snapshot:
            staged.runs = [self.journal.begin(volume.name, "snapshot", os.getpid())]
            try:
                staged.results += [_attempt(t) for t in staged.takes]
            except BaseException as e:
                staged.failure = e
                raise
            finally:
                # The rollback's window is not this snapshot's: its services are held as the grade says.
                self._record_staged(staged, Report().as_meta() | {"group": None, "grade": grade}, [])
            return _pre_rollback_taken(outcome)
        try:
            yield take
        except BaseException as e:
            staged.failure = e
            raise
        finally:
            if staged.recorded and not isinstance(staged.failure, (Interrupted, KeyboardInterrupt)):
                self.manifest_if_missing(volume, str(staged.recorded[0][1].snapshot.id))

    def manifest_if_missing(self, volume: Volume, snapshot_id: str) -> None:
        """Write the manifest of a snapshot taken without one yet: a rollback's pre-rollback
        snapshot once the rollback is over, or once a resume has finished a rollback whose
        run was stopped before it could. Found again first: a rollback may have moved it
        and its record (btrfs carries the snapshots' own subvolume into the tree it swaps in)."""
        backend = self.backend(volume)

        def write() -> list[SnapmgrError | None]:
            snapshot = next((s for s in backend.list() if str(s.id) == snapshot_id), None)
            if snapshot is None:
                raise SnapmgrError(f"{snapshot_id} was not found after the rollback")
            records = self._records(backend)
            record = records.read(snapshot.id)
            if record is None or manifest_recording.was_written(record) or volume.manifest == "off":
                return []
            return manifest_recording.record_all([manifest_recording.Taken(snapshot, backend, records,
                                                                           volume.manifest, record)])
        _told(snapshot_id, write)

    def held_for_rollback(self, volume: Volume, work: Callable[[str], T]) -> T:
        """`work(grade)` with the volume's services stopped for a rollback (each quiescer in
        its part of one, see Quiescer.in_rollback), their restart guaranteed by the
        watchdog, under the volume's lock, which the caller holds; `grade`: what a snapshot
        taken meanwhile is. What `work` raised is raised once the services are back; a
        service that did not come back is an error after it."""
        window = self._window([volume], [self.backend(volume)], [], None, False, purpose="rollback")
        grade = "application" if window.quiescers else "crash"
        results: list = []
        self._hold(window, [volume], None, [lambda: work(grade)], results)
        [result] = results
        if isinstance(result, SnapmgrError):
            raise result
        if window.report.resume_failures:
            raise SnapmgrError(f"rolled back, but starting the services again failed: "
                               f"{'; '.join(window.report.resume_failures)} (later runs try again; snapmgr check "
                               f"is critical until then)")
        return result

    def rollback_quiescers(self, volume: Volume) -> list[str]:
        """What a rollback of the volume does to its services, one line per quiescer."""
        window = self._window([volume], [self.backend(volume)], [], None, True, purpose="rollback")
        return [f"{q.name}: {q.describe()}" for q in window.quiescers]

    # Lookups ------------------------------------------------------------------------------

    def snapshot_of(self, text: str) -> tuple[Volume, Backend, Snapshot]:
        """The snapshot `VOLUME@ID` names, with its record, and its volume and backend."""
        sid = _parsed(text)
        [volume] = self.volumes([sid.volume])
        backend = self.backend(volume)
        snapshots = {s.id: s for s in backend.list()}
        if sid not in snapshots:
            newest = max(snapshots, default=None)
            raise SnapmgrError(f"no such snapshot: {sid} (volume {volume.name} has {len(snapshots)}"
                               + (f", the newest {newest})" if newest else ")"))
        return volume, backend, replace(snapshots[sid], record=self._records(backend).read(sid))

    def manifest(self, text: str) -> manifest.Manifest:
        """The manifest of the snapshot `VOLUME@ID`, or an error saying why it has none."""
        _, _, snapshot = self.snapshot_of(text)
        found = self.stored_manifest(snapshot)
        if found is None:
            raise SnapmgrError(f"{snapshot.id} is unverifiable: {manifest_recording.why_none(snapshot.record)}")
        return found

    def stored_manifest(self, snapshot: Snapshot) -> manifest.Manifest | None:
        """The manifest recorded when `snapshot` was taken, None when it has none;
        manifest.ManifestDamaged when it cannot be read. For diff and mount --verify too."""
        backend = self.backend(self.config.volumes[snapshot.volume])
        return manifest.load(self._records(backend).directory, snapshot.id)

    def browsable(self, names: Iterable[str] = ()) -> dict[str, Backend]:
        """The backend of each named volume (all when none are named), for the FUSE mount:
        it lists their snapshots and enters them through browse_root(), read-only."""
        return {v.name: self.backend(v) for v in self.volumes(names)}


def _parsed(text: str) -> SnapshotId:
    """A `VOLUME@ID` typed by the user; refused as a usage error when it is none."""
    try:
        return SnapshotId.parse(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _verify_state(verifies: list[Verify], existing: set[str]) -> tuple[Verify | None, tuple[str, ...]]:
    """Of the snapshots that still exist: the latest verify, and those found damaged."""
    mine = [v for v in verifies if v.snapshot in existing]
    return (mine[-1] if mine else None), tuple(sorted(v.snapshot for v in mine if v.result == "damaged"))


def _told(snapshot_id: str, write: Callable[[], list[SnapmgrError | None]]) -> None:
    """Write a snapshot's manifest once a rollback is over: what fails is told, not raised
    over the rollback's own outcome; a stop stays one, saying the rollback is done."""
    try:
        errors = write()
    except (Interrupted, KeyboardInterrupt) as e:
        raise Interrupted(f"{e or 'interrupted'}; the rollback is done, but the manifest of {snapshot_id} was not "
                          f"written") from None
    except (SnapmgrError, OSError) as e:
        errors = [as_error(e)]
    for error in errors:
        if error:
            log.warning("the manifest of %s: %s", snapshot_id, error)


def _pre_rollback_taken(outcome: Outcome) -> Snapshot:
    if outcome.error or outcome.created is None:
        raise SnapmgrError(f"the {PRE_ROLLBACK_TAG} snapshot failed, so nothing was restored: {outcome.error}")
    return outcome.created


def _attempt(take: Callable[[], Snapshot]) -> Snapshot | SnapmgrError:
    """One volume's snapshot, or why it failed; what ends the whole window is raised."""
    try:
        return take()
    except (Interrupted, WindowOverrun):
        raise
    except (SnapmgrError, OSError) as e:
        log.debug("taking the snapshot failed", exc_info=True)
        return as_error(e)


def _stopping_for_rollback(specs: list, volumes: list[Volume]) -> list:
    """The quiescers a rollback runs: a database session cannot keep its server off files
    being replaced, so a volume with one needs a systemd quiescer that stops the server,
    and then the session is not needed; a frozen filesystem could not be written."""
    kinds = {s.name: quiesce.KINDS[s.kind] for s in specs}
    servers = [s for s in specs if kinds[s.name].in_rollback == "server"]
    if servers and not any(s.kind == "systemd" for s in specs):
        names = ", ".join(f"{s.name} ({s.kind})" for s in servers)
        raise SnapmgrError(f"quiescer {names} of volume {', '.join(v.name for v in volumes)} cannot keep its server "
                           f"off the files a rollback replaces: add a systemd quiescer that stops the server "
                           f"(kind = \"systemd\", units = [...]) to the volume's quiesce list, and the rollback "
                           f"stops it instead")
    return [s for s in specs if kinds[s.name].in_rollback == "pause"]
