"""`snapmgr versions` on real rsync and btrfs volumes: a file's distinct versions across
many snapshots, newest first, also once it is deleted; by manifest or by reading."""

from __future__ import annotations

import os
import time

import pytest
from blake3 import blake3

from snapmgr.manifest import hash_file
from snapmgr.versions import Reader
from tests.integration.helpers import in_one_second, loop_mount, needs_root
from tests.integration.test_diff import record_manifests
from tests.integration.trees import snapshot, volume  # noqa: F401 (a fixture)

pytestmark = needs_root


def write(path, content: bytes, mtime_s: int) -> None:
    path.write_bytes(content)
    os.utime(path, (mtime_s, mtime_s))


@pytest.mark.parametrize("manifests", [False, True], ids=["read", "manifests"])
def test_versions_are_deduplicated_newest_first(volume, manifests):
    ws, live = volume
    f = live / "notes.txt"
    taken = []
    # Eight snapshots, three contents: A A B B B A' C C, where A' is A again with a new mtime.
    for content, mtime in [(b"A", 1000), (b"A", 1000), (b"B", 2000), (b"B", 2000), (b"B", 2000), (b"A", 3000),
                           (b"C!", 4000), (b"C!", 4000)]:
        write(f, content, mtime)
        taken.append(snapshot(ws))
    if manifests:
        record_manifests(ws, *taken)

    result = ws.ok("--json", "versions", str(f)).json()
    assert result["volume"] == "data" and result["path"] == "notes.txt"
    got = [(v["size"], v["snapshots"], v["current"]) for v in result["versions"]]
    newest_first = taken[::-1]
    # A and A' are one content: one version, held by the old snapshots and the one after B.
    assert got == [(2, newest_first[:2], True), (1, [newest_first[2], *newest_first[-2:]], False),
                   (1, newest_first[3:6], False)]
    assert result["live"]["size"] == 2

    text = ws.ok("versions", str(f)).stdout.splitlines()
    assert text[0] == "3 version(s) of /notes.txt in volume data"
    assert "(= live)" in text[2] and text[2].startswith("1 ")


def test_a_deleted_file_still_has_its_versions(volume, monkeypatch):
    ws, live = volume
    (live / "dir").mkdir()
    write(live / "dir" / "gone.txt", b"first", 1000)
    first = snapshot(ws)
    write(live / "dir" / "gone.txt", b"second", 2000)
    second = snapshot(ws)
    (live / "dir" / "gone.txt").unlink()
    snapshot(ws)
    monkeypatch.chdir(live / "dir")   # a relative PATH is relative to the current directory
    result = ws.ok("--json", "versions", "gone.txt").json()
    assert result["live"] is None
    assert [v["snapshots"] for v in result["versions"]] == [[second], [first]]
    assert "deleted from the live volume" in ws.ok("versions", "gone.txt").stdout.splitlines()[0]


def test_a_symlink_has_versions_by_target(volume):
    ws, live = volume
    os.symlink("one", live / "link")
    first = snapshot(ws)
    second = snapshot(ws)
    (live / "link").unlink()
    os.symlink("two", live / "link")
    third = snapshot(ws)
    result = ws.ok("--json", "versions", str(live / "link")).json()
    assert [(v["target"], v["snapshots"]) for v in result["versions"]] == [("two", [third]), ("one", [second, first])]


def test_no_versions_and_refusals(volume):
    ws, live = volume
    (live / "dir").mkdir()
    snapshot(ws)
    (live / "new.txt").write_bytes(b"not yet in a snapshot")
    assert ws.ok("versions", str(live / "new.txt")).stdout.strip() \
        == "no versions of /new.txt in volume data: no snapshot holds it"
    assert ws.ok("versions", str(live / "never")).stdout.strip() \
        == "no versions of /never in volume data: no snapshot holds it (nor does the live volume)"
    for path, message in [(str(live / "dir"), "is a directory"), ("/etc/passwd", "is in no configured volume"),
                          (str(live), "is the root of volume data")]:
        r = ws.run("versions", path)
        assert r.returncode == 2
        [line] = r.stderr.splitlines()
        assert message in line


def test_a_file_rewritten_in_the_tick_an_older_state_was_taken_is_read_again(tmp_path):
    """ext4 with 128-byte inodes keeps timestamps to the second. The reader goes from the
    newest state to older ones; a file rewritten in the second an older state was taken,
    size and mtime set back, shows the same inode and ctime in both: only the
    racy-clean margin makes the reader hash it again instead of taking the newer hash."""
    with loop_mount(tmp_path, "ext4", size_mib=32, mkfs_args=("-I", "128")) as root:
        f = root / "db"
        for _ in in_one_second():
            f.write_bytes(b"B" * 4096)
            os.utime(f, ns=(10**18, 10**18))
            before = f.stat()
            reader = Reader("blake3", shares_inodes=False)
            newer = reader.state(root, b"db", "live")
            f.write_bytes(b"A" * 4096)             # the older state, as it was when taken
            os.utime(f, ns=(10**18, 10**18))
            older = reader.state(root, b"db", "data@x", taken=time.time())
            st = f.stat()
            if (st.st_ino, st.st_ctime_ns) == (before.st_ino, before.st_ctime_ns):
                break   # the two states differ in nothing but the content
        assert older.content == hash_file(f, "blake3")
        assert newer.content == blake3(b"B" * 4096).hexdigest() != older.content
