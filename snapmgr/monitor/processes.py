"""Whether the process that began a run is still there: a run the journal holds as
running whose process is gone was killed.

The journal keeps with each run the identity of its process: the boot it began in and
when the process started, in clock ticks since that boot (snapmgr.procfs). A run of
another boot was ended by the restart; a live pid whose process started at another tick
is a new process the kernel has given the pid to since the run's own died. No wall clock
enters into it, so a clock stepped since (NTP at boot, a resumed VM) changes nothing.

Asked by signal 0, never by /proc/PID alone: /proc may hide other users' processes
(hidepid=invisible, systemd's ProtectProc=invisible) from a monitoring user, and then a
live run would look killed. Where /proc/PID/stat cannot be read, a live pid is taken
for the run's process."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from snapmgr import procfs

# For a run an older snapmgr began, which kept no identity: how much later than the run
# its process may seem to have begun. The boot time the kernel reports is whole seconds,
# and a clock stepped since the boot moves it.
SLACK = timedelta(seconds=2)


def running(pid: int, began: datetime, boot_id: str | None, ticks: int | None) -> bool:
    """Whether the run that process `pid` began at `began` still runs: `boot_id` and
    `ticks` are the identity its process had (None: not kept, by an older snapmgr)."""
    identified = boot_id is not None and ticks is not None
    current = procfs.boot_id() if identified else None
    if current is not None and boot_id != current:
        return False   # the machine restarted since
    if not _exists(pid):
        return False
    # /proc not telling: hidden from this user, or gone since the signal (asked again).
    if identified:
        now = procfs.start_ticks(pid)
        return now == ticks if now is not None else _exists(pid)
    since = started(pid)
    return since <= began + SLACK if since is not None else _exists(pid)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # it exists, and belongs to another user
    return True


def started(pid: int) -> datetime | None:
    """When process `pid` started by the wall clock as it is now, or None when /proc
    does not tell."""
    ticks, boot = procfs.start_ticks(pid), procfs.boot_time()
    if ticks is None or boot is None:
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), timezone.utc)
