"""Background priority for the part of a scheduled run that no one waits for (pruning).

A timer's service runs at normal priority, because services stay paused while its
snapshots are taken; once they are taken, the process lowers its own CPU and I/O
priority while it prunes, and every program it starts meanwhile (rm, lvremove, zfs
destroy) inherits both. Then both are put back: what follows (the journal, the metrics
published) must not wait behind every other process's I/O."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from typing import Callable, Iterator

from snapmgr import sh
from snapmgr.errors import SnapmgrError

log = logging.getLogger(__name__)
NICE = 10
# What `ionice --pid` prints: "idle", "none: prio 4", "best-effort: prio 0", ...
_IONICE_RE = re.compile(r"(none|realtime|best-effort|idle)(?:: prio (\d+))?")


@contextmanager
def background() -> Iterator[None]:
    """Nice 10 (or the nicer value this process already had) and the idle I/O class for
    the duration, then the priorities from before. As far as allowed: a failure costs
    only speed, so it is logged, never raised."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        io = _io_class()
    except (SnapmgrError, OSError) as e:
        log.info("pruning at normal I/O priority, which could not be read: %s", e)
        io = None
    _attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, max(NICE, nice)), "pruning at normal CPU priority")
    lowered = io is not None and _attempt(lambda: _ionice("--class", "idle"), "pruning at normal I/O priority")
    try:
        yield
    finally:
        _attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, nice), f"nice {nice} not restored after pruning")
        if lowered:
            _attempt(lambda: _ionice(*io), f"I/O class {' '.join(io)} not restored after pruning")


def _io_class() -> tuple[str, ...]:
    """This process's I/O class, as the arguments of ionice that set it again."""
    out = _ionice().strip()
    m = _IONICE_RE.fullmatch(out)
    if not m:
        raise SnapmgrError(f"ionice printed {out!r}")
    return ("--class", m[1], "--classdata", m[2]) if m[1] in ("realtime", "best-effort") else ("--class", m[1])


def _ionice(*args: str) -> str:
    return sh.run(["ionice", *args, "--pid", str(os.getpid())], timeout=10, holds_locks=False).stdout


def _attempt(step: Callable[[], object], failure: str) -> bool:
    try:
        step()
    except (SnapmgrError, OSError) as e:
        log.info("%s: %s", failure, e)
        return False
    return True
