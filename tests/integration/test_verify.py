"""verify on real rsync and btrfs volumes: corruption injected into a stored file (same
size, same mtime: only the content says so), entries deleted and added behind snapmgr's
back, snapshots without manifests, the journal and status."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from snapmgr import manifest
from tests.integration.helpers import make_tree, needs_root, wait_for
from tests.integration.test_btrfs import btrfs  # noqa: F401 (a fixture)


def created(ws) -> str:
    return ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]


def flip_a_byte(path: Path) -> None:
    """Bit rot as a disk would cause it: the content changes, size and times do not."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_intact_snapshots_verify_with_exit_0_and_are_journaled(ws):
    make_tree(ws.source, files=20)
    first, second = created(ws), created(ws)
    r = ws.ok("verify")
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [first, second]
    assert all(": intact (26 entries, 20 files, 0.0 MiB hashed in" in line for line in lines)
    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["last_verify"]["snapshot"] == second and status["last_verify"]["result"] == "intact"
    assert status["damaged"] == [] and status["newest_manifest"] == "blake3"
    assert "intact 0s ago" in ws.ok("status").stdout or "intact 1s ago" in ws.ok("status").stdout


def test_corruption_in_an_rsync_repository_is_caught_in_every_snapshot_sharing_the_file(ws):
    make_tree(ws.source, files=20)
    first = created(ws)
    (ws.source / "d4" / "f0004").write_bytes(b"changed, so not shared")
    second = created(ws)
    flip_a_byte(ws.repo / first / "d1" / "f0001")   # a hard link in both snapshots
    r = ws.run("verify")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{first}: DAMAGED, 1 problem:", "  changed    '/d1/f0001' (content)",
        f"{second}: DAMAGED, 1 problem:", "  changed    '/d1/f0001' (content)"]
    only = ws.run("verify", first)
    assert only.returncode == 1 and only.stdout.splitlines()[0] == f"{first}: DAMAGED, 1 problem:"
    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["damaged"] == [first, second]
    assert f"DAMAGED: {first}, {second}" in ws.ok("status").stdout


def test_missing_unexpected_and_changed_entries_are_each_reported_on_one_line(ws):
    make_tree(ws.source, files=10)
    os.symlink("d0/f0000", ws.source / "link")
    sid = created(ws)
    snap = ws.repo / sid
    (snap / "d2" / "f0002").unlink()
    (snap / "odd\nname").write_bytes(b"planted")
    (snap / "link").unlink()
    os.symlink("elsewhere", snap / "link")
    os.chmod(snap / "d3" / "f0003", 0o777)
    stamp = (snap / "d2").stat()   # put the directories' times back: only the entries are in question
    os.utime(snap / "d2", ns=(stamp.st_atime_ns, manifest.load(ws.repo, sid).lookup(b"d2").mtime_ns))
    os.utime(snap, ns=(stamp.st_atime_ns, manifest.load(ws.repo, sid).lookup(b"").mtime_ns))
    r = ws.run("verify", "data")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{sid}: DAMAGED, 4 problems:",
        "  missing    '/d2/f0002'",
        "  changed    '/d3/f0003' (mode)",
        "  changed    '/link' (mtime, size, target)",
        "  unexpected '/odd\\nname'"]
    problems = ws.run("--json", "verify", sid).json()["results"][0]["problems"]
    assert [(p["status"], p["path"], p["what"]) for p in problems] == [
        ("missing", "/d2/f0002", []), ("changed", "/d3/f0003", ["mode"]),
        ("changed", "/link", ["mtime", "size", "target"]), ("unexpected", "/odd\nname", [])]
    assert problems[3]["path_base64"] == "b2RkCm5hbWU="


@needs_root
def test_corruption_in_a_read_only_btrfs_snapshot_is_caught(ws, btrfs):
    ws.write_config({"data": {"backend": "btrfs", "subvolume": btrfs / "data", "snapshot_dir": btrfs / ".snapshots"}})
    make_tree(btrfs / "data", files=20, size=5000)
    sid = created(ws)
    snap = btrfs / ".snapshots" / sid
    subprocess.run(["btrfs", "property", "set", "-ts", snap, "ro", "false"], check=True)
    flip_a_byte(snap / "d3" / "f0003")
    subprocess.run(["btrfs", "property", "set", "-ts", snap, "ro", "true"], check=True)
    r = ws.run("verify")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"{sid}: DAMAGED, 1 problem:", "  changed    '/d3/f0003' (content)"]


@needs_root
def test_a_large_file_the_disk_cannot_read_is_reported_unreadable_not_a_crash(ws, btrfs):
    # Real damage: bytes of a 20 MiB file's extent overwritten in the filesystem image, so
    # that btrfs's checksum fails and read(2) says EIO (a memory map would take a SIGBUS).
    ws.write_config({"data": {"backend": "btrfs", "subvolume": btrfs / "data", "snapshot_dir": btrfs / ".snapshots"}})
    marker = os.urandom(64)
    big = marker + os.urandom(20 << 20)
    (btrfs / "data" / "big").write_bytes(big)
    (btrfs / "data" / "small").write_bytes(b"fine")
    sid = created(ws)
    image = btrfs.parent / "btrfs.img"
    subprocess.run(["umount", btrfs], check=True)
    with open(image, "r+b") as f:
        offset = f.read().find(marker)   # the image holds one copy: data is not duplicated
        assert offset > 0
        f.seek(offset + 100)
        f.write(b"\0" * 16)
    subprocess.run(["mount", "-o", "loop", image, btrfs], check=True)
    r = ws.run("verify")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [f"{sid}: DAMAGED, 1 problem:", "  unreadable '/big' (Input/output error)"]
    assert r.stderr.strip().splitlines() == [f"snapmgr: error: 1 of 1 snapshots are not intact: {sid} (damaged)"]


def test_a_snapshot_deleted_during_its_verify_is_an_error_not_damage(ws):
    make_tree(ws.source, files=60000, size=10)
    sid = created(ws)
    Path("/proc/sys/vm/drop_caches").write_text("3")   # a cold cache: the verify reads for a while
    p = ws.start("--json", "verify", sid)
    wait_for(lambda: Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().strip(), timeout=120,
             what="the verify's hashing processes")
    ws.ok("delete", sid)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1
    [result] = json.loads(out)["results"]
    assert (result["result"], result["reason"], result["problems"]) == ("error", "deleted during verify", [])
    assert err.strip().splitlines() == [f"snapmgr: error: 1 of 1 snapshots are not intact: {sid} (error)"]


def test_snapshots_without_a_manifest_are_unverifiable_never_intact(ws):
    make_tree(ws.source, files=5)
    old, new = created(ws), created(ws)
    manifest.delete(ws.repo, old)
    record = ws.repo / f"{new}.record.json"
    record.write_text(record.read_text().replace('"manifest"', '"not-the-manifest"'))
    manifest.delete(ws.repo, new)
    r = ws.run("--json", "verify")
    assert r.returncode == 1   # the manifest written and since lost: a failure
    results = r.json()["results"]
    assert [(v["snapshot"], v["result"]) for v in results] == [(old, "error"), (new, "unverifiable")]
    assert results[0]["reason"] == "its manifest file is missing (deleted by hand?)"
    assert results[1]["reason"].startswith("it has no manifest: it was taken before snapmgr recorded manifests")
    assert r.json()["intact"] is False


def test_snapshots_that_never_had_a_manifest_are_told_of_but_fail_no_verify(ws):
    # A timer running `snapmgr verify` must not fail forever because of old snapshots.
    make_tree(ws.source, files=5)
    old, new = created(ws), created(ws)
    manifest.delete(ws.repo, old)
    record = ws.repo / f"{old}.record.json"
    record.write_text(record.read_text().replace('"manifest"', '"not-the-manifest"'))   # as before manifests
    r = ws.run("verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == (f"{old}: UNVERIFIABLE: it has no manifest: it was taken before snapmgr "
                                        f"recorded manifests, or its run was stopped before the manifest was written")
    assert r.stdout.splitlines()[1].startswith(f"{new}: intact")
    # The JSON says what the exit status says, and how many were really checked.
    assert ws.run("--json", "verify").json() | {"results": None} == {
        "results": None, "passed_over": [], "intact": True, "checked": 1, "journal_error": None, "monitoring_error": None}
    manifest.delete(ws.repo, new)
    record = ws.repo / f"{new}.record.json"
    record.write_text(record.read_text().replace('"manifest"', '"not-the-manifest"'))
    nothing = ws.run("--json", "verify")
    assert nothing.returncode == 0 and (nothing.json()["intact"], nothing.json()["checked"]) == (True, 0)


def test_a_volume_whose_repository_is_gone_is_passed_over_and_said_so(ws):
    make_tree(ws.source, files=2)
    created(ws)
    ws.repo.rename(ws.root / "away")
    r = ws.run("--json", "verify")
    assert r.json()["passed_over"] == ["data: no snapshots found; not verified"] and r.json()["results"] == []


def test_every_named_snapshot_is_found_before_any_is_verified(ws):
    make_tree(ws.source, files=2)
    ws.write_config({"a": {"backend": "rsync", "source": ws.source, "repository": ws.root / "ra"},
                     "b": {"backend": "rsync", "source": ws.source, "repository": ws.root / "rb"}})
    sid = ws.ok("--json", "snapshot", "a").json()["results"][0]["created"]["id"]
    r = ws.run("verify", sid, "b@20200101T000000Z")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "snapmgr: error: no such snapshot: b@20200101T000000Z\n"
    with sqlite3.connect(ws.root / "state" / "journal.db") as db:
        assert db.execute("SELECT count(*) FROM verifies").fetchone() == (0,)


def test_a_damaged_manifest_is_an_error_for_its_snapshot_alone(ws):
    make_tree(ws.source, files=5)
    bad, good = created(ws), created(ws)
    path = manifest.manifest_path(ws.repo, bad)
    path.write_bytes(path.read_bytes()[:-30])
    r = ws.run("verify")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{bad}: ERROR: manifest '{path}' ")
    assert lines[1].startswith(f"{good}: intact")


def test_verify_arguments_are_checked_before_anything_is_read(ws):
    make_tree(ws.source, files=2)
    created(ws)
    for args, code, message in [
        (["nosuch"], 2, "snapmgr: error: unknown volume 'nosuch'"),
        (["data@20200101T000000Z"], 1, "snapmgr: error: no such snapshot: data@20200101T000000Z"),
        (["data@x\ny"], 2, "snapmgr: error: 'data@x\\ny' is not a snapshot id"),
        (["--", "-x"], 2, "snapmgr: error: unknown volume '-x'"),
    ]:
        r = ws.run("verify", *args)
        assert r.returncode == code and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr)
        assert r.stdout == ""


def test_verify_results_go_to_the_journal(ws):
    make_tree(ws.source, files=3)
    sid = created(ws)
    flip_a_byte(ws.repo / sid / "d0" / "f0000")
    ws.run("verify")
    with sqlite3.connect(ws.root / "state" / "journal.db") as db:
        rows = db.execute("SELECT volume, snapshot, source, result, entries, problems, detail FROM verifies").fetchall()
    assert rows == [("data", sid, "verify", "damaged", 7, 1, '["changed    \'/d0/f0000\' (content)"]')]


def test_progress_is_shown_on_a_terminal_only(ws):
    make_tree(ws.source, files=5000, size=10)
    sid = created(ws)
    returncode, seen = ws.on_terminal("verify")
    assert returncode == 0
    assert f"{sid}: 4,096 entries found" in seen and f"{sid}: 4,096 files hashed" in seen and "\r" in seen
    assert ws.ok("verify").stderr == ""
