"""`snapmgr mount --verify`: a stored file whose content no longer matches its manifest
cannot be read through the mount (EIO), and that is logged and journaled; intact files
and snapshots without a manifest are served."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapmgr.journal import Journal
from tests.integration.helpers import make_tree, needs_root, open_paths, pids_of, wait_for
from tests.integration.test_mount import label, mnt, mount, mounted_type, snapshot  # noqa: F401 (mnt: a fixture)
from tests.integration.test_verify import flip_a_byte

pytestmark = needs_root


def test_a_rotten_file_fails_reads_with_eio_and_is_journaled(ws, mnt):
    make_tree(ws.source, files=20, size=5000)
    sid = snapshot(ws)
    flip_a_byte(ws.repo / sid / "d1" / "f0001")
    with mount(ws, mnt, "--verify") as proc:
        via = mnt / "data" / label(sid)
        assert (via / "d2" / "f0002").read_bytes() == (ws.repo / sid / "d2" / "f0002").read_bytes()
        for _ in range(2):  # the verdict is kept: the second open fails as the first did
            with open(via / "d1" / "f0001", "rb") as f, pytest.raises(OSError) as e:
                f.read()
            assert e.value.errno == errno.EIO
        os.stat(via / "d1" / "f0001")  # its metadata is still shown
    [rotten] = [v for v in Journal(ws.root / "state" / "journal.db").latest_verifies() if v.snapshot == sid]
    assert rotten.source == "read" and rotten.result == "damaged"
    assert rotten.detail[0].startswith("/d1/f0001: content does not match the manifest")
    assert f"{sid}: '/d1/f0001': content does not match the manifest" in proc.log
    assert "reads fail with EIO" in proc.log


def test_without_verify_and_without_a_manifest_files_are_served(ws, mnt):
    make_tree(ws.source, files=5)
    ws.write_config(manifest="off")
    unhashed = snapshot(ws)
    with mount(ws, mnt, "--verify"):
        assert (mnt / "data" / label(unhashed) / "d0" / "f0000").read_bytes() == \
            (ws.repo / unhashed / "d0" / "f0000").read_bytes()
    ws.write_config()
    hashed = snapshot(ws)
    flip_a_byte(ws.repo / hashed / "d4" / "f0004")
    with mount(ws, mnt):
        assert (mnt / "data" / label(hashed) / "d4" / "f0004").read_bytes() == \
            (ws.repo / hashed / "d4" / "f0004").read_bytes()


def test_a_daemon_journals_through_a_connection_of_its_own(ws, mnt):
    make_tree(ws.source, files=5, size=5000)
    sid = snapshot(ws)
    flip_a_byte(ws.repo / sid / "d1" / "f0001")
    journal = ws.root / "state" / "journal.db"
    r = ws.run("mount", "--daemon", "--verify", str(mnt))
    try:
        assert r.returncode == 0, r.stderr
        [daemon] = pids_of(Path(sys.executable).name, str(mnt))
        # SQLite connections must not cross a fork: the daemon has opened none yet, though
        # its parent read the journal before forking (every command resumes interrupted windows).
        assert not [path for path in open_paths(daemon) if path.startswith(str(journal))]
        with open(mnt / "data" / label(sid) / "d1" / "f0001", "rb") as f, pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO
        [rotten] = [v for v in Journal(journal).latest_verifies() if v.snapshot == sid]
        assert rotten.source == "read" and rotten.detail[0].startswith("/d1/f0001: content does not match")
        ws.ok("umount", str(mnt))
        wait_for(lambda: not pids_of(Path(sys.executable).name, str(mnt)), what="the daemon to exit")
    finally:
        if mounted_type(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
