"""`snapmgr restore` as a job: find the snapshot, check every PATH and DEST before anything
is copied, then copy (snapmgr.restore). `--in-place` copies back into the live volume
under its lock, after a protected pre-rollback snapshot of it, and is journaled."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

from snapmgr import volume_paths
from snapmgr.engine import Engine
from snapmgr.errors import Interrupted, SnapmgrError, UsageError
from snapmgr.restore import SHOWN_CONFLICTS, Restored, check_dest, conflicts, copy, kept_out


def restore(engine: Engine, snapshot_text: str, paths: Sequence[str], dest: Path | None, overwrite: bool = False,
            in_place: bool = False, delete: bool = False, dry_run: bool = False) -> Restored:
    """Copy PATHS out of a snapshot into DEST, or with `in_place` back into the live
    volume, after a protected pre-rollback snapshot of it."""
    if delete and not in_place:
        raise UsageError("--delete only goes with --in-place, where the pre-rollback snapshot keeps what it "
                         "deletes; restore into an empty DEST instead")
    volume, backend, snapshot = engine.snapshot_of(snapshot_text)
    live = backend.live_root()
    wanted = list(dict.fromkeys(volume_paths.relative(p, live, volume.name) for p in paths))
    if in_place:
        if live is None:
            raise SnapmgrError(f"volume {volume.name} is not mounted now: there is nowhere to restore in place")
        dest = live
    dest = Path(os.path.abspath(dest))
    if not in_place:
        check_dest(dest)
    kept = kept_out(dest, wanted, own_places(engine))
    with ExitStack() as stack:
        if in_place and not dry_run:
            stack.enter_context(engine.locked(volume))
        root = stack.enter_context(backend.browse_root(snapshot))
        for path in wanted:
            volume_paths.located(root, path, str(snapshot.id))
        if not (overwrite or in_place):
            _refuse_overwriting(root, wanted, dest)
        pre_rollback = None
        if in_place and not dry_run:
            pre_rollback = engine.pre_rollback(volume)
            stack.enter_context(engine.journal.run(volume.name, "restore", os.getpid()))
        try:
            changes = copy(root, wanted, dest, dry_run, delete, backend.left_out(), kept, backend.own_mounts())
        except SnapmgrError as e:
            if pre_rollback is None or isinstance(e, Interrupted):   # a stop is said as such
                raise
            # Raised inside the journal's run, so the journal keeps this line too.
            raise SnapmgrError(f"{e}; the volume as it was before is in {pre_rollback}: snapmgr restore "
                               f"{pre_rollback} PATH --in-place puts it back") from None
    return Restored(str(snapshot.id), dest, tuple(wanted), dry_run, tuple(changes), pre_rollback)


def own_places(engine: Engine) -> list[tuple[Path, str]]:
    """What a restore must never write into, as real paths, each with what it is: also
    where every other volume keeps its snapshots, which may lie inside this one's source."""
    settings = engine.config.settings
    places = [(settings.state_dir, "snapmgr's state directory (its journal and records)"),
              (settings.run_dir, "snapmgr's run directory (its locks)"),
              *((storage, f"where volume {v.name} keeps its snapshots")
                for v in engine.config.volumes.values() for storage in engine.backend(v).written_paths())]
    return [(Path(os.path.realpath(place)), what) for place, what in places]


def _refuse_overwriting(root: Path, paths: list[bytes], dest: Path) -> None:
    existing = conflicts(root, paths, dest)
    if existing:
        shown = ", ".join(volume_paths.shown(p) for p in existing[:SHOWN_CONFLICTS])
        more = " and more" if len(existing) > SHOWN_CONFLICTS else ""
        raise SnapmgrError(f"refusing to overwrite what exists in {dest}: {shown}{more} "
                           f"(--overwrite replaces them; nothing was copied)")
