"""What the kernel says, under /proc, of this boot and of a process: enough to tell a
process from a later one the kernel gave its pid to, and a boot from the next.

A process is one boot id and, within that boot, one pid and one start time: the start
time is counted in clock ticks since the boot, so no wall clock (stepped by NTP at boot,
or by a resumed VM) enters into it."""

from __future__ import annotations

import os
from pathlib import Path

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This boot's id, which the kernel makes anew at every boot; None without /proc."""
    try:
        return Path(BOOT_ID).read_text().strip() or None
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since the boot (field 22 of
    /proc/PID/stat); None when /proc does not tell (no such process, or hidden)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: the fields after it
        # start behind its last ')'.
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_time() -> int | None:
    """When this boot began, in whole seconds since the epoch, by the wall clock as it is
    now (the kernel moves it when the clock is stepped); None when /proc does not tell."""
    try:
        with open("/proc/stat", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def running_for(pid: int) -> float | None:
    """How many seconds ago process `pid` started; None when /proc does not tell."""
    ticks = start_ticks(pid)
    try:
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if ticks is None else max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
