"""Backends whose snapshots are directories side by side in one folder (rsync, btrfs).

Each snapshot `<dir>/<id>` has its metadata in `<dir>/<id>.json`. The sidecar is written
and fsync'd *before* the snapshot becomes visible under its final name, so a listed
snapshot always has its metadata; a sidecar left without a snapshot by a crash is removed
on the next run."""

from __future__ import annotations

import abc
import ctypes
import json
import logging
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from snapmgr.backends import mounts
from snapmgr.backends.base import Backend, Progress, Space
from snapmgr.model import Snapshot, SnapshotId
from snapmgr.records import write_json

log = logging.getLogger(__name__)
SIDECAR_SUFFIX = ".json"
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2   # <fcntl.h>, <linux/fs.h>


class DirectoryBackend(Backend):
    @property
    @abc.abstractmethod
    def snapshot_dir(self) -> Path:
        """The folder that holds this volume's snapshots."""

    @abc.abstractmethod
    def _is_snapshot(self, path: Path) -> bool:
        """Whether a directory named like a snapshot id really is one of ours."""

    @abc.abstractmethod
    def _build(self, snapshot_id: SnapshotId, progress: Progress | None) -> dict:
        """Make the snapshot's data where list() does not see it; return extra metadata."""

    @abc.abstractmethod
    def _publish(self, snapshot_id: SnapshotId) -> None:
        """Make the built snapshot visible as `<dir>/<id>`, atomically."""

    @abc.abstractmethod
    def _discard(self, path: Path) -> None:
        """Remove a snapshot's data."""

    @abc.abstractmethod
    def _clean_leftovers(self) -> None:
        """Deal with what an interrupted create or delete left behind."""

    # The protocol ---------------------------------------------------------------

    def create(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None = None) -> Snapshot:
        return self.stage(snapshot_id, tags, progress, prepass=False)()

    def stage(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None,
              prepass: bool) -> Callable[[], Snapshot]:
        self.snapshot_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clean_leftovers()
        self._remove_orphan_sidecars()
        if prepass:
            self._prebuild(snapshot_id, progress)
        return lambda: self._take(snapshot_id, tags, progress)

    def _prebuild(self, snapshot_id: SnapshotId, progress: Progress | None) -> None:
        """Copy what can be copied before the services are paused; _build then only
        brings it up to date. Nothing to do where a snapshot copies nothing."""

    def _take(self, snapshot_id: SnapshotId, tags: frozenset[str], progress: Progress | None) -> Snapshot:
        meta = {
            "id": str(snapshot_id),
            "volume": self.volume,
            "backend": self.name,
            "tags": sorted(tags),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        meta |= self._build(snapshot_id, progress)
        write_json(self._sidecar(snapshot_id), meta)
        try:
            self._publish(snapshot_id)
        except BaseException:
            self._sidecar(snapshot_id).unlink(missing_ok=True)
            raise
        fsync_dir(self.snapshot_dir)
        return Snapshot(snapshot_id, self.snapshot_dir / str(snapshot_id), frozenset(tags), meta)

    def written_paths(self) -> tuple[Path, ...]:
        return (self.snapshot_dir,)

    def _filesystem_space(self, where: str | None = None) -> Space:
        """The filesystem the snapshots are on, as df shows it (free: what is available
        to other users than root, so root's reserve is kept for the system); `where`
        when already known, for a watch that asks many times."""
        at = self.snapshot_dir
        while not at.exists():
            at = at.parent   # the folder is made by the first snapshot
        st = os.statvfs(at)
        if where is None:
            mount = mounts.containing(at)
            where = f"{mount.mountpoint} ({mount.fstype})" if mount else str(at)
        return Space(where, st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)

    def records_dir(self, state_dir: Path) -> Path:
        return self.snapshot_dir

    def list(self) -> list[Snapshot]:
        snapshots = []
        for sid, path in self._snapshot_dirs():
            if not self._sidecar(sid).exists() and not os.path.lexists(path):
                continue   # deleted since the directory was read: the sidecar goes after the data
            meta = self._read_sidecar(sid)
            tags = frozenset(meta["tags"]) if meta else frozenset()
            snapshots.append(Snapshot(sid, path, tags, meta or {}, meta_readable=meta is not None))
        return snapshots

    def _snapshot_dirs(self) -> list[tuple[SnapshotId, Path]]:
        """(id, path) of each complete snapshot, found by name and type alone: no metadata
        is read, for callers that only need to know what exists."""
        try:
            entries = list(os.scandir(self.snapshot_dir))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            sid = SnapshotId.try_parse(entry.name)
            if sid and sid.volume == self.volume and entry.is_dir(follow_symlinks=False) \
                    and self._is_snapshot(Path(entry.path)):
                found.append((sid, Path(entry.path)))
        return found

    def delete(self, snapshot: Snapshot) -> None:
        self._discard(snapshot.path)
        self._sidecar(snapshot.id).unlink(missing_ok=True)
        fsync_dir(self.snapshot_dir)

    @contextmanager
    def browse_root(self, snapshot: Snapshot) -> Iterator[Path]:
        yield snapshot.path

    # Sidecars ---------------------------------------------------------------------

    def _sidecar(self, snapshot_id: SnapshotId) -> Path:
        return self.snapshot_dir / f"{snapshot_id}{SIDECAR_SUFFIX}"

    def _read_sidecar(self, snapshot_id: SnapshotId) -> dict | None:
        """The metadata, or None when it is missing or damaged."""
        try:
            meta = json.loads(self._sidecar(snapshot_id).read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: metadata unreadable (%s); prune will keep it", snapshot_id, e)
            return None
        tags = meta.get("tags") if isinstance(meta, dict) else None
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            log.warning("%s: metadata has no list of tags; prune will keep it", snapshot_id)
            return None
        return meta

    def _remove_orphan_sidecars(self) -> None:
        unfinished = self._suffixed(SIDECAR_SUFFIX + ".tmp") + [
            sidecar for sidecar in self._suffixed(SIDECAR_SUFFIX)
            if not sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX)).exists()]
        for sidecar in unfinished:
            log.info("removing metadata of an unfinished snapshot: %s", sidecar.name)
            sidecar.unlink()

    def _suffixed(self, suffix: str) -> list[Path]:
        """This volume's entries named `<id><suffix>`, oldest first."""
        found = {}
        for path in self.snapshot_dir.glob(f"{self.volume}@*{suffix}"):
            sid = SnapshotId.try_parse(path.name.removesuffix(suffix))
            if sid and sid.volume == self.volume:
                found[sid] = path
        return [found[sid] for sid in sorted(found)]


@contextmanager
def _opened_dir(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with _opened_dir(path) as fd:
        os.fsync(fd)


def exchange(a: Path, b: Path) -> None:
    """Swap the names of `a` and `b`, in one step (renameat2 RENAME_EXCHANGE): whoever
    looks finds each name always there, naming the one or the other, never neither. Both
    must be on one filesystem that supports it (ext4, xfs, btrfs with subvolumes too)."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot swap {a} and {b} in one step: {os.strerror(err)}")


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path` (one syscall, however many files were
    written), so what was written there is on disk before it is named."""
    with _opened_dir(path) as fd:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
