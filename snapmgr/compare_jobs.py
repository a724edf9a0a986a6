"""`snapmgr diff` and `snapmgr versions` as jobs: find the snapshots (and the live volume)
to compare, read each from its manifest where it has a usable one and from its files
where not, and hand them to snapmgr.diff and snapmgr.versions. They only read: no lock."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path

from snapmgr import volume_paths
from snapmgr.backends.base import Backend
from snapmgr.config import Volume
from snapmgr.diff import Diff, Side, differences
from snapmgr.engine import Engine
from snapmgr.errors import SnapmgrError, UsageError, quote
from snapmgr.manifest import ALGORITHMS, Manifest, ManifestDamaged
from snapmgr.model import Snapshot
from snapmgr.versions import History, Reader, State, distinct

log = logging.getLogger(__name__)
LIVE = "live"   # the volume as it is now, where a snapshot could be named


def diff(engine: Engine, old_text: str, new_text: str, path_text: str | None = None, quick: bool = False,
         written_only: bool = False, live_moving: bool = False) -> Diff:
    """What changed from snapshot OLD to snapshot NEW (or to the live volume, LIVE); how
    much it reads: see snapmgr.diff."""
    volume, backend, old = engine.snapshot_of(old_text)
    live = backend.live_root()
    new = None
    if new_text == LIVE:
        if live is None:
            raise SnapmgrError(f"volume {volume.name} is not mounted now: there is no live state to compare with")
    else:
        other, _, new = engine.snapshot_of(new_text)
        if other.name != volume.name:
            raise UsageError(f"{old_text} and {new_text} are snapshots of different volumes; compare two "
                             f"snapshots of one volume, or one with 'live'")
    path = volume_paths.relative(path_text, live, volume.name) if path_text else b""
    manifests = [_usable_manifest(engine, s) for s in (old, new)]
    algorithm = next((m.algorithm for m in manifests if m), ALGORITHMS[0])
    with ExitStack() as stack:
        sides = []
        for snapshot, found in zip((old, new), manifests):
            if snapshot is None:
                # Resolved: the walk would take a root that is a symlink for one.
                sides.append(Side(LIVE, None, Path(os.path.realpath(live)), None, left_out=backend.left_out(),
                                  crosses_mounts=backend.crosses_mounts(), own_mounts=backend.own_mounts()))
            elif found and found.algorithm == algorithm:
                sides.append(Side(str(snapshot.id), found, None, snapshot.created.timestamp()))
            else:
                root = stack.enter_context(backend.browse_root(snapshot))
                sides.append(Side(str(snapshot.id), None, root, snapshot.created.timestamp()))
        return differences(*sides, path, algorithm, quick, backend.shares_inodes and new is not None, written_only,
                           live_moving and new is None)


def versions(engine: Engine, path_text: str) -> History:
    """Each distinct version of a live volume's file in its snapshots, newest first;
    also of a file deleted from the live volume since."""
    volume, backend, live, path = _volume_holding(engine, path_text)
    if not path:
        raise UsageError(f"{quote(path_text)} is the root of volume {volume.name}; name a file in it")
    snapshots = sorted((s for s in backend.list() if not s.invalid), key=lambda s: s.id, reverse=True)
    manifests = {s.id: _usable_manifest(engine, s) for s in snapshots}
    algorithm = next((m.algorithm for m in manifests.values() if m), ALGORITHMS[0])
    reader = Reader(algorithm, backend.shares_inodes)
    current = reader.state(live, path, LIVE)
    if current is not None and current.kind == "d":
        raise UsageError(f"{quote(path_text)} is a directory; versions lists the versions of a file")
    found = []
    for snapshot in snapshots:
        held = manifests[snapshot.id]
        if held is not None and held.algorithm == algorithm:
            entry = held.lookup(path)
            state = State.of(entry) if entry else None
        else:
            with backend.browse_root(snapshot) as root:
                state = reader.state(root, path, str(snapshot.id), snapshot.created.timestamp())
        if state is not None:
            found.append((str(snapshot.id), state))
    return History(volume.name, path, current, distinct(found, current))


def _volume_holding(engine: Engine, path_text: str) -> tuple[Volume, Backend, Path, bytes]:
    """The volume whose live files hold the path (absolute, or relative to the current
    directory), and the path relative to its root; the innermost such volume."""
    absolute = os.path.abspath(path_text)
    parent, name = os.path.split(absolute)
    spellings = dict.fromkeys([absolute, os.path.join(os.path.realpath(parent), name)])
    best = None
    for volume in engine.volumes():
        backend = engine.backend(volume)
        try:
            live = backend.live_root()
        except (SnapmgrError, OSError) as e:
            log.debug("volume %s: no live root: %s", volume.name, e)
            continue
        for spelling in spellings:
            try:
                path = volume_paths.relative(spelling, live, volume.name)
            except UsageError:
                continue
            depth = len(os.fsencode(live).split(b"/"))
            if best is None or depth > best[0]:
                best = (depth, (volume, backend, live, path))
    if best is None:
        raise UsageError(f"{quote(path_text)} is in no configured volume's live files "
                         f"(volumes: {', '.join(engine.config.volumes) or 'none'})")
    return best[1]


def _usable_manifest(engine: Engine, snapshot: Snapshot | None) -> Manifest | None:
    """The snapshot's manifest; None for the live volume, or when it has none or a
    damaged one (then the snapshot is walked instead)."""
    if snapshot is None:
        return None
    try:
        return engine.stored_manifest(snapshot)
    except ManifestDamaged as e:
        log.warning("%s; reading the snapshot itself instead", e)
        return None
