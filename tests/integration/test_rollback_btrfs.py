"""snapmgr rollback of btrfs volumes on a real btrfs filesystem (a loop device): the swap
of a writable snapshot of the target for the live subvolume, nested subvolumes carried
over, a subvolume mounted with subvol= (takes effect at its next mount) and what is
refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import btrfsutil
import pytest

from snapmgr.backends import mounts
from snapmgr.backends.btrfs import BtrfsBackend
from tests.integration.helpers import Workspace, loop_mount, needs_root, tree

pytestmark = needs_root


@pytest.fixture
def fs(tmp_path):
    with loop_mount(tmp_path, "btrfs") as mnt:
        btrfsutil.create_subvolume(mnt / "data")
        yield mnt


def btrfs_volume(ws: Workspace, subvolume: Path, snapshot_dir: Path) -> None:
    ws.write_config({"data": {"backend": "btrfs", "subvolume": subvolume, "snapshot_dir": snapshot_dir}})


def snapshot_then_change(ws: Workspace, live: Path) -> str:
    for name, text in {"a": "one", "b": "keep", "d/e": "deep"}.items():
        (live / name).parent.mkdir(exist_ok=True)
        (live / name).write_text(text)
    ws.ok("snapshot")
    [target] = ws.snapshots()
    (live / "a").write_text("two")
    (live / "b").unlink()
    (live / "c").write_text("new")
    return target


def subvolumes(mnt: Path) -> set[str]:
    return {os.fsdecode(path) for path, _ in btrfsutil.SubvolumeIterator(mnt, top=5)}


def test_a_rollback_swaps_in_the_snapshot_keeps_newer_ones_and_is_undone_by_another(ws, fs):
    live = fs / "data"
    btrfs_volume(ws, live, fs / ".snapshots")
    target = snapshot_then_change(ws, live)
    ws.ok("snapshot")
    newer = ws.snapshots()[1]
    before, newer_tree = tree(live), tree(fs / ".snapshots" / newer)
    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert tree(live) == tree(fs / ".snapshots" / target)
    assert {p: c for p, (_, _, c) in tree(live).items()} == {"a": b"one", "b": b"keep", "d": None, "d/e": b"deep"}
    assert done["takes_effect"] == "now" and "RENAME_EXCHANGE" in done["method"]
    safety = done["pre_rollback"]
    assert ws.snapshots() == sorted([target, newer, safety])
    assert tree(fs / ".snapshots" / newer) == newer_tree   # newer snapshots kept, still browsable
    assert tree(fs / ".snapshots" / safety) == before
    assert not btrfsutil.get_subvolume_read_only(live)
    # Nothing is left beside it: the replaced subvolume is deleted, P holds it.
    assert subvolumes(fs) == {"data", *(f".snapshots/{s}" for s in (target, newer, safety))}
    again = ws.ok("--json", "rollback", safety, "--yes").json()
    assert tree(live) == before and again["matches"] and again["check"].startswith(
        f"the volume matches {safety}: every entry by its metadata, and by content each file written since it was "
        f"taken (")
    assert len(ws.snapshots()) == 4


def test_a_dry_run_changes_nothing(ws, fs):
    live = fs / "data"
    btrfs_volume(ws, live, fs / ".snapshots")
    target = snapshot_then_change(ws, live)
    before, subvolume_id = tree(live), btrfsutil.subvolume_id(live)
    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert plan["pre_rollback"] is None and plan["takes_effect"] == "now"
    assert (plan["losses"]["added"], plan["losses"]["removed"]) == (1, 1)   # changed: 'a' and the top directory
    assert {"+ 'c'", "- 'b'", "~ 'a'"} <= set(plan["losses"]["shown"])
    assert tree(live) == before and btrfsutil.subvolume_id(live) == subvolume_id
    assert ws.snapshots() == [target] and subvolumes(fs) == {"data", f".snapshots/{target}"}


def test_nested_subvolumes_and_the_snapshots_inside_are_carried_over(ws, fs):
    live = fs / "data"
    btrfsutil.create_subvolume(live / ".snapshots")
    btrfs_volume(ws, live, live / ".snapshots")
    btrfsutil.create_subvolume(live / "old")
    (live / "old" / "x").write_text("in a nested subvolume")
    target = snapshot_then_change(ws, live)
    # One made since, deeper, in directories the snapshot does not have.
    (live / "new" / "dir").mkdir(parents=True, mode=0o750)
    btrfsutil.create_subvolume(live / "new" / "dir" / "sub")
    (live / "new" / "dir" / "sub" / "y").write_text("made after the snapshot")
    (live / "old" / "x").write_text("changed after the snapshot")
    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert "the nested subvolumes '.snapshots', 'new/dir/sub', 'old' moved into it first" in plan["method"]
    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert (live / "a").read_text() == "one" and not (live / "c").exists()
    # The check leaves them out, and the directories made to hold one ('new', 'new/dir').
    assert done["matches"] and done["check"].endswith(
        "other filesystems in it and snapmgr's own directories, which no rollback changes, left out: '.snapshots', "
        "'new/dir/sub', 'old'")
    # Not part of the volume's snapshots: kept as they are, where they were.
    assert (live / "old" / "x").read_text() == "changed after the snapshot"
    assert (live / "new" / "dir" / "sub" / "y").read_text() == "made after the snapshot"
    assert (live / "new" / "dir").stat().st_mode & 0o777 == 0o750
    # The directories they were moved into are as the snapshot holds them.
    assert live.stat().st_mtime_ns == (live / ".snapshots" / target).stat().st_mtime_ns
    assert ws.snapshots() == sorted([target, done["pre_rollback"]])
    assert subvolumes(fs) == {"data", "data/.snapshots", "data/old", "data/new/dir/sub",
                              *(f"data/.snapshots/{s}" for s in ws.snapshots())}


def test_what_a_swap_would_lose_is_refused(ws, fs):
    live = fs / "data"
    btrfs_volume(ws, live, live / ".snapshots")   # a plain directory inside the subvolume
    target = snapshot_then_change(ws, live)
    refused = ws.run("rollback", target, "--yes")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert (f"{str(live / '.snapshots')!r}, where the snapshots are, is inside {str(live)!r} but not in a subvolume "
            f"of its own") in refused.stderr and "nothing was changed" in refused.stderr
    # A nested subvolume where the snapshot has a file.
    btrfs_volume(ws, live, fs / ".snapshots")
    ws.ok("snapshot")
    target = max(ws.snapshots())
    btrfsutil.create_subvolume(live / "a.d")
    (live / "a").unlink()
    os.rename(live / "a.d", live / "a")
    refused = ws.run("rollback", target, "--dry-run")
    assert refused.returncode == 1
    assert (f"{str(fs / '.snapshots' / target / 'a')!r} is not the empty directory a snapshot holds in place of "
            f"the nested subvolume {str(live / 'a')!r}") in refused.stderr
    btrfsutil.delete_subvolume(live / "a")
    # Another filesystem mounted inside would stay on the replaced subvolume.
    (live / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", live / "m"], check=True)
    try:
        refused = ws.run("rollback", target, "--dry-run")
    finally:
        subprocess.run(["umount", live / "m"], check=True)
    assert refused.returncode == 1
    assert f"{str(live / 'm')!r} is mounted inside {str(live)!r}" in refused.stderr


@pytest.fixture
def mounted(fs, tmp_path):
    """The subvolume `data` also mounted on its own with subvol=, as fstab would."""
    where = tmp_path / "live"
    where.mkdir()
    device = subprocess.run(["findmnt", "-no", "SOURCE", fs], capture_output=True, text=True, check=True).stdout
    remount = ["mount", "-t", "btrfs", "-o", "subvol=/data", device.strip(), where]
    subprocess.run(remount, check=True)
    try:
        yield where, remount
    finally:
        subprocess.run(["umount", where], check=False)


def test_a_subvolume_mounted_by_name_is_rolled_back_at_its_next_mount(ws, fs, mounted):
    where, remount = mounted
    btrfs_volume(ws, where, fs / ".snapshots")
    target = snapshot_then_change(ws, where)
    before = tree(where)
    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert plan["takes_effect"].startswith(f"at the next mount of {str(where)!r} (mounted with subvol=/data")
    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert tree(where) == before   # the mount shows the replaced subvolume until mounted again
    backend = BtrfsBackend("data", {"subvolume": where, "snapshot_dir": fs / ".snapshots"}, ws.root / "run")
    assert backend.rollback_pending(target).startswith(f"at the next mount of {str(where)!r}")
    assert tree(fs / "data") == tree(fs / ".snapshots" / target)
    assert not mounts.below(ws.root / "run")   # the top level is unmounted again
    subprocess.run(["umount", where], check=True)
    subprocess.run(remount, check=True)
    assert tree(where) == tree(fs / ".snapshots" / target) and backend.rollback_pending(target) is None
    # The replaced subvolume waited for that: a resume, once nothing is pending, deletes it.
    assert ".data.rollback" in subvolumes(fs)
    target_snapshot = next(s for s in backend.list() if str(s.id) == target)
    assert backend.roll_back(target_snapshot, backend.rollback_way(target_snapshot, [], None), (), True) is None
    assert ".data.rollback" not in subvolumes(fs) and tree(where) == tree(fs / ".snapshots" / target)
    ws.ok("rollback", done["pre_rollback"], "--yes")
    assert ".data.rollback" in subvolumes(fs) and tree(fs / "data") == before
    assert backend.rollback_pending(target) is not None


def test_a_subvolume_mounted_by_id_or_as_the_default_is_refused(ws, fs, mounted, tmp_path):
    where, _ = mounted
    btrfs_volume(ws, where, fs / ".snapshots")
    target = snapshot_then_change(ws, where)
    for options, why in [("subvolid=256", "is mounted by subvolid= (/etc/fstab), which would keep mounting the "
                                          "replaced subvolume after a rollback: use subvol=/data instead"),
                         ("defaults", "is mounted as its filesystem's default subvolume (no subvol= in its "
                                      "/etc/fstab line), which a rollback does not change: mount it with "
                                      "subvol=/data (in /etc/fstab) first")]:
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# test\nUUID=x {where} btrfs {options} 0 0\n")
        refused = with_fstab(ws, fstab, "rollback", target, "--yes")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"{str(where)!r} {why}" in refused.stderr and "nothing was changed" in refused.stderr
    # Mounted by hand (no fstab line), as the default subvolume: the next mount may find it by id.
    subprocess.run(["btrfs", "subvolume", "set-default", where], check=True)
    refused = ws.run("rollback", target, "--yes")
    assert refused.returncode == 1
    assert (f"{str(where)!r} is mounted as its filesystem's default subvolume (it is the default one, and "
            f"/etc/fstab has no line for it)") in refused.stderr
    assert ws.snapshots() == [target] and (where / "c").exists()


def with_fstab(ws: Workspace, fstab: Path, *args: str) -> subprocess.CompletedProcess:
    """snapmgr run in a mount namespace of its own, where /etc/fstab is `fstab`."""
    bind = ("import os, subprocess, sys; subprocess.run(['mount', '--bind', sys.argv[1], '/etc/fstab'], check=True); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", bind, str(fstab),
                           *ws.command(*args)[1:]], capture_output=True, text=True, env=ws.env, timeout=120)
