"""`snapmgr systemd install | uninstall | status`: the rendered units put in place (only
what changed is rewritten, units of schedules gone are removed, never a unit snapmgr did
not write), systemd told of them, and what systemd says of their runs."""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from snapmgr import calendar, files, sh, systemctl, systemd
from snapmgr.config import Config
from snapmgr.errors import ConfigError, SnapmgrError, UsageError, quote
from snapmgr.journal import JournalError, VolumeHistory

SYSTEM_DIR = Path("/etc/systemd/system")
TIMEOUT = 90   # for one systemctl call: a stop waits for a running snapshot's SIGTERM handling
_STAMP_RE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")
ERROR_MARK = "snapmgr: error: "
# ExecMainCode: how the main process ended (siginfo's si_code, as systemctl show prints it).
CLD_KILLED, CLD_DUMPED = "2", "3"


@dataclass
class Changes:
    """What install or uninstall did (or, with --dry-run, would do) in `unit_dir`."""

    unit_dir: Path
    dry_run: bool
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)   # empty with --unit-dir: systemd is not told


@dataclass(frozen=True)
class TimerState:
    schedule: str
    timer: str
    service: str
    enabled: str                      # UnitFileState of the timer: enabled, disabled, ... or "not-found"
    active: str                       # ActiveState of the timer
    last_trigger: datetime | None
    next_elapse: datetime | None
    running: bool                     # a run is under way now
    last_result: str | None           # Result of the service's last run; None if it never ran
    exit_status: int | None           # None also when a signal killed it
    last_error: str | None
    signal: str | None = None         # the signal that killed the last run (SIGKILL, ...)


def check_calendars(config: Config) -> dict[str, datetime]:
    """Each schedule's next elapse; a ConfigError naming the key of one systemd refuses."""
    found = {}
    for s in config.schedules.values():
        try:
            found[s.name] = calendar.elapses(s.on_calendar)[0]
        except calendar.CalendarError as e:
            raise ConfigError(config.path, f"schedules.{s.name}.on_calendar", str(e)) from None
    return found


def install(config: Config, unit_dir: Path | None, dry_run: bool) -> Changes:
    check_calendars(config)
    _not_systemds(unit_dir)
    live = unit_dir is None
    changes = Changes(unit_dir or SYSTEM_DIR, dry_run)
    units = systemd.render(config)
    mine = _own_units(config, changes.unit_dir)
    for unit in units:
        path = changes.unit_dir / unit.name
        if unit.name not in mine and (path.exists() or path.is_symlink()):
            raise SnapmgrError(f"{path} exists and was not written by snapmgr from {systemd.absolute(config.path)}; "
                               f"not overwriting it (move it away, or uninstall it with the config that wrote it)")
        (changes.unchanged if mine.get(unit.name) == unit.text else changes.written).append(unit.name)
    changes.removed = sorted(set(mine) - {u.name for u in units})
    timers = [u.name for u in units if u.name.endswith(".timer")]
    if live:
        changes.enabled = [*timers, systemd.RECOVER]
    if dry_run:
        return changes
    if live:
        _require_systemd()
        _stop_and_disable(changes.removed)
    changes.unit_dir.mkdir(parents=True, exist_ok=True)
    for name in changes.removed:
        (changes.unit_dir / name).unlink()
    texts = {u.name: u.text for u in units}
    for name in changes.written:
        files.replace(changes.unit_dir / name, texts[name])  # systemd never reads half a unit
    if live:
        _systemctl("daemon-reload")
        if timers:
            _systemctl("enable", "--now", "--", *timers)
        _systemctl("enable", "--", systemd.RECOVER)
    return changes


def uninstall(config: Config, unit_dir: Path | None, dry_run: bool) -> Changes:
    """Every unit written from this config stopped, disabled and removed (and the mounts
    of the FUSE template with them)."""
    _not_systemds(unit_dir)
    live = unit_dir is None
    changes = Changes(unit_dir or SYSTEM_DIR, dry_run)
    changes.removed = sorted(_own_units(config, changes.unit_dir))
    if dry_run or not changes.removed:
        return changes
    if live:
        _require_systemd()
        instances = _loaded(f"{systemd.MOUNT.split('@')[0]}@*.service") if systemd.MOUNT in changes.removed else []
        _stop_and_disable(changes.removed + instances)
    for name in changes.removed:
        (changes.unit_dir / name).unlink()
    if live:
        _systemctl("daemon-reload")
    return changes


def status(config: Config, history: Callable[[str], VolumeHistory]) -> list[TimerState]:
    """Each schedule's timer as systemd has it, with the result of its last run; the error
    of a failed run from the journal of that very run (journalctl), else the newest
    failure snapmgr's journal holds for the schedule's volumes."""
    _require_systemd()
    states = []
    for s in config.schedules.values():
        timer, service = systemd.timer(s.name), systemd.service(s.name)
        t, v = systemctl.show([timer, service], ["UnitFileState", "ActiveState", "SubState", "LastTriggerUSec",
                                                 "NextElapseUSecRealtime", "Result", "ExecMainCode",
                                                 "ExecMainStatus", "ExecMainStartTimestamp", "InvocationID",
                                                 "LoadState"], TIMEOUT)
        started = _stamp(v.get("ExecMainStartTimestamp", ""))
        result = v.get("Result") if started else None
        error = None
        if result not in (None, "success"):
            error = _journal_error(v.get("InvocationID", "")) or _newest_error(config, s.name, started, history)
        code, status_ = v.get("ExecMainCode", ""), v.get("ExecMainStatus", "")
        killed = started is not None and code in (CLD_KILLED, CLD_DUMPED) and status_.isdigit()
        enabled = "not-found" if t.get("LoadState") == "not-found" else t.get("UnitFileState") or "unknown"
        states.append(TimerState(
            s.name, timer, service, enabled, t.get("ActiveState", "inactive"), _stamp(t.get("LastTriggerUSec", "")),
            _stamp(t.get("NextElapseUSecRealtime", "")),
            # The timer's own word too: from its elapse until its service ends, systemd
            # has no next elapse for it, even before the service shows as activating.
            v.get("ActiveState") in ("activating", "deactivating") or t.get("SubState") == "running",
            result, int(status_) if started and not killed and status_.isdigit() else None, error,
            _signal_name(int(status_)) if killed else None))
    return states


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _not_systemds(unit_dir: Path | None) -> None:
    """--unit-dir leaves the running systemd alone: a directory systemd reads units from
    would have it run them unreloaded, and lose running timers' units unstopped."""
    if unit_dir is None:
        return
    read = sh.run(["systemd-analyze", "unit-paths"], timeout=TIMEOUT, holds_locks=False).stdout.split()
    if os.path.realpath(unit_dir) in {os.path.realpath(p) for p in read}:
        raise UsageError(f"--unit-dir {quote(unit_dir)}: systemd reads its units from there; leave out --unit-dir "
                         f"to install into {SYSTEM_DIR} with systemd told of the changes")


# Files ------------------------------------------------------------------------------------

def _own_units(config: Config, unit_dir: Path) -> dict[str, str]:
    """The unit files in `unit_dir` that snapmgr wrote from this config, with their text."""
    wanted = str(systemd.absolute(config.path))
    found = {}
    try:
        entries = sorted(unit_dir.iterdir())
    except FileNotFoundError:
        return {}
    for path in entries:
        if not path.name.startswith(systemd.PREFIX) or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if systemd.written_from(text) == wanted:
            found[path.name] = text
    return found


# systemd ----------------------------------------------------------------------------------

def _require_systemd() -> None:
    if not Path("/run/systemd/system").is_dir():
        raise UsageError("systemd is not running on this system, so its units cannot be installed, changed or shown "
                         "here; write them elsewhere with --unit-dir DIR")


def _systemctl(*args: str) -> str:
    return sh.run(["systemctl", *args], timeout=TIMEOUT, holds_locks=False).stdout


def _systemctl_each(*verb: str, units: list[str]) -> None:
    if units:
        _systemctl(*verb, "--", *units)


def _stop_and_disable(units: list[str]) -> None:
    """A template has nothing to stop (its instances are named among `units`): only
    disabled. A failed run's state is forgotten too, or it would outlive its unit file
    in `systemctl --failed`."""
    templates = [u for u in units if "@." in u]
    running = [u for u in units if u not in templates]
    timers = [u for u in running if u.endswith(".timer")]
    # The timers first: one elapsing while its service is stopped in the same call would
    # queue a start that cancels the stop ("Job ... canceled", and systemctl fails).
    _systemctl_each("disable", "--now", units=timers)
    _systemctl_each("disable", "--now", units=[u for u in running if u not in timers])
    _systemctl_each("disable", units=templates)
    for unit in running:
        sh.run(["systemctl", "reset-failed", "--", unit], timeout=TIMEOUT, check=False, holds_locks=False)


def _loaded(pattern: str) -> list[str]:
    out = _systemctl("list-units", "--all", "--plain", "--no-legend", "--full", "--", pattern)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _stamp(text: str) -> datetime | None:
    m = _STAMP_RE.search(text)
    return datetime.fromisoformat(m[1]).replace(tzinfo=timezone.utc) if m else None


def _journal_error(invocation: str) -> str | None:
    """The last error line snapmgr wrote in that run of the service."""
    if not re.fullmatch(r"[0-9a-f]{32}", invocation):
        return None
    try:
        done = sh.run(["journalctl", "--no-pager", "--output=cat", f"_SYSTEMD_INVOCATION_ID={invocation}"],
                      timeout=TIMEOUT, check=False, holds_locks=False)
    except sh.CommandNotFound:
        return None
    errors = [line[len(ERROR_MARK):] for line in done.stdout.splitlines() if line.startswith(ERROR_MARK)]
    return errors[-1] if errors else None


def _newest_error(config: Config, schedule: str, since: datetime | None,
                  history: Callable[[str], VolumeHistory]) -> str | None:
    try:
        histories = [history(v) for v in config.volumes_of(config.schedules[schedule])]
    except JournalError:
        return None
    failures = [h for h in histories if h.last_failure and (since is None or h.last_failure >= since)]
    newest = max(failures, key=lambda h: h.last_failure, default=None)
    return newest.last_error if newest else None
