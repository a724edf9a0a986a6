"""Per-volume run locks: flock(2) on `<run_dir>/locks/<volume>.lock`.

The kernel drops a flock when the last descriptor of it is closed, however its holders
die, so a crash never leaves a stale lock. The engine lets the programs it runs on a
volume inherit the descriptor (sh.holding): a killed run's rsync, and the helpers rsync
forked, keep the lock until the last of them has exited, so the next run cannot start
cleaning up a copy that is still being written.

The holder writes its pid into the file so that a waiter can name it, and a run that
waits long says so (on stderr, which a timer's service puts in the system journal):
when it starts to wait and every REPORT_EVERY_S while it still does, so that a run held
up by another is never a silent "activating" service."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from snapmgr import procfs, trust
from snapmgr.errors import LockBusy, SnapmgrError
from snapmgr.model import span

log = logging.getLogger(__name__)
POLL_S = 0.1
REPORT_EVERY_S = 300.0   # a wait this long is told, and retold after as long while it lasts...
REPORT_AT_MOST_EVERY_S = 3600.0   # ...then after twice as long each time, up to this
_OPEN = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


@contextmanager
def volume_lock(run_dir: Path, volume: str, wait: float, why: str = "", unattended: bool = False) -> Iterator[int]:
    """Hold the volume's lock for the duration; wait at most `wait` seconds for it.
    Yields the lock's descriptor. `why`: what sets the wait's length, told with it.
    `unattended`: tell even a wait shorter than REPORT_EVERY_S (a timer's run: its log
    is all anyone sees of it); at a terminal, a short wait ends soon enough in a result."""
    lock_dir = run_dir / "locks"
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        trust.check(lock_dir)  # root creates and writes files here
    except trust.Untrusted as e:
        raise SnapmgrError(f"{lock_dir}: {e}") from None
    path = lock_dir / f"{volume}.lock"
    fd = _open(path)
    try:
        _acquire(fd, path, volume, wait, why, unattended)
        _write_pid(fd)
        yield fd
    finally:
        os.close(fd)  # the flock goes when its last descriptor closes


def _open(path: Path) -> int:
    """The lock file, created already holding a pid, so that it is never seen empty."""
    try:
        return os.open(path, _OPEN)
    except FileNotFoundError:
        pass
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    draft.unlink(missing_ok=True)  # left by a killed run whose pid this one reuses
    fd = os.open(draft, _OPEN | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_pid(fd)
        os.link(draft, path)
    except FileExistsError:  # another run created it first: use theirs
        os.close(fd)
        fd = os.open(path, _OPEN)
    except BaseException:
        os.close(fd)
        raise
    finally:
        draft.unlink()
    return fd


def _write_pid(fd: int) -> None:
    # Written over the old pid, then cut to length: a reader sees one pid or the other,
    # never an empty file.
    data = f"{os.getpid()}\n".encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _acquire(fd: int, path: Path, volume: str, wait: float, why: str, unattended: bool) -> None:
    if take_within(fd, 0):
        return
    started = time.monotonic()
    told = wait > 0 and (unattended or wait >= REPORT_EVERY_S)
    if told:
        log.warning("volume %s is busy: another snapmgr run (%s) holds %s; waiting for it up to %s%s",
                    volume, _holder(path), path, _length(wait), f" ({why})" if why else "")
    every = REPORT_EVERY_S
    while True:
        left = max(started + wait - time.monotonic(), 0)
        if take_within(fd, min(left, every) if told else left):
            return
        every = min(every * 2, REPORT_AT_MOST_EVERY_S)
        waited = time.monotonic() - started
        if waited >= wait:
            raise LockBusy(f"busy: another snapmgr run ({_holder(path)}) holds {path}; "
                           f"gave up after waiting {_length(wait)}")
        log.warning("volume %s: still waiting for another snapmgr run (%s): %s so far, at most %s more",
                    volume, _holder(path), _length(waited), _length(wait - waited))


def _length(seconds: float) -> str:
    return f"{seconds:.3g}s" if seconds < 60 else span(timedelta(seconds=seconds))


def take_within(fd: int, wait: float) -> bool:
    """flock(2) `fd` exclusively, waiting at most `wait` seconds: whether it was taken."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)


def _holder(path: Path) -> str:
    """The run that took the lock, by the pid it wrote; when that run has died, the
    programs it started that still hold the lock."""
    try:
        pid = int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        pid = None
    holders = _holders(path)
    if not holders or pid in holders:
        return f"pid {pid or 'unknown'}"
    return (f"pid {pid or 'unknown'}, which has exited; still held by "
            + ", ".join(f"{name} (pid {p})" for p, name in sorted(holders.items())))


def _holders(path: Path) -> dict[int, str]:
    """pid -> command name of every process holding the flock on `path`. A descriptor
    shares the lock when /proc/PID/fdinfo shows it; a waiter's own descriptor does not."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    found = {}
    for fd in procfs.descriptors():
        try:
            linked = fd.stat()
            if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino) and "FLOCK" in fd.info():
                found[fd.pid] = procfs.command(fd.pid)
        except OSError:  # the process ended, or closed the descriptor, meanwhile
            continue
    return found
