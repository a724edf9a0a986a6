"""Where a filesystem is mounted, read from /proc/self/mountinfo (the kernel's own table,
so a mount made by hand, by fstab or by `zfs mount` is found alike)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_OCTAL_RE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    device: tuple[int, int]   # major, minor
    root: bytes               # the directory of the filesystem mounted here ("/": all of it)
    mountpoint: Path
    fstype: str
    source: str
    # Its filesystem's options, then the mount's own, which win where they differ (a
    # read-only mount of a writable filesystem): what mounting it again the same way takes.
    options: str = ""


def mounts(pid: int | None = None) -> list[Mount]:
    """This process's mount table, or process `pid`'s (its mount namespace, its
    mountpoints as seen from its root directory)."""
    found = []
    for line in (MOUNTINFO if pid is None else Path(f"/proc/{pid}/mountinfo")).read_bytes().splitlines():
        fields = line.split(b" ")
        sep = fields.index(b"-")
        major, minor = fields[2].split(b":")
        found.append(Mount((int(major), int(minor)), unescaped(fields[3]), Path(unescaped(fields[4]).decode(
            errors="surrogateescape")), fields[sep + 1].decode(), unescaped(fields[sep + 2]).decode(errors="replace"),
            _options(fields[5], fields[sep + 3])))
    return found


def whole_mounts() -> list[Mount]:
    """The mounts that show a whole filesystem (not a bind mount of a directory inside it)."""
    return [m for m in mounts() if m.root == b"/"]


def whole_mount(match) -> Path | None:
    """The mountpoint of the first whole mount for which `match(mount)` holds."""
    return next((m.mountpoint for m in whole_mounts() if match(m)), None)


def mounted_at(path: Path) -> Mount | None:
    """The topmost mount at `path` (the one a lookup of `path` reaches), if any."""
    return next((m for m in reversed(mounts()) if m.mountpoint == path), None)


def containing(path: Path) -> Mount | None:
    """The mount whose filesystem holds `path`: the deepest mountpoint on its way (by
    path, not device: a btrfs subvolume has a device number of its own)."""
    real = Path(os.path.realpath(path))
    # Latest first: of two mounts at one place, the later one hides the earlier.
    return max((m for m in reversed(mounts()) if m.mountpoint == real or m.mountpoint in real.parents),
               key=lambda m: len(m.mountpoint.parts), default=None)


def below(path: Path) -> list[Mount]:
    """The mounts at `path` and below it, in the order they were made."""
    real = Path(os.path.realpath(path))
    return [m for m in mounts() if m.mountpoint == real or real in m.mountpoint.parents]


def _options(own: bytes, filesystem: bytes) -> str:
    return ",".join(dict.fromkeys(unescaped(filesystem).decode().split(",") + unescaped(own).decode().split(",")))


def unescaped(field: bytes) -> bytes:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL_RE.sub(lambda m: bytes([int(m[1], 8)]), field)
