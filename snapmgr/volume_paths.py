"""Paths inside a volume, from what a user typed to what a snapshot holds.

A path is bytes relative to the volume's root, components joined by b"/" (b"" is the
root), as in a manifest: a file name may be any bytes, so nothing here decodes them.
A user names a path relative to the volume's root, or absolute as the live volume shows
it; either way it must stay inside the volume, and inside a snapshot it must not pass
through a symlink, which could lead anywhere (the live system's /etc)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from snapmgr.errors import SnapmgrError, UsageError, quote


def relative(text: str, live_root: Path | None, volume: str) -> bytes:
    """The path `text` names, relative to the volume's root."""
    raw = os.fsencode(text)
    if not raw:
        raise UsageError("PATH is empty: name a path inside the volume ('.' for all of it)")
    if not raw.startswith(b"/"):
        return _normal(raw, text)
    if live_root is None:
        raise UsageError(f"{quote(text)}: volume {volume} is not mounted now, so it has no absolute paths; "
                         f"name the path relative to the volume's root")
    path = _normal(raw, text)
    for root in dict.fromkeys((os.fsencode(live_root), os.fsencode(os.path.realpath(live_root)))):
        top = _normal(root, str(live_root))
        if path == top:
            return b""
        if path.startswith(top + b"/") or top == b"":
            return path[len(top) + 1 if top else 0:]
    raise UsageError(f"{quote(text)} is outside volume {volume}, whose files are at {live_root}")


def under(relative_path: bytes, prefix: bytes) -> bool:
    """Whether `relative_path` is `prefix` or below it."""
    return not prefix or relative_path == prefix or relative_path.startswith(prefix + b"/")


def joined(root: Path, relative_path: bytes) -> bytes:
    return os.fsencode(root) + (b"/" + relative_path if relative_path else b"")


def children(root: Path, relative_path: bytes) -> list[tuple[bytes, bool]] | None:
    """Each entry of the directory at `relative_path` below `root`, by its own relative
    path, and whether it is a directory; None when no directory is there."""
    try:
        with os.scandir(joined(root, relative_path)) as it:
            return [(os.path.join(relative_path, e.name), e.is_dir(follow_symlinks=False)) for e in it]
    except (FileNotFoundError, NotADirectoryError):
        return None


def shown(relative_path: bytes) -> str:
    """A relative path as messages show it."""
    return quote(os.fsdecode(relative_path or b"."))


def located(root: Path, relative_path: bytes, where: str) -> os.stat_result:
    """The path's own status inside the tree at `root` (a symlink's, not its target's);
    refused when it is missing or a directory on the way to it is a symlink."""
    current = os.fsencode(root)
    components = relative_path.split(b"/") if relative_path else []
    st = os.lstat(current)
    for i, name in enumerate(components):
        if not stat.S_ISDIR(st.st_mode):
            on_the_way = b"/".join(components[:i])
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise SnapmgrError(f"{shown(relative_path)}: {shown(on_the_way)} is {kind} in {where}")
        current += b"/" + name
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            raise SnapmgrError(f"{shown(relative_path)} does not exist in {where}") from None
    return st


def _normal(raw: bytes, text: str) -> bytes:
    """The components of a path, without '.' and empty ones; '..' is refused, not
    resolved: resolving it lexically is wrong where a symlink comes before it."""
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UsageError(f"{quote(text)}: '..' is not allowed in PATH; name the path itself")
    return b"/".join(parts)
