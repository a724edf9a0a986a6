"""The pass inside the quiesce window copies only what changed since the prepass began
(snapmgr.backends.changes). On real trees with real rsync, whatever happens between the
prepass and that pass, the snapshot equals the source (rsync finds nothing to change, the
hard links are the same), the previous snapshot is left as it was, and the short pass is
the one that ran, unless a hard link reached into a directory copied whole."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from snapmgr.backends import changes
from snapmgr.config import load
from snapmgr.engine import Engine
from snapmgr.model import SnapshotId
from tests.integration.helpers import make_tree, needs_root, toml, tree

EXCLUDE = ["*.tmp", "/cache/", "skip/"]
EXAMPLES = 30
PREVIOUS, NEXT = SnapshotId("data", "20200101T000000Z"), SnapshotId("data", "20200101T000001Z")
SHORT_PASS = "the pass in the window lists"
WHOLE_TREE = "the pass in the window compares the whole tree: "


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
    """An access ACL granting `uid` read, written as the kernel's xattr (no setfacl needed)."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, 4, uid), (0x04, 4, undefined), (0x10, 4, undefined),
               (0x20, 0, undefined)]  # user::rw- user:uid:r-- group::r-- mask::r-- other::---
    os.setxattr(path, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries), follow_symlinks=False)


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


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("bases"), EXAMPLES + 5)


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

def differences(source: Path, snapshot: Path) -> list[str]:
    """What rsync, comparing contents too, would change to make the snapshot the source."""
    return subprocess.run(
        ["rsync", "-aHAXn", "--delete", "--delete-excluded", "--itemize-changes", "--numeric-ids",
         "--modify-window=-1", "--checksum", *(f"--exclude={e}" for e in EXCLUDE), f"{source}/", f"{snapshot}/"],
        capture_output=True, text=True, check=True).stdout.splitlines()


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


# The properties ----------------------------------------------------------------------------

@pytest.fixture
def examples() -> Iterator[int]:
    return itertools.count()


def workspace(root: Path, bases: Bases, one_file_system: bool):
    """A source from the base trees, and its rsync volume, excludes and all, as the engine makes it."""
    root.mkdir()
    bases.take(root / "source")
    config = root / "snapmgr.toml"
    config.write_text(toml({"settings": {"state_dir": root / "state", "run_dir": root / "run"},
                            "volumes.data": {"backend": "rsync", "source": root / "source", "repository": root / "repo",
                                             "exclude": EXCLUDE, "one_file_system": one_file_system}}))
    loaded = load(config)
    return Engine(loaded).backend(loaded.volumes["data"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=ops, one_file_system=st.booleans())
def test_the_snapshot_equals_the_source_whatever_changed_in_between(bases, tmp_path, examples, operations,
                                                                     one_file_system):
    root = tmp_path / f"example{next(examples)}"
    source = root / "source"
    backend = workspace(root, bases, one_file_system)
    previous = backend.create(PREVIOUS, frozenset()).path
    before = signature(previous)

    with backend_log() as log:
        take = backend.stage(NEXT, frozenset(), None, prepass=True)
        changed = Ops(source)
        for op in operations:
            changed.apply(op)
        snapshot = take().path
    note("\n".join(log))

    assert differences(source, snapshot) == []
    among = names(snapshot)
    assert link_groups(source, among) == link_groups(snapshot, among)
    assert signature(previous) == before
    whole_tree = [line.removeprefix(f"{NEXT}: {WHOLE_TREE}") for line in log if WHOLE_TREE in line]
    event(f"whole tree: {whole_tree[0]}" if whole_tree else "short pass")
    # The one fallback these operations can call for: a hard link made into a new directory.
    assert any(SHORT_PASS in line for line in log) or whole_tree == [
        "a directory to copy whole holds hard links, which rsync links only within one run"], log


# Through the CLI, inside a real window -----------------------------------------------------

def aged_tree(ws, files: int = 200) -> None:
    """A source whose entries are all older than the next mark's slack."""
    make_tree(ws.source, files=files)
    time.sleep(changes.SLACK_S + 0.2)


def in_window(ws, script: str, **volume) -> None:
    """From now on, each snapshot of `data` runs `script` (Python, in the source) inside its window."""
    pre = [sys.executable, "-c", f"import os, shutil; os.chdir({str(ws.source)!r}); {script}"]
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["change"],
                              **volume}},
                    quiesce={"change": {"kind": "command", "pre": pre}})


def snapshot(ws) -> tuple[Path, str]:
    """The new snapshot's path, and the run's debug log."""
    r = ws.ok("-vv", "--json", "snapshot")
    return Path(r.json()["results"][0]["created"]["path"]), r.stderr


def test_a_pre_command_s_changes_reach_the_snapshot_by_the_short_pass(ws):
    aged_tree(ws)
    first, _ = snapshot(ws)
    in_window(ws, "os.chmod('d0/f0000', 0o600); shutil.rmtree('d1'); os.rename('d2', 'd1'); "
                  "open('d3/new', 'w').write('new')")
    second, log = snapshot(ws)
    assert SHORT_PASS in log and WHOLE_TREE not in log
    assert tree(second) == tree(ws.source)
    assert (first / "d0" / "f0000").stat().st_mode & 0o777 == 0o644  # changed in its copy only
    assert (first / "d1" / "f0001").exists() and not (second / "d1" / "f0001").exists()


def test_a_repository_inside_the_source_is_left_out_of_the_listing(ws):
    aged_tree(ws)
    ws.repo = ws.source / "var" / "snapshots"
    in_window(ws, "open('d0/f0000', 'w').write('changed')", exclude=["/var/snapshots/"])
    snapshot(ws)
    second, log = snapshot(ws)  # the first copy, written inside the source, is no change
    assert SHORT_PASS in log and WHOLE_TREE not in log
    assert (second / "d0" / "f0000").read_text() == "changed"
    assert (second / "var").is_dir() and not (second / "var" / "snapshots").exists()


def test_a_source_that_changed_throughout_is_compared_whole(ws):
    make_tree(ws.source, files=20)
    snapshot(ws)
    in_window(ws, "open('d0/f0000', 'w').write('changed')")
    second, log = snapshot(ws)  # every entry was made within the mark's slack
    assert WHOLE_TREE in log and "entries changed" in log
    assert tree(second) == tree(ws.source)


@needs_root
def test_mount_points_inside_the_source(ws):
    aged_tree(ws, files=50)
    mnt = ws.source / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
    try:
        (mnt / "before").write_text("on tmpfs")
        # one_file_system: the mount point's own attributes, never what is below it.
        in_window(ws, "os.chmod('mnt', 0o700); open('mnt/inside', 'w').write('x'); open('d0/new', 'w').write('x')",
                  one_file_system=True)
        snapshot(ws)
        second, log = snapshot(ws)
        assert SHORT_PASS in log and WHOLE_TREE not in log
        assert (second / "mnt").stat().st_mode & 0o777 == 0o700 and list((second / "mnt").iterdir()) == []
        assert (second / "d0" / "new").exists()
        # Without it, what changes below the mount point is copied too.
        in_window(ws, "open('mnt/inside2', 'w').write('x')")
        second, log = snapshot(ws)
        assert SHORT_PASS in log and (second / "mnt" / "inside2").exists()
        # A mount that comes in the window shows old entries, which no ctime tells of.
        in_window(ws, "import subprocess; subprocess.run(['mount', '--bind', 'd3', 'd4'], check=True)")
        second, log = snapshot(ws)
        assert f"{WHOLE_TREE}mounts in the source changed since the mark" in log
        assert tree(second / "d4") == tree(ws.source / "d3")
    finally:
        subprocess.run(["umount", "-R", mnt], check=True)
        subprocess.run(["umount", ws.source / "d4"], capture_output=True)
