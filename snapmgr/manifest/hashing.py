"""Content hashes of regular files: one file, or many in parallel.

Many small files cost mostly system calls and per-file overhead, so they are hashed in
batches by a pool of processes, one per CPU (threads would queue on the GIL between the
short reads). A large file is hashed by BLAKE3's own threads over a memory map, as b3sum
does; sha256 has no parallel form, so large files go to the pool like the rest."""

from __future__ import annotations

import errno
import hashlib
import mmap
import multiprocessing
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from snapmgr.errors import SnapmgrError

ALGORITHMS = ("blake3", "sha256")
READ_SIZE = 1 << 20
# From this size on a file is worth BLAKE3's threads and a memory map.
LARGE = 16 << 20
# One batch sent to a worker: big enough that the round trip costs little beside it.
BATCH_FILES = 256
BATCH_BYTES = 32 << 20
_buffer = bytearray(READ_SIZE)


@dataclass(frozen=True)
class Unreadable:
    """A file that could not be read, and why."""
    reason: str


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
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # not the owner and no CAP_FOWNER
        return os.open(path, flags)


def _digest(new, algorithm: str, fd: int) -> str:
    size = os.fstat(fd).st_size
    if algorithm == "blake3" and size >= LARGE:
        h = new(max_threads=new.AUTO)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            h.update(mapped)
        return h.hexdigest()
    h = new()
    view = memoryview(_buffer)
    while n := os.readv(fd, (_buffer,)):
        h.update(view[:n])
    return h.hexdigest()


def hash_file(path: bytes | str | os.PathLike, algorithm: str) -> str:
    """The hex digest of one file's content (a symlink is refused, not followed)."""
    new = hasher_factory(algorithm)
    fd = _open(path)
    try:
        return _digest(new, algorithm, fd)
    finally:
        os.close(fd)


def _hash_or_why(new, algorithm: str, path: bytes) -> str | Unreadable:
    try:
        fd = _open(path)
    except OSError as e:
        return Unreadable("is a symlink now" if e.errno == errno.ELOOP else e.strerror or str(e))
    try:
        return _digest(new, algorithm, fd)
    except OSError as e:
        return Unreadable(e.strerror or str(e))
    finally:
        os.close(fd)


def _hash_batch(job: tuple[str, list[bytes]]) -> list[str | Unreadable]:
    algorithm, paths = job
    new = hasher_factory(algorithm)
    return [_hash_or_why(new, algorithm, p) for p in paths]


def hash_many(files: Sequence[tuple[bytes, int]], algorithm: str, workers: int | None = None
              ) -> list[str | Unreadable]:
    """The digest (or why there is none) of each (absolute path, size), in order."""
    hasher_factory(algorithm)  # an unknown algorithm or a missing module fails here, once
    large = [i for i, (_, size) in enumerate(files) if algorithm == "blake3" and size >= LARGE]
    skip = set(large)
    batches = list(_batches([(i, p, s) for i, (p, s) in enumerate(files) if i not in skip]))
    results: list[str | Unreadable | None] = [None] * len(files)
    with _mapper(workers or os.cpu_count() or 1, len(batches)) as mapped:
        done = mapped(_hash_batch, ((algorithm, [p for _, p in b]) for b in batches))
        for i in large:  # while the pool works through the small ones
            results[i] = _hash_batch((algorithm, [files[i][0]]))[0]
        _place(results, batches, done)
    return results


@contextmanager
def _mapper(workers: int, batches: int) -> Iterator[Callable]:
    """map() over a pool of processes when there is work for more than one."""
    if workers == 1 or batches <= 1:
        yield map
        return
    # fork: the workers need nothing but this module, and start in a millisecond.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.imap


def _batches(files: Iterable[tuple[int, bytes, int]]) -> Iterator[list[tuple[int, bytes]]]:
    batch, size = [], 0
    for i, path, length in files:
        batch.append((i, path))
        size += length
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _place(results: list, batches: list[list[tuple[int, bytes]]], done: Iterable[list]) -> None:
    for batch, digests in zip(batches, done):
        for (i, _), digest in zip(batch, digests):
            results[i] = digest
