"""The life of a mount: refuse a busy mount point, clear a stale one left by a killed
snapmgr and the browse roots it left entered, mount, detach (--daemon), serve until a
signal or an unmount, and always unmount and release the browse roots on the way out,
also after an error."""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pyfuse3
import trio

from snapmgr import sh
from snapmgr.backends.base import Backend
from snapmgr.backends.mounts import mounted_at
from snapmgr.errors import SnapmgrError, UsageError, as_error, quote
from snapmgr.fuse import connection
from snapmgr.fuse.filesystem import Filesystem
from snapmgr.fuse.inodes import Inodes
from snapmgr.fuse.passthrough import Passthrough
from snapmgr.fuse.roots import Roots
from snapmgr.fuse.tree import Tree
from snapmgr.fuse.verifying import Verifier

log = logging.getLogger(__name__)
FSNAME = "snapmgr"
FSTYPE = "fuse.snapmgr"
# The kernel reads ahead 128 KiB on a FUSE mount, so a sequential read costs a request
# through Python per 128 KiB; at 1 MiB (libfuse's largest request) a cold read of a big
# file went from 0.37x to about bindfs's speed here.
READ_AHEAD_KIB = 1024
SYSLOG = "/dev/log"


@dataclass(frozen=True)
class MountOptions:
    allow_other: bool = False
    idle: float = 300.0       # seconds before an unused browse root (an LVM mount) is released
    workers: int = 16         # requests served concurrently


def _canonical(mountpoint: Path) -> Path:
    """The mount point's real path, found without a lookup of the mount point itself,
    which a stuck FUSE server would never answer: a mount point is never a symlink."""
    absolute = Path(os.path.abspath(mountpoint))
    beside = Path(os.path.realpath(absolute.parent)) / absolute.name
    return beside if mounted_at(beside) is not None else Path(os.path.realpath(absolute))


def prepare(mountpoint: Path) -> Path:
    """The mount point, checked: a dead snapmgr mount there is cleared; any other mount,
    and anything but an empty directory, is refused."""
    path = _canonical(mountpoint)
    existing = mounted_at(path)
    if existing is not None and existing.fstype == FSTYPE:
        found = connection.state(path)
        if found is connection.State.LIVE:
            raise SnapmgrError(f"{quote(path)} is already a snapmgr mount; unmount it first: snapmgr umount {path}")
        if found is connection.State.STUCK:
            raise SnapmgrError(f"{quote(path)} is a snapmgr mount whose process does not answer (stopped?); "
                               f"snapmgr umount {path} clears it")
        log.warning("%s: clearing a snapmgr mount left by a process that died", path)
        sh.run(["fusermount3", "-u", "-z", path], timeout=60)
    elif existing is not None:
        raise SnapmgrError(f"{quote(path)} is already a mount point ({existing.fstype} of "
                           f"{quote(existing.source)}); choose an empty directory")
    if not os.path.lexists(path):
        raise UsageError(f"mount point {quote(mountpoint)} does not exist; create an empty directory there")
    if not path.is_dir():
        raise UsageError(f"mount point {quote(mountpoint)} is not a directory")
    if os.listdir(path):
        raise UsageError(f"mount point {quote(mountpoint)} is not empty: the mount would hide what it holds; "
                         f"choose an empty directory")
    return path


def release_abandoned(backends: Iterable[Backend]) -> None:
    """Release what killed snapmgr processes left entered (an LVM snapshot still active
    and mounted, which kill -9 leaves behind), as far as no live process uses it."""
    for backend in backends:
        try:
            released = backend.release_abandoned()
        except (SnapmgrError, OSError) as e:
            log.warning("volume %s: cannot release what a killed snapmgr left mounted: %s", backend.volume,
                        as_error(e))
            continue
        for snapshot_id in released:
            log.warning("%s: released the browse mount a killed snapmgr left", snapshot_id)


def unmount(mountpoint: Path) -> tuple[Path, bool]:
    """Unmount a snapmgr mount: its path, and whether its process answered (and so
    releases what it entered as it exits)."""
    path = _canonical(mountpoint)
    existing = mounted_at(path)
    if existing is None:
        raise SnapmgrError(f"{quote(path)} is not mounted")
    if existing.fstype != FSTYPE:
        raise SnapmgrError(f"{quote(path)} is a {existing.fstype} mount, not snapmgr's; not unmounting it")
    found = connection.state(path)
    if found is connection.State.STUCK:
        log.warning("%s: its process does not answer; aborting its connection", path)
        connection.abort(existing)
    # Lazily when nothing serves it any more: a plain unmount would wait on the dead connection.
    sh.run(["fusermount3", "-u", *(["-z"] if found is not connection.State.LIVE else []), path], timeout=60)
    return path, found is connection.State.LIVE


def detach() -> Callable[[], None]:
    """Fork. The parent exits once the child calls the returned `ready` (status 0), or
    with the child's status when the child ends first (it has said why on stderr)."""
    readable, writable = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.close(writable)
        with os.fdopen(readable, "rb") as pipe:
            told = pipe.read()
        if told == b"ready":
            os._exit(0)
        os._exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) or 1)
    os.close(readable)
    os.setsid()   # no terminal: its hangup and Ctrl-C do not reach the mount
    os.chdir("/")

    def ready() -> None:
        os.write(writable, b"ready")
        os.close(writable)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        _log_to_syslog()
    return ready


def _log_to_syslog() -> None:
    """A daemon has no terminal left to log to: its log (a rotten file --verify refused, a
    snapshot it cannot enter) goes to syslog, the journal under systemd, where there is
    one, in the lines it had on stderr."""
    try:
        handler = logging.handlers.SysLogHandler(SYSLOG, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        log.debug("no syslog at %s: the daemon's log goes nowhere", SYSLOG)
        return
    root = logging.getLogger()
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.handlers = [handler]


def serve(mountpoint: Path, backends: dict[str, Backend], options: MountOptions,
          ready: Callable[[], None] | None = None, verifier: Verifier | None = None) -> None:
    """Mount the snapshots of `backends` at `mountpoint` (checked by prepare) and serve
    them until a signal or an unmount; with a verifier, every file is checked against its
    manifest when first opened."""
    tree = Tree(backends, Inodes())
    roots = Roots(tree.snapshot, options.idle)
    fs = Filesystem(tree, roots, Passthrough(tree.inodes, roots), verifier)
    fuse_options = {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro", "default_permissions"}
    if options.allow_other:
        fuse_options.add("allow_other")
    try:
        pyfuse3.init(fs, str(mountpoint), fuse_options)
    except RuntimeError as e:
        raise SnapmgrError(f"cannot mount at {quote(mountpoint)}: {e}") from None
    try:
        log.info("serving %s at %s", ", ".join(backends) or "no volumes", mountpoint)
        if ready is not None:
            ready()
        trio.run(_serve, mountpoint, roots, options.workers)
    finally:
        try:
            fs.close_files()
            # Whatever is mounted now: libfuse leaves alone a mount already gone (its
            # /dev/fuse descriptor says so), and as root detaches ours (MNT_DETACH), so a
            # process still inside cannot keep it.
            pyfuse3.close(unmount=True)
        finally:
            roots.release_all()
    log.info("unmounted %s", mountpoint)


async def _read_ahead(mountpoint: Path) -> None:
    """Raise the mount's read-ahead, once the kernel has had libfuse's answer to INIT
    (which caps it): a stat of the mount point returns only after that."""
    try:
        # Abandoned if the mount ends first: nothing would answer the stat then.
        await trio.to_thread.run_sync(os.stat, mountpoint, cancellable=True)
        mounted = mounted_at(mountpoint)
        if mounted is not None:   # None: unmounted meanwhile
            major, minor = mounted.device
            Path("/sys/class/bdi", f"{major}:{minor}", "read_ahead_kb").write_text(f"{READ_AHEAD_KIB}\n")
    except OSError as e:
        log.debug("read-ahead of %s left as it was: %s", mountpoint, e)


async def _serve(mountpoint: Path, roots: Roots, workers: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(roots.release_idle_forever)
        nursery.start_soon(_read_ahead, mountpoint)
        await pyfuse3.main(min_tasks=1, max_tasks=workers)
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
