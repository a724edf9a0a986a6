"""The ZFS backend on a real pool, through libzfs_core and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from snapmgr import config, manifest
from snapmgr.engine import Engine
from tests.integration.test_mount import label, mount, snapshot
from tests.lab.conftest import POOL, sh, zfs_volume

# A file in the dataset and one in each of its children (the `dataset` fixture's a and b,
# mounted inside it by their inherited mountpoints).
FILES = {"top": b"in the dataset", "a/fa": b"in child a", "b/fb": b"in child b"}


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


# Several datasets browsed as one tree ---------------------------------------------------

@pytest.fixture
def tree(dataset) -> Path:
    root = Path(f"/{dataset}")
    for path, data in FILES.items():
        (root / path).write_bytes(data)
    return root


def snapmgrs_mounts(ws, snapshot_id: str = "", field: int = 4) -> list[str]:
    """Where something is mounted under snapmgr's run directory (the trees of several
    datasets' snapshots), or in the tree of one snapshot; or another mountinfo field of each."""
    under = str(ws.root / "run" / "mounts" / snapshot_id)
    return [line.split(" ")[field] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split(" ")[4].startswith(under)]


def test_a_recursive_snapshots_manifest_covers_every_dataset_and_verify_checks_them(ws, dataset, tree):
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    created = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]
    sid = created["id"]
    assert created["consistency"]["manifest"]["hashed"] == len(FILES)
    records = ws.root / "state" / "records" / "data"
    assert {e.path for e in manifest.load(records, sid).entries() if e.kind == "f"} == {p.encode() for p in FILES}
    assert ws.ok("verify", sid).stdout.startswith(f"{sid}: intact")

    # A snapshot cannot be written to: a digest recorded wrong for a child dataset's file
    # stands for its data gone bad, and verify must read that file to tell.
    entries = [e._replace(digest="0" * 64) if e.path == b"a/fa" else e for e in manifest.load(records, sid).entries()]
    manifest.save(records, sid, "blake3", entries)
    r = ws.run("verify", sid)
    assert r.returncode == 1 and r.stdout.splitlines() == [f"{sid}: DAMAGED, 1 problem:",
                                                           "  changed    '/a/fa' (content)"]
    assert snapmgrs_mounts(ws) == []


def test_mount_shows_each_child_dataset_where_it_is_live(ws, dataset, tree, tmp_path):
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    sid = snapshot(ws, "data")
    for path in FILES:
        (tree / path).write_bytes(b"changed since")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount(ws, mnt):
        root = mnt / "data" / label(sid)
        assert {path: (root / path).read_bytes() for path in FILES} == FILES
        assert sorted(os.listdir(root)) == ["a", "b", "top"] and os.listdir(root / "a") == ["fa"]
        # Each dataset numbers its files from the same start: here each is a file of its own.
        paths = [root, root / "a", root / "b", *(root / path for path in FILES)]
        assert len({os.stat(p).st_ino for p in paths}) == len(paths)
        with pytest.raises(OSError):
            (root / "a" / "fa").write_bytes(b"x")
        assert len(snapmgrs_mounts(ws)) == 3   # the dataset's snapshot, with a's and b's inside it
        assert [options.split(",")[0] for options in snapmgrs_mounts(ws, field=5)] == ["ro"] * 3
    assert snapmgrs_mounts(ws) == []


def test_trees_left_by_a_killed_mount_are_cleared_by_the_next_use(ws, dataset, tree, tmp_path):
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    first, second = snapshot(ws, "data"), snapshot(ws, "data")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount(ws, mnt) as proc:
        for sid in (first, second):
            assert (mnt / "data" / label(sid) / "a" / "fa").read_bytes() == FILES["a/fa"]
        proc.kill()
        proc.wait()
    assert [len(snapmgrs_mounts(ws, sid)) for sid in (first, second)] == [3, 3]

    # Browsing the first again clears what was left and builds it once, not on top.
    with mount(ws, mnt):
        assert (mnt / "data" / label(first) / "b" / "fb").read_bytes() == FILES["b/fb"]
        assert len(snapmgrs_mounts(ws, first)) == 3
    assert ws.ok("verify", first).stdout.startswith(f"{first}: intact")
    assert snapmgrs_mounts(ws, first) == []
    ws.ok("delete", second)   # the tree left of it would keep its snapshots busy
    assert snapmgrs_mounts(ws) == []


def test_restore_diff_and_versions_reach_into_child_datasets_and_no_foreign_mount(host, ws, dataset, tree,
                                                                                    tmp_path):
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    (tree / "foreign").mkdir()
    sid = snapshot(ws, "data")
    # Another filesystem mounted inside the volume: not the volume's, never compared or deleted.
    sh(host, "mount", "-t", "tmpfs", "tmpfs", tree / "foreign")
    try:
        (tree / "foreign" / "theirs").write_bytes(b"not the volume's")
        (tree / "a" / "fa").write_bytes(b"ruined")
        (tree / "b" / "new").write_bytes(b"made since")

        ws.ok("restore", sid, str(tree / "a" / "fa"), "--to", str(tmp_path / "out"))
        assert (tmp_path / "out" / "a" / "fa").read_bytes() == FILES["a/fa"]
        lines = ws.ok("diff", sid, "live").stdout.splitlines()
        assert {"c....m /a/fa", "+..... /b/new"} <= set(lines) and not [l for l in lines if "/foreign/" in l]
        versions = ws.ok("--json", "versions", str(tree / "a" / "fa")).json()["versions"]
        assert [v["snapshots"] for v in versions] == [[sid]] and versions[0]["current"] is False

        ws.ok("restore", sid, str(tree), "--in-place", "--delete")
        assert (tree / "a" / "fa").read_bytes() == FILES["a/fa"] and not (tree / "b" / "new").exists()
        assert (tree / "foreign" / "theirs").read_bytes() == b"not the volume's"
    finally:
        sh(host, "umount", tree / "foreign")
    assert snapmgrs_mounts(ws) == []


@pytest.mark.parametrize("where", ["elsewhere", "legacy"])
def test_a_dataset_without_a_place_in_the_tree_leaves_the_snapshot_unverified(host, ws, dataset, tree, where,
                                                                               tmp_path):
    if where == "elsewhere":
        sh(host, "zfs", "set", f"mountpoint={tmp_path / 'elsewhere'}", f"{dataset}/b")
        reason = f"{dataset}/b is mounted at {tmp_path / 'elsewhere'}, outside /{dataset} where {dataset} is"
    else:
        sh(host, "zfs", "set", "mountpoint=legacy", f"{dataset}/b")
        reason = f"{dataset}/b is not mounted (mountpoint=legacy, canmount=on)"
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    check = ws.ok("--json", "config", "check")
    assert reason in check.json()["browse_problems"]["data"] and reason in check.stderr

    r = ws.ok("--json", "snapshot", "data")
    record = r.json()["results"][0]["created"]["consistency"]["manifest"]
    assert list(record) == ["unverified"] and reason in record["unverified"]
    assert reason in r.stderr and len(r.stderr.splitlines()) == 1
    assert "UNVERIFIABLE" in ws.ok("verify", "data").stdout
    assert snapmgrs_mounts(ws) == []


def test_a_zvol_and_a_dataset_that_cannot_be_mounted_are_left_out_of_the_tree(host, ws, dataset, tree, tmp_path):
    # Neither has files anyone sees live; a child of the one that cannot be mounted has
    # (its mountpoint, inherited through it, is a directory in the first dataset).
    sh(host, "zfs", "create", "-s", "-V", "8M", f"{dataset}/vol")
    sh(host, "zfs", "create", "-o", "canmount=off", f"{dataset}/off")
    sh(host, "zfs", "create", f"{dataset}/off/on")
    (tree / "off" / "on" / "fo").write_bytes(b"below the one that cannot be mounted")
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    assert ws.ok("--json", "config", "check").json()["browse_problems"] == {}

    created = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]
    sid = created["id"]
    assert set(zfs_snapshots(host, f"{dataset}/vol", f"{dataset}/off")) == \
        {f"{d}@snapmgr-{sid.split('@')[1]}" for d in (f"{dataset}/vol", f"{dataset}/off", f"{dataset}/off/on")}
    assert created["consistency"]["manifest"]["hashed"] == len(FILES) + 1
    assert ws.ok("verify", sid).stdout.startswith(f"{sid}: intact")
    (tree / "off" / "on" / "fo").write_bytes(b"ruined")
    ws.ok("restore", sid, str(tree / "off" / "on" / "fo"), "--in-place")
    assert (tree / "off" / "on" / "fo").read_bytes() == b"below the one that cannot be mounted"
    assert snapmgrs_mounts(ws) == []


def test_with_snapdir_visible_diff_and_restore_leave_every_zfs_directory_alone(host, ws, dataset, tree):
    sh(host, "zfs", "set", "snapdir=visible", dataset)   # a and b inherit it
    ws.write_config({"data": zfs_volume(dataset, recursive=True)})
    sid = snapshot(ws, "data")
    (tree / "a" / "new").write_bytes(b"made since")
    lines = ws.ok("diff", sid, "live").stdout.splitlines()
    assert "+..... /a/new" in lines and not [line for line in lines if ".zfs" in line]

    # rmdir in .zfs/snapshot destroys a snapshot: a deletion there would take sid's.
    ws.ok("restore", sid, str(tree), "--in-place", "--delete")
    assert not (tree / "a" / "new").exists()
    assert len(zfs_snapshots(host, dataset)) == 6   # sid's and the pre-rollback snapshot's, on 3 datasets
    assert snapmgrs_mounts(ws) == []
