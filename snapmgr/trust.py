"""Whether anyone but root (and the user snapmgr runs as) could change what a path
names, as OpenSSH's StrictModes and sudo check before they trust a file: root runs what
a config file says, and writes where the lock and journal directories point.

Every entry on the way to the path (each directory, each symlink followed, the file
itself) must be owned by root or that user; none may be writable by group or others,
except a sticky directory (/tmp), where only an entry's owner can rename or replace it.
Once that holds, no one else can change the chain between this check and the open
that follows it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

MAX_SYMLINKS = 40  # the kernel's own limit before ELOOP


class Untrusted(Exception):
    """Someone else could change the file; the message says which entry and how to fix it."""


def check(path: Path) -> None:
    """Raise Untrusted if anyone but root or this user could change `path` or any entry
    on the way to it. OSError (FileNotFoundError, ...) passes through for the caller to word."""
    todo = list(PurePosixPath(os.path.join(os.getcwd(), path)).parts[1:])
    here = Path("/")
    _check(here, os.lstat(here), "directory / on the way to it ")
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            here = here.parent
            continue
        entry = here / name
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            _check(entry, st, f"symlink {entry} on the way to it ")
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            target = PurePosixPath(os.readlink(entry))
            todo[:0] = target.parts[1:] if target.is_absolute() else target.parts
            here = Path("/") if target.is_absolute() else here
        elif todo:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(entry))
            _check(entry, st, f"directory {entry} on the way to it ")
            here = entry
        else:
            _check(entry, st, "")


def _check(entry: Path, st: os.stat_result, which: str) -> None:
    """`which` names the entry in the message; empty for the file itself."""
    if st.st_uid not in (0, os.geteuid()):
        whom = "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()}"
        raise Untrusted(f"{which}is owned by uid {st.st_uid}, not {whom}; refusing to use it (chown root {entry})")
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
        raise Untrusted(f"{which}is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"refusing to use it (chmod go-w {entry})")
