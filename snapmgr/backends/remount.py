"""Take a block device's filesystem off every place it is mounted, and put it back there
the same way afterwards: for a rollback that replaces what lies under the mounts. Where
it was mounted is written down before the first unmount, so that a process resuming a
rollback killed in between (which never saw the mounts) puts them back too."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from snapmgr import sh
from snapmgr.backends import mounts
from snapmgr.errors import SnapmgrError, quote

UMOUNT_TIMEOUT = 120
MOUNT_TIMEOUT = 300   # a filesystem replays its journal when it is mounted


@dataclass(frozen=True)
class Place:
    mountpoint: str
    fstype: str
    options: str


def device_number(device: Path) -> tuple[int, int] | None:
    try:
        number = os.stat(device).st_rdev
    except FileNotFoundError:
        return None   # not active
    return os.major(number), os.minor(number)


def taken_off(device: Path, record: Path, resuming: bool) -> str | None:
    """Unmount `device` wherever it is mounted, latest mount first, once `record` says
    where (a record an earlier, cut-short call wrote is kept when `resuming`: it knew
    mounts since undone). None once the device is mounted nowhere; otherwise why not, and
    what was unmounted is mounted again."""
    number = device_number(device)
    here = [m for m in mounts.mounts() if m.device == number] if number else []
    if root := next((m for m in here if m.mountpoint == Path("/")), None):
        return f"{device} is mounted at {root.mountpoint}"
    if part := next((m for m in here if m.root != b"/"), None):
        return f"{device} is also mounted at {quote(str(part.mountpoint))} (a directory of it, bound there)"
    if not (resuming and record.exists()):
        _write(record, [Place(os.fsdecode(m.mountpoint), m.fstype, m.options) for m in here])
    for m in reversed(here):
        result = sh.run(["umount", m.mountpoint], timeout=UMOUNT_TIMEOUT, check=False)
        if result.returncode:
            put_back(device, record, forget=False)
            why = result.stderr.strip().splitlines()[-1:] or [f"umount exited with status {result.returncode}"]
            return f"{quote(str(m.mountpoint))} cannot be unmounted ({why[0]})"
    return None


def put_back(device: Path, record: Path, forget: bool = True) -> None:
    """Mount `device` again wherever `record` says it was and it is not now, as it was
    mounted; then, if `forget`, drop the record."""
    if not record.exists():
        return
    number = device_number(device)
    for place in [Place(**p) for p in json.loads(record.read_text())]:
        mountpoint = Path(place.mountpoint)
        now = mounts.mounted_at(mountpoint)
        if now is not None and now.device == number:
            continue
        argv = ["mount", "-t", place.fstype, "-o", place.options, device, mountpoint]
        try:
            sh.run(argv, timeout=MOUNT_TIMEOUT)
        except sh.CommandError as e:
            raise SnapmgrError(f"{device} could not be mounted again at {quote(place.mountpoint)} ({e}): mount it "
                               f"by hand ({shlex.join(map(str, argv))})") from None
    if forget:
        record.unlink()


def recorded(record: Path) -> list[Path]:
    """Where a rollback cut short took the device off, as `record` says: none without one."""
    try:
        return [Path(p["mountpoint"]) for p in json.loads(record.read_text())]
    except FileNotFoundError:
        return []


def _write(record: Path, places: list[Place]) -> None:
    # Written whole or not at all: a half-written record would lose a mount.
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(record.name + ".partial")
    partial.write_text(json.dumps([asdict(p) for p in places]))
    os.replace(partial, record)
