"""Manifests recorded when a snapshot is taken (real rsync and btrfs volumes), reused by
the next snapshot, removed with their snapshot, and exported for b3sum -c / sha256sum -c
in a restored copy."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from snapmgr import manifest
from tests.integration.helpers import in_one_second, loop_mount, make_tree, needs_root, wait_for
from tests.integration.test_btrfs import btrfs  # noqa: F401 (a fixture)

HOSTILE = [b"-rf", b"new\nline", b"back\\slash", b"cr\rx", b" lead", b"trail ", b"tab\tx", b"\xc3\xa9t\xc3\xa9",
           b"x" * 255, b"--", b"\\n"]


def created(ws, *args) -> dict:
    return ws.ok("--json", "snapshot", *args).json()["results"][0]["created"]


def hostile_tree(root, names=HOSTILE) -> None:
    deep = os.fsencode(root) + b"/d" * 40
    os.makedirs(deep)
    for i, name in enumerate(names):
        with open((deep if i % 2 else os.fsencode(root)) + b"/" + name, "wb") as f:
            f.write(name * 3)


def restored_copy(snapshot, to) -> None:
    subprocess.run(["cp", "-a", f"{snapshot}/.", to], check=True)


def test_a_snapshot_records_its_manifest_beside_its_record(ws):
    make_tree(ws.source, files=30)
    os.symlink("d0/f0000", ws.source / "link")
    snap = created(ws)
    record = snap["consistency"]["manifest"]
    assert record["algorithm"] == "blake3" and record["previous"] is None
    assert (record["entries"], record["hashed"], record["reused"], record["bytes"]) == (37, 30, 0, 3000)
    assert snap["manifest"] == "blake3"
    stored = manifest.load(ws.repo, snap["id"])
    assert stored.algorithm == "blake3"
    # Read from the snapshot itself: the same entries a walk of it finds now.
    assert [(e.path, e.ino, e.size) for e in stored.entries()] == \
        [(e.path, e.ino, e.size) for e in manifest.scan(ws.repo / snap["id"], None)]
    by_path = {e.path: e for e in stored.entries()}
    assert by_path[b"link"].target == b"d0/f0000"
    b3 = subprocess.run(["b3sum", "--no-names", ws.repo / snap["id"] / "d1" / "f0001"], capture_output=True,
                        text=True, check=True).stdout.strip()
    assert by_path[b"d1/f0001"].digest == b3
    assert [s["manifest"] for s in ws.ok("--json", "list").json()["snapshots"]] == ["blake3"]
    assert "MANIFEST" in ws.ok("list").stdout.splitlines()[0]


def test_the_next_rsync_snapshot_reuses_the_hashes_of_its_hardlinked_files(ws):
    make_tree(ws.source, files=50)
    created(ws)
    (ws.source / "d0" / "f0000").write_bytes(b"changed")
    (ws.source / "d1" / "f0001").write_bytes(b"changed too")
    (ws.source / "new").write_bytes(b"new")
    second = created(ws)
    record = second["consistency"]["manifest"]
    # 48 files are hard links to the previous snapshot's: their ctimes moved (link(2)),
    # yet the same inode is the same content.
    assert (record["hashed"], record["reused"]) == (3, 48)
    assert ws.ok("verify").returncode == 0
    # Reused hashes are right: the manifest equals one hashed from scratch.
    fresh = list(manifest.scan(ws.repo / second["id"], "blake3"))
    assert [(e.path, e.digest) for e in manifest.load(ws.repo, second["id"]).entries()] == \
        [(e.path, e.digest) for e in fresh]


@needs_root
def test_the_next_btrfs_snapshot_reuses_hashes_of_files_whose_inode_and_ctime_are_kept(ws, btrfs):
    ws.write_config({"data": {"backend": "btrfs", "subvolume": btrfs / "data", "snapshot_dir": btrfs / ".snapshots"}})
    make_tree(btrfs / "data", files=40)
    time.sleep(3.1)   # past the racy margin: a file written as a snapshot is taken is hashed again by the next
    first = created(ws)
    assert first["consistency"]["manifest"]["hashed"] == 40
    (btrfs / "data" / "d2" / "f0002").write_bytes(b"changed")
    os.chmod(btrfs / "data" / "d3" / "f0003", 0o600)   # metadata only: ctime moves, so it is hashed again
    second = created(ws)
    record = second["consistency"]["manifest"]
    assert (record["hashed"], record["reused"], record["previous"]) == (2, 38, first["id"])
    assert manifest.load(btrfs / ".snapshots", second["id"]) is not None
    assert ws.ok("verify").returncode == 0


@needs_root
def test_a_file_rewritten_in_the_tick_the_previous_snapshot_was_taken_is_hashed_again(tmp_path):
    # ext4 with 128-byte inodes keeps timestamps to the second: a rewrite in place in the
    # same second keeps inode, size, mtime and ctime.
    with loop_mount(tmp_path, "ext4", size_mib=32, mkfs_args=("-I", "128")) as mnt:
        f = mnt / "db"
        for _ in in_one_second():
            taken = time.time()
            f.write_bytes(b"A" * 4096)
            previous = list(manifest.scan(mnt, "blake3"))
            fd = os.open(f, os.O_WRONLY)
            os.pwrite(fd, b"B" * 4096, 0)
            os.close(fd)
            [old] = [e for e in previous if e.path == b"db"]
            if (old.ctime_ns, old.mtime_ns) == (f.stat().st_ctime_ns, f.stat().st_mtime_ns):
                break   # the write is hidden
        stats = manifest.ScanStats()
        [new] = [e for e in manifest.scan(mnt, "blake3", iter(previous), previous_taken=taken, stats=stats)
                 if e.path == b"db"]
        assert new.digest == manifest.hash_file(f, "blake3") != old.digest
        assert stats.reused == 0


def test_sha256_volumes_and_export_checked_by_sha256sum_in_a_restored_copy(ws, tmp_path):
    hostile_tree(ws.source, HOSTILE + [b"\xff\xfe not utf-8"])
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "manifest": "sha256"}}, manifest="blake3")
    sid = created(ws)["id"]
    assert manifest.load(ws.repo, sid).algorithm == "sha256"
    sums = tmp_path / "sums"
    with open(sums, "wb") as out:
        subprocess.run(ws.command("manifest", sid), stdout=out, check=True, env=ws.env)
    assert sums.read_bytes().count(b"\n") == len(HOSTILE) + 1
    restored = tmp_path / "restored"
    restored.mkdir()
    restored_copy(ws.repo / sid, restored)
    check = subprocess.run(["sha256sum", "--strict", "-c", sums], cwd=restored, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # A changed byte in the restored copy is what the check is for.
    victim = restored / os.fsdecode(b"d" + b"/d" * 39 + b"/new\nline")
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    check = subprocess.run(["sha256sum", "-c", sums], cwd=restored, capture_output=True)
    assert check.returncode == 1 and b"FAILED" in check.stdout
    r = ws.run("manifest", sid, "--format", "b3sum")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("snapmgr: error: this manifest holds sha256 hashes; --format b3sum needs blake3 "
                        "(use --format sha256sum)\n")


def test_export_for_b3sum_checks_hostile_names_and_refuses_what_b3sum_cannot_check(ws, tmp_path):
    hostile_tree(ws.source)
    sid = created(ws)["id"]
    sums = tmp_path / "sums"
    with open(sums, "wb") as out:
        subprocess.run(ws.command("manifest", sid), stdout=out, check=True, env=ws.env)
    restored = tmp_path / "restored"
    restored.mkdir()
    restored_copy(ws.repo / sid, restored)
    check = subprocess.run(["b3sum", "-c", sums], cwd=restored, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(b": OK\n") == len(HOSTILE)
    (ws.source / os.fsdecode(b"\xff bad")).write_bytes(b"x")
    sid = created(ws)["id"]
    r = ws.run("manifest", sid)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("snapmgr: error: '/\\\\xff bad' is not UTF-8, which b3sum -c cannot check; nothing was "
                        "printed (use a sha256 manifest and --format sha256sum)\n")
    lines = [json.loads(line) for line in ws.ok("manifest", sid, "--format", "json").stdout.splitlines()]
    bad = next(e for e in lines if e["path"] == "\\xff bad")
    assert bad["path_base64"] == "/yBiYWQ=" and bad["kind"] == "f" and bad["size"] == 1


def test_manifest_of_a_snapshot_without_one_or_of_none_is_a_clear_error(ws):
    make_tree(ws.source, files=3)
    sid = created(ws)["id"]
    manifest.delete(ws.repo, sid)
    r = ws.run("manifest", sid)
    assert (r.returncode, r.stderr) == (1, f"snapmgr: error: {sid} is unverifiable: its manifest file is missing "
                                           f"(deleted by hand?)\n")
    r = ws.run("manifest", "data@20200101T000000Z")
    assert (r.returncode, r.stderr) == (1, f"snapmgr: error: no such snapshot: data@20200101T000000Z (volume data "
                                           f"has 1, the newest {sid})\n")
    r = ws.run("manifest", "data@yesterday")
    assert r.returncode == 2 and r.stderr.startswith("snapmgr: error: 'data@yesterday' is not a snapshot id")


def test_manifest_off_takes_snapshots_that_say_they_are_unverified(ws):
    make_tree(ws.source, files=3)
    ws.write_config(manifest="off")
    snap = created(ws)
    assert snap["consistency"]["manifest"] == {"unverified": 'manifests are off for this volume (manifest = "off")'}
    assert snap["manifest"] == "unverified"
    assert not manifest.manifest_path(ws.repo, snap["id"]).exists()
    every = ws.ok("verify")   # no volume named: those without manifests are passed over, and say so
    assert every.stdout == 'data: manifests are off (manifest = "off"); not verified\n'
    named = ws.run("verify", "data")
    assert named.returncode == 0
    assert named.stdout == f'{snap["id"]}: UNVERIFIABLE: manifests are off for this volume (manifest = "off")\n'


@needs_root
def test_a_manifest_that_cannot_be_written_leaves_the_snapshot_marked_unverified(ws):
    # A real full disk: the repository on a small tmpfs, filled up but for three pages.
    # The snapshot (hard links, one page of metadata, one of record) fits, its manifest
    # (several pages) does not.
    make_tree(ws.source, files=400, size=10)
    ws.repo.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", ws.repo], check=True)
    try:
        created(ws)
        filler = ws.repo / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        os.truncate(filler, filler.stat().st_size - 3 * 4096)
        r = ws.run("--json", "snapshot")
        assert r.returncode == 0, r.stderr
        snap = r.json()["results"][0]["created"]
        reason = snap["consistency"]["manifest"]["unverified"]
        assert reason.startswith("its manifest could not be written: No space left on device"), reason
        assert f"snapmgr: WARNING: {snap['id']} is unverified: its manifest could not be written: " in r.stderr
        assert [s["manifest"] for s in ws.ok("--json", "list").json()["snapshots"]] == ["blake3", "unverified"]
        assert not list(ws.repo.glob("*.tmp"))
        v = ws.run("verify", snap["id"])
        assert v.returncode == 0 and v.stdout.startswith(f"{snap['id']}: UNVERIFIABLE: its manifest could not be "
                                                         f"written: No space left on device")
        filler.unlink()
        third = created(ws)   # room again: the next snapshot has its manifest
        assert third["manifest"] == "blake3"
    finally:
        subprocess.run(["umount", ws.repo], check=True)


def test_delete_and_prune_remove_manifests(ws):
    make_tree(ws.source, files=3)
    ws.write_config(policies={"default": {"keep_last": 1}})
    ids = [created(ws, "--tag", "hourly")["id"] for _ in range(3)]
    assert all(manifest.manifest_path(ws.repo, i).exists() for i in ids)
    ws.ok("delete", ids[0])
    ws.ok("prune")
    assert [manifest.manifest_path(ws.repo, i).exists() for i in ids] == [False, False, True]


@pytest.mark.parametrize("where,expected", [
    ("settings", "settings.manifest: 'md5' is not one of blake3, sha256, off"),
    ("volume", "volumes.data.manifest: 'sha-256' is not one of blake3, sha256, off (did you mean 'sha256'?)"),
])
def test_a_bad_manifest_setting_is_one_line_naming_the_key(ws, where, expected):
    if where == "settings":
        ws.write_config(manifest="md5")
    else:
        ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                                  "manifest": "sha-256"}})
    r = ws.run("snapshot")
    assert (r.returncode, r.stderr) == (78, f"snapmgr: error: {ws.config}: {expected}\n")


def test_sigterm_during_a_groups_first_manifest_keeps_every_record_and_finishes_every_run(ws):
    # Volume a's manifest takes a while (many files); b has its snapshot and record by then.
    sa, sb = ws.root / "srca", ws.root / "srcb"
    sa.mkdir()
    sb.mkdir()
    make_tree(sa, files=60000, size=50)
    (sb / "x").write_bytes(b"hello")
    ws.write_config({"a": {"backend": "rsync", "source": sa, "repository": ws.root / "ra", "manifest": "sha256"},
                     "b": {"backend": "rsync", "source": sb, "repository": ws.root / "rb"}},
                    groups={"g": {"volumes": ["a", "b"]}})
    p = ws.start("snapshot", "--group", "g")
    wait_for(lambda: list((ws.root / "ra").glob("*.manifest.gz.tmp")), timeout=120, what="a's manifest begun")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode != 0
    [a] = ws.ok("--json", "list", "a").json()["snapshots"]
    [b] = ws.ok("--json", "list", "b").json()["snapshots"]
    assert a["manifest"] == "unverified" and b["manifest"] == "unverified"
    assert ws.run("verify", a["id"]).stdout == \
        f"{a['id']}: UNVERIFIABLE: interrupted before its manifest was complete\n"
    assert (ws.root / "rb" / f"{b['id']}.record.json").exists()
    assert not list((ws.root / "ra").glob("*.tmp"))
    with contextlib.closing(sqlite3.connect(ws.root / "state" / "journal.db")) as db:
        assert sorted(db.execute("SELECT volume, status FROM runs")) == [("a", "ok"), ("b", "ok")]
