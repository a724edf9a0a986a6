"""`snapmgr mount` of LVM (thick and thin) and ZFS snapshots, inside the lab guest: LVM
snapshots are activated and mounted only when walked into, released when idle and at
unmount, and after a kill -9 by the next snapmgr; ZFS snapshots are browsed through
their .zfs directory."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.helpers import make_tree, wait_for
from tests.integration.test_mount import (as_nobody, label, mnt, mount, mounted_type,  # noqa: F401 (mnt: a fixture)
                                          serving, snapshot)
from tests.integration.test_verify import flip_a_byte
from tests.lab.conftest import VG, lv_report, lvm_volume, zfs_volume

IDLE = "2s"


def lazy_mounts(ws) -> list[str]:
    """What snapmgr has mounted under its run_dir (LVM browse roots)."""
    under = str(ws.root / "run" / "mounts") + "/"
    return [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split(" ")[4].startswith(under)]


def active(host, lv_name: str) -> bool:
    [row] = [r for r in lv_report(host, VG) if r["lv_name"] == lv_name]
    return row["lv_attr"][4] == "a"


@pytest.mark.parametrize("kind", ["thick", "thin"])
def test_lvm_snapshots_are_mounted_lazily_and_released(host, ws, mnt, kind, request):
    lv = request.getfixturevalue(f"{kind}_lv")
    ws.write_config({"data": lvm_volume(lv, **({"snapshot_size": "32M"} if kind == "thick" else {}))})
    lv.write("kept", b"as it was")
    first = snapshot(ws, "data")
    lv.write("kept", b"changed since")
    second = snapshot(ws, "data")
    snapshot_lv = f"{lv.name}-{label(first)}"
    with mount(ws, mnt, "--idle", IDLE, "--allow-other") as proc:
        volume = mnt / "data"
        # Anyone's `ls` and root's `ls -l` show every snapshot and mount none of them.
        assert sorted(as_nobody("ls", "-A", volume).stdout.split()) == \
            sorted([".by-tag", "latest", label(first), label(second)])
        assert subprocess.run(["ls", "-l", volume], capture_output=True).returncode == 0
        listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(volume)}
        assert stat.S_IMODE(listed[label(first)].st_mode) == 0o700  # the placeholder: root's alone
        assert lazy_mounts(ws) == []
        if kind == "thin":
            assert not active(host, snapshot_lv)

        # Walking in mounts it, read-only, with the data of its time.
        assert (volume / label(first) / "kept").read_bytes() == b"as it was"
        assert (volume / "latest" / "kept").read_bytes() == b"changed since"
        assert len(lazy_mounts(ws)) == 2
        root_mode = stat.S_IMODE(os.stat(volume / label(first)).st_mode)
        assert root_mode == stat.S_IMODE(os.stat(lv.mountpoint).st_mode)
        ino = os.stat(volume / label(first) / "kept").st_ino

        # Idle: released (thin snapshots deactivated again); entered again on the next access,
        # with the same inode numbers and its real attributes kept meanwhile.
        wait_for(lambda: lazy_mounts(ws) == [], timeout=30, what="the idle release")
        if kind == "thin":
            assert not active(host, snapshot_lv)
        assert stat.S_IMODE(os.stat(volume / label(first)).st_mode) == root_mode
        assert lazy_mounts(ws) == []
        Path("/proc/sys/vm/drop_caches").write_text("2")
        assert os.stat(volume / label(first) / "kept").st_ino == ino
        assert (volume / label(first) / "kept").read_bytes() == b"as it was"
        assert len(lazy_mounts(ws)) == 1

        # A file held open keeps its snapshot mounted while the other one goes idle.
        with open(volume / label(first) / "kept", "rb") as held:
            assert (volume / "latest" / "kept").read_bytes() == b"changed since"
            assert len(lazy_mounts(ws)) == 2
            wait_for(lambda: len(lazy_mounts(ws)) == 1, timeout=30, what="the idle release of the other")
            assert lazy_mounts(ws) == [str(ws.root / "run" / "mounts" / first)]
            assert held.read() == b"as it was"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    # Unmounting releases whatever was still entered.
    assert lazy_mounts(ws) == []
    if kind == "thin":
        assert not active(host, snapshot_lv)


def killed_inside(ws, mnt: Path, path: Path) -> None:
    """A `snapmgr mount` killed with SIGKILL once `path` (inside a snapshot) was read
    through it: it releases nothing."""
    killed = ws.start("mount", str(mnt))
    try:
        wait_for(lambda: serving(mnt) or killed.poll() is not None, what="the mount")
        (mnt / path).read_bytes()
    finally:
        killed.kill()
        killed.communicate()


def test_an_lvm_snapshot_left_by_a_killed_mount_is_used_once_and_released(host, ws, mnt, thin_lv):
    ws.write_config({"data": lvm_volume(thin_lv)})
    thin_lv.write("kept", b"as it was")
    sid = snapshot(ws, "data")
    snapshot_lv, kept = f"{thin_lv.name}-{label(sid)}", Path("data", label(sid), "kept")
    left = [str(ws.root / "run" / "mounts" / sid)]

    # Another command browsing the snapshot uses what the killed mount left, not a mount
    # of its own on top, and releases it as its last user.
    killed_inside(ws, mnt, kept)
    assert lazy_mounts(ws) == left and active(host, snapshot_lv)
    ws.ok("verify", sid)
    assert lazy_mounts(ws) == [] and not active(host, snapshot_lv)

    # The next mount releases it before serving, and mounts it once when walked into;
    # a verify meanwhile shares that mount and leaves it to the mount.
    killed_inside(ws, mnt, kept)
    with mount(ws, mnt) as proc:
        assert lazy_mounts(ws) == [] and not active(host, snapshot_lv)
        assert (mnt / kept).read_bytes() == b"as it was"
        assert lazy_mounts(ws) == left
        ws.ok("verify", sid)
        assert lazy_mounts(ws) == left and (mnt / kept).read_bytes() == b"as it was"
        ws.ok("umount", str(mnt))
        assert proc.wait(60) == 0
    assert f"{sid}: released the browse mount a killed snapmgr left" in proc.log
    assert lazy_mounts(ws) == [] and not active(host, snapshot_lv)

    # `snapmgr umount` of the stale mount releases it too.
    killed_inside(ws, mnt, kept)
    ws.ok("umount", str(mnt))
    assert mounted_type(mnt) is None and lazy_mounts(ws) == [] and not active(host, snapshot_lv)


def test_a_zfs_snapshot_left_mounted_by_a_killed_mount_is_not_mounted_again(host, ws, mnt, dataset):
    # ZFS mounts a snapshot under .zfs itself on access and unmounts it when idle; snapmgr
    # mounts nothing there, so a killed mount leaves nothing to stack a second mount on.
    ws.write_config({"data": zfs_volume(dataset)})
    (Path("/" + dataset) / "file").write_bytes(b"first")
    sid = snapshot(ws, "data")
    killed_inside(ws, mnt, Path("data", label(sid), "file"))
    with mount(ws, mnt):
        assert (mnt / "data" / label(sid) / "file").read_bytes() == b"first"
        at = f"/{dataset}/.zfs/snapshot/snapmgr-{label(sid)}"
        assert [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split(" ")[4] == at] == [at]


def test_zfs_snapshots_are_browsed(host, ws, mnt, dataset):
    ws.write_config({"data": zfs_volume(dataset)})
    root = Path("/" + dataset)
    (root / "file").write_bytes(b"first")
    first = snapshot(ws, "data")
    (root / "file").write_bytes(b"second")
    second = snapshot(ws, "--tag", "daily", "data")
    with mount(ws, mnt):
        volume = mnt / "data"
        assert sorted(os.listdir(volume)) == sorted([".by-tag", "latest", label(first), label(second)])
        assert (volume / label(first) / "file").read_bytes() == b"first"
        assert (volume / "latest" / "file").read_bytes() == b"second"
        assert (volume / ".by-tag" / "daily" / label(second) / "file").read_bytes() == b"second"
        with pytest.raises(OSError):
            (volume / label(first) / "file").write_bytes(b"x")


def test_a_daemons_log_goes_to_the_journal(host, ws, mnt):
    """Detached, the mount has no stderr: what it logs (here, the rotten file --verify
    refused) must reach syslog, which journald serves in the guest."""
    make_tree(ws.source, files=3, size=5000)
    sid = snapshot(ws)
    flip_a_byte(ws.repo / sid / "d1" / "f0001")
    since = int(time.time())
    assert ws.run("mount", "--daemon", "--verify", str(mnt)).returncode == 0
    try:
        with open(mnt / "data" / label(sid) / "d1" / "f0001", "rb") as f, pytest.raises(OSError):
            f.read()
        logged = lambda: host.run(f"journalctl -q -o cat -t snapmgr --since @{since}").stdout  # noqa: E731
        wait_for(lambda: "/d1/f0001" in logged() and "reads fail with EIO" in logged(), what="the line in the journal")
    finally:
        ws.ok("umount", str(mnt))
