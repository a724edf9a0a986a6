"""`snapmgr diff` on real rsync and btrfs volumes: every flag, between two snapshots and
against the live volume, from manifests and by walking, hostile names kept to one line."""

from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path

import pytest

from snapmgr import config, diff
from snapmgr.diff import Side, differences
from snapmgr.engine import Engine
from snapmgr.errors import SnapmgrError
from snapmgr.manifest import load, save, scan
from tests.integration.helpers import in_one_second, loop_mount, needs_root
from tests.integration.trees import ACL, snapshot, volume  # noqa: F401 (a fixture)

pytestmark = needs_root

# Each change below, and the line diff prints for it.
EXPECTED = {
    "+..... /added": "added",
    "-..... /removed": "removed",
    "c..... /same-size-same-mtime": "rewritten, size and mtime set back",
    "c....m /grown": "appended to",
    ".p.... /mode": "chmod",
    "..u... /owner": "chown",
    "...g.. /group": "chgrp",
    "....x. /xattr": "a new xattr",
    ".p..x. /acl": "a new ACL (its mask and others entries are the mode's group and other bits)",
    ".....m /touched": "touched",
    "c..... /link": "pointed elsewhere (a target of the same length, the old mtime)",
    "t..... /file-to-dir": "a file became a directory",
}


def before(root: Path) -> None:
    for name in ("removed", "same-size-same-mtime", "grown", "mode", "owner", "group", "xattr", "acl", "touched",
                 "file-to-dir", "unchanged"):
        (root / name).write_bytes(b"original content\n")
        os.utime(root / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    os.symlink("target-one", root / "link")
    os.utime(root / "link", ns=(1_700_000_000_000_000_000,) * 2, follow_symlinks=False)
    os.utime(root, ns=(1_700_000_000_000_000_000,) * 2)


def change(root: Path) -> None:
    (root / "added").write_bytes(b"new")
    (root / "removed").unlink()
    (root / "same-size-same-mtime").write_bytes(b"ORIGINAL CONTENT\n")
    os.utime(root / "same-size-same-mtime", ns=(1_700_000_000_000_000_000,) * 2)
    with open(root / "grown", "ab") as f:
        f.write(b"more\n")
    os.chmod(root / "mode", 0o600)
    os.chown(root / "owner", 1234, -1)
    os.chown(root / "group", -1, 5678)
    os.setxattr(root / "xattr", "user.note", b"hello")
    os.setxattr(root / "acl", "system.posix_acl_access", ACL)
    os.utime(root / "touched", ns=(1_800_000_000_000_000_000,) * 2)
    (root / "link").unlink()
    os.symlink("target-two", root / "link")
    os.utime(root / "link", ns=(1_700_000_000_000_000_000,) * 2, follow_symlinks=False)
    (root / "file-to-dir").unlink()
    (root / "file-to-dir").mkdir()
    os.utime(root / "file-to-dir", ns=(1_700_000_000_000_000_000,) * 2)
    os.utime(root, ns=(1_700_000_000_000_000_000,) * 2)
    for name in ("mode", "owner", "group", "xattr", "acl"):   # chmod & co. leave the mtime alone
        assert os.stat(root / name).st_mtime_ns == 1_700_000_000_000_000_000


def lines(ws, *args) -> list[str]:
    return ws.ok("diff", *args).stdout.splitlines()


def record_manifests(ws, *ids: str) -> None:
    """Manifests as a snapshot run records them: scanned from the snapshot itself."""
    engine = Engine(config.load(ws.config))
    backend = engine.backend(engine.config.volumes["data"])
    listed = {str(s.id): s for s in backend.list()}
    for sid in ids:
        with backend.browse_root(listed[sid]) as root:
            save(backend.records_dir(engine.config.settings.state_dir), sid, "blake3", scan(root, "blake3"))


@pytest.mark.parametrize("manifests", [False, True], ids=["walk", "manifests"])
def test_every_flag_between_two_snapshots(volume, manifests):
    ws, live = volume
    before(live)
    first = snapshot(ws)
    change(live)
    second = snapshot(ws)
    if manifests:
        record_manifests(ws, first, second)
    result = ws.ok("--json", "diff", first, second).json()
    assert result["method"] == ("manifests" if manifests else "walk")
    assert sorted(lines(ws, first, second)) == sorted(EXPECTED)
    assert {c["path"]: c["flags"] for c in result["changes"]} == {k[8:]: k[:6] for k in EXPECTED}
    # And the other way round: what was added is removed.
    backwards = lines(ws, second, first)
    assert "-..... /added" in backwards and "+..... /removed" in backwards


def test_manifests_recorded_by_the_snapshot_runs_are_used(ws):
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "manifest": "blake3"}})
    before(ws.source)
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    change(ws.source)
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    result = ws.ok("--json", "diff", first, second).json()
    assert result["method"] == "manifests" and result["hashed"] == 0
    # rsync's quick check kept the rewrite that kept size and mtime out of the snapshot.
    assert sorted(lines(ws, first, second)) == sorted(set(EXPECTED) - {"c..... /same-size-same-mtime"})


def test_against_the_live_volume(volume):
    ws, live = volume
    before(live)
    sid = snapshot(ws)
    assert ws.ok("diff", sid, "live").stdout.strip() == f"no changes from {sid} to live"
    change(live)
    assert sorted(lines(ws, sid, "live")) == sorted(EXPECTED)


def test_one_snapshot_with_a_manifest_and_live(volume):
    ws, live = volume
    before(live)
    sid = snapshot(ws)
    record_manifests(ws, sid)
    change(live)
    assert sorted(lines(ws, sid, "live")) == sorted(EXPECTED)


def test_unchanged_files_are_not_read(volume):
    ws, live = volume
    before(live)
    for i in range(50):
        (live / f"many-{i}").write_bytes(b"x" * 100)
    time.sleep(3.1)   # past the racy margin: a file written as a snapshot is taken is read by a diff from it
    first = snapshot(ws)
    (live / "many-7").write_bytes(b"y" * 100)   # same size: must be read to be told apart
    second = snapshot(ws)
    result = ws.ok("--json", "diff", first, second).json()
    assert [c["path"] for c in result["changes"] if c["flags"].startswith("c")] == ["many-7"]
    # Only the rewritten file: every other one is the same inode on both sides.
    assert result["hashed"] == 2
    quick = ws.ok("--json", "diff", "--quick", first, second).json()
    assert quick["hashed"] == 0 and "c" not in {c["flags"][0] for c in quick["changes"]}


def test_a_file_rewritten_in_the_tick_its_snapshot_was_taken_is_read_not_trusted(tmp_path):
    """ext4 with 128-byte inodes keeps timestamps to the second: rewritten in place in the
    second its snapshot was taken, size and mtime set back, a file keeps inode and ctime
    too. Only the racy-clean margin makes the walk read it."""
    sid, records = "data@20261124T000000Z", tmp_path / "records"
    with loop_mount(tmp_path, "ext4", size_mib=32, mkfs_args=("-I", "128")) as live:
        f = live / "db"
        for _ in in_one_second():
            f.write_bytes(b"A" * 4096)
            taken = time.time()
            save(records, sid, "blake3", scan(live, "blake3"))   # the snapshot's manifest
            [old] = [e for e in load(records, sid).entries() if e.path == b"db"]
            f.write_bytes(b"B" * 4096)
            os.utime(f, ns=(old.mtime_ns, old.mtime_ns))
            st = f.stat()
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (old.ino, old.size, old.mtime_ns,
                                                                           old.ctime_ns):
                break   # the rewrite shows in nothing but the content
        result = differences(Side(sid, load(records, sid), None, taken), Side("live", None, live, None), b"",
                             "blake3", quick=False)
    assert [(c.path, c.status, c.what) for c in result.changes] == [(b"db", "changed", frozenset({"content"}))]
    assert (result.method, result.hashed) == ("walk", 1)


def test_path_limits_to_a_subtree(volume):
    ws, live = volume
    (live / "a" / "inner").mkdir(parents=True)
    (live / "b").mkdir()
    sid = snapshot(ws)
    (live / "a" / "inner" / "new").write_bytes(b"1")
    (live / "b" / "new").write_bytes(b"2")
    assert lines(ws, sid, "live", "a/inner") == [".....m /a/inner", "+..... /a/inner/new"]
    assert lines(ws, sid, "live", str(live / "b" / "new")) == ["+..... /b/new"]
    r = ws.run("diff", sid, "live", "nowhere")
    assert r.returncode == 1 and r.stderr.strip().endswith(f"'nowhere' exists neither in {sid} nor in live")


def test_hostile_names_stay_on_one_line_each(volume):
    ws, live = volume
    sid = snapshot(ws)
    names = [b"new\nline", b"caf\xe9", b"-rf", b"tab\there", b"\x1b[31mred", b"back\\slash", b"a\\nb"]
    for name in names:
        with open(os.fsencode(live) + b"/" + name, "wb") as f:
            f.write(b"x")
    out = lines(ws, sid, "live")
    assert sorted(out[1:]) == sorted(["+..... /new\\nline", "+..... /caf\\xe9", "+..... /-rf", "+..... /tab\\there",
                                      "+..... /\\x1b[31mred", "+..... /back\\\\slash", "+..... /a\\\\nb"])
    assert all(line.isprintable() for line in out)
    result = ws.ok("--json", "diff", "--", sid, "live", "-rf").json()   # as for any command
    assert [c["path"] for c in result["changes"]] == ["-rf"]


@pytest.mark.parametrize("args, message", [
    (["SID", "data@20200101T000000Z"], "no such snapshot: data@20200101T000000Z"),
    (["SID", "other@20200101T000000Z"], "unknown volume 'other'"),
    (["SID", "yesterday"], "'yesterday' is not a snapshot id"),
    (["SID", "live", "../x"], "'..' is not allowed"),
    (["SID", "live", "/etc"], "is outside volume data"),
])
def test_bad_arguments_are_one_line(volume, args, message):
    ws, live = volume
    sid = snapshot(ws)
    r = ws.run("diff", *[sid if a == "SID" else a for a in args])
    assert r.returncode in (1, 2)
    [line] = r.stderr.splitlines()
    assert message in line


def test_snapshots_of_two_volumes_are_refused(ws, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo},
                     "other": {"backend": "rsync", "source": other, "repository": tmp_path / "repo2"}})
    a = ws.ok("--json", "snapshot", "data").json()["results"][0]["created"]["id"]
    b = ws.ok("--json", "snapshot", "other").json()["results"][0]["created"]["id"]
    r = ws.run("diff", a, b)
    assert r.returncode == 2 and "snapshots of different volumes" in r.stderr


def test_live_leaves_out_what_snapshots_leave_out(volume):
    ws, live = volume
    # Excluded from the rsync volume; a nested subvolume of the btrfs one (other filesystem).
    if os.stat(live).st_ino == 256:
        subprocess.run(["btrfs", "subvolume", "create", live / "cache"], check=True, capture_output=True)
    else:
        (live / "cache").mkdir()
    (live / "cache" / "blob").write_bytes(b"left out")
    (live / "kept.tmp").write_bytes(b"kept")
    sid = snapshot(ws)
    (live / "cache" / "more").write_bytes(b"also left out")
    (live / "kept.tmp").write_bytes(b"changed")
    changed = {c["path"] for c in ws.ok("--json", "diff", sid, "live").json()["changes"]}
    assert "kept.tmp" in changed and not any(p.startswith("cache/") for p in changed)


def test_between_rsync_snapshots_one_inode_is_one_content_though_its_ctime_moved(ws):
    """Each new snapshot hardlinks the unchanged files, and every link moves their ctime
    past what an older manifest recorded: the inode number alone must still count."""
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "manifest": "off"}})
    for i in range(20):
        (ws.source / f"f{i}").write_bytes(b"same size")
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    record_manifests(ws, first)
    (ws.source / "f3").write_bytes(b"SAME SIZE")
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    result = ws.ok("--json", "diff", first, second).json()
    assert [(c["flags"], c["path"]) for c in result["changes"]] == [("c....m", "f3")]
    assert result["hashed"] == 1   # the new f3: the old one's hash is in the manifest


@pytest.mark.parametrize("moving", [True, False])
def test_a_live_file_deleted_between_the_walk_and_its_reading(tmp_path, monkeypatch, moving):
    """On a live volume whose services run (new_moving), a file can go after the walk listed
    it: it is left uncompared by content rather than failing the whole comparison. Where
    nothing is expected to move, the same is an error naming the file. (The deletion is
    made to fall between the two steps, where a running service would put it by chance.)"""
    sid, records, live = "data@20261124T000000Z", tmp_path / "records", tmp_path / "live"
    live.mkdir()
    for name in ("kept", "doomed"):
        (live / name).write_bytes(b"1")
    save(records, sid, "blake3", scan(live, "blake3"))
    for name in ("kept", "doomed"):
        (live / name).write_bytes(b"2")   # the same size: only reading tells the change
        os.utime(live / name, ns=(0, 0))  # and an mtime of its own, whatever the clock's tick
    real = diff.hash_many

    def deleting_first(jobs, algorithm):
        (live / "doomed").unlink()
        return real(jobs, algorithm)
    monkeypatch.setattr(diff, "hash_many", deleting_first)
    compared = functools.partial(differences, Side(sid, load(records, sid), None, time.time()),
                                 Side("live", None, live, None), b"", "blake3", quick=False, new_moving=moving)
    if not moving:
        with pytest.raises(SnapmgrError, match=r"^cannot compare 'doomed' in live: "):
            compared()
        return
    changes = {c.path: (c.status, c.what) for c in compared().changes}
    assert changes[b"kept"][1] >= {"content"} and "content" not in changes[b"doomed"][1], changes
