"""Trees that change between two moments, for the properties that must hold whatever
changed: a base tree (files, a hard link, a symlink, a FIFO, an xattr, an ACL, a sparse
file, what the excludes leave out) made ahead to age, operations drawn by hypothesis
that change it, and what tells two trees apart as rsync sees them."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from hypothesis import note
from hypothesis import strategies as st

from snapmgr.backends import changes, directory
from tests.integration.trees import acl_xattr

EXCLUDE = ["*.tmp", "/cache/", "skip/"]
EXAMPLES = 30   # of each property: each takes a base tree and a second or two of rsync


# The trees ---------------------------------------------------------------------------------

def make_base(root: Path) -> None:
    """Files, a hard link, a symlink, a FIFO, an xattr, an ACL, a sparse file, and what
    the excludes leave out: ~200 entries, so that an example's changes stay well under
    the share past which the whole tree is compared. Each directory's `twin` has the same
    data and mtime, but not the same mode: after directories swap, only the mode tells
    the twins apart, and rsync would change it in place."""
    for d in range(4):
        for s in range(4):
            sub = root / f"d{d}" / f"s{s}"
            sub.mkdir(parents=True)
            for f in range(12):
                (sub / f"f{f}").write_bytes(bytes([d, s, f]) * (50 + 37 * f))
            (sub / "twin").write_text("twin")
            os.utime(sub / "twin", ns=(0, 10**18))
            (sub / "twin").chmod(0o640 if (d + s) % 2 else 0o644)
    (root / "top").write_bytes(b"top" * 10)
    os.link(root / "d0/s0/f0", root / "d1/s1/linked")
    (root / "d0/link").symlink_to("s0/f1")
    os.mkfifo(root / "d2/fifo")
    os.setxattr(root / "d0/s0/f2", "user.tag", b"base")
    set_acl(root / "d1/s0/f0", 1234)
    with open(root / "d3/sparse", "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"data")
    (root / "d0/s1/x.tmp").write_text("excluded")
    for excluded in (root / "cache", root / "d2/skip"):
        excluded.mkdir()
        (excluded / "inner").write_text("excluded")


def set_acl(path: Path, uid: int) -> None:
    """An access ACL granting `uid` read: user::rw- user:uid:r-- group::r-- mask::r-- other::---."""
    undefined = 0xFFFFFFFF
    os.setxattr(path, "system.posix_acl_access", acl_xattr([(0x01, 6, undefined), (0x02, 4, uid), (0x04, 4, undefined),
                                                            (0x10, 4, undefined), (0x20, 0, undefined)]),
                follow_symlinks=False)


class Bases:
    """Base trees made ahead and left to age past the mark's slack, so that only what an
    example does to its tree is a change. A tree renamed into place keeps its entries'
    ctimes."""

    def __init__(self, root: Path, count: int):
        self.root, self.made = root, 0
        self.ready = [self._make() for _ in range(count)]
        time.sleep(changes.SLACK_S + 0.2)

    def take(self, dest: Path) -> None:
        if not self.ready:  # shrinking a failure needs more trees than were made ahead
            self.ready.append(self._make())
            time.sleep(changes.SLACK_S + 0.2)
        os.rename(self.ready.pop(), dest)

    def _make(self) -> Path:
        self.made += 1
        base = self.root / f"base{self.made}"
        make_base(base)
        return base


# What happens between the prepass and the pass in the window -------------------------------

class Ops:
    """Each operation picks its targets among the entries the source has when it runs, by
    the numbers it was drawn with; one that cannot apply to them (a directory moved into
    itself) does nothing."""

    def __init__(self, source: Path):
        self.source, self.made = source, 0

    def apply(self, op: tuple[str, int, int]) -> None:
        name, i, j = op
        try:
            getattr(self, name)(i, j)
        except OSError as e:
            note(f"{op}: {e}")

    # Targets --------------------------------------------------------------------------

    def _entries(self, want) -> list[Path]:
        return sorted(p for p in self.source.rglob("*") if want(p))

    def _file(self, i: int) -> Path:
        return pick(self._entries(lambda p: p.is_file() and not p.is_symlink()), i)

    def _other(self, i: int) -> Path:
        return pick(self._entries(lambda p: not p.is_dir() or p.is_symlink()), i)

    def _dir(self, i: int, root: bool = True) -> Path:
        return pick(([self.source] if root else []) + self._entries(lambda p: p.is_dir() and not p.is_symlink()), i)

    def _new(self, j: int, suffix: str = "") -> Path:
        self.made += 1
        return self._dir(j) / f"new{self.made}{suffix}"

    # The operations -------------------------------------------------------------------

    def create(self, i, j):
        self._new(j).write_bytes(os.urandom(100 + i))

    def rewrite_within_the_second(self, i, j):
        """Same size, mtime moved within its second: only --modify-window=-1 tells."""
        path = self._file(i)
        before = path.stat()
        path.write_bytes(os.urandom(before.st_size))
        second, ns = divmod(before.st_mtime_ns, 10**9)
        os.utime(path, ns=(before.st_atime_ns, second * 10**9 + (ns + 1 + j) % 10**9))

    def truncate(self, i, j):
        path = self._file(i)
        os.truncate(path, path.stat().st_size // 2)

    def chmod(self, i, j):
        path = self._file(i)
        os.chmod(path, path.stat().st_mode ^ 0o044)

    def chown(self, i, j):
        os.chown(self._other(i), 1000 + j, 2000 + j, follow_symlinks=False)

    def xattr(self, i, j):
        os.setxattr(self._file(i), "user.op", str(j).encode())

    def acl(self, i, j):
        set_acl(self._file(i) if j % 2 else self._dir(i), 2000 + j)

    def delete_file(self, i, j):
        self._other(i).unlink()

    def delete_tree(self, i, j):
        shutil.rmtree(self._dir(i, root=False))

    def rename_file(self, i, j):
        """Into another directory, under a new name or over an existing entry's."""
        target = self._new(j) if i % 2 else self._other(j)
        os.rename(self._other(i), target)

    def rename_dir(self, i, j):
        """Across directories: its entries keep their ctimes, under a new path."""
        os.rename(self._dir(i, root=False), self._new(j))

    def replace_dir(self, i, j):
        """rm -rf DEST; mv SRC DEST: DEST's name is back, with other contents."""
        moved, replaced = self._dir(i, root=False), self._dir(j, root=False)
        if moved != replaced and not replaced.is_relative_to(moved) and not moved.is_relative_to(replaced):
            shutil.rmtree(replaced)
            os.rename(moved, replaced)

    def swap_dirs(self, i, j):
        """Each directory's name now holds the other: both where the mark saw neither."""
        a, b = self._dir(i, root=False), self._dir(j, root=False)
        if not a.is_relative_to(b) and not b.is_relative_to(a):
            parked = a.with_name(f"parked{self.made}")
            os.rename(a, parked)
            os.rename(b, a)
            os.rename(parked, b)

    def exchange(self, i, j):
        """Two entries swap names in one step (renameat2 RENAME_EXCHANGE)."""
        a, b = self._other(i), self._entries(lambda p: True)[j % len(self._entries(lambda p: True))]
        if a != b and not b.is_relative_to(a):
            directory.exchange(a, b)

    def dir_over_file(self, i, j):
        path = self._other(i)
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("a directory where a file was")

    def file_over_dir(self, i, j):
        path = self._dir(i, root=False)
        shutil.rmtree(path)
        path.write_text("a file where a directory was")

    def chmod_dir(self, i, j):
        path = self._dir(i)
        os.chmod(path, path.stat().st_mode ^ 0o005)

    def mkdir(self, i, j):
        made = self._new(j)
        made.mkdir()
        if i % 2:
            (made / "inside").write_text("in a new directory")

    def hardlink(self, i, j):
        os.link(self._file(i), self._new(j))

    def symlink(self, i, j):
        self._new(j).symlink_to(f"../target{i}")

    def fifo(self, i, j):
        os.mkfifo(self._new(j))

    def sparse(self, i, j):
        with open(self._new(j), "wb") as f:
            f.truncate(1 << 20)
            f.seek(i << 12)
            f.write(b"x")

    def excluded(self, i, j):
        """An entry the excludes leave out: by name, or in an excluded directory."""
        where = [self._new(j, ".tmp"), self.source / "cache" / f"new{j}", self._dir(j) / "skip" / f"new{i}"]
        path = where[i % 3]
        path.parent.mkdir(exist_ok=True)
        path.write_text("excluded")


def pick(paths: list[Path], i: int) -> Path:
    if not paths:
        raise FileNotFoundError("nothing to pick")
    return paths[i % len(paths)]


OP_NAMES = [name for name, f in vars(Ops).items() if callable(f) and not name.startswith("_") and name != "apply"]
ops = st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 400), st.integers(0, 400)), min_size=1, max_size=10)


# Comparing ---------------------------------------------------------------------------------

def differences(source: Path, copy: Path, excluded_kept: bool = False) -> list[str]:
    """What rsync, comparing contents too, would change to make the copy the source: a
    snapshot, or with `excluded_kept` a volume rolled back, which keeps what the excludes
    leave out of its snapshots, and so the directories holding it (which rsync's dry run
    shows deleted)."""
    lines = subprocess.run(
        ["rsync", "-aHAXn", "--delete", *([] if excluded_kept else ["--delete-excluded"]), "--itemize-changes",
         "--numeric-ids", "--modify-window=-1", "--checksum", *(f"--exclude={e}" for e in EXCLUDE), f"{source}/",
         f"{copy}/"],
        capture_output=True, text=True, check=True).stdout.splitlines()
    if not excluded_kept:
        return lines
    holding = {str(parent) for path in copy.rglob("*") if left_out(str(path.relative_to(copy)), path.lstat().st_mode)
               for parent in path.relative_to(copy).parents}
    kept = [line for line in lines if line.startswith("*deleting ") and line.split(None, 1)[1].rstrip("/") in holding]
    return [line for line in lines if line not in kept and not line.startswith("cannot delete non-empty directory: ")]


def left_out(path: str, mode: int) -> bool:
    """Whether EXCLUDE leaves `path` (relative to the source) out of the snapshots: its
    rules for directories ("/cache/", "skip/") match no other entry."""
    parts = PurePosixPath(path).parts
    dirs = parts if stat.S_ISDIR(mode) else parts[:-1]
    return dirs[:1] == ("cache",) or "skip" in dirs or any(p.endswith(".tmp") for p in parts)


def link_groups(root: Path, among: set[str]) -> set[frozenset[str]]:
    """Names (of `among`) that share an inode, by group."""
    groups = defaultdict(set)
    for path in root.rglob("*"):
        rel = str(path.relative_to(root))
        if rel in among and not path.is_dir():
            groups[path.lstat().st_ino].add(rel)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def signature(root: Path) -> dict[str, tuple]:
    """Everything rsync keeps of each entry, but the link count (the next snapshot adds links)."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        data = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
        xattrs = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
        out[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns, data, xattrs)
    return out


@contextmanager
def backend_log() -> Iterator[list[str]]:
    logger = logging.getLogger("snapmgr.backends.rsync")
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
