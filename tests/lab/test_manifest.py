"""Manifests of LVM and ZFS snapshots: written under the state directory, the second
snapshot reusing the first one's hashes (these snapshots keep inode numbers and ctimes),
and verify passing, then catching a file changed behind snapmgr's back."""

from __future__ import annotations

import os
import time

from snapmgr import manifest
from tests.lab.conftest import lvm_volume, sh, zfs_volume


def created(ws) -> dict:
    return ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]


def write_files(root, count: int) -> None:
    for i in range(count):
        (root / f"f{i:03d}").write_bytes(os.urandom(2000 + i))


def check_two_snapshots(ws, write, records) -> tuple[str, str]:
    time.sleep(3.1)   # past the racy margin: files written as a snapshot is taken are hashed again by the next
    first = created(ws)
    assert first["consistency"]["manifest"]["hashed"] == 30
    write("f007", b"changed")
    second = created(ws)
    record = second["consistency"]["manifest"]
    assert (record["hashed"], record["reused"], record["previous"]) == (1, 29, first["id"])
    for sid in (first["id"], second["id"]):
        assert manifest.load(records, sid).algorithm == "blake3"
    assert ws.ok("verify").stdout.count(": intact (") == 2
    return first["id"], second["id"]


def test_lvm_snapshots_get_manifests_under_the_state_directory(host, ws, thick_lv):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="32M")})
    write_files(thick_lv.mountpoint, 30)
    sh(host, "sync")
    check_two_snapshots(ws, thick_lv.write, ws.root / "state" / "records" / "data")


def test_zfs_snapshots_get_manifests_reuse_hashes_and_verify_catches_a_change(host, ws, dataset):
    ws.write_config({"data": zfs_volume(dataset)})
    mountpoint = sh(host, "zfs", "get", "-H", "-o", "value", "mountpoint", dataset).strip()
    root = type(ws.root)(mountpoint)
    write_files(root, 30)
    first, _ = check_two_snapshots(ws, lambda name, data: (root / name).write_bytes(data),
                                   ws.root / "state" / "records" / "data")
    # A ZFS snapshot cannot be written to: the manifest itself is changed instead, as a
    # hash recorded wrong would be, and verify must tell.
    records = ws.root / "state" / "records" / "data"
    entries = list(manifest.load(records, first).entries())
    entries = [e._replace(digest="0" * 64) if e.path == b"f003" else e for e in entries]
    manifest.save(records, first, "blake3", entries)
    r = ws.run("verify", first)
    assert r.returncode == 1 and r.stdout.splitlines() == [f"{first}: DAMAGED, 1 problem:",
                                                           "  changed    '/f003' (content)"]
