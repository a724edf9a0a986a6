"""Whether the process that began a run is still there: a run the journal holds as
running whose process is gone was killed.

Asked by signal 0, never by /proc/PID: /proc may hide other users' processes
(hidepid=invisible, systemd's ProtectProc=invisible) from a monitoring user, and then a
live run would look killed. A pid the kernel has handed to a new process since the run's
own died would make a killed run look alive: where /proc/PID/stat can be read, the
process must have started before the run began."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

# How much later than the run's start its process may seem to have begun: the boot time
# the kernel reports is whole seconds, and a clock stepped since the boot moves it.
SLACK = timedelta(seconds=2)


def running(pid: int, since: datetime) -> bool:
    """Whether process `pid`, which began a run at `since`, still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # it exists, and belongs to another user
    began = started(pid)
    return began is None or began <= since + SLACK


def started(pid: int) -> datetime | None:
    """When process `pid` started, or None when /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it
    # start behind its last ')'. starttime is field 22, in clock ticks since the boot.
    ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), timezone.utc)
