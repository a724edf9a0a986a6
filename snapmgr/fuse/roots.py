"""Browse roots, entered when first needed and left when idle.

Entering a snapshot's browse root may mount something (an LVM snapshot is activated and
mounted): that is done on first access, in a worker thread so the rest of the mount keeps
answering, and undone once nothing has used it for `idle` seconds and no file in it is
open, and at unmount. A file the kernel still knows inside a released root is served by
entering it again. The root's own attributes are kept once seen: a snapshot is immutable,
so they stay true after the release.

Each snapshot has one lock for the life of the mount, held while it is entered and while
it is left: requests that find it entered use it as it is, the others wait their turn,
and none enters it beside another or while it is still being left."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyfuse3
import trio

from snapmgr.backends import mounts
from snapmgr.errors import SnapmgrError, as_error
from snapmgr.fuse.tree import Listed

log = logging.getLogger(__name__)


@dataclass
class _Entered:
    name: str
    path: bytes
    stack: ExitStack
    last_used: float
    places: dict[int, bytes]   # device -> where in the tree it is mounted, for each filesystem below the root
    open_files: int = 0


@dataclass
class Roots:
    locate: Callable[[int], Listed | None]     # slot -> the snapshot, while it exists
    idle: float
    clock: Callable[[], float] = time.monotonic
    _entered: dict[int, _Entered] = field(default_factory=dict)
    _locks: defaultdict[int, trio.Lock] = field(default_factory=lambda: defaultdict(trio.Lock))
    _stats: dict[int, os.stat_result] = field(default_factory=dict)

    def known_stat(self, slot: int) -> os.stat_result | None:
        """The root directory's attributes, if the root was ever entered."""
        return self._stats.get(slot)

    async def enter(self, slot: int) -> bytes:
        """The snapshot's browse root as a path, entering it first if needed."""
        entered = self._entered.get(slot)
        if entered is None:
            async with self._locks[slot]:
                entered = self._entered.get(slot) or await self._enter(slot)
        entered.last_used = self.clock()
        return entered.path

    async def _enter(self, slot: int) -> _Entered:
        listed = self.locate(slot)
        if listed is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # pruned since the kernel looked it up
        stack = ExitStack()
        try:
            root = listed.backend.browse_root(listed.snapshot)
            path = (await trio.to_thread.run_sync(stack.enter_context, root) if listed.backend.browse_mounts
                    else stack.enter_context(root))
            self._stats[slot] = os.lstat(path)
            places = _places(Path(path))
        except (SnapmgrError, OSError) as e:
            stack.close()
            log.error("%s: cannot browse it: %s", listed.snapshot.id, as_error(e))
            raise pyfuse3.FUSEError(errno.EIO) from None
        entered = self._entered[slot] = _Entered(str(listed.snapshot.id), os.fsencode(path), stack, self.clock(),
                                                 places)
        return entered

    def place(self, slot: int, device: int) -> bytes:
        """Where in the entered snapshot's tree the filesystem of `device` is mounted; b""
        for the root's own (or one unknown: its inode numbers are taken as the root's)."""
        return self._entered[slot].places.get(device, b"")

    def opened(self, slot: int) -> None:
        self._entered[slot].open_files += 1

    def closed(self, slot: int) -> None:
        entered = self._entered[slot]
        entered.open_files -= 1
        entered.last_used = self.clock()

    async def release_idle_forever(self) -> None:
        """Leave every root unused for `idle` seconds; runs until cancelled."""
        while True:
            await trio.sleep(max(self.idle / 4, 0.1))
            for slot, e in list(self._entered.items()):
                if self._unused(e):
                    async with self._locks[slot]:
                        # Rechecked: a request may have used it while this waited.
                        if self._entered.get(slot) is e and self._unused(e):
                            del self._entered[slot]
                            await trio.to_thread.run_sync(self._leave, e)

    def _unused(self, entered: _Entered) -> bool:
        return entered.open_files == 0 and self.clock() - entered.last_used >= self.idle

    def release_all(self) -> None:
        """Leave every root (at unmount)."""
        while self._entered:
            self._leave(self._entered.popitem()[1])

    @staticmethod
    def _leave(entered: _Entered) -> None:
        try:
            entered.stack.close()
        except (SnapmgrError, OSError) as e:
            log.warning("%s: releasing its browse root failed: %s", entered.name, as_error(e))


def _places(root: Path) -> dict[int, bytes]:
    # Read each time the root is entered: a snapshot mounted again may get another device.
    real = Path(os.path.realpath(root))
    return {os.lstat(m.mountpoint).st_dev: os.fsencode(m.mountpoint.relative_to(real))
            for m in mounts.below(real) if m.mountpoint != real}
