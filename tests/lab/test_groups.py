"""Consistency groups on real LVM and ZFS: one quiesce window over every member, the ZFS
members of one pool in one transaction group, each with its own properties."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

from tests.lab.conftest import lvm_volume, sh, zfs_volume
from tests.lab.test_zfs import zfs_snapshots


def logger(ws) -> list[str]:
    """argv of a command that appends its phase and the volumes it was told of to ws.root/log."""
    script = ("import os; open(%r, 'a').write(os.environ['SNAPMGR_PHASE'] + ' ' + os.environ['SNAPMGR_VOLUMES'] + '\\n')"
              % str(ws.root / "log"))
    return [sys.executable, "-c", script]


def test_a_group_of_lvm_and_zfs_volumes_shares_one_window_and_one_zfs_transaction(host, ws, thick_lv, dataset):
    ws.write_config({"db": lvm_volume(thick_lv, snapshot_size="16M"),
                     "uploads": zfs_volume(f"{dataset}/a"), "cache": zfs_volume(f"{dataset}/b")},
                    quiesce={"app": {"kind": "command", "pre": logger(ws), "post": logger(ws)}},
                    groups={"stack": {"volumes": ["db", "uploads", "cache"], "quiesce": ["app"]}})
    results = ws.ok("--json", "snapshot", "--group", "stack").json()["results"]
    assert (ws.root / "log").read_text().splitlines() == ["pre db uploads cache", "post db uploads cache"]
    created = {r["volume"]: r["created"] for r in results}
    assert {c["consistency"]["group"] for c in created.values()} == {"stack"}
    assert len({c["consistency"]["quiesce_window_s"] for c in created.values()}) == 1  # one window

    snaps = zfs_snapshots(host, dataset)
    assert len(snaps) == 2 and len({p["createtxg"] for p in snaps.values()}) == 1  # one transaction group
    assert {(p["snapmgr:volume"], p["snapmgr:id"]) for p in snaps.values()} == \
        {("uploads", created["uploads"]["id"]), ("cache", created["cache"]["id"])}
    listed = ws.ok("--json", "list").json()["snapshots"]
    assert sorted(s["volume"] for s in listed) == ["cache", "db", "uploads"]
    assert {s["grade"] for s in listed} == {"application"}


def test_the_zfs_members_of_a_group_are_taken_together_or_not_at_all(host, ws, dataset):
    ws.write_config({"uploads": zfs_volume(f"{dataset}/a"), "cache": zfs_volume(f"{dataset}/b")},
                    groups={"stack": {"volumes": ["uploads", "cache"]}})
    ws.ok("snapshot", "--group", "stack")
    taken = zfs_snapshots(host, dataset)
    # Someone else's snapshots on b take every name snapmgr could pick in the next half
    # minute: the program refuses b, and so takes nothing on a either.
    now = datetime.now(timezone.utc)
    for i in range(30):
        name = f"{dataset}/b@snapmgr-{now + timedelta(seconds=i):%Y%m%dT%H%M%SZ}"
        if name not in taken:
            sh(host, "zfs", "snapshot", name)
    r = ws.run("--json", "snapshot", "--group", "stack")
    assert r.returncode == 1
    errors = {o["volume"]: o["error"] for o in r.json()["results"]}
    assert errors["uploads"] == errors["cache"] and "File exists" in errors["cache"]
    assert len(zfs_snapshots(host, f"{dataset}/a")) == 1
