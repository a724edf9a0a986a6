"""What changed in an rsync source since a mark taken before the prepass, so that the
pass inside the quiesce window copies that alone instead of comparing the whole tree.

Every change to an entry sets its ctime, from the kernel's clock (utimensat sets the
other times, never this one): content, truncation, mode, owner, xattrs and ACLs, a
link made or removed, a rename of the entry itself. Making, removing or renaming an
entry also sets its directory's. So an entry older than the mark is as the prepass
copied it, if each directory above it is older too or, though changed, still the one
the mark saw there. Of a changed directory, the directory itself is copied, each changed
entry, and each name the copy has but the source no longer does (deleted, with
rsync --delete-missing-args): what was made or renamed into it has a ctime of its own.
But xfs (and any filesystem not known to do otherwise) leaves the ctimes of two entries
that renameat2(RENAME_EXCHANGE) swaps as they were: there a changed directory's entries
are all compared ("dir/."). One the mark did not see there (made, renamed in, put in
another's place) is copied whole, because what was renamed in with it keeps its old
ctimes.

What ctimes cannot show, the whole tree is compared for: filesystems whose ctimes come
from another clock (network, FUSE) or do not record these changes, mounts that came or
went, the clock set back. The one case no mark can see: a directory renamed away and
back while the prepass ran, with another directory in its place meanwhile.

The same ctimes let a rollback's check run once the services start again (held_now): a
listing of the volume taken just before tells what they changed since."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

from snapmgr import sh
from snapmgr.backends import mounts
from snapmgr.errors import SnapmgrError
from snapmgr.manifest.walk import KIND_OF

log = logging.getLogger(__name__)

# ctime comes from a coarse clock, and some filesystems keep whole seconds only.
SLACK_S = 2.0
# Past this share of the tree the listing saves little (it costs as much near a half).
WHOLE_TREE_SHARE = 0.4
# Local filesystems that set ctime on each change above, from this kernel's clock.
CTIME_KEPT = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs"})
# Of those, the ones seen to set the ctime of both entries a RENAME_EXCHANGE swaps.
EXCHANGE_STAMPED = frozenset({"ext2", "ext3", "ext4", "btrfs", "tmpfs"})
MOUNTINFO = "/proc/self/mountinfo"

Identity = tuple[int, int]  # (st_dev, st_ino)


def fine_ctimes(root: Path) -> bool:
    """Whether the filesystem holding `root` sets a ctime on every change, from this
    kernel's clock, finer than a second: then the ctimes of what changed tell changes made
    a few clock ticks apart from each other. One that keeps whole seconds (ext4 with
    128-byte inodes, as mke2fs makes small ones) shows it in the root's own ctime."""
    mount = mounts.containing(root)
    return mount is not None and mount.fstype in CTIME_KEPT and os.stat(root).st_ctime_ns % 1_000_000_000 != 0


class Held(NamedTuple):
    """An entry as find lists it: what tells whether it changed since (its identity and
    ctime), and the properties a later comparison can take from it."""
    dev: int
    ino: int
    ctime_ns: int
    kind: str        # find's %y, as snapmgr.manifest's kinds: "f", "d", "l", ...
    mode: int        # st_mode & 0o7777
    uid: int
    gid: int
    size: int
    mtime_ns: int


def held(st: os.stat_result) -> Held:
    return Held(st.st_dev, st.st_ino, st.st_ctime_ns, KIND_OF.get(stat.S_IFMT(st.st_mode), "?"), st.st_mode & 0o7777,
                st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Listing:
    """What held_now's find printed, read only when asked: once the services run again."""
    inside: str   # the root's real path, ending in "/"
    text: str

    def entries(self) -> dict[bytes, Held]:
        """Each entry by its path relative to the root ("" the root itself)."""
        listed = {}
        try:
            for record in self.text.split("\0")[:-1]:
                dev, ino, ctime, kind, mode, uid, gid, size, mtime, path = record.split(" ", 9)
                if not (path + "/").startswith(self.inside):
                    raise ValueError(f"{path!r} is not below {self.inside}")
                listed[os.fsencode(path[len(self.inside):])] = Held(
                    int(dev), int(ino), _ns(ctime), kind, int(mode, 8), int(uid), int(gid), int(size), _ns(mtime))
        except ValueError as e:
            raise SnapmgrError(f"find's listing of the volume could not be read ({e})") from None
        return listed


def held_now(root: Path, own_mounts: Sequence[Path], pruned: Sequence[Path]) -> Listing | None:
    """Every entry on the filesystems of `root` and of `own_mounts` (below it), but in the
    directories `pruned`. None where what changes next could not be told (fine_ctimes),
    or a name is not UTF-8."""
    if not fine_ctimes(root):
        return None
    real = os.path.realpath(root)
    inside = real.rstrip("/") + "/"
    prunes = [arg for place in map(os.path.realpath, pruned) if place.startswith(inside) and os.path.exists(place)
              for arg in ("-samefile", place, "-prune", "-o")]
    result = sh.run(["find", real, *(os.path.realpath(m) for m in own_mounts), "-xdev", *prunes,
                     "-printf", r"%D %i %C@ %y %m %U %G %s %T@ %p\0"], check=False)
    if result.returncode or "\ufffd" in result.stdout:
        return None
    return Listing(inside, result.stdout)


def _ns(stamp: str) -> int:
    """find's %C@ or %T@ (seconds, a point, ten digits) in ns."""
    seconds, _, fraction = stamp.partition(".")
    return int(seconds) * 1_000_000_000 + int(fraction[:9].ljust(9, "0"))


class WholeTree(Exception):
    """Why only comparing the whole tree can be trusted this time."""


@dataclass(frozen=True)
class Scope:
    """The tree rsync copies: its source, whether it stays on one filesystem, and the
    directory never to look into (the repository, which may be inside the source)."""
    source: Path
    one_file_system: bool
    pruned: Path


@dataclass(frozen=True)
class Mark:
    since: float                    # a ctime at or after this is a change
    wall: float
    monotonic: float
    mounts: tuple[str, ...]         # mountinfo lines of the source's filesystems
    dirs: Mapping[str, Identity]    # each directory by its path below the source ("" the source)
    boundaries: tuple[str, ...]     # with one_file_system: directories on other filesystems
    entries: int
    exchanges_stamped: bool         # every filesystem walked is one of EXCHANGE_STAMPED


@dataclass(frozen=True)
class Passes:
    """Names for rsync --files-from, relative to the source: `names` each alone (one gone
    from the source is deleted from the copy), `trees` copied whole."""
    names: tuple[str, ...]
    trees: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    kind: str  # find's %y: "d" for a directory
    ident: Identity
    path: str


def take_mark(scope: Scope) -> Mark:
    """The source as it is before the prepass; WholeTree when its ctimes cannot be trusted."""
    wall, monotonic = time.time(), time.monotonic()
    mounts = _mounts(scope.source)
    # With one_file_system rsync reads only the mount points of the others: always listed.
    walked = mounts[:1] if scope.one_file_system else mounts
    if untrusted := sorted({kind for _, kind, _ in walked if kind not in CTIME_KEPT}):
        raise WholeTree(f"ctimes on {', '.join(untrusted)} cannot be trusted")
    try:
        dirs, boundaries, entries = _walk(scope)
    except OSError as e:
        raise WholeTree(f"the source could not be walked: {e}") from None
    return Mark(wall - SLACK_S, wall, monotonic, tuple(line for *_, line in mounts), dirs, boundaries, entries,
                all(kind in EXCHANGE_STAMPED for _, kind, _ in walked))


def prepare(mark: Mark, scope: Scope, partial: Path) -> Passes:
    """The passes that bring the prepass's copy up to date. Whatever pass follows, the
    copy is readied first (see _ready). WholeTree when the listing cannot be trusted or
    saves little."""
    _check_unchanged(mark, scope, partial)
    changed = _changed(mark, scope)
    copy = _Copy(partial)
    names, trees = _sort(mark, scope, changed, copy)
    _ready(copy, scope, changed, trees)
    if len(changed) > WHOLE_TREE_SHARE * mark.entries:
        raise WholeTree(f"{len(changed):,} of {mark.entries:,} entries changed")
    if trees and _hard_linked(scope, trees):
        raise WholeTree("a directory to copy whole holds hard links, which rsync links only within one run")
    return Passes(tuple(names), tuple(f"./{tree}" for tree in trees))


# At the mark ---------------------------------------------------------------------------

def _mounts(source: Path) -> list[tuple[Path, str, str]]:
    """(mount point, type, mountinfo line) of the mount holding the source, then of each
    mount inside it."""
    real = Path(os.path.realpath(source))
    with open(MOUNTINFO, errors="surrogateescape") as f:
        mounts = [_mount(line) for line in f]
    # The last of the deepest mounts holding the source is the one on top.
    holding = max(reversed([m for m in mounts if real.is_relative_to(m[0])]), key=lambda m: len(m[0].parts))
    return [holding] + [m for m in mounts if m[0].is_relative_to(real) and m is not holding]


def _mount(line: str) -> tuple[Path, str, str]:
    fields, _, rest = line.partition(" - ")
    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields.split()[4])
    return Path(point), rest.split()[0], line.rstrip("\n")


def _walk(scope: Scope) -> tuple[dict[str, Identity], tuple[str, ...], int]:
    """Every directory's identity, the directories on other filesystems rsync does not
    enter (one_file_system), and how many entries the tree has."""
    top = os.stat(scope.source)
    pruned = os.stat(scope.pruned)
    dirs, boundaries, entries = {"": (top.st_dev, top.st_ino)}, [], 0
    todo = [""]
    while todo:
        parent = todo.pop()
        for entry in _scandir(scope.source / parent):
            entries += 1
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            path = f"{parent}/{entry.name}" if parent else entry.name
            if (st.st_dev, st.st_ino) == (pruned.st_dev, pruned.st_ino):
                continue
            if scope.one_file_system and st.st_dev != top.st_dev:
                boundaries.append(path)
                continue
            dirs[path] = (st.st_dev, st.st_ino)
            todo.append(path)
    return dirs, tuple(boundaries), entries


def _scandir(path: Path) -> list[os.DirEntry]:
    """The entries of a directory, none if it vanished meanwhile (a live source)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


# In the window ---------------------------------------------------------------------------

def _check_unchanged(mark: Mark, scope: Scope, partial: Path) -> None:
    """What the listing relies on, still as at the mark."""
    if time.time() - mark.wall < time.monotonic() - mark.monotonic - SLACK_S:
        raise WholeTree("the clock was set back since the mark")
    if tuple(line for *_, line in _mounts(scope.source)) != mark.mounts:
        raise WholeTree("mounts in the source changed since the mark")
    top = os.stat(scope.source)
    if (top.st_dev, top.st_ino) != mark.dirs[""]:
        raise WholeTree("the source directory was replaced since the mark")
    if not stat.S_ISDIR(_mode(partial)):
        raise WholeTree("the prepass's copy is gone")


def _changed(mark: Mark, scope: Scope) -> list[_Entry]:
    """Entries whose ctime is at or after the mark ("" is the source itself)."""
    result = sh.run([*_find(scope, [f"{scope.source}/"]), "-newerct", f"@{mark.since:.9f}",
                     "-printf", r"%y %D %i %P\0"], check=False)
    if result.returncode:
        raise WholeTree(f"find exited with status {result.returncode}: {_first_line(result.stderr)}")
    if "\ufffd" in result.stdout:
        raise WholeTree("a changed name is not UTF-8")
    entries = []
    for record in result.stdout.split("\0")[:-1]:
        kind, dev, ino, path = record.split(" ", 3)
        entries.append(_Entry(kind, (int(dev), int(ino)), path))
    return entries


def _find(scope: Scope, starts: list[str | Path]) -> list[str | Path]:
    """find over `starts` as rsync walks them, the repository left out; tests follow."""
    xdev = ["-xdev"] if scope.one_file_system else []
    return ["find", *starts, *xdev, "-samefile", scope.pruned, "-prune", "-o"]


def _sort(mark: Mark, scope: Scope, changed: list[_Entry], copy: _Copy) -> tuple[list[str], list[str]]:
    """The names to list, and the directories to copy whole: changed ones not where the
    mark saw them, or missing from the copy. A path whose directory is not in the copy is
    left out: the prepass excluded that directory, and rsync checks a listed name alone.
    The source itself is listed once a name in it is: rsync sets a directory's mtime
    back only when it lists it (with --relative, each directory above a name but ".")."""
    top_dev = mark.dirs[""][0]
    levels: dict[str, bool] = dict.fromkeys(mark.boundaries, False)  # path: with its entries?
    trees = []
    for entry in changed:
        levels[entry.path] = False
        if entry.kind != "d" or (scope.one_file_system and entry.ident[0] != top_dev):
            continue   # with one_file_system, a mount point is listed for itself alone
        if mark.dirs.get(entry.path) != entry.ident or not copy.is_dir(entry.path):
            trees.append(entry.path)
        elif mark.exchanges_stamped:
            levels.update(dict.fromkeys(copy.gone(entry.path, scope.source), False))
        else:
            levels[entry.path] = True
    covered = _Covered(trees)
    if any(path and not _parent(path) for path in levels):
        levels.setdefault("", False)

    def listed(path: str) -> bool:
        # An entry listed for itself alone is sent anyway with the entries of its directory.
        sent = path and not levels[path] and levels.get(_parent(path))
        return not covered(path) and copy.is_dir(_parent(path)) and not sent
    # "." alone is sent with its entries too (rsync -d).
    names = [os.path.join(".", path, ".") if level else f"./{path}" if path else "."
             for path, level in levels.items() if listed(path)]
    return sorted(names), sorted(tree for tree in covered.roots if copy.is_dir(_parent(tree)))


def _ready(copy: _Copy, scope: Scope, changed: list[_Entry], trees: list[str]) -> None:
    """A changed entry whose copy shares its inode (with the previous snapshot, through
    --link-dest) is unlinked where rsync would keep that copy and change its attributes
    in place, and so the previous snapshot's too. A directory to copy whole is removed,
    for the same reason."""
    covered = _Covered(trees)
    for entry in changed:
        if entry.kind != "d" and not covered(entry.path):
            copy.unshare(entry.path, scope.source / entry.path)
    for tree in trees:
        copy.remove(tree)


def _hard_linked(scope: Scope, trees: list[str]) -> bool:
    # No trailing slash: a directory replaced by a symlink since is not followed.
    result = sh.run([*_find(scope, [scope.source / t for t in trees]), "!", "-type", "d", "-links", "+1",
                     "-print", "-quit"], check=False)
    if result.returncode:
        raise WholeTree(f"find exited with status {result.returncode}: {_first_line(result.stderr)}")
    return bool(result.stdout)


class _Covered:
    """Whether a path is in one of these directories (or is one), by its outermost ones."""

    def __init__(self, dirs: Iterable[str]):
        names = set(dirs)
        self.roots = [d for d in names if not any(a in names for a in _ancestors(d))]
        self._roots = set(self.roots)

    def __call__(self, path: str) -> bool:
        return path in self._roots or any(a in self._roots for a in _ancestors(path))


class _Copy:
    """The prepass's copy, looked at without following symlinks: a path in it is used
    only when each directory on the way is a real directory."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs = {"": True}

    def is_dir(self, path: str) -> bool:
        todo = []
        while (known := self._dirs.get(path)) is None:
            todo.append(path)
            path = _parent(path)
        for path in reversed(todo):
            known = self._dirs[path] = known and stat.S_ISDIR(_mode(self.root / path))
        return known

    def gone(self, path: str, source: Path) -> list[str]:
        """The entries of the copy's directory `path` the source's no longer has."""
        there = {entry.name for entry in _scandir(source / path)}
        return [os.path.join(path, entry.name) for entry in _scandir(self.root / path) if entry.name not in there]

    def unshare(self, path: str, source: Path) -> None:
        """Unlink the copy of `path` if it shares its inode and rsync would keep it: a
        regular file that differs in size or mtime is replaced (a new file renamed over it)."""
        if not self.is_dir(_parent(path)):
            return
        try:
            copied, now = os.lstat(self.root / path), os.lstat(source)
        except (FileNotFoundError, NotADirectoryError):
            return  # not copied yet; or gone, and rsync deletes the copy (--delete-missing-args)
        quick_check = (copied.st_size, copied.st_mtime_ns) == (now.st_size, now.st_mtime_ns)
        replaced = stat.S_ISREG(now.st_mode) and not quick_check
        if not stat.S_ISDIR(copied.st_mode) and copied.st_nlink > 1 and not replaced:
            os.unlink(self.root / path)

    def remove(self, path: str) -> None:
        if self.is_dir(path):
            shutil.rmtree(self.root / path)
        elif _mode(self.root / path):
            os.unlink(self.root / path)


def _mode(path: Path) -> int:
    """Its st_mode, without following a symlink; 0 when there is nothing there."""
    try:
        return os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _ancestors(path: str) -> Iterator[str]:
    while path:
        path = _parent(path)
        yield path


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "no message")
