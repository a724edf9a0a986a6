"""OnCalendar expressions, read by systemd itself (`systemd-analyze calendar`): what a
timer accepts is exactly what systemd accepts, and its next elapses are systemd's."""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone

from snapmgr import sh
from snapmgr.errors import SnapmgrError, quote

PROGRAM = "systemd-analyze"
# The elapses looked at must span more than a week, so that a weekday schedule's weekend
# is among its gaps (`Mon..Fri 09..17:00` has 45 elapses a week, its longest gap 64h);
# asked for in ever larger batches, as few as need be, up to a cap that a per-minute
# schedule reaches (16384 iterations take systemd-analyze about a quarter of a second).
SPAN = timedelta(days=8)
FIRST_COUNT, GROWTH, MAX_COUNT = 16, 4, 16384
# An elapse in the machine's time zone, which systemd's timers keep, then the same in UTC,
# a line systemd leaves out when the zone is UTC by any name (UTC, GMT, Atlantic/Reykjavik).
_ELAPSE_RE = re.compile(r"^\s*(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) (\S+)\n"
                        r"(?:\s*\(in UTC\): \w+ (\S+ \S+) UTC\n)?", re.M)


# The zone systemd's timers keep, named so that glibc reads it once: with TZ unset it
# looks at /etc/localtime again for every time it converts (16384 elapses: 0.24 s, not 0.04 s).
LOCAL_ZONE = ":/etc/localtime"


class CalendarError(SnapmgrError):
    """An expression systemd refuses, or one that never elapses."""


def elapses(expression: str, count: int = 1) -> list[datetime]:
    """The next `count` times (UTC) a timer with OnCalendar=`expression` elapses, read in
    the machine's time zone as systemd reads it: `daily` is local midnight."""
    try:
        done = sh.run([PROGRAM, "calendar", f"--iterations={count}", "--", expression],
                      timeout=10, check=False, env={"LC_ALL": "C", "TZ": os.environ.get("TZ", LOCAL_ZONE)})
    except sh.CommandNotFound:
        raise CalendarError(f"cannot check OnCalendar {quote(expression)}: {PROGRAM} is not installed "
                            f"(Debian: apt install systemd)") from None
    if done.returncode != 0:
        reason = done.stderr.strip().rsplit(": ", 1)[-1] or f"{PROGRAM} exited {done.returncode}"
        raise CalendarError(f"{quote(expression)} is not a systemd calendar expression ({reason}; "
                            f"see man systemd.time, e.g. hourly, daily, *:0/15, Mon..Fri 09:00)")
    found = [datetime.fromisoformat(utc or local).replace(tzinfo=timezone.utc)
             for local, _, utc in _ELAPSE_RE.findall(done.stdout)]
    if not found:
        raise CalendarError(f"{quote(expression)} never elapses again")
    return found


def interval(expression: str) -> timedelta:
    """The longest gap between two elapses: how long a volume on this schedule can rightly
    go without a new snapshot."""
    count = FIRST_COUNT
    times = elapses(expression, count)
    while len(times) == count and times[-1] - times[0] < SPAN and count < MAX_COUNT:
        count = min(count * GROWTH, MAX_COUNT)
        times = elapses(expression, count)
    if len(times) < 2:
        raise CalendarError(f"{quote(expression)} elapses once only: it is no schedule")
    return max(b - a for a, b in zip(times, times[1:]))
