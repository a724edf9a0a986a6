"""Space guards on real LVM (thick and thin) and ZFS: the figures each backend reports
match what LVM and ZFS say, and a floor (min_free) refuses a snapshot with them."""

from __future__ import annotations

import json
import os

from snapmgr import config
from snapmgr.engine import Engine
from tests.lab.conftest import POOL, VG, lvm_volume, sh, zfs_volume

MiB = 1 << 20


def space_of(ws, volume: str = "data"):
    engine = Engine(config.load(ws.config))
    backend = engine.backend(engine.config.volumes[volume])
    return backend.space(backend.list())


def status_space(ws) -> dict:
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert status["space_error"] is None, status
    return status["space"]


def vg_figures(host) -> tuple[int, int]:
    out = sh(host, "vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_size,vg_free", VG)
    [row] = json.loads(out)["report"][0]["vg"]
    return int(row["vg_size"]), int(row["vg_free"])


def refused(ws, volume: dict, *expected: str) -> str:
    ws.write_config({"data": volume})
    before = ws.snapshots()
    r = ws.run("snapshot", "data")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "volume data: refusing to snapshot: " in r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr
    assert ws.snapshots() == before
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert status["state"] == "failing" and "refusing to snapshot" in status["last_error"]
    return r.stderr


def test_thick_lvm_figures_are_the_volume_groups_and_each_snapshots_use(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="16M")})
    sid = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    thick_lv.write("new", os.urandom(4 * MiB))

    space = space_of(ws)
    size, free = vg_figures(host)
    assert (space.where, space.size, space.free, space.needs) == (f"volume group {VG}", size, free, 16 * MiB)
    assert space.held == 16 * MiB                        # what the snapshot takes from the VG
    [(snap, used)] = space.held_each.items()
    assert str(snap) == sid and 4 * MiB <= used < 16 * MiB   # what writes to the origin used of it
    shown = status_space(ws)
    assert (shown["where"], shown["free_bytes"], shown["held_bytes"]) == (space.where, free, 16 * MiB)


def test_thick_lvm_floor_counts_the_snapshots_own_allocation(host, ws, thick_lv):
    _, free = vg_figures(host)
    # The VG meets the floor now, but would not once the 16 MiB snapshot is carved out of it.
    floor = free - 8 * MiB
    message = refused(ws, lvm_volume(thick_lv, snapshot_size="16M", min_free=str(floor)),
                      f"volume group {VG} has ", "and the snapshot would take 16.0MiB of it at once, below min_free")
    assert f"min_free {floor} (" in message
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="16M", min_free=str(free - 32 * MiB))})
    ws.ok("snapshot", "data")


def test_thin_lvm_figures_are_the_pools_and_a_floor_refuses(host, ws, thin_lv, thin_pool):
    ws.write_config({"data": lvm_volume(thin_lv)})
    ws.ok("snapshot", "data")
    thin_lv.write("new", os.urandom(8 * MiB))
    out = sh(host, "lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_size,data_percent",
             f"{VG}/{thin_pool}")
    [pool] = json.loads(out)["report"][0]["lv"]
    space = space_of(ws)
    assert space.where == f"thin pool {VG}/{thin_pool}" and space.size == int(pool["lv_size"])
    assert space.free == int(space.size * (100 - float(pool["data_percent"])) / 100)
    assert space.held is None and "thin snapshot" in space.note
    assert status_space(ws)["free_bytes"] == space.free

    refused(ws, lvm_volume(thin_lv, min_free="99%"), f"thin pool {VG}/{thin_pool} has ", "below min_free 99% (")


def test_zfs_figures_are_the_datasets_and_each_snapshots_written(host, ws, dataset):
    ws.write_config({"data": zfs_volume(dataset)})
    mountpoint = sh(host, "zfs", "get", "-H", "-o", "value", "mountpoint", dataset).strip()
    target = f"{mountpoint}/file"
    with open(target, "wb") as f:
        f.write(os.urandom(MiB))
    first = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    with open(target, "wb") as f:          # replaced: the first snapshot alone keeps the old MiB
        f.write(os.urandom(2 * MiB))
    second = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    os.unlink(target)
    sh(host, "zpool", "sync", dataset.split("/")[0])

    space = space_of(ws)
    available, by_snapshots = (int(v) for v in sh(
        host, "zfs", "get", "-H", "-p", "-o", "value", "available,usedbysnapshots", dataset).split())
    pool_used, pool_available = (int(v) for v in sh(
        host, "zfs", "get", "-H", "-p", "-o", "value", "used,available", dataset.split("/")[0]).split())
    # A share of min_free is of the pool's usable size; free is what the dataset can take.
    assert (space.where, space.size, space.free, space.held) == \
        (f"pool {POOL}", pool_used + pool_available, available, by_snapshots)
    assert 3 * MiB <= space.held < 4 * MiB
    each = {str(k): v for k, v in space.held_each.items()}
    assert set(each) == {first, second}
    assert MiB <= each[first] < 2 * MiB and 2 * MiB <= each[second] < 3 * MiB
    shown = status_space(ws)
    assert (shown["where"], shown["held_bytes"], shown["free_bytes"]) == (space.where, space.held, space.free)

    refused(ws, zfs_volume(dataset, min_free="99.9%"), f"pool {POOL} has ", "below min_free 99.9% (")


def test_zfs_floor_follows_a_quota(host, ws, dataset):
    sh(host, "zfs", "set", "quota=64M", dataset)
    fill(host, dataset, "file", 16 * MiB)
    space = space_of_volume(ws, dataset)
    used, available = zfs_figures(host, dataset, "used", "available")
    # A share is of what the dataset can ever hold under its quota, not of the pool.
    assert (space.where, space.free, space.size) == (f"quota of {dataset}", available, 64 * MiB)
    assert used + available == 64 * MiB
    refused(ws, zfs_volume(dataset, min_free="80M"), f"quota of {dataset} has ", "below min_free 80M (80.0MiB)")
    refused(ws, zfs_volume(dataset, min_free="90%"), f"quota of {dataset} has ",
            "below min_free 90% (57.6MiB of 64.0MiB)")
    ws.write_config({"data": zfs_volume(dataset, min_free="50%")})
    ws.ok("snapshot", "data")    # half the pool would be more than the quota, and never met


def test_zfs_floor_follows_an_ancestors_quota_and_a_siblings_reservation(host, ws, dataset):
    # The volume is the child a; its parent's quota holds a's data and what b reserves.
    child, sibling = f"{dataset}/a", f"{dataset}/b"
    sh(host, "zfs", "set", "quota=64M", dataset)
    sh(host, "zfs", "set", "reservation=24M", sibling)
    fill(host, child, "file", 8 * MiB)
    ws.write_config({"data": zfs_volume(child)})
    used, available = zfs_figures(host, child, "used", "available")
    [parent_used] = zfs_figures(host, dataset, "used")
    assert available == 64 * MiB - parent_used and used + available < 48 * MiB   # no size of any limit
    shown = status_space(ws)
    assert (shown["where"], shown["size_bytes"], shown["free_bytes"]) == (f"quota of {dataset}", 64 * MiB, available)
    refused(ws, zfs_volume(child, min_free="90%"), f"quota of {dataset} has ",
            "below min_free 90% (57.6MiB of 64.0MiB)")
    ws.write_config({"data": zfs_volume(child, min_free="25%")})
    ws.ok("snapshot", "data")


def test_zfs_floor_follows_a_refquota_which_snapshots_are_not_under(host, ws, dataset):
    sh(host, "zfs", "set", "refquota=32M", dataset)
    fill(host, dataset, "file", 12 * MiB)
    ws.write_config({"data": zfs_volume(dataset)})
    ws.ok("snapshot", "data")
    fill(host, dataset, "file", 12 * MiB)      # replaced: the snapshot alone keeps the old 12 MiB
    used, referenced, available = zfs_figures(host, dataset, "used", "referenced", "available")
    assert available == 32 * MiB - referenced and used + available > 40 * MiB   # used counts the snapshot
    shown = status_space(ws)
    assert (shown["where"], shown["size_bytes"], shown["free_bytes"]) == \
        (f"refquota of {dataset}", 32 * MiB, available)
    refused(ws, zfs_volume(dataset, min_free="90%"), f"refquota of {dataset} has ",
            "below min_free 90% (28.8MiB of 32.0MiB)")
    ws.write_config({"data": zfs_volume(dataset, min_free="25%")})
    ws.ok("snapshot", "data")


def fill(host, dataset: str, name: str, size: int) -> None:
    """Write `size` random bytes to a file of the dataset, accounted for when it returns."""
    mountpoint = sh(host, "zfs", "get", "-H", "-o", "value", "mountpoint", dataset).strip()
    with open(f"{mountpoint}/{name}", "wb") as f:
        f.write(os.urandom(size))
    sh(host, "zpool", "sync", dataset.split("/")[0])


def zfs_figures(host, dataset: str, *properties: str) -> list[int]:
    return [int(v) for v in sh(host, "zfs", "get", "-H", "-p", "-o", "value", ",".join(properties), dataset).split()]


def space_of_volume(ws, dataset: str):
    ws.write_config({"data": zfs_volume(dataset)})
    return space_of(ws)
