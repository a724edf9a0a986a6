"""The ZFS backend on a real pool, through libzfs_core and the CLI."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from snapmgr import config
from snapmgr.engine import Engine
from tests.lab.conftest import POOL, sh, zfs_volume


def zfs_snapshots(host, *datasets: str) -> dict[str, dict[str, str]]:
    """name -> {property: value} of the snapshots under the datasets."""
    out = sh(host, "zfs", "list", "-H", "-p", "-t", "snapshot", "-r", "-o",
             "name,createtxg,snapmgr:volume,snapmgr:id,snapmgr:tags", *datasets)
    keys = ("createtxg", "snapmgr:volume", "snapmgr:id", "snapmgr:tags")
    return {line.split("\t")[0]: dict(zip(keys, line.split("\t")[1:])) for line in out.splitlines()}


def test_recursive_snapshot_is_one_transaction_with_properties(host, ws, dataset):
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    result = ws.ok("--json", "snapshot", "--tag", "daily", "--tag", "pre-upgrade", "data").json()["results"][0]
    sid = result["created"]["id"]

    snaps = zfs_snapshots(host, dataset)
    label = sid.split("@")[1]
    assert set(snaps) == {f"{d}@snapmgr-{label}" for d in (dataset, f"{dataset}/a", f"{dataset}/b")}
    assert len({p["createtxg"] for p in snaps.values()}) == 1     # all in one transaction group
    for props in snaps.values():
        assert (props["snapmgr:volume"], props["snapmgr:id"], props["snapmgr:tags"]) == \
            ("data", sid, "daily,pre-upgrade")
    [listed] = ws.ok("--json", "list").json()["snapshots"]
    assert listed["id"] == sid and listed["tags"] == ["daily", "pre-upgrade"] and listed["invalid"] is None


def test_several_datasets_are_taken_atomically_or_not_at_all(host, ws, dataset):
    ws.write_config({"data": zfs_volume(f"{dataset}/a", f"{dataset}/b")})
    ws.ok("snapshot", "data")
    snaps = zfs_snapshots(host, dataset)
    assert len(snaps) == 2 and len({p["createtxg"] for p in snaps.values()}) == 1

    # Someone else's snapshots on b take every name snapmgr could pick in the next
    # half minute: the call fails on b, and so takes nothing on a either.
    now = datetime.now(timezone.utc)
    for i in range(30):
        name = f"{dataset}/b@snapmgr-{now + timedelta(seconds=i):%Y%m%dT%H%M%SZ}"
        if name not in snaps:       # the first snapshot may have taken this second
            sh(host, "zfs", "snapshot", name)
    r = ws.run("snapshot", "data")
    assert r.returncode == 1 and "zfs snapshot of" in r.stderr and len(r.stderr.splitlines()) == 1
    assert [p["snapmgr:volume"] for n, p in zfs_snapshots(host, f"{dataset}/a").items()] == ["data"]


def test_properties_survive_export_and_import(host, ws, dataset):
    ws.write_config({"data": zfs_volume(dataset)})
    ws.ok("snapshot", "--tag", "weekly", "data")
    before = ws.ok("--json", "list").json()["snapshots"]
    sh(host, "zpool", "export", POOL)
    sh(host, "zpool", "import", "-d", "/dev/disk/by-id", POOL)
    assert ws.ok("--json", "list").json()["snapshots"] == before
    assert before[0]["tags"] == ["weekly"]


def test_delete_and_prune_destroy_every_dataset_snapshot(host, ws, dataset):
    ws.write_config({"data": zfs_volume(dataset, recursive=True)}, {"default": {"keep_last": 1}})
    for _ in range(3):
        ws.ok("snapshot", "--tag", "hourly", "data")
    ids = ws.snapshots()
    assert len(zfs_snapshots(host, dataset)) == 9

    ws.ok("delete", ids[0])
    assert len(zfs_snapshots(host, dataset)) == 6
    ws.ok("prune", "data")
    assert ws.snapshots() == [ids[2]]
    assert {p["snapmgr:id"] for p in zfs_snapshots(host, dataset).values()} == {ids[2]}


def test_foreign_snapshots_are_listed_and_never_pruned(host, ws, dataset):
    sh(host, "zfs", "snapshot", f"{dataset}@autosnap_daily")
    ws.write_config({"data": zfs_volume(dataset)}, {"default": {"keep_last": 1}})
    for _ in range(2):
        ws.ok("snapshot", "--tag", "hourly", "data")
    listing = ws.ok("--json", "list").json()
    assert [f["name"] for f in listing["foreign"]] == [f"{dataset}@autosnap_daily"]
    assert "foreign to data" in ws.ok("list").stdout

    ws.ok("prune", "data")
    assert f"{dataset}@autosnap_daily" in zfs_snapshots(host, dataset)
    assert len(ws.snapshots()) == 1


def test_a_partly_destroyed_snapshot_is_invalid(host, ws, dataset):
    ws.write_config({"data": zfs_volume(f"{dataset}/a", f"{dataset}/b")})
    sid = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    sh(host, "zfs", "destroy", f"{dataset}/b@snapmgr-{sid.split('@')[1]}")
    [listed] = ws.ok("--json", "list").json()["snapshots"]
    assert listed["invalid"].startswith("incomplete")


def test_browse_root_is_the_snapshot_directory(host, ws, dataset):
    mountpoint = Path(f"/{dataset}")
    (mountpoint / "file").write_text("before")
    ws.write_config({"data": zfs_volume(dataset)})
    ws.ok("snapshot", "data")
    (mountpoint / "file").write_text("after")

    engine = Engine(config.load(ws.config))
    backend = engine.backend(engine.config.volumes["data"])
    [snapshot] = backend.list()
    with backend.browse_root(snapshot) as root:
        assert root == mountpoint / ".zfs" / "snapshot" / f"snapmgr-{snapshot.id.label}"
        assert (root / "file").read_text() == "before"


def test_without_pyzfs_the_error_says_how_to_install_it(ws, dataset):
    ws.write_config({"data": zfs_volume(dataset)})
    # The guest has pyzfs; hide it from this one process, as on a machine without it.
    hide = "import sys, runpy; sys.modules['libzfs_core'] = None; runpy.run_module('snapmgr', run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", hide, "--config", str(ws.config), "snapshot", "data"],
                       capture_output=True, text=True, env=ws.env)
    assert p.returncode == 1
    assert p.stderr.strip().endswith("apt install python3-pyzfs") and len(p.stderr.splitlines()) == 1
