"""Consistency groups on real LVM and ZFS: one quiesce window over every member, the ZFS
members of one pool in one transaction group, each with its own properties."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.lab.conftest import lvm_volume, zfs_volume
from tests.lab.test_zfs import zfs_snapshots


def logger(ws, *marked) -> list[str]:
    """argv of a command that appends its phase and the volumes it was told of to
    ws.root/log, and writes a file `marker` into each of the `marked` directories."""
    script = ("import os, sys; open(%r, 'a').write(os.environ['SNAPMGR_PHASE'] + ' ' + os.environ['SNAPMGR_VOLUMES'] + '\\n')"
              "; [open(os.path.join(d, 'marker'), 'w').write(os.environ['SNAPMGR_SNAPSHOT']) for d in sys.argv[1:]]"
              % str(ws.root / "log"))
    return [sys.executable, "-c", script, *marked]


def test_a_group_of_lvm_and_zfs_volumes_shares_one_window_and_one_zfs_transaction(host, ws, thick_lv, dataset):
    mounts = [f"/{dataset}/a", f"/{dataset}/b"]
    ws.write_config({"db": lvm_volume(thick_lv, snapshot_size="16M"),
                     "uploads": zfs_volume(f"{dataset}/a"), "cache": zfs_volume(f"{dataset}/b")},
                    quiesce={"app": {"kind": "command", "pre": logger(ws, *mounts), "post": logger(ws)}},
                    groups={"stack": {"volumes": ["db", "uploads", "cache"], "quiesce": ["app"]}})
    results = ws.ok("--json", "snapshot", "--group", "stack").json()["results"]
    assert (ws.root / "log").read_text().splitlines() == ["pre db uploads cache", "post db uploads cache"]
    created = {r["volume"]: r["created"] for r in results}
    assert {c["consistency"]["group"] for c in created.values()} == {"stack"}
    for mount, volume in zip(mounts, ("uploads", "cache")):  # written by the one pre, before either was taken
        label = created[volume]["id"].split("@")[1]
        assert (Path(mount) / ".zfs" / "snapshot" / f"snapmgr-{label}" / "marker").read_text().split() == \
            [created[v]["id"] for v in ("db", "uploads", "cache")]

    snaps = zfs_snapshots(host, dataset)
    assert len(snaps) == 2 and len({p["createtxg"] for p in snaps.values()}) == 1  # one transaction group
    assert {(p["snapmgr:volume"], p["snapmgr:id"]) for p in snaps.values()} == \
        {("uploads", created["uploads"]["id"]), ("cache", created["cache"]["id"])}
    listed = ws.ok("--json", "list").json()["snapshots"]
    assert sorted(s["volume"] for s in listed) == ["cache", "db", "uploads"]
    assert {s["grade"] for s in listed} == {"application"}


def zfs_pair(ws, dataset: str, **quiesce) -> None:
    ws.write_config({"uploads": zfs_volume(f"{dataset}/a"), "cache": zfs_volume(f"{dataset}/b")},
                    quiesce=quiesce, groups={"stack": {"volumes": ["uploads", "cache"], "quiesce": list(quiesce)}})


def test_a_name_taken_on_one_zfs_member_refuses_the_whole_batch(host, ws, dataset):
    # Inside the window, someone takes the very name snapmgr is about to give b's snapshot.
    steal = [sys.executable, "-c", "import os, subprocess; label = os.environ['SNAPMGR_SNAPSHOT'].split()[1]"
             f".split('@')[1]; subprocess.run(['zfs', 'snapshot', '{dataset}/b@snapmgr-' + label], check=True)"]
    zfs_pair(ws, dataset, steal={"kind": "command", "pre": steal})
    r = ws.run("--json", "snapshot", "--group", "stack")
    assert r.returncode == 1
    errors = {o["volume"]: o["error"] for o in r.json()["results"]}
    assert errors["uploads"] == errors["cache"] and errors["cache"].endswith(": File exists")
    assert [p["snapmgr:volume"] for p in zfs_snapshots(host, dataset).values()] == ["-"]  # only the thief's


def test_a_batch_failing_half_way_leaves_no_snapshot_behind(host, ws, dataset):
    # Each snapshot is taken and then given its properties; 140 tags of 64 characters
    # are more than a ZFS property value holds, so the first set_prop fails after its
    # snapshot was taken: the program must destroy it again.
    zfs_pair(ws, dataset)
    tags = [arg for i in range(140) for arg in ("--tag", f"t{i:03d}" + "x" * 60)]
    r = ws.run("--json", "snapshot", "--group", "stack", *tags)
    assert r.returncode == 1
    errors = {o["volume"]: o["error"] for o in r.json()["results"]}
    assert errors["uploads"] == errors["cache"] and "zfs snapshot of" in errors["cache"]
    assert zfs_snapshots(host, dataset) == {}
