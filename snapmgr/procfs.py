"""What the kernel says, under /proc, of this boot and of a process: enough to tell a
process from a later one the kernel gave its pid to, and a boot from the next.

A process is one boot id and, within that boot, one pid and one start time: the start
time is counted in clock ticks since the boot, so no wall clock (stepped by NTP at boot,
or by a resumed VM) enters into it.

And what a process has open: its file descriptors and the files it has mapped, which
root (snapmgr's user) may read of every process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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


def pids() -> list[int]:
    """Every process's pid, as /proc lists them now."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def command(pid: int) -> str:
    """Process `pid`'s command name; raises OSError once it has ended."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


@dataclass(frozen=True)
class Descriptor:
    """One open file descriptor of a process. Each read raises OSError when the process
    has ended, or closed the descriptor, since it was listed."""

    pid: int
    number: str

    def stat(self) -> os.stat_result:
        """Of the file itself, wherever the process sees it (/proc's link leads to it
        whatever its mount namespace)."""
        return os.stat(f"/proc/{self.pid}/fd/{self.number}")

    def target(self) -> str:
        """The file's path as the process's mount namespace shows it."""
        return os.readlink(f"/proc/{self.pid}/fd/{self.number}")

    def info(self) -> str:
        return Path(f"/proc/{self.pid}/fdinfo/{self.number}").read_text()

    def flags(self) -> int:
        """The open(2) flags it was opened with."""
        return next(int(line.split()[1], 8) for line in self.info().splitlines() if line.startswith("flags:"))


def descriptors(of: Iterable[int] | None = None) -> Iterator[Descriptor]:
    """The open descriptors of the processes `of` (by default every one), those that
    /proc still lists when each process is reached."""
    for pid in pids() if of is None else of:
        try:
            numbers = os.listdir(f"/proc/{pid}/fd")
        except OSError:   # ended meanwhile
            continue
        for number in numbers:
            yield Descriptor(pid, number)


@dataclass(frozen=True)
class Mapping:
    """A file mapped into a process's memory (a line of /proc/PID/maps)."""

    writable_shared: bool      # "w" and "s": its writes go to the file
    device: tuple[int, int]    # major, minor of the file's filesystem, as mount tables give it
    path: str                  # as the process's mount namespace shows it


def mappings(pid: int) -> list[Mapping]:
    """The files process `pid` has mapped; raises OSError once it has ended."""
    found = []
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith(b"/") or fields[4] == b"0":
                continue   # anonymous memory, or the heap, the stack
            major, minor = fields[3].split(b":")
            found.append(Mapping(fields[1][1:2] == b"w" and fields[1][3:4] == b"s", (int(major, 16), int(minor, 16)),
                                 os.fsdecode(fields[5])))
    return found
