"""Which processes have files open for writing under a directory: what must be stopped
before a rollback replaces the files there. Read from /proc/PID/fd and fdinfo (root sees
every process), so it finds writers no quiescer names, and a quiescer that stopped the
wrong service."""

from __future__ import annotations

import os
from pathlib import Path

WRITING = os.O_WRONLY | os.O_RDWR


def open_for_writing(root: Path) -> dict[int, str]:
    """pid -> command name of every other process with a file under `root` open for writing."""
    return _holding(root, writing=True)


def using(root: Path) -> dict[int, str]:
    """pid -> command name of every other process with a file, its working directory or
    its root under `root`: what keeps a filesystem mounted there from being unmounted."""
    return _holding(root, writing=False)


def _holding(root: Path, writing: bool) -> dict[int, str]:
    top = os.path.realpath(root)

    def under(target: str) -> bool:
        return target == top or target.startswith(top + "/")

    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if not writing and any(under(os.readlink(proc / link)) for link in ("cwd", "root")):
                found[int(proc.name)] = (proc / "comm").read_text().strip()
                continue
            for fd in (proc / "fd").iterdir():
                if not under(os.readlink(fd)):
                    continue
                flags = next(int(line.split()[1], 8) for line in (proc / "fdinfo" / fd.name).read_text().splitlines()
                             if line.startswith("flags:"))
                if flags & WRITING or not writing:
                    found[int(proc.name)] = (proc / "comm").read_text().strip()
                    break
        except (OSError, StopIteration, ValueError):   # the process ended, or closed it, meanwhile
            continue
    return found
