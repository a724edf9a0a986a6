"""The engine sequences every job: lock -> (quiesce) -> snapshot -> (resume) -> record -> prune.

It is the only module that knows the order of steps. Each volume's job runs under that
volume's lock; a failure of one volume is reported and does not stop the others."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from snapmgr import diff, manifest, quiesce, restore, retention, sh, versions, volume_paths
from snapmgr.backends import BACKENDS
from snapmgr.backends.base import Backend, Progress, taken_with_another
from snapmgr.config import Config, Group, Volume
from snapmgr.errors import Interrupted, LockBusy, SnapmgrError, UsageError, as_error, quote
from snapmgr.journal import Journal, JournalError, Run, Verify, VolumeHistory
from snapmgr.lock import volume_lock
from snapmgr.manifest import ALGORITHMS, Manifest, ManifestDamaged
from snapmgr.manifest.verify import Problem, check as check_snapshot
from snapmgr.model import ForeignSnapshot, Snapshot, SnapshotId
from snapmgr.quiesce.watchdog import Watchdog, perform_all
from snapmgr.quiesce.window import Window, WindowOverrun
from snapmgr.records import Records
from snapmgr.schema import did_you_mean

log = logging.getLogger(__name__)
DEFAULT_TAG = "manual"
PRE_ROLLBACK_TAG = "pre-rollback"
LIVE = "live"   # the volume as it is now, where a snapshot could be named


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


@dataclass(frozen=True)
class Verification:
    """How verifying one snapshot went."""

    snapshot: Snapshot
    result: str                                  # intact, damaged, unverifiable, error
    problems: tuple[Problem, ...] = ()
    reason: str | None = None                    # why unverifiable, or the error
    stats: manifest.ScanStats | None = None


class Engine:
    def __init__(self, config: Config, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.config = config
        self.clock = clock
        self._journal: Journal | None = None

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.config.settings.state_dir / "journal.db")
        return self._journal

    @property
    def journal_failure(self) -> JournalError | None:
        """Why what was done could not all be recorded, if it could not."""
        return self._journal.failure if self._journal else None

    def backend(self, volume: Volume) -> Backend:
        return BACKENDS[volume.backend](volume.name, volume.options, self.config.settings.run_dir)

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
            try:
                sid = SnapshotId.parse(text)
            except ValueError as e:
                raise UsageError(str(e)) from None
            wanted[sid.volume].append(sid)
        volumes = self.volumes(wanted)
        return [self._each(v, lambda o, v=v: self._delete(v, wanted[v.name], dry_run, o)) for v in volumes]

    def list(self, names: Iterable[str] = ()) -> list[Snapshot]:
        return sorted((s for v in self.volumes(names) for s in self._listed(v)), key=lambda s: s.id)

    def _listed(self, volume: Volume) -> list[Snapshot]:
        """The backend's snapshots, with their records."""
        backend = self.backend(volume)
        records = self._records(backend)
        return [replace(s, record=records.read(s.id)) for s in backend.list()]

    def _records(self, backend: Backend) -> Records:
        return Records(backend.records_dir(self.config.settings.state_dir))

    def foreign(self, names: Iterable[str] = ()) -> list[ForeignSnapshot]:
        return sorted((f for v in self.volumes(names) for f in self.backend(v).foreign()),
                      key=lambda f: (f.volume, f.created, f.name))

    def status(self, names: Iterable[str] = ()) -> list[VolumeStatus]:
        statuses = []
        verifies = self.journal.latest_verifies()
        for volume in self.volumes(names):
            history = self.journal.history(volume.name)
            try:
                snapshots = self._listed(volume)
            except (SnapmgrError, OSError) as e:
                statuses.append(VolumeStatus(volume.name, volume.backend, None, None, history, str(as_error(e))))
                continue
            invalid = sorted((s for s in snapshots if s.invalid), key=lambda s: s.id)
            problem = "; ".join(f"{s.id} is invalid ({s.invalid})" for s in invalid) or None
            statuses.append(VolumeStatus(volume.name, volume.backend, len(snapshots),
                                         max(snapshots, key=lambda s: s.id, default=None), history,
                                         problem, tuple(str(s.id) for s in invalid),
                                         *_verify_state(verifies, {str(s.id) for s in snapshots})))
        return statuses

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
            try:
                sid = SnapshotId.parse(text)
            except ValueError as e:
                raise UsageError(str(e)) from None
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

    def manifest(self, text: str) -> manifest.Manifest:
        """The manifest of the snapshot `VOLUME@ID`, or an error saying why it has none."""
        try:
            sid = SnapshotId.parse(text)
        except ValueError as e:
            raise UsageError(str(e)) from None
        [volume] = self.volumes([sid.volume])
        snapshot = next((s for s in self._listed(volume) if s.id == sid), None)
        if snapshot is None:
            raise SnapmgrError(f"no such snapshot: {sid}")
        found = self.stored_manifest(snapshot)
        if found is None:
            raise SnapmgrError(f"{sid} is unverifiable: {_why_no_manifest(snapshot)}")
        return found

    def stored_manifest(self, snapshot: Snapshot) -> manifest.Manifest | None:
        """The manifest recorded when `snapshot` was taken, None when it has none;
        manifest.ManifestDamaged when it cannot be read. For diff and mount --verify too."""
        backend = self.backend(self.config.volumes[snapshot.volume])
        return manifest.load(self._records(backend).directory, snapshot.id)

    def _verify_one(self, backend: Backend, snapshot: Snapshot, progress: Progress | None) -> Verification:
        started = self.clock()
        try:
            stored = self.stored_manifest(snapshot)
            if stored is None:
                # Never written is no failure (an old snapshot, manifests off); lost is.
                written = "algorithm" in ((snapshot.record or {}).get("manifest") or {})
                done = Verification(snapshot, "error" if written else "unverifiable", reason=_why_no_manifest(snapshot))
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

    def recover(self) -> list[str]:
        """Resume what interrupted quiesce windows left paused, and tell, once, of each
        window that its snapmgr did not close itself: one line per window."""
        told = []
        for w in self.journal.unsettled_windows():
            if w.status == "open":
                try:
                    with ExitStack() as locks:
                        for volume in sorted(w.volumes):
                            locks.enter_context(volume_lock(self.config.settings.run_dir, volume, 0))
                        done = perform_all(list(reversed(w.plan)), inherited_fds=False)
                except LockBusy:
                    continue  # its snapmgr, or its watchdog, is still at work
                detail = "recovered now: " + ("; ".join(done) or "nothing was left to resume")
                self.journal.window_ended(w.id, "recovered", detail)
            else:
                detail = w.detail or w.status
            told.append(f"the quiesce window of {', '.join(w.volumes)} opened by pid {w.pid} at "
                        f"{w.started:%Y-%m-%d %H:%M:%S} UTC was not closed by its run; {detail}")
            self.journal.window_reported(w.id)
        return told

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
    def _locked(self, volume: Volume):
        """The volume's lock, held also by every program run meanwhile, so that no
        program left running by a killed run can race the next one."""
        settings = self.config.settings
        with volume_lock(settings.run_dir, volume.name, settings.lock_wait.total_seconds()) as fd, sh.holding(fd):
            yield

    def _snapshot_together(self, volumes: list[Volume], group: Group | None, tags: frozenset[str], prune: bool,
                           dry_run: bool, progress: Progress | None) -> list[Outcome]:
        outcomes = [Outcome(v.name) for v in volumes]
        try:
            with ExitStack() as locks:
                # One fixed order: two overlapping groups never wait for each other.
                for volume in sorted(volumes, key=lambda v: v.name):
                    locks.enter_context(self._locked(volume))
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
        now = self.clock()
        ids = [SnapshotId.next_free(v.name, now, (s.id for s in b.list())) for v, b in zip(volumes, backends)]
        window = self._window(volumes, backends, ids, group, dry_run)
        if dry_run:
            quiesce_plan = "; ".join(f"{q.name}: {q.describe()}" for q in window.quiescers) or "none"
            for outcome, backend, sid in zip(outcomes, backends, ids):
                outcome.planned = f"would create {sid}: {backend.plan_create(sid)} (quiesce: {quiesce_plan})"
            return
        pid = os.getpid()
        runs = [self.journal.begin(v.name, "snapshot", pid) for v in volumes]
        takes: list[Callable[[], Snapshot]] = []
        results: list[Snapshot | SnapmgrError] = []
        failure: BaseException | None = None
        try:
            takes = [b.stage(sid, tags | v.tags, progress, prepass=bool(window.quiescers))
                     for v, b, sid in zip(volumes, backends, ids)]
            for kind in {type(b) for b in backends}:
                kind.join([t for b, t in zip(backends, takes) if type(b) is kind])
            self._hold(window, volumes, group, takes, results)
        except BaseException as e:
            failure = e
        if failure is not None:
            # What was taken is recorded whatever stopped the rest: without its record a
            # snapshot loses what its quiescers kept (a backup label, a binlog position).
            stopped = as_error(failure) if isinstance(failure, (SnapmgrError, OSError)) else \
                SnapmgrError(f"stopped by {failure!r}")
            results += [taken_with_another(t) or stopped for t in takes[len(results):]]
            results += [stopped] * (len(volumes) - len(results))
        meta = window.report.as_meta() | {"group": group.name if group else None}
        recorded = []
        for outcome, run, volume, backend, result in zip(outcomes, runs, volumes, backends, results):
            record = dict(meta)
            outcome.error = self._record(run, volume, backend, result, record, window.report.resume_failures)
            if isinstance(result, Snapshot):
                outcome.created = replace(result, record=record)
                recorded.append((outcome, volume, backend, result, record))
        # The manifests last, each possibly hours long: a stop meanwhile finds every
        # snapshot of the group recorded and every run finished.
        if not isinstance(failure, Interrupted):
            self._record_manifests(recorded)
        if failure is not None:
            raise failure

    def _window(self, volumes: list[Volume], backends: list[Backend], ids: list[SnapshotId], group: Group | None,
                dry_run: bool) -> Window:
        """The quiescers of the group, then each volume's own, each once."""
        names = list(dict.fromkeys([*(group.quiesce if group else ()), *(q for v in volumes for q in v.quiesce)]))
        specs = [self.config.quiescers[n] for n in names]
        settings = self.config.settings
        busy = {f"state_dir {settings.state_dir}": settings.state_dir, f"run_dir {settings.run_dir}": settings.run_dir,
                f"snapmgr's Python {sys.prefix}": Path(sys.prefix), "snapmgr itself": Path(__file__).parent}
        busy |= {f"{b.volume}'s snapshots, at {p}": p for b in backends for p in b.written_paths()}
        context = quiesce.Context(self.config.path, tuple(v.name for v in volumes), tuple(map(str, ids)), dry_run, busy,
                                  tuple(b.volume for b in backends if not b.atomic))
        limits = [s.max_window for s in specs] + ([group.max_window] if group else [])
        return Window([quiesce.KINDS[s.kind](s, context) for s in specs],
                      min(limits, default=timedelta(0)).total_seconds())

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
                                                       os.getpid(), plan)
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
                # The watchdog that was handed the window records how it ended; without a
                # watchdog, a window whose resumes failed stays open for the next run to replay.
                if not (watchdog.abandoned or (watchdog.lost and r.resume_failures)):
                    self.journal.window_ended(window_id, "closed", "; ".join(r.degraded + r.resume_failures) or None,
                                              r.grade, r.quiesce_s, r.freeze_s)
        finally:
            window.close()

    def _record(self, run: Run, volume: Volume, backend: Backend, result: Snapshot | SnapmgrError, record: dict,
                resume_failures: list[str]) -> SnapmgrError | None:
        """Record the snapshot taken (or the error), its manifest still to come, and
        finish its run; the error the volume reports."""
        if isinstance(result, SnapmgrError):
            run.finish(result)
            return result
        error = None
        # What the record says until the manifest is written, if snapmgr is stopped first.
        record["manifest"] = MANIFESTS_OFF if volume.manifest == "off" else \
            {"unverified": "its run was stopped before its manifest was written"}
        try:
            self._records(backend).write(result.id, record)
        except OSError as e:
            error = SnapmgrError(f"{result.id} was taken, but its record could not be written: {as_error(e)}")
        if resume_failures:
            error = SnapmgrError(f"{result.id} was taken, but resuming failed: {'; '.join(resume_failures)}")
        run.created(str(result.id))
        run.finish(error)
        return error

    def _record_manifests(self, recorded: list[tuple[Outcome, Volume, Backend, Snapshot, dict]]) -> None:
        """Write each snapshot's manifest and say in its record how that went. Stopped
        (SIGTERM, Ctrl-C): the records of this one and of those not reached say so."""
        for i, (outcome, volume, backend, snapshot, record) in enumerate(recorded):
            try:
                record["manifest"] = self._manifest(volume, backend, snapshot)
            except Interrupted:
                for _, _, later_backend, later, later_record in recorded[i:]:
                    later_record["manifest"] = {"unverified": "interrupted before its manifest was complete"}
                    with suppress(OSError):  # the record of the snapshot itself is written already
                        self._records(later_backend).write(later.id, later_record)
                raise
            try:
                self._records(backend).write(snapshot.id, record)
            except OSError as e:
                outcome.error = outcome.error or SnapmgrError(
                    f"{snapshot.id} was taken, but its record could not be written: {as_error(e)}")
            outcome.created = replace(snapshot, record=record)

    def _manifest(self, volume: Volume, backend: Backend, snapshot: Snapshot) -> dict:
        """Write the snapshot's manifest, read from the snapshot itself; for its record,
        what that took, or why the snapshot is unverified."""
        if volume.manifest == "off":
            return MANIFESTS_OFF
        directory = self._records(backend).directory
        previous = self._previous_manifest(backend, snapshot, volume.manifest)
        stats = manifest.ScanStats()
        started = time.monotonic()
        try:
            with backend.browse_root(snapshot) as root:
                try:
                    manifest.save(directory, snapshot.id, volume.manifest, manifest.stream(
                        root, volume.manifest, previous.entries() if previous else None,
                        shares_inodes=backend.shares_inodes, stats=stats,
                        previous_taken=previous and SnapshotId.parse(previous.snapshot).created.timestamp()))
                except manifest.ManifestDamaged as e:  # the previous one, found damaged past its first line
                    log.warning("%s: %s; hashing every file", snapshot.id, e)
                    previous, stats = None, manifest.ScanStats()
                    manifest.save(directory, snapshot.id, volume.manifest,
                                  manifest.stream(root, volume.manifest, stats=stats))
        except Interrupted:
            raise
        except (SnapmgrError, OSError) as e:
            log.debug("manifest of %s failed", snapshot.id, exc_info=True)
            reason = f"its manifest could not be written: {as_error(e)}"
            log.warning("%s is unverified: %s", snapshot.id, reason)
            return {"unverified": reason}
        return {"algorithm": volume.manifest, "previous": previous.snapshot if previous else None,
                **stats.as_record(), "seconds": round(time.monotonic() - started, 3)}  # the file written too

    def _previous_manifest(self, backend: Backend, snapshot: Snapshot, algorithm: str) -> manifest.Manifest | None:
        """The manifest of the newest older snapshot that still exists (so that, where
        snapshots share inodes, its inode numbers are still its files') and has one."""
        directory = self._records(backend).directory
        for older in sorted((s for s in backend.list() if s.id < snapshot.id), key=lambda s: s.id, reverse=True):
            try:
                found = manifest.load(directory, older.id)
            except manifest.ManifestDamaged as e:
                log.warning("%s: %s; not reused", older.id, e)
                continue
            if found is not None and found.algorithm == algorithm:
                return found
        return None

    def _prune(self, volume: Volume, dry_run: bool, outcome: Outcome) -> None:
        with self._locked(volume):
            self._prune_locked(volume, self.backend(volume), dry_run, outcome)

    def _prune_locked(self, volume: Volume, backend: Backend, dry_run: bool, outcome: Outcome) -> None:
        if volume.retention is None:
            return
        outcome.policy = volume.retention.name
        outcome.decisions = retention.decide(backend.list(), volume.retention, self.clock(),
                                             self.config.settings.timezone)
        doomed = [d.snapshot for d in outcome.decisions if not d.keep]
        if dry_run or not doomed:
            return
        with self.journal.run(volume.name, "prune", os.getpid()) as run:
            for snapshot in doomed:
                self._delete_one(backend, snapshot)
                run.deleted(str(snapshot.id))
                outcome.deleted.append(str(snapshot.id))

    def _delete(self, volume: Volume, ids: list[SnapshotId], dry_run: bool, outcome: Outcome) -> None:
        backend = self.backend(volume)
        with self._locked(volume):
            existing = {s.id: s for s in backend.list()}
            missing = [str(i) for i in ids if i not in existing]
            if missing:
                raise SnapmgrError(f"no such snapshot: {', '.join(missing)}")
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

    # Restore, diff, versions -----------------------------------------------------------

    def restore(self, snapshot_text: str, paths: Sequence[str], dest: Path | None, overwrite: bool = False,
                in_place: bool = False, delete: bool = False, dry_run: bool = False) -> restore.Restored:
        """Copy PATHS out of a snapshot into DEST, or with `in_place` back into the live
        volume, after a protected pre-rollback snapshot of it."""
        if delete and not in_place:
            raise UsageError("--delete only goes with --in-place, where the pre-rollback snapshot keeps what it "
                             "deletes; restore into an empty DEST instead")
        volume, backend, snapshot = self._snapshot_of(snapshot_text)
        live = backend.live_root()
        wanted = list(dict.fromkeys(volume_paths.relative(p, live, volume.name) for p in paths))
        if in_place:
            if live is None:
                raise SnapmgrError(f"volume {volume.name} is not mounted now: there is nowhere to restore in place")
            dest = live
        dest = Path(os.path.abspath(dest))
        kept = restore.kept_out(dest, wanted, self._own_places(volume, backend))
        with ExitStack() as stack:
            if in_place and not dry_run:
                stack.enter_context(self._locked(volume))
            root = stack.enter_context(backend.browse_root(snapshot))
            for path in wanted:
                volume_paths.located(root, path, str(snapshot.id))
            if not (overwrite or in_place):
                self._refuse_overwriting(root, wanted, dest)
            pre_rollback = None
            if in_place and not dry_run:
                pre_rollback = self._pre_rollback(volume)
                stack.enter_context(self.journal.run(volume.name, "restore", os.getpid()))
            try:
                changes = restore.copy(root, wanted, dest, dry_run, delete, backend.left_out(), kept)
            except SnapmgrError as e:
                if pre_rollback is None or isinstance(e, Interrupted):   # a stop is said as such
                    raise
                # Raised inside the journal's run, so the journal keeps this line too.
                raise SnapmgrError(f"{e}; the volume as it was before is in {pre_rollback}: snapmgr restore "
                                   f"{pre_rollback} PATH --in-place puts it back") from None
        return restore.Restored(str(snapshot.id), dest, tuple(wanted), dry_run, tuple(changes), pre_rollback)

    def _own_places(self, volume: Volume, backend: Backend) -> list[tuple[Path, str]]:
        """What a restore must never write into, as real paths, each with what it is."""
        settings = self.config.settings
        places = [(settings.state_dir, "snapmgr's state directory (its journal and records)"),
                  (settings.run_dir, "snapmgr's run directory (its locks)"),
                  *((storage, f"where volume {volume.name} keeps its snapshots") for storage in backend.written_paths())]
        return [(Path(os.path.realpath(place)), what) for place, what in places]

    def diff(self, old_text: str, new_text: str, path_text: str | None = None, quick: bool = False) -> diff.Diff:
        """What changed from snapshot OLD to snapshot NEW (or to the live volume, LIVE)."""
        volume, backend, old = self._snapshot_of(old_text)
        live = backend.live_root()
        new = None
        if new_text == LIVE:
            if live is None:
                raise SnapmgrError(f"volume {volume.name} is not mounted now: there is no live state to compare with")
        else:
            other, _, new = self._snapshot_of(new_text)
            if other.name != volume.name:
                raise UsageError(f"{old_text} and {new_text} are snapshots of different volumes; compare two "
                                 f"snapshots of one volume, or one with 'live'")
        path = volume_paths.relative(path_text, live, volume.name) if path_text else b""
        manifests = [self._usable_manifest(s) for s in (old, new)]
        algorithm = next((m.algorithm for m in manifests if m), ALGORITHMS[0])
        with ExitStack() as stack:
            sides = []
            for snapshot, found in zip((old, new), manifests):
                if found and found.algorithm == algorithm:
                    sides.append(diff.Side(str(snapshot.id), found, None))
                elif snapshot is None:
                    sides.append(diff.Side(LIVE, None, live, left_out=backend.left_out(),
                                           crosses_mounts=backend.crosses_mounts()))
                else:
                    sides.append(diff.Side(str(snapshot.id), None, stack.enter_context(backend.browse_root(snapshot))))
            return diff.differences(*sides, path, algorithm, quick, backend.shares_inodes and new is not None)

    def versions(self, path_text: str) -> versions.History:
        """Each distinct version of a live volume's file in its snapshots, newest first;
        also of a file deleted from the live volume since."""
        volume, backend, live, path = self._volume_holding(path_text)
        if not path:
            raise UsageError(f"{quote(path_text)} is the root of volume {volume.name}; name a file in it")
        snapshots = sorted((s for s in backend.list() if not s.invalid), key=lambda s: s.id, reverse=True)
        manifests = {s.id: self._usable_manifest(s) for s in snapshots}
        algorithm = next((m.algorithm for m in manifests.values() if m), ALGORITHMS[0])
        reader = versions.Reader(algorithm)
        current = reader.state(live, path, LIVE)
        if current is not None and current.kind == "d":
            raise UsageError(f"{quote(path_text)} is a directory; versions lists the versions of a file")
        found = []
        for snapshot in snapshots:
            held = manifests[snapshot.id]
            if held is not None and held.algorithm == algorithm:
                entry = held.lookup(path)
                state = versions.State.of(entry) if entry else None
            else:
                with backend.browse_root(snapshot) as root:
                    state = reader.state(root, path, str(snapshot.id))
            if state is not None:
                found.append((str(snapshot.id), state))
        return versions.History(volume.name, path, current, versions.distinct(found, current))

    def _volume_holding(self, path_text: str) -> tuple[Volume, Backend, Path, bytes]:
        """The volume whose live files hold the path (absolute, or relative to the current
        directory), and the path relative to its root; the innermost such volume."""
        absolute = os.path.abspath(path_text)
        parent, name = os.path.split(absolute)
        spellings = dict.fromkeys([absolute, os.path.join(os.path.realpath(parent), name)])
        best = None
        for volume in self.volumes():
            backend = self.backend(volume)
            try:
                live = backend.live_root()
            except (SnapmgrError, OSError) as e:
                log.debug("volume %s: no live root: %s", volume.name, e)
                continue
            for spelling in spellings:
                try:
                    path = volume_paths.relative(spelling, live, volume.name)
                except UsageError:
                    continue
                depth = len(os.fsencode(live).split(b"/"))
                if best is None or depth > best[0]:
                    best = (depth, (volume, backend, live, path))
        if best is None:
            raise UsageError(f"{quote(path_text)} is in no configured volume's live files "
                             f"(volumes: {', '.join(self.config.volumes) or 'none'})")
        return best[1]

    def _usable_manifest(self, snapshot: Snapshot | None) -> Manifest | None:
        """The snapshot's manifest; None for the live volume, or when it has none or a
        damaged one (then the snapshot is walked instead)."""
        if snapshot is None:
            return None
        try:
            return self.stored_manifest(snapshot)
        except ManifestDamaged as e:
            log.warning("%s; reading the snapshot itself instead", e)
            return None

    def _snapshot_of(self, text: str) -> tuple[Volume, Backend, Snapshot]:
        try:
            sid = SnapshotId.parse(text)
        except ValueError as e:
            raise UsageError(str(e)) from None
        [volume] = self.volumes([sid.volume])
        backend = self.backend(volume)
        snapshots = {s.id: s for s in backend.list()}
        if sid not in snapshots:
            newest = max(snapshots, default=None)
            raise SnapmgrError(f"no such snapshot: {sid} (volume {volume.name} has {len(snapshots)}"
                               + (f", the newest {newest})" if newest else ")"))
        return volume, backend, snapshots[sid]

    @staticmethod
    def _refuse_overwriting(root: Path, paths: list[bytes], dest: Path) -> None:
        existing = restore.conflicts(root, paths, dest)
        if existing:
            shown = ", ".join(volume_paths.shown(p) for p in existing[:restore.SHOWN_CONFLICTS])
            more = " and more" if len(existing) > restore.SHOWN_CONFLICTS else ""
            raise SnapmgrError(f"refusing to overwrite what exists in {dest}: {shown}{more} "
                               f"(--overwrite replaces them; nothing was copied)")

    def _pre_rollback(self, volume: Volume) -> str:
        """A protected snapshot of the volume as it is, taken under the lock already held."""
        outcome = Outcome(volume.name)
        self._take([volume], None, frozenset({PRE_ROLLBACK_TAG}), False, None, [outcome])
        if outcome.error or outcome.created is None:
            raise SnapmgrError(f"the {PRE_ROLLBACK_TAG} snapshot failed, so nothing was restored: {outcome.error}")
        return str(outcome.created.id)

    # Browsing -----------------------------------------------------------------------------

    def browsable(self, names: Iterable[str] = ()) -> dict[str, Backend]:
        """The backend of each named volume (all when none are named), for the FUSE mount:
        it lists their snapshots and enters them through browse_root(), read-only."""
        return {v.name: self.backend(v) for v in self.volumes(names)}


MANIFESTS_OFF = {"unverified": 'manifests are off for this volume (manifest = "off")'}


def _verify_state(verifies: list[Verify], existing: set[str]) -> tuple[Verify | None, tuple[str, ...]]:
    """Of the snapshots that still exist: the latest verify, and those found damaged."""
    mine = [v for v in verifies if v.snapshot in existing]
    return (mine[-1] if mine else None), tuple(sorted(v.snapshot for v in mine if v.result == "damaged"))


def _why_no_manifest(snapshot: Snapshot) -> str:
    state = (snapshot.record or {}).get("manifest")
    if state is None:
        return ("it has no manifest: it was taken before snapmgr recorded manifests, or its run "
                "was stopped before the manifest was written")
    return state.get("unverified") or "its manifest file is missing (deleted by hand?)"


def _attempt(take: Callable[[], Snapshot]) -> Snapshot | SnapmgrError:
    """One volume's snapshot, or why it failed; what ends the whole window is raised."""
    try:
        return take()
    except (Interrupted, WindowOverrun):
        raise
    except (SnapmgrError, OSError) as e:
        log.debug("taking the snapshot failed", exc_info=True)
        return as_error(e)
