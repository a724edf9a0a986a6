"""Running LVM's commands, for the LVM backend and its rollback."""

from __future__ import annotations

from snapmgr import sh


def lvm(argv: list, timeout: float | None) -> sh.Completed:
    # LVM closes every descriptor it inherits, with a warning on stderr: the volume lock
    # is of no use to it (its own VG lock orders its commands).
    return sh.run(argv, timeout=timeout, holds_locks=False)
