"""mount --verify: a file is hashed and checked against its snapshot's manifest when it is
first opened; the result is kept by inode, so each file of a snapshot is hashed once for
the life of the mount. A file that does not match is logged and journaled, and every read
of it fails with EIO instead of serving rotten data. A file that cannot be checked (its
snapshot has no manifest, or the manifest does not list it) is served, and said so once
per snapshot."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import trio

from snapmgr.errors import SnapmgrError, as_error
from snapmgr.fuse.tree import Listed
from snapmgr.manifest import Manifest, display, hash_file
from snapmgr.model import Snapshot

log = logging.getLogger(__name__)
MANIFESTS_HELD = 4   # a manifest's index holds every entry of its snapshot: only the last few stay


class Verifier:
    def __init__(self, manifest_of: Callable[[Snapshot], Manifest | None],
                 report: Callable[[str, str, str], None]):
        self._manifest_of = manifest_of
        self._report = report          # (snapshot id, path, what is wrong) -> the journal
        self._problems: dict[int, str | None] = {}
        self._manifests: OrderedDict[int, Manifest | None] = OrderedDict()
        self._unverifiable: set[int] = set()

    async def problem(self, ino: int, listed: Listed, path: bytes, full: bytes) -> str | None:
        """What is wrong with the file's content, None when it matches (or cannot be checked)."""
        if ino not in self._problems:
            self._problems[ino] = await self._check(listed, path, full)
        return self._problems[ino]

    async def _check(self, listed: Listed, path: bytes, full: bytes) -> str | None:
        manifest = await self._manifest(listed)
        entry = manifest and await trio.to_thread.run_sync(manifest.lookup, path)
        if entry is None or entry.digest is None:
            if listed.slot not in self._unverifiable:
                self._unverifiable.add(listed.slot)
                why = "it has no manifest" if manifest is None else f"its manifest does not list {display(path)}"
                log.warning("%s: served unverified: %s", listed.snapshot.id, why)
            return None
        digest = await trio.to_thread.run_sync(hash_file, full, manifest.algorithm)
        if digest == entry.digest:
            return None
        problem = f"content does not match the manifest ({manifest.algorithm} {digest}, recorded {entry.digest})"
        log.error("%s: %s: %s; reads fail with EIO", listed.snapshot.id, display(path), problem)
        self._report(str(listed.snapshot.id), "/" + path.decode("utf-8", "backslashreplace"), problem)
        return problem

    async def _manifest(self, listed: Listed) -> Manifest | None:
        if listed.slot in self._manifests:
            self._manifests.move_to_end(listed.slot)
            return self._manifests[listed.slot]
        try:
            manifest = await trio.to_thread.run_sync(self._manifest_of, listed.snapshot)
        except (SnapmgrError, OSError) as e:
            log.error("%s: its manifest cannot be read, files are served unverified: %s",
                      listed.snapshot.id, as_error(e))
            manifest = None
        self._manifests[listed.slot] = manifest
        if len(self._manifests) > MANIFESTS_HELD:
            self._manifests.popitem(last=False)
        return manifest
