"""systemd: stop units and start them again, or freeze and thaw them (cgroup v2).

Only the units that were active are paused and brought back, so a unit the administrator
had stopped stays stopped. `freeze` pauses every process of the units where they stand
(`systemctl freeze`, systemd >= 246 on the unified cgroup hierarchy): faster than a stop,
but a frozen database has not flushed anything, so its snapshot is only as good as a
crash; use it for services whose files are consistent between writes.

A rollback also stops what would start the units again while their files are being
replaced: the units that trigger them (a socket that starts its service at the first
connection, a path or timer unit), before the units, and starts them again after."""

from __future__ import annotations

import re
from functools import cached_property
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
        # What prepare() stops (or freezes), in that order, each only the units that were
        # active: in a rollback, the units' triggers, then the units.
        self.stages: list[list[str]] = []

    @property
    def active(self) -> list[str]:
        return [u for stage in self.stages for u in stage]

    @property
    def units(self) -> tuple[str, ...]:
        return self.opts["units"]

    @property
    def freezing(self) -> bool:
        # A rollback replaces the files under the services: they are stopped, never frozen.
        return self.opts["mode"] == "freeze" and self.context.purpose != "rollback"

    def open(self) -> None:
        if not _systemd_running():
            raise self._unfit("kind", f"systemd is not running on this system (PID 1 is {_pid1()}), so its "
                                      f"units cannot be stopped or frozen")
        if self.freezing:
            self._check_freeze_support()
        states = self._states()
        unknown = [u for u in self.units if states[u]["LoadState"] == "not-found"]
        if unknown:
            raise self._unfit("units", f"no such unit: {', '.join(map(quote, unknown))}")
        if self.triggers:
            states.update(self._states(self.triggers))
        stages = [self.triggers, tuple(u for u in self.units if u not in self.triggers)]
        self.stages = [active for stage in stages if (active := [u for u in stage if states[u]["ActiveState"] in
                                                                 ("active", "activating", "reloading")])]

    @cached_property
    def triggers(self) -> tuple[str, ...]:
        """In a rollback, the units that start the named ones on demand (systemd's
        TriggeredBy): a connection to a socket left listening would start its service
        while the files are replaced. Asked of systemd once, for the plan or for open()."""
        if self.context.purpose != "rollback" or not _systemd_running():
            return ()
        blocks = systemctl.show(self.units, ["TriggeredBy"], self.timeout)
        return tuple(dict.fromkeys(t for b in blocks for t in b.get("TriggeredBy", "").split()))

    def _states(self, units: tuple[str, ...] | None = None) -> dict[str, dict[str, str]]:
        """LoadState and ActiveState of each unit (by default the named ones)."""
        units = units or self.units
        blocks = systemctl.show(units, ["LoadState", "ActiveState"], self.timeout)
        if not all({"LoadState", "ActiveState"} <= b.keys() for b in blocks):
            raise SnapmgrError(f"quiesce {self.name}: systemctl show gave no state for each unit: {quote(blocks)}")
        return dict(zip(units, blocks))

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
        return [undo.run_action(self._argv(self.verbs[1], self.active), {}, self.timeout, at_boot, queued)] \
            if self.active else []

    def prepare(self) -> None:
        for stage in self.stages:
            self._systemctl(self.verbs[0], stage)

    def resume(self) -> None:
        # In one transaction, which systemd orders by the units' own dependencies: a socket
        # starts before its service, which would otherwise get no listening descriptor.
        if self.active:
            self._systemctl(self.verbs[1], self.active)

    def _systemctl(self, verb: str, units: list[str]) -> None:
        # holds_locks=False: a started service must not hold the volume lock.
        sh.run(self._argv(verb, units), timeout=self.timeout, holds_locks=False)

    @staticmethod
    def _argv(verb: str, units: list[str]) -> list[str]:
        return ["systemctl", verb, "--", *units]

    def describe(self) -> str:
        pause, back = self.verbs
        units = " ".join(u for u in self.units if u not in self.triggers)
        if not self.triggers:
            return f"systemctl {pause} {units}, then {back} (only the units that were active)"
        triggers = " ".join(self.triggers)
        return (f"systemctl {pause} {triggers} (which start them on demand), then {pause} {units}; then {back} "
                f"them all (only the units that were active)")


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _pid1() -> str:
    try:
        return quote(Path("/proc/1/comm").read_text().strip())
    except OSError:
        return "unknown"
