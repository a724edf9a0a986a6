"""fsfreeze: FIFREEZE / FITHAW on descriptors of the mountpoints, opened before the window.

No dependence on the fsfreeze program or on PATH: the watchdog thaws through the very
descriptors it inherited. snapmgr itself must keep working while the filesystems are
frozen, so it refuses to freeze `/` or any filesystem it writes to or runs from."""

from __future__ import annotations

import os
from pathlib import Path

from snapmgr import schema
from snapmgr.errors import ConfigError, quote
from snapmgr.quiesce import undo
from snapmgr.quiesce.base import Quiescer
from snapmgr.quiesce.freezing import freeze, thaw

class FsfreezeQuiescer(Quiescer):
    kind = "fsfreeze"
    in_rollback = "skip"
    holds = "filesystem"
    options = {"mountpoints": schema.Field(schema.list_of(schema.mountpoint, non_empty=True), required=True)}

    def __init__(self, *args):
        super().__init__(*args)
        self.fds: dict[Path, int] = {}
        self.frozen: list[Path] = []

    @property
    def mountpoints(self) -> tuple[Path, ...]:
        return self.opts["mountpoints"]

    def open(self) -> None:
        for mountpoint in self.mountpoints:
            self._refuse_if_busy(mountpoint)
        for mountpoint in self.mountpoints:
            self.fds[mountpoint] = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _refuse_if_busy(self, mountpoint: Path) -> None:
        device = os.stat(mountpoint).st_dev
        busy = {"/ (the root filesystem)": Path("/"), **self.context.busy_paths}
        for what, path in busy.items():
            if _device_of(path) == device:
                raise ConfigError(self.context.config, f"quiesce.{self.name}.mountpoints",
                                  f"refusing to freeze {quote(mountpoint)}: it holds {what}, which snapmgr "
                                  f"needs while the filesystem is frozen")

    def undo(self) -> list[dict]:
        return [undo.thaw_action(m, fd) for m, fd in self.fds.items()]

    def prepare(self) -> None:
        for mountpoint, fd in self.fds.items():
            # Noted first: a signal handled as FIFREEZE returns must not hide a freeze from
            # resume(), and thawing what is not frozen is harmless.
            self.frozen.append(mountpoint)
            freeze(fd)

    def resume(self) -> None:
        while self.frozen:
            thaw(self.fds[self.frozen[-1]])
            self.frozen.pop()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def describe(self) -> str:
        return "freeze " + ", ".join(map(str, self.mountpoints)) + " (FIFREEZE), then thaw"


def _device_of(path: Path) -> int | None:
    """The filesystem holding `path`, or that would hold it once created."""
    for candidate in (path, *path.parents):
        try:
            return os.stat(candidate).st_dev
        except OSError:
            continue
    return None
