"""Background priority for the part of a scheduled run that no one waits for (pruning).

A timer's service runs at normal priority, because services stay paused while its
snapshots are taken; once they are taken, the process lowers its own CPU and I/O
priority, and every program it starts from then on (rm, lvremove, zfs destroy) inherits
both."""

from __future__ import annotations

import logging
import os

from snapmgr import sh
from snapmgr.errors import SnapmgrError

log = logging.getLogger(__name__)
NICE = 10


def background() -> None:
    """Lower this process to nice 10 and the idle I/O class, as far as allowed; a failure
    costs only speed, so it is logged, never raised."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(NICE, os.getpriority(os.PRIO_PROCESS, 0)))
        sh.run(["ionice", "--class", "idle", "--pid", str(os.getpid())], timeout=10, holds_locks=False)
    except (SnapmgrError, OSError) as e:
        log.info("pruning at normal priority: %s", e)
