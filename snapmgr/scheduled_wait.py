"""How long a scheduled run waits for a volume that another run holds (a long manual
snapshot, programs a killed run left holding the lock).

A timer has no one to retry for it, so it waits longer than a run at a terminal
(settings.lock_wait, never less), but not past the point where waiting only piles up:
with the schedule's `timeout`, that long (systemd ends the run then anyway); without
one, until the schedule's next elapse, when its timer has fired again and systemd folded
that firing into the run still waiting. Then the run fails, and monitoring sees it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

from snapmgr import calendar
from snapmgr.config import Schedule
from snapmgr.model import stamp

Wait = Callable[[], tuple[float, str]]


def of(schedule: Schedule, lock_wait: timedelta) -> Wait:
    """Asked as each volume's lock is about to be taken: how many seconds to wait for
    it at most, and what sets that length (told with the wait). The next elapse is the
    one after the run started: a volume locked later in the run waits for what is left."""
    floor = lock_wait.total_seconds()
    if schedule.timeout:
        told = _at_least(floor, schedule.timeout.total_seconds(), f"schedule {schedule.name}'s timeout")
        return lambda: told
    [deadline] = calendar.elapses(schedule.on_calendar)
    why = f"until schedule {schedule.name} runs again, at {stamp(deadline)}"
    return lambda: _at_least(floor, (deadline - datetime.now(timezone.utc)).total_seconds(), why)


def _at_least(floor: float, seconds: float, why: str) -> tuple[float, str]:
    return (seconds, why) if seconds >= floor else (floor, "settings.lock_wait")
