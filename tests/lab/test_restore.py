"""restore, diff and versions on real LVM (thick and thin) and ZFS volumes: the live root
is found where the kernel has the origin mounted, and a path comes back out of a
snapshot with its attributes, by absolute path as the user knows it."""

from __future__ import annotations

import os

from snapmgr import config
from snapmgr.engine import Engine
from tests.lab.conftest import lvm_volume, sh, zfs_volume


def live_root(ws):
    engine = Engine(config.load(ws.config))
    return engine.backend(engine.config.volumes["data"]).live_root()


def round_trip(ws, live, tmp_path):
    """A file changed after the snapshot comes back as it was, by its absolute path;
    diff and versions see the change."""
    (live / "docs").mkdir()
    (live / "docs" / "report.txt").write_bytes(b"as it was")
    os.chown(live / "docs" / "report.txt", 1234, 5678)
    os.chmod(live / "docs" / "report.txt", 0o640)
    os.sync()
    sid = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    (live / "docs" / "report.txt").write_bytes(b"ruined!!!")
    os.sync()

    ws.ok("restore", sid, str(live / "docs" / "report.txt"), "--to", str(tmp_path / "out"))
    restored = tmp_path / "out" / "docs" / "report.txt"
    st = os.stat(restored)
    assert restored.read_bytes() == b"as it was" and (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o640)
    assert "c....m /docs/report.txt" in ws.ok("diff", sid, "live").stdout.splitlines()
    versions = ws.ok("--json", "versions", str(live / "docs" / "report.txt")).json()["versions"]
    assert [v["snapshots"] for v in versions] == [[sid]] and versions[0]["current"] is False

    ws.ok("restore", sid, "docs/report.txt", "--in-place")
    assert (live / "docs" / "report.txt").read_bytes() == b"as it was"
    assert [s["tags"] for s in ws.ok("--json", "list").json()["snapshots"]] == [["manual"], ["pre-rollback"]]


def test_lvm_thick(host, ws, thick_lv, tmp_path):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="32M")})
    assert live_root(ws) == thick_lv.mountpoint
    round_trip(ws, thick_lv.mountpoint, tmp_path)


def test_lvm_thin(host, ws, thin_lv, tmp_path):
    ws.write_config({"data": lvm_volume(thin_lv)})
    assert live_root(ws) == thin_lv.mountpoint
    round_trip(ws, thin_lv.mountpoint, tmp_path)


def test_lvm_not_mounted_has_no_live_root(host, ws, thick_lv, tmp_path):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="32M")})
    thick_lv.write("kept", b"kept")
    sid = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    sh(host, "umount", thick_lv.mountpoint)
    assert live_root(ws) is None
    r = ws.run("restore", sid, "/anything", "--to", str(tmp_path / "out"))
    assert r.returncode == 2 and "volume data is not mounted now" in r.stderr
    ws.ok("restore", sid, "kept", "--to", str(tmp_path / "out"))   # a relative PATH still works
    assert (tmp_path / "out" / "kept").read_bytes() == b"kept"


def test_zfs(host, ws, dataset, tmp_path):
    ws.write_config({"data": zfs_volume(dataset)})
    mountpoint = sh(host, "zfs", "get", "-H", "-o", "value", "mountpoint", dataset).strip()
    assert str(live_root(ws)) == mountpoint
    round_trip(ws, live_root(ws), tmp_path)


def test_zfs_legacy_mount_is_found_and_unmounted_is_none(host, ws, dataset, tmp_path):
    ws.write_config({"data": zfs_volume(f"{dataset}/a")})
    sh(host, "zfs", "set", "mountpoint=legacy", f"{dataset}/a")
    assert live_root(ws) is None
    (tmp_path / "mnt").mkdir()
    sh(host, "mount", "-t", "zfs", f"{dataset}/a", tmp_path / "mnt")
    try:
        assert live_root(ws) == tmp_path / "mnt"
    finally:
        sh(host, "umount", tmp_path / "mnt")
