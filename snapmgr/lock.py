"""Per-volume run locks: flock(2) on `<run_dir>/locks/<volume>.lock`.

The kernel drops a flock when its holder dies, however it dies, so a crash never leaves
a stale lock. The holder writes its pid into the file so a waiter can name it."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from snapmgr.errors import LockBusy

POLL_S = 0.1


@contextmanager
def volume_lock(run_dir: Path, volume: str, wait: float) -> Iterator[None]:
    """Hold the volume's lock for the duration; wait at most `wait` seconds for it."""
    lock_dir = run_dir / "locks"
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = lock_dir / f"{volume}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _acquire(fd, path, wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(fd: int, path: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockBusy(f"busy: another snapmgr run (pid {_holder(path)}) holds {path}; "
                               f"gave up after waiting {wait:g}s") from None
            time.sleep(POLL_S)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
