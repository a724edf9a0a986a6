"""Copy paths out of a snapshot with every attribute kept, by rsync.

`rsync -aHAX --numeric-ids --sparse --relative ROOT/./PATH... DEST/`: each PATH lands at
DEST/PATH with the directories on the way, whose attributes come from the snapshot too.
rsync never writes through a symlink it finds in DEST (it replaces the link), so nothing
is written outside DEST."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from snapmgr import sh
from snapmgr.backends.rsync_filters import anchored
from snapmgr.errors import SnapmgrError, UsageError, quote
from snapmgr.volume_paths import joined, shown, under

# How many existing paths a refusal to overwrite names.
SHOWN_CONFLICTS = 5
# Marks rsync's itemized lines among its other messages ("created directory DEST").
ITEM = "item: "


def check_dest(dest: Path) -> None:
    """Refuse a DEST rsync cannot copy into: it makes DEST itself, not the directories
    above it. Checked before anything is done, since a dry run makes nothing and rsync
    would not notice then."""
    if dest.is_dir():
        return
    if os.path.lexists(dest):
        raise SnapmgrError(f"--to {quote(str(dest))} is not a directory")
    parent = dest.parent
    if not parent.is_dir():
        why = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise SnapmgrError(f"--to {quote(str(dest))}: {quote(str(parent))} {why} (a restore creates DEST, "
                           f"not the directories above it)")


def kept_out(dest: Path, paths: Sequence[bytes], places: Sequence[tuple[Path, str]]) -> list[str]:
    """rsync rules that keep a copy into DEST out of the `places` (real paths, each with
    what it is) below DEST: snapmgr's own state, which a restore must never roll back or
    delete. A DEST inside one of them, or a PATH that would land in one, is refused."""
    real = Path(os.path.realpath(dest))
    rules = []
    for place, what in places:
        if real.is_relative_to(place):
            raise UsageError(f"{quote(str(dest))} is inside {place}, {what}: restoring there would change it; "
                             f"restore elsewhere")
        if not place.is_relative_to(real):
            continue
        inside = os.fsencode(place.relative_to(real))
        for path in paths:
            if under(path, inside):
                raise UsageError(f"{shown(path)} would land in {place}, {what}: a restore never writes there; "
                                 f"restore it elsewhere with --to DEST")
        rules.append(anchored(PurePosixPath(os.fsdecode(inside))))
    return rules


def conflicts(root: Path, paths: Sequence[bytes], dest: Path, limit: int = SHOWN_CONFLICTS + 1) -> list[bytes]:
    """Paths (relative to DEST) that exist in DEST where the copy would put something
    else than a directory into a directory: what restoring would overwrite. At most
    `limit` of them, found without walking further."""
    found: list[bytes] = []
    for path in paths:
        for clash in _clashes(root, path, dest):
            found.append(clash)
            if len(found) >= limit:
                return found
    return found


def _clashes(root: Path, path: bytes, dest: Path) -> Iterator[bytes]:
    components = path.split(b"/") if path else []
    # The directories on the way: a file or a symlink where one must go is in the way.
    for i in range(1, len(components)):
        above = b"/".join(components[:i])
        kind = _kind(joined(dest, above))
        if kind is None:
            return
        if kind != "d":
            yield above
            return
    yield from _tree_clashes(joined(root, path), joined(dest, path), path)


def _tree_clashes(source: bytes, target: bytes, path: bytes) -> Iterator[bytes]:
    existing = _kind(target)
    if existing is None:
        return
    if existing != "d" or not stat.S_ISDIR(os.lstat(source).st_mode):
        yield path
        return
    with os.scandir(source) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        yield from _tree_clashes(source + b"/" + name, target + b"/" + name, path + b"/" + name if path else name)


def _kind(path: bytes) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return "d" if stat.S_ISDIR(mode) else "other"


def argv(root: Path, paths: Sequence[bytes], dest: Path, dry_run: bool, delete: bool,
         left_out: Sequence[str], kept: Sequence[str], names_from: Path | None = None) -> list[str]:
    """rsync's argv for a copy of PATHs from ROOT into DEST; with `names_from`, of the
    names that file lists instead (NUL-terminated, relative to ROOT), each alone: one
    ROOT lacks is deleted from DEST."""
    # --modify-window=-1: mtimes compared to the nanosecond; otherwise a symlink or fifo
    # made within the second of its original's mtime keeps the time of its making.
    argv = ["rsync", "-aHAX", "--numeric-ids", "--sparse", "--relative", "--modify-window=-1",
            f"--out-format={ITEM}%i %n%L"]
    if dry_run:
        argv.append("--dry-run")
    # Excluded, the places are neither written nor deleted.
    argv += [f"--exclude={rule}" for rule in kept]
    if delete:
        # The deletion stops at every other filesystem mounted inside DEST (a nested
        # subvolume, a dataset not in the volume, whatever is mounted while rsync runs):
        # the snapshot shows those as empty directories. rsync looks at each mount as it
        # walks, where a list of mounts read beforehand would miss one made meanwhile.
        # What the snapshots leave out on purpose is excluded, so it is not deleted either.
        argv += ["--delete", "--one-file-system", *(f"--exclude={rule}" for rule in left_out)]
    if names_from:
        return argv + [f"--files-from={names_from}", "--from0", "--delete-missing-args", f"{root}/", f"{dest}/"]
    # Every source starts with '/', so none can be read as an option or a remote host.
    sources = [joined(root, b"./" + (p or b".")) for p in paths]
    return argv + [os.fsdecode(p) for p in sources] + [f"{dest}/"]


def copy(root: Path, paths: Sequence[bytes], dest: Path, dry_run: bool = False, delete: bool = False,
         left_out: Sequence[str] = (), kept: Sequence[str] = (), own_mounts: Sequence[Path] = ()) -> list[str]:
    """Copy, or with dry_run only say what would change: rsync's itemized lines
    ('>f+++++++++ a/b' a new file, '*deleting c'), names escaped by rsync (\\#012 for a
    newline) so each stays one line. `own_mounts`: the volume's other filesystems inside
    DEST (each a filesystem of its own in the snapshot's tree too), into which a
    deletion goes too."""
    changes = []
    for sources in runs(root, paths, dest, own_mounts if delete else ()):
        result = sh.run(argv(root, sources, dest, dry_run, delete, left_out, kept))
        changes += [line[len(ITEM):] for line in result.stdout.splitlines() if line.startswith(ITEM)]
    return changes


def runs(root: Path, paths: Sequence[bytes], dest: Path, own_mounts: Sequence[Path]) -> list[list[bytes]]:
    """The PATHs of each rsync run of a copy: the first run takes them all; then each of
    the volume's own filesystems below one of them gets a run of its own, parents first,
    since a deletion stops at every filesystem boundary (-x) and so no run crosses into a
    filesystem that is not the volume's, even one mounted while it runs. An own
    filesystem that is no filesystem of its own in the snapshot's tree (a dataset made
    since the snapshot) is left alone, as -x leaves it: a run there would empty it."""
    real = Path(os.path.realpath(dest))
    places = sorted((m.relative_to(real) for m in own_mounts if real in m.parents), key=lambda p: p.parts)
    inner = [os.fsencode(p) for p in places]
    return [list(paths), *([place] for place in inner
                           if any(place != p and under(place, p) for p in paths)
                           and os.path.ismount(joined(root, place)))]


@dataclass(frozen=True)
class Restored:
    """What a restore did, or with dry_run would do."""

    snapshot: str
    dest: Path
    paths: tuple[bytes, ...]
    dry_run: bool
    changes: tuple[str, ...]          # rsync's itemized lines
    pre_rollback: str | None = None   # the snapshot taken of the live volume first (--in-place)
