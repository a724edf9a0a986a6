"""The life of a mount: refuse a busy mount point, clear a stale one left by a killed
snapmgr, mount, detach (--daemon), serve until a signal or an unmount, and always
unmount and release the browse roots on the way out, also after an error."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyfuse3
import trio

from snapmgr import sh
from snapmgr.backends.base import Backend
from snapmgr.errors import SnapmgrError, UsageError, quote
from snapmgr.fuse.filesystem import Filesystem
from snapmgr.fuse.inodes import Inodes
from snapmgr.fuse.passthrough import Passthrough
from snapmgr.fuse.roots import Roots
from snapmgr.fuse.tree import Tree
from snapmgr.fuse.verifying import Verifier

log = logging.getLogger(__name__)
FSNAME = "snapmgr"
FSTYPE = "fuse.snapmgr"
MOUNTINFO = Path("/proc/self/mountinfo")
# The kernel reads ahead 128 KiB on a FUSE mount, so a sequential read costs a request
# through Python per 128 KiB; at 1 MiB (libfuse's largest request) a cold read of a big
# file went from 0.37x to about bindfs's speed here.
READ_AHEAD_KIB = 1024


@dataclass(frozen=True)
class MountOptions:
    allow_other: bool = False
    idle: float = 300.0       # seconds before an unused browse root (an LVM mount) is released
    workers: int = 16         # requests served concurrently


@dataclass(frozen=True)
class MountEntry:
    fstype: str
    source: str
    device: str    # MAJOR:MINOR


def mount_at(path: Path) -> MountEntry | None:
    """What is mounted at `path` (the topmost mount), if anything is."""
    found = None
    for line in MOUNTINFO.read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        columns = fields.split(" ")
        if _unescape(columns[4]) == str(path):
            fstype, source, *_ = rest.split(" ")
            found = MountEntry(fstype, _unescape(source), columns[2])
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _disconnected(path: Path) -> bool:
    """Whether the FUSE mount at `path` has lost its server. Not a stat of `path` itself:
    the kernel may answer that from its cache for a second after the server died. A
    name nobody has is never cached, so looking it up asks the server."""
    try:
        os.stat(path / ".snapmgr-liveness-probe")
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _canonical(mountpoint: Path) -> Path:
    # realpath, not resolve(strict): a stale FUSE mount cannot be stat'ed.
    return Path(os.path.realpath(mountpoint))


def prepare(mountpoint: Path) -> Path:
    """The mount point, checked: a stale FUSE mount there is cleared, a live mount of
    anything is refused."""
    path = _canonical(mountpoint)
    existing = mount_at(path)
    if existing is not None:
        if existing.fstype.startswith("fuse") and _disconnected(path):
            log.warning("%s: clearing a stale %s mount left by a process that died", path, existing.fstype)
            sh.run(["fusermount3", "-u", "-z", path], timeout=60)
        elif existing.fstype == FSTYPE:
            raise SnapmgrError(f"{quote(path)} is already a snapmgr mount; unmount it first: snapmgr umount {path}")
        else:
            raise SnapmgrError(f"{quote(path)} is already a mount point ({existing.fstype} of "
                               f"{quote(existing.source)}); choose an empty directory")
    if not path.is_dir():
        raise UsageError(f"mount point {quote(mountpoint)} is not a directory")
    return path


def unmount(mountpoint: Path) -> Path:
    path = _canonical(mountpoint)
    existing = mount_at(path)
    if existing is None:
        raise SnapmgrError(f"{quote(path)} is not mounted")
    if existing.fstype != FSTYPE:
        raise SnapmgrError(f"{quote(path)} is a {existing.fstype} mount, not snapmgr's; not unmounting it")
    sh.run(["fusermount3", "-u", *(["-z"] if _disconnected(path) else []), path], timeout=60)
    return path


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
    return ready


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
            # Not stat(): with the loop ended, nothing would answer it. As root, libfuse
            # detaches the mount (MNT_DETACH), so a process still inside cannot keep it.
            pyfuse3.close(unmount=mount_at(mountpoint) is not None)
        finally:
            roots.release_all()
    log.info("unmounted %s", mountpoint)


async def _read_ahead(mountpoint: Path) -> None:
    """Raise the mount's read-ahead, once the kernel has had libfuse's answer to INIT
    (which caps it): a stat of the mount point returns only after that."""
    try:
        # Abandoned if the mount ends first: nothing would answer the stat then.
        await trio.to_thread.run_sync(os.stat, mountpoint, cancellable=True)
        mounted = mount_at(mountpoint)
        Path("/sys/class/bdi", mounted.device, "read_ahead_kb").write_text(f"{READ_AHEAD_KIB}\n")
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
