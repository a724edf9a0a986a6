"""systemd: stop units and start them again, or freeze and thaw them (cgroup v2).

Only the units that were active are paused and brought back, so a unit the administrator
had stopped stays stopped. `freeze` pauses every process of the units where they stand
(`systemctl freeze`, systemd >= 246 on the unified cgroup hierarchy): faster than a stop,
but a frozen database has not flushed anything, so its snapshot is only as good as a
crash; use it for services whose files are consistent between writes."""

from __future__ import annotations

import re
from pathlib import Path

from snapmgr import schema, sh, systemctl
from snapmgr.errors import SnapmgrError, quote
from snapmgr.quiesce import undo
from snapmgr.quiesce.base import Quiescer

FREEZE_SINCE = 246  # the systemd release that added `systemctl freeze`
UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(service|socket|target|scope|slice|mount|timer|path)")


def unit(value) -> str:
    text = schema.string(value)
    if not UNIT_RE.fullmatch(text) or text.startswith("-"):
        raise ValueError(f"{quote(text)} is not a systemd unit name (e.g. myapp.service)")
    return text


class SystemdQuiescer(Quiescer):
    kind = "systemd"
    options = {"units": schema.Field(schema.list_of(unit, non_empty=True), required=True),
               "mode": schema.Field(schema.choice("stop", "freeze"), default="stop")}

    def __init__(self, *args):
        super().__init__(*args)
        self.active: list[str] = []

    @property
    def units(self) -> tuple[str, ...]:
        return self.opts["units"]

    @property
    def freezing(self) -> bool:
        # A rollback replaces the files under the services: they are stopped, never frozen.
        return self.opts["mode"] == "freeze" and self.context.purpose != "rollback"

    def open(self) -> None:
        if not Path("/run/systemd/system").is_dir():
            raise self._unfit("kind", f"systemd is not running on this system (PID 1 is {_pid1()}), so its "
                                      f"units cannot be stopped or frozen")
        if self.freezing:
            self._check_freeze_support()
        states = self._states()
        unknown = [u for u in self.units if states[u]["LoadState"] == "not-found"]
        if unknown:
            raise self._unfit("units", f"no such unit: {', '.join(map(quote, unknown))}")
        self.active = [u for u in self.units if states[u]["ActiveState"] in ("active", "activating", "reloading")]

    def _states(self) -> dict[str, dict[str, str]]:
        """LoadState and ActiveState of each unit."""
        blocks = systemctl.show(self.units, ["LoadState", "ActiveState"], self.timeout)
        if not all({"LoadState", "ActiveState"} <= b.keys() for b in blocks):
            raise SnapmgrError(f"quiesce {self.name}: systemctl show gave no state for each unit: {quote(blocks)}")
        return dict(zip(self.units, blocks))

    def _check_freeze_support(self) -> None:
        if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
            raise self._unfit("mode", "\"freeze\" needs the unified cgroup hierarchy (cgroup v2), which this "
                                      "system does not use; use mode = \"stop\"")
        first = sh.run(["systemctl", "--version"], timeout=self.timeout, holds_locks=False).stdout.split("\n")[0]
        version = int(m[1]) if (m := re.match(r"systemd (\d+)", first)) else 0
        if version < FREEZE_SINCE:
            raise self._unfit("mode", f"\"freeze\" needs systemd {FREEZE_SINCE} or later, this is {quote(first)}; "
                                      f"use mode = \"stop\"")

    @property
    def verbs(self) -> tuple[str, str]:
        return ("freeze", "thaw") if self.freezing else ("stop", "start")

    def undo(self) -> list[dict]:
        # snapmgr-recover.service runs before the units (it is ordered Before= them): a
        # start there is queued, for waiting on it would wait forever. Nothing is frozen
        # after a restart; a thaw waits for nothing.
        queued = None if self.freezing else ["systemctl", "start", "--no-block", "--", *self.active]
        at_boot = [] if self.freezing else queued
        return [undo.run_action(self._argv(self.verbs[1]), {}, self.timeout, at_boot, queued)] if self.active else []

    def prepare(self) -> None:
        self._systemctl(self.verbs[0])

    def resume(self) -> None:
        self._systemctl(self.verbs[1])

    def _systemctl(self, verb: str) -> None:
        if self.active:
            # holds_locks=False: a started service must not hold the volume lock.
            sh.run(self._argv(verb), timeout=self.timeout, holds_locks=False)

    def _argv(self, verb: str) -> list[str]:
        return ["systemctl", verb, "--", *self.active]

    def describe(self) -> str:
        pause, back = self.verbs
        return f"systemctl {pause} {' '.join(self.units)}, then {back} (only the units that were active)"


def _pid1() -> str:
    try:
        return quote(Path("/proc/1/comm").read_text().strip())
    except OSError:
        return "unknown"
