"""Whether a FUSE mount's server answers, told without hanging on one that does not.

A request to a live server is answered; one to a server that died fails at once with
ENOTCONN; one to a server that is alive but stuck (stopped by SIGSTOP, deadlocked) waits
for as long as the server does. So the probe runs in a thread with a deadline, and a
stuck connection is aborted through the kernel's fusectl files, which fails every
request waiting on it and lets the mount be cleared."""

from __future__ import annotations

import enum
import errno
import os
import threading
from pathlib import Path

from snapmgr import sh
from snapmgr.backends.mounts import Mount, mounted_at

CONNECTIONS = Path("/sys/fs/fuse/connections")
# How long a live server may take to answer a lookup; the server answers it from memory.
PROBE_DEADLINE = 5.0
# A name nobody has: a lookup of it is never answered from the kernel's cache (a stat of
# the mount point itself may be, for a second after the server died), so it asks the server.
PROBE_NAME = ".snapmgr-liveness-probe"


class State(enum.Enum):
    LIVE = "live"
    DEAD = "dead"        # its server is gone: the mount only waits to be cleared
    STUCK = "stuck"      # its server is there but does not answer


def state(mountpoint: Path) -> State:
    answer: list[OSError | None] = []

    def probe() -> None:
        try:
            os.stat(mountpoint / PROBE_NAME)
        except OSError as e:
            answer.append(e)
        else:
            answer.append(None)

    # A daemon thread: one stuck past the deadline must not keep the process from exiting.
    thread = threading.Thread(target=probe, name="fuse-probe", daemon=True)
    thread.start()
    thread.join(PROBE_DEADLINE)
    if not answer:
        return State.STUCK
    error = answer[0]
    return State.DEAD if error is not None and error.errno == errno.ENOTCONN else State.LIVE


def abort(mount: Mount) -> None:
    """Sever the mount's connection: every request on it fails, the server's next read
    from /dev/fuse too, so it ends once it runs again. The connection is named by the
    minor number of the mount's anonymous device."""
    if mounted_at(CONNECTIONS) is None:
        # Where systemd does not mount it at boot.
        sh.run(["mount", "-t", "fusectl", "fusectl", CONNECTIONS], timeout=60)
    (CONNECTIONS / str(mount.device[1]) / "abort").write_text("1\n")
