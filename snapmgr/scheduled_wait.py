"""How long a scheduled run waits for a volume that another run holds (a long manual
snapshot, programs a killed run left holding the lock).

A timer has no one to retry for it, so it waits longer than a run at a terminal
(settings.lock_wait, never less), but not past the point where waiting only piles up:
with the schedule's `timeout`, that long (systemd ends the run then anyway); without
one, until the schedule's next elapse, when its timer has fired again and systemd folded
that firing into the run still waiting. Then the run fails, and monitoring sees it."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from snapmgr import calendar, procfs
from snapmgr.config import Schedule
from snapmgr.model import stamp

log = logging.getLogger(__name__)
Wait = Callable[[], tuple[float, str]]
LOCK_WAIT = "settings.lock_wait"
# Given up this long before the schedule's timeout (a tenth of a shorter one), so that the
# run is recorded as failed before systemd's TimeoutStartSec, counted from the service's
# start, stops it.
BEFORE_TIMEOUT_S = 10.0


def of(schedule: Schedule, lock_wait: timedelta) -> Wait:
    """Asked as each volume's lock is about to be taken: how many seconds to wait for
    it at most, and what sets that length (told with the wait). Both ends are fixed when
    the run starts: a volume locked later in the run waits for what is left."""
    floor = lock_wait.total_seconds()
    if schedule.timeout:
        timeout = schedule.timeout.total_seconds()
        end = time.monotonic() + timeout - min(BEFORE_TIMEOUT_S, timeout / 10) \
            - (procfs.running_for(os.getpid()) or 0.0)
        why = f"schedule {schedule.name}'s timeout"
        return lambda: _at_least(floor, end - time.monotonic(), why)
    try:
        [at] = calendar.elapses(schedule.on_calendar)
    except calendar.CalendarError as e:
        # Never a reason to take no snapshot: the wait is only shorter.
        log.warning("cannot tell when schedule %s runs again (%s): a busy volume is waited for as long as %s says",
                    schedule.name, e, LOCK_WAIT)
        return lambda: (floor, LOCK_WAIT)
    why = f"until schedule {schedule.name} runs again, at {stamp(at)}"
    return lambda: _at_least(floor, (at - datetime.now(timezone.utc)).total_seconds(), why)


def _at_least(floor: float, seconds: float, why: str) -> tuple[float, str]:
    return (seconds, why) if seconds >= floor else (floor, LOCK_WAIT)
