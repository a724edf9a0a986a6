"""`snapmgr restore` on real rsync and btrfs volumes: what is copied keeps every
attribute, nothing is overwritten unasked, --in-place takes a pre-rollback snapshot
first, --dry-run changes nothing, and paths are mapped or refused."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from tests.integration.helpers import needs_root, pids_of, wait_for
from tests.integration.trees import (HOSTILE, SPARSE_SIZE, allocated, fingerprint, rich_tree, snapshot,
                                     volume)  # noqa: F401 (a fixture)

pytestmark = needs_root


def subtree(found: dict[bytes, tuple], prefix: bytes) -> dict[bytes, tuple]:
    return {p: v for p, v in found.items() if p == prefix or p.startswith(prefix + b"/")}


def test_a_copy_keeps_every_attribute(volume, tmp_path):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    dest = tmp_path / "restored"
    out = ws.ok("restore", sid, "docs", "links", "sparse.img", "hostile", "--to", str(dest)).stdout
    assert f"from {sid} into {dest}" in out

    # Modes (setgid too), owners, mtimes, xattrs, the ACL, hardlinks, symlinks, a fifo, hostile names.
    assert fingerprint(dest) == fingerprint(live)
    assert os.stat(dest / "links" / "one").st_ino == os.stat(dest / "links" / "two").st_ino
    assert os.getxattr(dest / "docs" / "acl.txt", "system.posix_acl_access") \
        == os.getxattr(live / "docs" / "acl.txt", "system.posix_acl_access")
    assert os.path.getsize(dest / "sparse.img") == SPARSE_SIZE and allocated(dest / "sparse.img") < SPARSE_SIZE // 8
    assert sorted(os.listdir(os.fsencode(dest / "hostile"))) == sorted(HOSTILE)


def test_one_file_comes_with_the_directories_on_its_way(volume, tmp_path):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    dest = tmp_path / "restored"
    ws.ok("restore", sid, "docs/private/key", "--to", str(dest))
    assert sorted(fingerprint(dest)) == [b"docs", b"docs/private", b"docs/private/key"]
    assert fingerprint(dest)[b"docs/private"] == fingerprint(live)[b"docs/private"]  # mode 2750, group 5678
    assert (dest / "docs" / "private" / "key").read_bytes() == b"secret"


def test_existing_files_are_not_overwritten_unless_asked(volume, tmp_path):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    dest = tmp_path / "restored"
    (dest / "docs").mkdir(parents=True)
    (dest / "docs" / "report.txt").write_bytes(b"mine")
    (dest / "links").write_bytes(b"a file where the snapshot has a directory")
    before = fingerprint(dest)

    r = ws.run("restore", sid, "docs", "links", "--to", str(dest))
    assert r.returncode == 1
    [line] = r.stderr.splitlines()
    assert "refusing to overwrite" in line and "'docs/report.txt'" in line and "'links'" in line
    assert "nothing was copied" in line
    assert fingerprint(dest) == before  # not even the files that did not clash

    ws.ok("restore", sid, "docs", "links", "--to", str(dest), "--overwrite")
    assert fingerprint(dest) == subtree(fingerprint(live), b"docs") | subtree(fingerprint(live), b"links")


def outside_state(found: dict[bytes, tuple]) -> dict[bytes, tuple]:
    """All but snapmgr's own state directory (every command opens the journal)."""
    return {p: v for p, v in found.items() if not p.startswith(b"state")}


def test_dry_run_changes_nothing_and_lists_what_would(volume, tmp_path):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    (live / "docs" / "report.txt").write_bytes(b"edited since")
    dest = tmp_path / "restored"
    before_live, before_tmp = fingerprint(live), outside_state(fingerprint(tmp_path))

    into_dest = ws.ok("restore", "--dry-run", sid, "docs", "--to", str(dest)).stdout
    in_place = ws.ok("restore", "-n", sid, "docs", "--in-place").stdout
    assert fingerprint(live) == before_live and outside_state(fingerprint(tmp_path)) == before_tmp
    assert not dest.exists() and ws.snapshots() == [sid]
    assert ">f+++++++++ docs/report.txt" in into_dest.splitlines()
    assert [line for line in in_place.splitlines() if "report.txt" in line] == [">f.st...... docs/report.txt"]


@pytest.mark.parametrize("dry_run", [False, True], ids=["real", "dry-run"])
def test_a_dest_rsync_could_not_create_is_refused_as_by_a_real_restore(volume, tmp_path, dry_run):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    (tmp_path / "a-file").write_bytes(b"x")
    os.symlink("nowhere", tmp_path / "dangling")
    for dest, message in [
        (tmp_path / "missing" / "dest", f"--to '{tmp_path}/missing/dest': '{tmp_path}/missing' does not exist "
                                        f"(a restore creates DEST, not the directories above it)"),
        (tmp_path / "a-file" / "dest", f"--to '{tmp_path}/a-file/dest': '{tmp_path}/a-file' is not a directory "
                                       f"(a restore creates DEST, not the directories above it)"),
        (tmp_path / "dangling", f"--to '{tmp_path}/dangling' is not a directory"),
    ]:
        r = ws.run("restore", *(["--dry-run"] if dry_run else []), sid, "docs", "--to", str(dest))
        assert (r.returncode, r.stdout, r.stderr) == (1, "", f"snapmgr: error: {message}\n")
    assert not (tmp_path / "missing").exists() and os.readlink(tmp_path / "dangling") == "nowhere"


def test_in_place_takes_a_pre_rollback_snapshot_first(volume):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    (live / "docs" / "report.txt").write_bytes(b"ruined")
    (live / "docs" / "new.txt").write_bytes(b"written after the snapshot")

    done = ws.ok("--json", "restore", sid, "docs/report.txt", "--in-place").json()
    assert (live / "docs" / "report.txt").read_bytes() == b"quarterly figures\n"
    assert (live / "docs" / "new.txt").exists()       # only in the live tree: left alone
    listed = {s["id"]: s for s in ws.ok("--json", "list").json()["snapshots"]}
    pre = done["pre_rollback"]
    assert set(listed) == {sid, pre} and pre > sid and listed[pre]["tags"] == ["pre-rollback"]
    # The pre-rollback snapshot holds the state before the restore.
    ws.ok("restore", pre, "docs/report.txt", "--to", str(ws.root / "before"))
    assert (ws.root / "before" / "docs" / "report.txt").read_bytes() == b"ruined"
    decisions = ws.ok("--json", "prune", "--dry-run").json()["results"][0]["decisions"]
    assert {"id": pre, "keep": True, "reason": "protected (tag pre-rollback)"} in decisions


def test_in_place_delete_removes_only_what_the_snapshot_lacks(volume):
    ws, live = volume
    rich_tree(live)
    # What the snapshots leave out: excluded from the rsync volume; a nested subvolume
    # of the btrfs one (its snapshots show it as an empty directory).
    if os.stat(live).st_ino == 256:
        subprocess.run(["btrfs", "subvolume", "create", live / "cache"], check=True, capture_output=True)
    else:
        (live / "cache").mkdir()
    (live / "cache" / "blob").write_bytes(b"left out on purpose")
    sid = snapshot(ws)
    expected = subtree(fingerprint(live), b"docs")
    (live / "docs" / "stray.txt").write_bytes(b"new")
    os.unlink(live / "docs" / "acl.txt")
    (live / "cache" / "later").write_bytes(b"also left out")

    ws.ok("restore", sid, ".", "--in-place", "--delete")
    assert not (live / "docs" / "stray.txt").exists()
    assert (live / "cache" / "later").exists() and (live / "cache" / "blob").exists()
    assert subtree(fingerprint(live), b"docs") == expected


def test_in_place_never_touches_snapmgrs_own_state_in_the_volume(ws):
    # As by default: the state dir (journal, records) and the run dir on the volume restored.
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "manifest": "off"}},
                    state_dir=ws.source / "var" / "lib" / "snapmgr", run_dir=ws.source / "run" / "snapmgr")
    (ws.source / "file").write_bytes(b"old")
    old = snapshot(ws)
    (ws.source / "file").write_bytes(b"new")
    snapshot(ws)

    out = ws.ok("restore", old, ".", "--in-place", "--delete").stdout
    assert (ws.source / "file").read_bytes() == b"old"
    assert "var/lib/snapmgr" not in out and "run/snapmgr" not in out
    # The journal is the live one, not the snapshot's older copy: it holds every run.
    with sqlite3.connect(ws.source / "var" / "lib" / "snapmgr" / "journal.db") as db:
        runs = db.execute("SELECT action, status FROM runs ORDER BY id").fetchall()
    assert runs == [("snapshot", "ok")] * 3 + [("restore", "ok")]

    for args, place in [(["var/lib/snapmgr/journal.db", "--in-place"], "state directory"),
                        (["run/snapmgr/x", "--in-place"], "run directory"),
                        (["file", "--to", str(ws.source / "var" / "lib" / "snapmgr" / "x")], "state directory")]:
        r = ws.run("restore", old, *args)
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.splitlines()
        assert place in line, line
    assert len(ws.snapshots()) == 3   # refused before any pre-rollback snapshot


def test_a_failed_in_place_restore_names_the_pre_rollback_snapshot(ws):
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "manifest": "off"}})
    (ws.source / "file").write_bytes(b"old")
    old = snapshot(ws)
    (ws.source / "file").write_bytes(b"new")
    subprocess.run(["chattr", "+i", ws.source / "file"], check=True)   # not even root replaces it
    try:
        r = ws.run("restore", old, "file", "--in-place")
    finally:
        subprocess.run(["chattr", "-i", ws.source / "file"], check=True)
    assert r.returncode == 1
    [pre] = [s for s in ws.snapshots() if s != old]
    line = one_line_error(r.stderr)
    assert f"the volume as it was before is in {pre}: snapmgr restore {pre} PATH --in-place puts it back" in line
    with sqlite3.connect(ws.root / "state" / "journal.db") as db:
        [(error,)] = db.execute("SELECT error FROM runs WHERE action = 'restore'").fetchall()
    assert pre in error


def one_line_error(stderr: str) -> str:
    [line] = stderr.splitlines()
    assert line.startswith("snapmgr: error: ")
    return line


@pytest.mark.parametrize("path, message", [
    ("../etc/passwd", "'..' is not allowed"),
    ("docs/../../x", "'..' is not allowed"),
    ("/etc/passwd", "is outside volume data"),
    ("nothing/here", "does not exist in data@"),
    ("links/relative/x", "'links/relative' is a symlink in data@"),
    ("docs/report.txt/x", "'docs/report.txt' is not a directory in data@"),
    ("", "PATH is empty"),
])
def test_bad_paths_are_refused_in_one_line(volume, tmp_path, path, message):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    r = ws.run("restore", sid, path, "--to", str(tmp_path / "restored"))
    assert r.returncode in (1, 2)
    [line] = r.stderr.splitlines()
    assert line.startswith("snapmgr: error: ") and message in line
    assert not (tmp_path / "restored").exists()


def test_an_absolute_path_is_mapped_into_the_volume(volume, tmp_path):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    ws.ok("restore", sid, str(live / "docs" / "report.txt"), f"{live}/./links//one", "--to", str(tmp_path / "r"))
    assert sorted(fingerprint(tmp_path / "r")) == [b"docs", b"docs/report.txt", b"links", b"links/one"]


@pytest.mark.parametrize("args, message", [
    (["data@20200101T000000Z", "docs", "--to", "x"], "no such snapshot: data@20200101T000000Z"),
    (["nope@20200101T000000Z", "docs", "--to", "x"], "unknown volume 'nope'"),
    (["not-an-id", "docs", "--to", "x"], "is not a snapshot id"),
    (["SID", "docs"], "give either --to DEST or --in-place"),
    (["SID", "docs", "--to", "x", "--in-place"], "give either --to DEST or --in-place"),
    (["SID", "docs", "--to", "x", "--delete"], "--delete only goes with --in-place"),
    (["SID", "docs", "--to", "STORAGE/SID/docs"], "where volume data keeps its snapshots"),
])
def test_bad_arguments_are_refused_in_one_line(volume, args, message):
    ws, live = volume
    rich_tree(live)
    sid = snapshot(ws)
    storage = ws.repo if live == ws.source else live.parent / "snaps"
    r = ws.run("restore", *[a.replace("STORAGE", str(storage)).replace("SID", sid) for a in args])
    assert r.returncode in (1, 2), r.stderr
    [line] = r.stderr.splitlines()
    assert message in line
    assert ws.snapshots() == [sid]


def test_in_place_holds_the_volume_lock_and_a_stopped_restore_blocks_nothing(ws):
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "manifest": "off"}})
    big = ws.source / "big.bin"
    big.write_bytes(b"1" * 3_000_000)
    old = snapshot(ws)
    big.write_bytes(b"2" * 3_000_000)
    snapshot(ws)
    ws.throttle_rsync(100)   # the copy back takes half a minute
    proc = ws.start("restore", old, "big.bin", "--in-place")
    wait_for(lambda: pids_of("rsync", f"{ws.repo / old}/./big.bin"), what="the restoring rsync to start")

    busy = ws.run("snapshot")   # a timer's run meanwhile
    assert busy.returncode == 75 and "busy" in busy.stderr
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "snapmgr: error: stopped by SIGTERM"
    assert big.read_bytes() == b"2" * 3_000_000     # rsync renames a whole file into place, or nothing
    # What a stopped rsync leaves: its temporary file, never a half-written big.bin.
    assert all(n.startswith(".big.bin.") for n in os.listdir(ws.source) if n != "big.bin")
    pre = [s["id"] for s in ws.ok("--json", "list").json()["snapshots"] if s["tags"] == ["pre-rollback"]]
    assert len(pre) == 1   # taken before anything was copied: it stays

    ws.env["PATH"] = os.environ["PATH"]
    ws.ok("restore", old, "big.bin", "--in-place")
    assert big.read_bytes() == b"1" * 3_000_000


def test_in_place_with_delete_never_touches_where_another_volume_keeps_its_snapshots(ws):
    # Volume b keeps its snapshots inside a's source, which a's snapshots do not leave out.
    inner = ws.source / "b-repo"
    other = ws.root / "b-source"
    other.mkdir()
    (other / "f").write_text("b's")
    ws.write_config({"a": {"backend": "rsync", "source": ws.source, "repository": ws.repo},
                     "b": {"backend": "rsync", "source": other, "repository": inner}})
    (ws.source / "x").write_text("a's")
    old = ws.ok("--json", "snapshot", "a").json()["results"][0]["created"]["id"]
    ws.ok("snapshot", "b")
    [b_snapshot] = ws.snapshots("b")
    ws.ok("restore", old, str(ws.source), "--in-place", "--delete")
    assert ws.snapshots("b") == [b_snapshot] and (inner / b_snapshot / "f").read_text() == "b's"
