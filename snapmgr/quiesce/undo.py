"""Undo actions: how a prepared quiescer is resumed without the process that prepared it.

They are plain data (JSON), so they cross the pipe to the watchdog and sit in the
journal for a later run to replay. Every action is idempotent: thawing a filesystem that
is not frozen does nothing, starting a running unit does nothing, and a `post` command
is documented to be safe to run twice."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Collection, Mapping, Sequence

from snapmgr import sh
from snapmgr.errors import SnapmgrError, quote
from snapmgr.quiesce.freezing import thaw


def thaw_action(mountpoint: Path, fd: int | None) -> dict:
    return {"thaw": str(mountpoint), "fd": fd}


def run_action(argv: Sequence[str], env: Mapping[str, str], timeout: float,
               at_boot: Sequence[str] | None = None, queued: Sequence[str] | None = None) -> dict:
    """`at_boot`: what to run instead when the machine restarted since the window, before
    the services come up ([] for nothing); `queued`: what to run instead when it must not
    wait (snapmgr-recover.service, which the units it would wait for are ordered after).
    By default the same argv."""
    action = {"run": list(argv), "env": dict(env), "timeout": timeout}
    if at_boot is not None:
        action["at_boot"] = list(at_boot)
    if queued is not None:
        action["queued"] = list(queued)
    return action


def mounted_action(mountpoints: Sequence[str]) -> dict:
    return {"mounted": list(mountpoints)}


def check_mounted(mountpoints: Sequence[str]) -> str:
    """Raise unless something is mounted at each mountpoint, as the mount table says (a
    bind mount within one filesystem is one too)."""
    from snapmgr.backends import mounts   # here: the watchdog starts without the backends
    bare = [m for m in mountpoints if mounts.mounted_at(Path(os.path.realpath(m))) is None]
    if bare:
        raise SnapmgrError(f"{', '.join(map(quote, bare))} is not mounted (a rollback cut short took it off), so the "
                           f"services were not started again, lest they write into the directory underneath: "
                           f"snapmgr rollback --resume mounts it, and the next snapmgr run starts them")
    return f"{', '.join(mountpoints)} is mounted"


def mark_done(steps: list[dict], pending: Collection[int]) -> None:
    """Mark every undo action done but those of the steps `pending` (by index): a later
    try repeats only those."""
    for i, step in enumerate(steps):
        for action in step["undo"]:
            action["done"] = i not in pending


def perform(action: dict, inherited_fds: bool, restarted: bool = False, queue: bool = False) -> str:
    """Carry the action out; say what was done. `inherited_fds`: the descriptors the
    action names are open in this process (the watchdog), else paths are opened anew.
    `restarted`: the machine was restarted since the window. `queue`: what would wait
    for a unit to start must not (snapmgr-recover.service)."""
    if "mounted" in action:
        return check_mounted(action["mounted"])
    if "thaw" in action:
        if restarted:
            return f"{action['thaw']} is no longer frozen: the machine restarted since"
        fd = action["fd"] if inherited_fds and action["fd"] is not None else None
        if fd is None:
            fd = os.open(action["thaw"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                was_frozen = thaw(fd)
            finally:
                os.close(fd)
        else:
            was_frozen = thaw(fd)
        return f"thawed {action['thaw']}" if was_frozen else f"{action['thaw']} was not frozen"
    if restarted:
        argv = action.get("at_boot", action["run"])
    else:
        argv = action.get("queued", action["run"]) if queue else action["run"]
    if not argv:
        return f"nothing to do after a restart for {shlex.join(action['run'])}"
    sh.run(argv, timeout=action["timeout"], env=action["env"], holds_locks=False)
    return f"ran {shlex.join(argv)}"
