"""The engine sequences every job: lock -> (quiesce) -> snapshot -> (resume) -> record -> prune.

It is the only module that knows the order of steps. Each volume's job runs under that
volume's lock; a failure of one volume is reported and does not stop the others."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from snapmgr import retention, sh
from snapmgr.backends import BACKENDS
from snapmgr.backends.base import Backend, Progress
from snapmgr.config import Config, Volume
from snapmgr.errors import SnapmgrError, UsageError, as_error, quote
from snapmgr.journal import Journal, JournalError, VolumeHistory
from snapmgr.lock import volume_lock
from snapmgr.model import ForeignSnapshot, Snapshot, SnapshotId
from snapmgr.schema import did_you_mean

log = logging.getLogger(__name__)
DEFAULT_TAG = "manual"


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
                 dry_run: bool = False, progress: Progress | None = None) -> list[Outcome]:
        tags = frozenset(tags) or frozenset({DEFAULT_TAG})
        return [self._each(v, lambda o, v=v: self._snapshot(v, tags, prune, dry_run, progress, o))
                for v in self.volumes(names)]

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
        return sorted((s for v in self.volumes(names) for s in self.backend(v).list()), key=lambda s: s.id)

    def foreign(self, names: Iterable[str] = ()) -> list[ForeignSnapshot]:
        return sorted((f for v in self.volumes(names) for f in self.backend(v).foreign()),
                      key=lambda f: (f.volume, f.created, f.name))

    def status(self, names: Iterable[str] = ()) -> list[VolumeStatus]:
        statuses = []
        for volume in self.volumes(names):
            history = self.journal.history(volume.name)
            try:
                snapshots = self.backend(volume).list()
            except (SnapmgrError, OSError) as e:
                statuses.append(VolumeStatus(volume.name, volume.backend, None, None, history, str(as_error(e))))
                continue
            invalid = sorted((s for s in snapshots if s.invalid), key=lambda s: s.id)
            problem = "; ".join(f"{s.id} is invalid ({s.invalid})" for s in invalid) or None
            statuses.append(VolumeStatus(volume.name, volume.backend, len(snapshots),
                                         max(snapshots, key=lambda s: s.id, default=None), history,
                                         problem, tuple(str(s.id) for s in invalid)))
        return statuses

    # One volume -------------------------------------------------------------------------

    def _each(self, volume: Volume, job: Callable[[Outcome], None]) -> Outcome:
        outcome = Outcome(volume.name)
        try:
            job(outcome)
        except (SnapmgrError, OSError) as e:
            log.debug("volume %s failed", volume.name, exc_info=True)
            outcome.error = as_error(e)
        return outcome

    @contextmanager
    def _locked(self, volume: Volume):
        """The volume's lock, held also by every program run meanwhile, so that no
        program left running by a killed run can race the next one."""
        settings = self.config.settings
        with volume_lock(settings.run_dir, volume.name, settings.lock_wait.total_seconds()) as fd, sh.holding(fd):
            yield

    def _snapshot(self, volume: Volume, tags: frozenset[str], prune: bool, dry_run: bool,
                  progress: Progress | None, outcome: Outcome) -> None:
        backend = self.backend(volume)
        with self._locked(volume):
            sid = SnapshotId.next_free(volume.name, self.clock(), (s.id for s in backend.list()))
            if dry_run:
                outcome.planned = f"would create {sid}: {backend.plan_create(sid)}"
            else:
                with self.journal.run(volume.name, "snapshot", os.getpid()) as run:
                    # Quiescers (a later release) wrap exactly this call: services are
                    # paused for the create alone, never for recording or pruning.
                    outcome.created = backend.create(sid, tags | volume.tags, progress)
                    run.created(str(sid))
            if prune:
                self._prune_locked(volume, backend, dry_run, outcome)

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
                backend.delete(snapshot)
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
                    backend.delete(existing[sid])
                    run.deleted(str(sid))
                    outcome.deleted.append(str(sid))

