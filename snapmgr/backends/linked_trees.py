"""Where two hardlink snapshots of one volume differ, told without reading a file or,
but for directories, looking at one: rsync --link-dest links a file into the next
snapshot only when it is unchanged, data and every attribute, so an entry that is one
inode in both is the same file. Directories are never linked; theirs are compared
(mode, owner, group, mtime, xattrs and ACLs).

An rsync rollback copies from the target only the names found here against the
pre-rollback snapshot it has just taken, the volume as it is: listing them costs a
readdir of both trees, where rsync --delete compares every file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple


class Apart(NamedTuple):
    names: list[bytes]   # relative to the roots, b"" the root itself
    entries: int         # how many the older tree has
    filed: list[bytes]   # directories of the newer tree where the older has something else


def apart(old: Path, new: Path, left_out: Callable[[bytes, bool], bool]) -> Apart | None:
    """The names a copy from `old` must list to make `new` as `old` is (rsync
    --files-from, one name each, --delete-missing-args): those where they differ; of a
    directory `new` lacks, each entry below it; every name of an inode `old` links under
    several, whether or not they look apart, since rsync -H links only names listed
    together and a split of them shows in no inode here (rsync --link-dest linked the
    newer tree's alike files back into the one); the root, once a name in it is, since
    rsync sets a directory's mtime back only when it lists it (with --relative, each
    directory above a name but the root). What `left_out` says (given a path and whether
    it is a directory, on either side) is neither listed nor looked into: rsync checks a
    listed name's own rules only, never its directories'. None when the trees are on
    different filesystems, where no inode is shared."""
    if os.lstat(old).st_dev != os.lstat(new).st_dev:
        return None
    found = [] if _same_dir(old, new) else [b""]
    first: dict[int, bytes] = {}         # each inode of `old` by its first name
    more: dict[int, list[bytes]] = {}    # and by its others, when it has more
    filed: list[bytes] = []
    entries = 0
    todo: list[tuple[bytes, bool]] = [(b"", True)]   # a directory of `old`, and whether `new` has one there
    while todo:
        path, in_new = todo.pop()
        olds = _entries(os.path.join(bytes(old), path))
        news = _entries(os.path.join(bytes(new), path)) if in_new else {}
        entries += len(olds)
        for name, o in olds.items():
            relative = os.path.join(path, name)
            n = news.get(name)
            if left_out(relative, o.is_dir(follow_symlinks=False)) or \
                    n is not None and left_out(relative, n.is_dir(follow_symlinks=False)):
                continue
            if o.is_dir(follow_symlinks=False):
                both = n is not None and n.is_dir(follow_symlinks=False)
                if not (both and _same_dir(o.path, n.path)):
                    found.append(relative)
                todo.append((relative, both))
                continue
            if n is not None and n.is_dir(follow_symlinks=False):
                filed.append(relative)
            inode = o.inode()
            if first.setdefault(inode, relative) is not relative:
                more.setdefault(inode, []).append(relative)
            if n is None or n.inode() != inode or n.is_dir(follow_symlinks=False):
                found.append(relative)
        found += [os.path.join(path, name) for name, n in news.items()
                  if name not in olds and not left_out(os.path.join(path, name), n.is_dir(follow_symlinks=False))]
    names = set(found).union(name for inode, others in more.items() for name in [first[inode], *others])
    if any(b"/" not in name for name in names):
        names.add(b"")
    return Apart(sorted(names), entries, filed)


def _entries(path: bytes) -> dict[bytes, os.DirEntry]:
    with os.scandir(path) as it:
        return {entry.name: entry for entry in it}


def _same_dir(a: bytes | Path, b: bytes | Path) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    if (sa.st_mode, sa.st_uid, sa.st_gid, sa.st_mtime_ns) != (sb.st_mode, sb.st_uid, sb.st_gid, sb.st_mtime_ns):
        return False
    return _xattrs(a) == _xattrs(b)


def _xattrs(path: bytes | Path) -> dict[str, bytes]:
    return {key: os.getxattr(path, key, follow_symlinks=False) for key in os.listxattr(path, follow_symlinks=False)}
