"""The LVM backend on real thick and thin logical volumes, through the CLI."""

from __future__ import annotations

import sys

import pytest

from snapmgr import config
from snapmgr.engine import Engine
from snapmgr.errors import SnapmgrError
from tests.lab.conftest import VG, lv_report, lvm_volume, sh


def snapshot_rows(host, origin: str) -> list[dict]:
    return [r for r in lv_report(host, VG) if r["origin"] == origin]


def backend_of(ws, volume: str = "data"):
    engine = Engine(config.load(ws.config))
    return engine.backend(engine.config.volumes[volume])


def test_thick_snapshot_is_an_lv_with_snapmgr_tags(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="32M")})
    created = ws.ok("--json", "snapshot", "--tag", "daily", "data").json()["results"][0]["created"]

    [row] = snapshot_rows(host, thick_lv.name)
    assert row["lv_attr"][0] == "s"           # a classic (thick) snapshot
    label = created["id"].split("@")[1]
    assert set(row["lv_tags"].split(",")) == {"snapmgr", "snapmgr.volume.data", f"snapmgr.id.{label}",
                                              "snapmgr.tag.daily"}
    assert host.check_output(f"lvs --noheadings -o lv_size --units m --nosuffix {VG}/{row['lv_name']}").strip() \
        == "32.00"
    [listed] = ws.ok("--json", "list").json()["snapshots"]
    assert listed["id"] == created["id"] and listed["tags"] == ["daily"] and listed["invalid"] is None
    assert listed["path"] == f"/dev/{VG}/{row['lv_name']}"


def test_size_as_a_share_of_the_origin(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="25%ORIGIN")})
    ws.ok("snapshot", "data")
    [row] = snapshot_rows(host, thick_lv.name)
    size = float(host.check_output(f"lvs --noheadings -o lv_size --units m --nosuffix {VG}/{row['lv_name']}"))
    assert 32 <= size < 40    # LVM rounds a share of the origin up, to whole extents and more


def test_delete_and_prune_remove_lvs(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="8M")}, {"default": {"keep_last": 1}})
    for _ in range(3):
        ws.ok("snapshot", "--tag", "hourly", "data")
    ids = ws.snapshots()
    assert len(snapshot_rows(host, thick_lv.name)) == 3

    ws.ok("delete", ids[0])
    assert len(snapshot_rows(host, thick_lv.name)) == 2
    out = ws.ok("prune", "data").stdout
    assert "deleted" in out and ws.snapshots() == [ids[2]]
    [row] = snapshot_rows(host, thick_lv.name)
    assert f"snapmgr.id.{ids[2].split('@')[1]}" in row["lv_tags"]


def test_overflowed_snapshot_is_invalid_everywhere(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="4M")}, {"default": {"keep_last": 5}})
    ws.ok("snapshot", "--tag", "hourly", "data")
    # 16 MiB of new data cannot fit in 4 MiB of snapshot space: LVM drops the snapshot.
    thick_lv.write("big", b"\xab" * (16 << 20))
    [row] = snapshot_rows(host, thick_lv.name)
    assert row["lv_attr"][4] == "I"

    [listed] = ws.ok("--json", "list").json()["snapshots"]
    assert listed["invalid"].startswith("overflowed")
    assert "INVALID: overflowed" in ws.ok("list").stdout
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert status["state"] == "failing" and status["invalid"] == [listed["id"]]
    assert "is invalid (overflowed" in status["last_error"]

    backend = backend_of(ws)
    [snapshot] = backend.list()
    with pytest.raises(SnapmgrError, match="is invalid"), backend.browse_root(snapshot):
        pass

    decisions = ws.ok("--json", "prune", "data").json()["results"][0]["decisions"]
    assert decisions == [{"id": listed["id"], "keep": False, "reason": f"invalid ({listed['invalid']})"}]
    assert snapshot_rows(host, thick_lv.name) == []


def test_snapshot_overflowed_before_its_manifest_is_unverified_and_leaves_nothing_behind(host, ws, thick_lv):
    # The service's resume writes more than the snapshot's 4 MiB can hold before snapmgr
    # browses the snapshot for its manifest: by then LVM has dropped it.
    fill = (f"import os; f = open({str(thick_lv.mountpoint / 'big')!r}, 'wb'); f.write(bytes(16 << 20)); "
            f"os.fsync(f.fileno())")
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="4M") | {"quiesce": ["app"]}},
                    {"default": {"keep_last": 5}},
                    quiesce={"app": {"kind": "command", "pre": ["true"], "post": [sys.executable, "-c", fill]}})
    created = ws.ok("--json", "snapshot", "--tag", "hourly", "data").json()["results"][0]["created"]
    reason = created["consistency"]["manifest"]["unverified"]
    assert reason == f"its manifest could not be written: {created['id']} is invalid (overflowed: writes to " \
                     f"{thick_lv.path} filled its 4.0MiB of snapshot space); it has no data to show", reason
    # Neither activated nor deactivated on its own: that would have taken the origin with it.
    assert sorted(p.name for p in (ws.root / "run" / "mounts").iterdir()) == [f"{created['id']}.lock"]
    assert host.mount_point(str(thick_lv.mountpoint)).exists

    decisions = ws.ok("--json", "prune", "data").json()["results"][0]["decisions"]
    assert [d["keep"] for d in decisions] == [False], decisions
    assert snapshot_rows(host, thick_lv.name) == []


def test_a_thick_snapshot_of_an_inactive_origin_is_refused_saying_how_to_activate_it(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="8M")})
    ws.ok("snapshot", "data")
    sh(host, "umount", thick_lv.mountpoint)
    sh(host, "lvchange", "--activate", "n", thick_lv.path)
    try:
        [snapshot] = backend_of(ws).list()
        with pytest.raises(SnapmgrError, match=f"is not active, as its origin {thick_lv.path} is not: lvchange "
                                               f"--activate y {thick_lv.path} activates both"):
            with backend_of(ws).browse_root(snapshot):
                pass
        assert snapshot_rows(host, thick_lv.name)[0]["lv_attr"][4] == "-"
    finally:
        sh(host, "lvchange", "--activate", "y", thick_lv.path)


def test_a_marker_an_older_run_left_on_a_thick_snapshot_is_dropped_without_deactivating_it(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="8M")})
    ws.ok("snapshot", "data")
    [sid] = ws.snapshots()
    # What a run of an older snapmgr killed while it browsed the snapshot left behind.
    mounts = ws.root / "run" / "mounts"
    (mounts / sid).mkdir(parents=True)
    for suffix in (".activated", ".users"):
        (mounts / f"{sid}{suffix}").touch()
    ws.ok("delete", sid)
    assert snapshot_rows(host, thick_lv.name) == [] and host.mount_point(str(thick_lv.mountpoint)).exists
    assert not (mounts / f"{sid}.activated").exists() and not (mounts / sid).exists()


def test_thick_snapshot_refused_when_the_vg_lacks_space(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="100G")})
    r = ws.run("snapshot", "data")
    assert r.returncode == 1
    assert f"the snapshot needs 100.0GiB (snapshot_size 100G) but volume group {VG} has" in r.stderr
    assert snapshot_rows(host, thick_lv.name) == []


def test_thick_lv_without_snapshot_size_is_a_clear_error(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv)})
    r = ws.run("snapshot", "data")
    assert r.returncode == 1 and "set snapshot_size" in r.stderr and len(r.stderr.splitlines()) == 1


def test_thin_snapshot_lives_in_the_pool_with_activation_skip(host, ws, thin_lv, thin_pool):
    ws.write_config({"data": lvm_volume(thin_lv)})
    ws.ok("snapshot", "data")
    [row] = snapshot_rows(host, thin_lv.name)
    assert row["segtype"] == "thin" and row["lv_attr"][0] == "V"
    assert row["lv_attr"][9] == "k"                # activation skip: not active by default
    assert "snapmgr.volume.data" in row["lv_tags"].split(",")
    ws.ok("snapshot", "data")
    ids = ws.snapshots()
    assert len(ids) == 2
    ws.ok("delete", ids[0])
    [left] = snapshot_rows(host, thin_lv.name)
    assert f"snapmgr.id.{ids[1].split('@')[1]}" in left["lv_tags"].split(",")
    assert ws.snapshots() == [ids[1]]


def test_thin_snapshot_refused_above_the_pool_threshold(host, ws, thin_lv, thin_pool):
    ws.write_config({"data": lvm_volume(thin_lv)})
    # Fill the pool past 80% in steps, stopping well before it is full (a full pool
    # would stall the test's own writes).
    for step in range(20):
        [pool] = lv_report(host, f"{VG}/{thin_pool}")
        if float(pool["data_percent"]) > 85:
            break
        thin_lv.write(f"fill{step}", b"\xcd" * (4 << 20))
    r = ws.run("snapshot", "data")
    assert r.returncode == 1
    assert f"thin pool {VG}/{thin_pool} is" in r.stderr and "above thin_pool_threshold 80%" in r.stderr
    assert snapshot_rows(host, thin_lv.name) == []

    ws.write_config({"data": lvm_volume(thin_lv, thin_pool_threshold=99)})
    ws.ok("snapshot", "data")
    assert len(snapshot_rows(host, thin_lv.name)) == 1


def test_browse_root_mounts_read_only_and_cleans_up(host, ws, thick_lv, thin_lv):
    for lv in (thick_lv, thin_lv):
        lv.write("file", b"before")
    ws.write_config({"thick": lvm_volume(thick_lv, snapshot_size="16M"), "thin": lvm_volume(thin_lv)})
    ws.ok("snapshot", "thick", "thin")
    for lv in (thick_lv, thin_lv):
        lv.write("file", b"after")

    for volume, lv in (("thick", thick_lv), ("thin", thin_lv)):
        backend = backend_of(ws, volume)
        [snapshot] = backend.list()
        with backend.browse_root(snapshot) as root:
            mount = host.mount_point(str(root))
            assert mount.exists and "ro" in mount.options
            assert mount.filesystem == lv.fstype
            assert (root / "file").read_bytes() == b"before"
        assert not host.mount_point(str(root)).exists and not root.exists()
        [row] = snapshot_rows(host, lv.name)
        # The thin snapshot was activated for browsing only.
        assert row["lv_attr"][4] == ("a" if volume == "thick" else "-")
