"""The last step of a rollback's window, which no configuration names: the services start
again only where the volume is mounted. A rollback that takes the volume off its
mountpoint (an LVM merge, a ZFS swap) and is cut short before mounting it again would
otherwise have them write into the bare directory underneath, where the files vanish
once the volume is mounted over them. Resumed first, the gate holds the services back
(in snapmgr, in the watchdog, in a later run's recovery) until it is mounted again:
a service kept stopped is told of and recovered; files written there are lost quietly."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from snapmgr.quiesce import undo
from snapmgr.quiesce.base import Context, Quiescer, Spec

NAME = "mounted"


class MountedGate(Quiescer):
    kind = "mounted"
    options = {}
    gates = True

    def __init__(self, mountpoints: list[Path], context: Context):
        super().__init__(Spec(NAME, self.kind, timedelta(seconds=10), True, timedelta(0),
                              {"mountpoints": [str(p) for p in mountpoints]}), context)

    def undo(self) -> list[dict]:
        return [undo.mounted_action(self.opts["mountpoints"])]

    def prepare(self) -> None:
        """Nothing to pause."""

    def resume(self) -> None:
        undo.check_mounted(self.opts["mountpoints"])

    def describe(self) -> str:
        return f"the services start again only once {', '.join(self.opts['mountpoints'])} is mounted again"
