"""How each volume is doing, judged once for both the check and the metrics.

The facts come from Engine.status: the snapshots as the backend lists them (or, for a
reader who cannot list them, as the last run recorded them: snapmgr.observed), and the
journal's runs, windows and verifies. Here they become findings in the states of the
monitoring plugins: OK, WARNING, CRITICAL, UNKNOWN."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Collection, Iterable

from snapmgr import calendar
from snapmgr.config import Config, Schedule, Volume
from snapmgr.engine import Engine, VolumeStatus
from snapmgr.errors import SnapmgrError
from snapmgr.journal import JournalError, RunRecord
from snapmgr.model import span, stamp
from snapmgr.monitor import processes

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
# Which state wins when several meet: an unknown volume must not hide behind healthy
# ones, and is less urgent than a known failure (monitoring-plugins' max_state_alt).
RANK = {OK: 0, UNKNOWN: 1, WARNING: 2, CRITICAL: 3}
# Ages a volume's schedules allow, as multiples of the longest gap between two of the
# shortest covering schedule's elapses.
WARN_FACTOR, CRIT_FACTOR = 1.5, 3
# The actions a schedule runs; a delete is run by hand, by someone who saw it fail.
WATCHED_ACTIONS = ("snapshot", "prune")
ATTEMPTS = 3  # reads of a journal a writer keeps racing (Journal.raced)


def worst(states: Iterable[int]) -> int:
    return max(states, key=RANK.__getitem__, default=OK)


@dataclass(frozen=True)
class Finding:
    state: int
    text: str


@dataclass(frozen=True)
class Ages:
    """How old a volume's newest good snapshot may grow; None: no alarm of that kind."""

    warn: timedelta | None
    crit: timedelta | None
    source: str                 # why these, for people


@dataclass(frozen=True)
class VolumeHealth:
    status: VolumeStatus
    ages: Ages | None           # None when they could not be worked out (a finding says why)
    age: timedelta | None       # of the newest good snapshot
    findings: tuple[Finding, ...]

    @property
    def state(self) -> int:
        return worst(f.state for f in self.findings)


@dataclass(frozen=True)
class Health:
    volumes: list[VolumeHealth]
    at: datetime
    live: bool                  # snapshots listed now, or as the runs recorded them
    run_counts: dict[tuple[str, str, str], int]

    @property
    def state(self) -> int:
        return worst(v.state for v in self.volumes)


def gather(engine: Engine, names: Iterable[str] = (), live: bool | Collection[str] | None = None,
           record: bool = False) -> Health:
    """Every named volume (all when none are named), judged now. `live` (default: when
    running as root) lists the snapshots; otherwise they are read as the last run
    recorded them; names of volumes: those are listed (Engine.status). `record`: keep
    what was listed in the journal for such readers."""
    live = os.geteuid() == 0 if live is None else live
    names = list(names)
    statuses, counts = _read(engine, names, live, record)
    now = datetime.now(timezone.utc)
    interval = functools.cache(calendar.interval)
    volumes = []
    for status in statuses:
        volume = engine.config.volumes[status.volume]
        try:
            ages = ages_of(engine.config, volume, interval)
            unknown = []
        except SnapmgrError as e:
            ages, unknown = None, [Finding(UNKNOWN, f"its snapshots' allowed age cannot be worked out: {e}")]
        good = status.newest_good
        volumes.append(VolumeHealth(status, ages, good and now - good.created,
                                    tuple(unknown + assess(status, ages, now, live is not False))))
    return Health(volumes, now, live is not False, counts)


def _read(engine: Engine, names: list[str], live: bool, record: bool):
    """The statuses and run counts, read again when a writer raced a read-only reader."""
    journal = engine.journal
    for attempt in range(1, ATTEMPTS + 1):
        try:
            # Read at one moment, unless what is listed is recorded meanwhile.
            with contextlib.nullcontext() if record else journal.reading():
                found = engine.status(names, live, record), journal.run_counts()
        except JournalError:
            if attempt == ATTEMPTS or not journal.raced():
                raise
        else:
            if not journal.raced():
                return found
        journal.close()
    raise JournalError(f"journal {journal.path} changed under every one of {ATTEMPTS} reads; try again")


def ages_of(config: Config, volume: Volume, interval: Callable[[str], timedelta] = calendar.interval) -> Ages:
    """The volume's own warn_age and crit_age, the rest derived from the shortest of the
    schedules that snapshot it (WARN_FACTOR and CRIT_FACTOR times the longest gap between
    its runs); a volume no schedule covers has no age it must keep to
    (sanoid #562, #654: no alarm for a period nobody configured)."""
    covering = sorted(s.name for s in config.schedules.values() if volume.name in config.volumes_of(s))
    warn, crit, source = volume.warn_age, volume.crit_age, "warn_age / crit_age of the volume"
    if covering and (warn is None or crit is None):
        gap, name = min((_gap(config.schedules[n], interval), n) for n in covering)
        derived = f"{WARN_FACTOR:g}x / {CRIT_FACTOR:g}x the {span(gap)} between runs of schedule {name}"
        source = derived if warn is None and crit is None else f"{source}, else {derived}"
        warn = warn if warn is not None else gap * WARN_FACTOR
        crit = crit if crit is not None else gap * CRIT_FACTOR
    elif warn is None and crit is None:
        source = "no schedule covers it and it sets no warn_age or crit_age"
    if warn is not None and crit is not None and warn >= crit:
        warn = None   # its own crit_age is below what the schedule would warn at: critical says it all
    return Ages(warn, crit, source)


def _gap(schedule: Schedule, interval: Callable[[str], timedelta]) -> timedelta:
    """The longest time between two runs of the schedule: its timer may fire up to its
    randomized delay plus its accuracy after each elapse (a daily run with a 12h random
    delay can follow the previous one by 36h)."""
    return interval(schedule.on_calendar) + schedule.randomized_delay + schedule.accuracy


def _alive(run: RunRecord) -> bool:
    return processes.running(run.pid, run.started, run.boot_id, run.start_ticks)


def assess(s: VolumeStatus, ages: Ages | None, now: datetime, live: bool,
           alive: Callable[[RunRecord], bool] = _alive) -> list[Finding]:
    """What is wrong with the volume, if anything. `alive`: whether a run's process is
    still there (a run journaled as running whose process is gone was killed)."""
    found = []
    seen = f" (as the run at {stamp(s.observed_at)} listed them)" if s.observed_at else ""
    if s.snapshots is None:
        if live or s.observed_at:
            found.append(Finding(CRITICAL, f"its snapshots cannot be listed{seen}: {s.problem}"))
        else:
            found.append(Finding(UNKNOWN, f"{s.problem}, and listing them needs root"))
    elif s.invalid:
        found.append(Finding(CRITICAL, f"{s.problem}{seen}"))
    if s.damaged:
        found.append(Finding(CRITICAL, f"verify found damage in {', '.join(s.damaged)}"))
    found += _runs(s.runs, alive)
    found += _window(s)
    found += _rollback(s, alive)
    if ages is not None and s.snapshots is not None:
        found += _age(s, ages, now)
    if s.newest is not None and s.newest.grade == "degraded":
        why = "; ".join((s.newest.record or {}).get("degraded") or []) or "an optional quiescer failed"
        found.append(Finding(WARNING, f"the newest snapshot {s.newest.id} is degraded: {why}"))
    return found


def _runs(runs: tuple[RunRecord, ...], alive: Callable[[RunRecord], bool]) -> list[Finding]:
    found = []
    for action in WATCHED_ACTIONS:
        mine = [r for r in runs if r.action == action]        # oldest first
        finished = [r for r in mine if r.status != "running"]
        if finished and finished[-1].status == "failed":
            last = finished[-1]
            found.append(Finding(CRITICAL, f"the last {action} run failed at {stamp(last.ended)}: {last.error}"))
        if mine and mine[-1].status == "running" and not alive(mine[-1]):
            run = mine[-1]
            found.append(Finding(CRITICAL, f"the {action} run started at {stamp(run.started)} by pid {run.pid} "
                                           f"never finished: its process is gone (killed?)"))
    return found


def _window(s: VolumeStatus) -> list[Finding]:
    """A window cut short by the watchdog, or resumed by a later run after its own died,
    until a snapshot run started after its end succeeds; and a window not fully resumed
    (an undo action failed, or its recovery was given up), whatever came after it."""
    found = []
    w = s.last_window
    how = {"undone": "was cut by the watchdog",
           "recovered": "was left open by its run, and resumed later"}.get(w.status) if w else None
    ok = next((r for r in s.runs if r.action == "snapshot" and r.status == "ok"), None)
    if how and not (ok is not None and ok.started > w.ended):
        found.append(Finding(CRITICAL, f"the quiesce window opened at {stamp(w.started)} {how}"
                                       + (f": {w.detail}" if w.detail else "")))
    u = s.unresumed_window
    if u is not None:
        how = "could not be resumed" if u.status == "recovery-failed" else "is not fully resumed yet"
        found.append(Finding(CRITICAL, f"the quiesce window opened at {stamp(u.started)} {how}"
                                       + (f": {u.detail}" if u.detail else "")))
    return found


def _rollback(s: VolumeStatus, alive: Callable[[RunRecord], bool]) -> list[Finding]:
    """A rollback cut short (its run killed too) leaves the volume part way until it is
    resumed or undone; one pending takes effect later."""
    r = s.rollback
    if r is None:
        return []
    if r.state == "cut-short" or (r.state == "rolling-back" and not (r.run and alive(r.run))):
        return [Finding(CRITICAL, f"the rollback to {r.target} begun at {stamp(r.started)} was cut short and the "
                                  f"volume may be part way: snapmgr rollback --resume {s.volume} finishes it, "
                                  f"snapmgr rollback {r.pre_rollback} puts it back as it was")]
    if r.state == "pending":
        return [Finding(WARNING, f"the rollback to {r.target} is pending: {s.rollback_pending or r.detail}")]
    return []


def _age(s: VolumeStatus, ages: Ages, now: datetime) -> list[Finding]:
    if ages.warn is None and ages.crit is None:
        return []
    good = s.newest_good
    if good is None:
        state = CRITICAL if ages.crit is not None else WARNING
        bad = f" (its {s.snapshots} are invalid or damaged)" if s.snapshots else ""
        return [Finding(state, f"it has no good snapshot{bad}")]
    age = now - good.created
    for state, limit in ((CRITICAL, ages.crit), (WARNING, ages.warn)):
        if limit is not None and age > limit:
            return [Finding(state, f"the newest good snapshot {good.id} is {span(age)} old "
                                   f"({NAMES[state].lower()} after {span(limit)})")]
    return []
