"""The pass inside the quiesce window copies only what changed since the prepass began
(snapmgr.backends.changes). On real trees with real rsync, whatever happens between the
prepass and that pass, the snapshot equals the source (rsync finds nothing to change, the
hard links are the same), the previous snapshot is left as it was, and the short pass is
the one that ran, unless a hard link reached into a directory copied whole."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from snapmgr.backends import changes
from snapmgr.config import load
from snapmgr.engine import Engine
from snapmgr.model import SnapshotId
from tests.integration.changing_trees import (EXAMPLES, EXCLUDE, Bases, Ops, backend_log, differences, link_groups,
                                              names, ops, signature)
from tests.integration.helpers import loop_mount, make_tree, needs_root, toml, tree

PREVIOUS, NEXT = SnapshotId("data", "20200101T000000Z"), SnapshotId("data", "20200101T000001Z")
SHORT_PASS = "the pass in the window lists"
WHOLE_TREE = "the pass in the window compares the whole tree: "


# The properties ----------------------------------------------------------------------------

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


@needs_root
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_entries_swapped_in_one_step_reach_the_snapshot(ws, tmp_path, fstype):
    """renameat2(RENAME_EXCHANGE) leaves the ctimes of the entries it swaps as they were
    on xfs (seen on 6.18), which ext4 and btrfs set: there the entries of a changed
    directory are all compared."""
    with loop_mount(tmp_path, fstype) as mnt:
        ws.source = mnt / "source"
        aged_tree(ws)
        snapshot(ws)
        swaps = [("d0/f0000", "d0/f0005"), ("d1/f0001", "d2/f0002")]   # within one directory, and across two
        in_window(ws, "import ctypes; libc = ctypes.CDLL(None); " + "; ".join(
            f"assert libc.renameat2(-100, {a.encode()!r}, -100, {b.encode()!r}, 2) == 0" for a, b in swaps))
        second, log = snapshot(ws)
        assert SHORT_PASS in log and WHOLE_TREE not in log
        assert tree(second) == tree(ws.source)
        assert (second / "d0" / "f0000").read_bytes() == bytes([5]) * 100
