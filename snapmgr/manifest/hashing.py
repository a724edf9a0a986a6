"""Content hashes of regular files: one file, or many in parallel.

Many small files cost mostly system calls and per-file overhead, so they are hashed in
batches by a pool of processes, one per CPU (threads would queue on the GIL between the
short reads). A large file is hashed by BLAKE3's own threads, fed large buffers; sha256
has no parallel form, so large files go to the pool like the rest. The pool reads each
file's xattrs too, through the descriptor it hashes by: the walk's process is the
bottleneck of a tree of small files, and this takes a third of its system calls off it.

Never through a memory map (as b3sum does): a read error on a damaged disk, exactly what
verify is there to find, is then a SIGBUS that kills snapmgr, where read(2) says EIO."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

from snapmgr import sh
from snapmgr.errors import SnapmgrError
from snapmgr.manifest import longpath, xattrs

ALGORITHMS = ("blake3", "sha256")
READ_SIZE = 1 << 20
# From this size on a file is worth BLAKE3's threads.
LARGE = 16 << 20
# What they are fed at a time: 4 MiB reads hash a warm 256 MiB file in 0.034 s, 16 MiB ones
# in 0.042 s (a memory map: 0.024 s), the smaller buffer staying in the CPU's cache.
LARGE_READ = 4 << 20
# One batch sent to a worker: big enough that the round trip costs little beside it.
BATCH_FILES = 256
BATCH_BYTES = 32 << 20
# Batches sent and not yet hashed, per worker: enough to keep every worker busy, and few
# enough that a walk far ahead of the hashing (a cold cache) holds few entries waiting.
IN_FLIGHT = 3
_buffer = bytearray(READ_SIZE)
_large_buffer: bytearray | None = None


class ScanError(SnapmgrError):
    pass


@dataclass(frozen=True)
class Unreadable:
    """A file that could not be read, and why; its xattrs' digest if they could be."""
    reason: str
    xattrs: str | None = None


class Content(NamedTuple):
    """What reading a file found: its content's digest and its xattrs' (None: none)."""
    digest: str
    xattrs: str | None


def _blake3():
    try:
        import blake3
    except ImportError:
        raise SnapmgrError("BLAKE3 hashing needs the Python package blake3 (pip install blake3), "
                           "or choose the sha256 algorithm") from None
    return blake3.blake3


def hasher_factory(algorithm: str) -> Callable[..., object]:
    if algorithm == "blake3":
        return _blake3()
    if algorithm == "sha256":
        return hashlib.sha256
    raise SnapmgrError(f"unknown hash algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def _open(path: bytes | str | os.PathLike) -> int:
    # O_NOATIME: hashing a writable repository (rsync) must not rewrite its inodes' atimes.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    path = os.fsencode(path)
    try:
        return longpath.open_file(path, flags | os.O_NOATIME)
    except PermissionError:  # not the owner and no CAP_FOWNER
        return longpath.open_file(path, flags)


def _large(algorithm: str, size: int) -> bool:
    return algorithm == "blake3" and size >= LARGE


def _digest(new, fd: int, large: bool = False) -> str:
    """large: on BLAKE3's threads. Told, not found by an fstat: the walk knows the size."""
    global _large_buffer
    if large:
        _large_buffer = _large_buffer or bytearray(LARGE_READ)  # allocated once, where needed
        h, buffer = new(max_threads=new.AUTO), _large_buffer
    else:
        h, buffer = new(), _buffer
    view = memoryview(buffer)
    while n := os.readv(fd, (buffer,)):
        h.update(view[:n])
    return h.hexdigest()


def hash_file(path: bytes | str | os.PathLike, algorithm: str) -> str:
    """The hex digest of one file's content (a symlink is refused, not followed)."""
    new = hasher_factory(algorithm)
    fd = _open(path)
    try:
        return _digest(new, fd, _large(algorithm, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _read_or_why(new, path: bytes, large: bool = False, with_xattrs: bool = True) -> Content | Unreadable:
    try:
        fd = _open(path)
    except OSError as e:
        why = "is a symlink now" if e.errno == errno.ELOOP else e.strerror or str(e)
        # Its xattrs as they are, so that an unreadable file is not also called changed.
        return Unreadable(why, _xattrs_or_none(path) if with_xattrs else None)
    try:
        try:
            found = xattrs.of_fd(fd) if with_xattrs else None
        except OSError as e:
            return Unreadable(f"extended attributes: {e.strerror or e}")
        try:
            return Content(_digest(new, fd, large), found)
        except OSError as e:
            return Unreadable(e.strerror or str(e), found)
    finally:
        os.close(fd)


def _worker_start(parent: int) -> None:
    # A worker holds what snapmgr held when it forked, the volume lock among them: killed
    # with snapmgr, or the next run would wait for it forever. Signals are snapmgr's to
    # handle: it ends the pool.
    sh.die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # snapmgr died before the line above
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _xattrs_or_none(path: bytes) -> str | None:
    try:
        return xattrs.of_path(path)
    except OSError:
        return None


def _read_batch(job: tuple[str, bool, list[bytes]]) -> list[Content | Unreadable]:
    algorithm, with_xattrs, paths = job
    new = hasher_factory(algorithm)
    return [_read_or_why(new, p, with_xattrs=with_xattrs) for p in paths]


class Hashing:
    """Files handed in one by one are read meanwhile by a pool of processes, in batches;
    results() gives each file's key with its Content (or why there is none) as they are
    done, in the order the files were added. With algorithm None nothing may be added:
    a walk that hashes nothing. with_xattrs False: contents only (no Content has xattrs).
    A worker that dies (killed, out of memory) is a ScanError, never a wait for what it
    will not send."""

    def __init__(self, algorithm: str | None, workers: int | None = None, with_xattrs: bool = True):
        # An unknown algorithm or a missing module fails here, before any work.
        self.new = hasher_factory(algorithm) if algorithm else None
        self.algorithm = algorithm
        self.with_xattrs = with_xattrs
        self.workers = workers or os.cpu_count() or 1
        self._batch: list[tuple[object, bytes]] = []
        self._batch_bytes = 0
        self._sent: deque[tuple[list, Future | list]] = deque()   # (keys, future or digests)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Hashing:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            # Ended, not waited for: a worker may be stuck on a slow or failing disk. The
            # executor has no terminate(); its processes are its own attribute.
            for process in list(self._pool._processes.values()):
                process.kill()
            # Batches still queued for the dead workers may fill the pipe to them; the
            # queue's feeder thread then blocks for good, and shutdown, or Python's exit,
            # would wait for it (CPython gh-94777): let them go without it.
            self._pool._call_queue.cancel_join_thread()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, key: object, path: bytes, size: int) -> None:
        if _large(self.algorithm, size):
            # At once, on BLAKE3's threads, while the pool goes on with what it has.
            self._sent.append(([key], [_read_or_why(self.new, path, large=True, with_xattrs=self.with_xattrs)]))
            return
        self._batch.append((key, path))
        self._batch_bytes += size
        if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            self._send(inline=self.workers == 1)

    def _send(self, inline: bool) -> None:
        keys, paths = [k for k, _ in self._batch], [p for _, p in self._batch]
        self._batch, self._batch_bytes = [], 0
        if inline:
            self._sent.append((keys, _read_batch((self.algorithm, self.with_xattrs, paths))))
            return
        if self._pool is None:
            # fork: the workers need nothing but this module, and start in a millisecond.
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                             initializer=_worker_start, initargs=(os.getpid(),))
        pending = [done for _, done in self._sent if isinstance(done, Future) and not done.done()]
        if len(pending) >= self.workers * IN_FLIGHT:
            wait(pending, return_when=FIRST_COMPLETED)   # the walk waits for the hashing
        try:
            future = self._pool.submit(_read_batch, (self.algorithm, self.with_xattrs, paths))
        except BrokenProcessPool:
            raise _broken() from None
        self._sent.append((keys, future))

    def results(self, wait: bool = True) -> Iterator[tuple[object, Content | Unreadable]]:
        """What is hashed: so far (wait False), or all that was added (wait True)."""
        if wait and self._batch:
            # The last batch; when it is the only one, no pool is worth starting for it.
            self._send(inline=self.workers == 1 or self._pool is None)
        while self._sent and (wait or isinstance(self._sent[0][1], list) or self._sent[0][1].done()):
            keys, done = self._sent.popleft()
            if isinstance(done, Future):
                try:
                    done = done.result()
                except BrokenProcessPool:
                    raise _broken() from None
            yield from zip(keys, done)


def _broken() -> ScanError:
    return ScanError("a hashing process died (killed, or out of memory?)")


def hash_many(files: Sequence[tuple[bytes, int]], algorithm: str, workers: int | None = None
              ) -> list[str | Unreadable]:
    """The digest (or why there is none) of each (absolute path, size), in order."""
    results: list[str | Unreadable | None] = [None] * len(files)
    # Content only: a comparison of contents must not fail on an xattr changing meanwhile.
    with Hashing(algorithm, workers, with_xattrs=False) as hashing:
        for i, (path, size) in enumerate(files):
            hashing.add(i, path, size)
        for i, found in hashing.results():
            results[i] = found.digest if isinstance(found, Content) else found
    return results


