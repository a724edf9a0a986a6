"""The rsync backend through the real CLI and real rsync."""

import hashlib
import json
import os
import random
import signal
import subprocess

from tests.integration.helpers import make_tree, needs_root, pids_of, tree, wait_for


def test_snapshot_is_a_faithful_copy_with_metadata(ws):
    make_tree(ws.source)
    (ws.source / "link").symlink_to("d0/f0000")
    os.link(ws.source / "d1" / "f0001", ws.source / "hardlink")
    created = ws.ok("--json", "snapshot", "--tag", "daily").json()["results"][0]["created"]
    snap = ws.repo / created["id"]
    assert tree(snap) == tree(ws.source)
    assert os.stat(snap / "hardlink").st_ino == os.stat(snap / "d1" / "f0001").st_ino  # -H
    meta = json.loads((ws.repo / f"{created['id']}.json").read_text())
    assert meta["volume"] == "data" and meta["id"] == created["id"] and meta["tags"] == ["daily"]
    assert meta["source"] == str(ws.source) and meta["backend"] == "rsync" and meta["link_dest"] is None
    # 51 regular files, but the hardlink's data is sent once
    assert meta["rsync_stats"]["number_of_regular_files_transferred"] == 50
    assert created["tags"] == ["daily"] and created["path"] == str(snap)


def test_unchanged_files_share_inodes_and_changed_files_do_not(ws):
    make_tree(ws.source)
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    (ws.source / "d0" / "f0000").write_bytes(b"changed")
    (ws.source / "new").write_bytes(b"new")
    (ws.source / "d1" / "f0001").unlink()
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    a, b = ws.repo / first, ws.repo / second
    assert os.stat(a / "d2" / "f0002").st_ino == os.stat(b / "d2" / "f0002").st_ino
    assert os.stat(b / "d2" / "f0002").st_nlink == 2
    assert os.stat(a / "d0" / "f0000").st_ino != os.stat(b / "d0" / "f0000").st_ino
    assert (b / "d0" / "f0000").read_bytes() == b"changed" and (a / "d0" / "f0000").read_bytes() != b"changed"
    assert not (b / "d1" / "f0001").exists() and (a / "d1" / "f0001").exists()
    assert tree(b) == tree(ws.source)
    assert json.loads((ws.repo / f"{second}.json").read_text())["link_dest"] == first


def test_excludes(ws):
    make_tree(ws.source, files=10)
    (ws.source / "cache").mkdir()
    (ws.source / "cache" / "big").write_bytes(b"x" * 1000)
    (ws.source / "d0" / "scratch.tmp").write_bytes(b"tmp")
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "exclude": ["*.tmp", "/cache/"]}})
    sid = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    assert not (ws.repo / sid / "cache").exists()
    assert not (ws.repo / sid / "d0" / "scratch.tmp").exists()
    assert (ws.repo / sid / "d0" / "f0000").exists()


@needs_root
def test_one_file_system_stops_at_mount_points(ws):
    make_tree(ws.source, files=5)
    mnt = ws.source / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
    try:
        (mnt / "other-fs").write_text("on tmpfs")
        for one_fs, expected in ((True, False), (False, True)):
            ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                                      "one_file_system": one_fs}})
            sid = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
            assert (ws.repo / sid / "mnt").is_dir()
            assert (ws.repo / sid / "mnt" / "other-fs").exists() is expected
    finally:
        subprocess.run(["umount", mnt], check=True)


def _start_slow_snapshot(ws):
    """A snapshot whose rsync is slowed to 200 KiB/s over 2 MB, caught while it copies."""
    make_tree(ws.source, files=20, size=100_000)
    ws.throttle_rsync(200)
    proc = ws.start("snapshot")
    partial = wait_for(lambda: next(ws.repo.glob("*.partial"), None), what="a .partial directory")
    rsync = wait_for(lambda: pids_of("rsync", str(partial)), what="rsync to start")
    return proc, partial, rsync


def test_killed_rsync_leaves_no_listed_snapshot_and_the_next_run_reuses_it(ws):
    proc, partial, rsync = _start_slow_snapshot(ws)
    for pid in rsync:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "error: volume data: rsync was killed by SIGKILL" in err
    assert partial.is_dir()
    assert ws.snapshots() == []
    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["state"] == "failing" and "killed by SIGKILL" in status["last_error"]

    ws.env["PATH"] = os.environ["PATH"]  # full speed again
    r = ws.ok("-v", "snapshot")
    assert f"reusing the interrupted first copy {partial.name}" in r.stderr
    [sid] = ws.snapshots()
    assert tree(ws.repo / sid) == tree(ws.source)
    assert list(ws.repo.glob("*.partial")) == [] and list(ws.repo.glob("*.json.tmp")) == []
    assert ws.ok("--json", "status").json()["volumes"][0]["state"] == "ok"


def test_interrupted_copy_after_a_good_snapshot_is_replaced_not_reused(ws):
    make_tree(ws.source, files=20, size=100_000)
    [first] = [ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]]
    for changed in ("d0", "d1", "d2"):  # ~1.2 MB to send: seconds at 200 KiB/s; d3, d4 unchanged
        for f in (ws.source / changed).iterdir():
            f.write_bytes(b"changed" * 15_000)
    ws.throttle_rsync(200)
    proc = ws.start("snapshot")
    partial = wait_for(lambda: next(ws.repo.glob("*.partial"), None), what="a .partial directory")
    os.kill(proc.pid, signal.SIGKILL)  # snapmgr itself dies; PDEATHSIG takes rsync down
    proc.communicate(timeout=30)
    wait_for(lambda: not pids_of("rsync", str(partial)), what="rsync to die with snapmgr")
    assert ws.snapshots() == [first]

    ws.env["PATH"] = os.environ["PATH"]
    r = ws.ok("-v", "snapshot")
    assert f"removing an interrupted copy: {partial.name}" in r.stderr
    first_path, second_path = (ws.repo / s for s in ws.snapshots())
    assert os.stat(first_path / "d3" / "f0003").st_ino == os.stat(second_path / "d3" / "f0003").st_ino


def test_sigterm_stops_rsync_and_records_the_failure(ws):
    proc, partial, rsync = _start_slow_snapshot(ws)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and "Z" not in
                             open(f"/proc/{p}/stat").read().split()[2] for p in rsync), what="rsync to exit")
    assert ws.snapshots() == []
    assert "stopped by SIGTERM" in ws.ok("--json", "status").json()["volumes"][0]["last_error"]


def test_vanished_files_are_a_warning_not_a_failure(ws):
    proc, partial, rsync = _start_slow_snapshot(ws)
    (ws.source / "d4" / "f0019").unlink()  # sorted last: not copied yet at 200 KiB/s
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "some files vanished" in err
    [sid] = ws.snapshots()
    assert json.loads((ws.repo / f"{sid}.json").read_text())["warnings"] == [
        "some files vanished during the copy (rsync exit 24)"]


def test_a_second_run_waits_for_the_lock_then_names_the_holder(ws):
    proc, partial, rsync = _start_slow_snapshot(ws)
    ws.write_config(lock_wait="1s")
    r = ws.run("snapshot")
    assert r.returncode == 75
    assert r.stderr.strip() == (f"snapmgr: error: volume data: busy: another snapmgr run "
                                f"(pid {proc.pid}) holds {ws.root}/run/locks/data.lock; gave up after waiting 1s")
    proc.kill()
    proc.communicate()


def test_leftovers_of_interrupted_deletes_and_orphan_metadata_are_cleaned(ws):
    make_tree(ws.source, files=5)
    ws.ok("snapshot")
    (ws.repo / "data@20200101T000000Z.deleting" / "x").mkdir(parents=True)
    (ws.repo / "data@20200101T000001Z.json").write_text("{}")
    (ws.repo / "notes.txt").write_text("not ours")
    assert len(ws.snapshots()) == 1
    ws.ok("snapshot")
    assert not list(ws.repo.glob("data@2020*"))
    assert (ws.repo / "notes.txt").exists()


def test_of_several_leftover_first_copies_the_newest_is_reused(ws):
    make_tree(ws.source, files=5)
    for name in ("data@20200101T000000Z-2.partial", "data@20200101T000000Z-10.partial",
                 "other@20300101T000000Z.partial", "data@20200101T000000Z-10.json.tmp"):
        (ws.repo / name).mkdir(parents=True) if name.endswith(".partial") else (ws.repo / name).write_text("{")
    r = ws.ok("-v", "snapshot")
    assert "reusing the interrupted first copy data@20200101T000000Z-10.partial" in r.stderr
    assert "removing an interrupted copy: data@20200101T000000Z-2.partial" in r.stderr
    assert sorted(p.name for p in ws.repo.iterdir() if "2020" in p.name or "2030" in p.name) == [
        "other@20300101T000000Z.partial"]  # another volume's leftovers are not ours to touch


def test_damaged_metadata_protects_the_snapshot_from_prune(ws):
    make_tree(ws.source, files=3)
    ids = [ws.ok("--json", "snapshot", "--tag", "hourly").json()["results"][0]["created"]["id"] for _ in range(5)]
    (ws.repo / f"{ids[0]}.json").write_text('{"tags": ["man')  # cut short
    (ws.repo / f"{ids[1]}.json").write_text('{"tags": "manual"}')
    (ws.repo / f"{ids[2]}.json").unlink()
    r = ws.ok("--json", "prune")
    assert "metadata unreadable" in r.stderr
    decisions = {d["id"]: d["reason"] for d in r.json()["results"][0]["decisions"]}
    assert decisions[ids[0]] == decisions[ids[1]] == decisions[ids[2]] == "protected (metadata unreadable)"
    assert ws.snapshots() == ids  # keep_last 3 keeps the other two
    ws.ok("snapshot", "--tag", "hourly", "--prune")
    assert ws.snapshots()[:3] == ids[:3] and len(ws.snapshots()) == 6


def _digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_sparse_files_keep_their_holes(ws):
    disk = ws.source / "disk.img"
    with open(disk, "wb") as f:  # 1 GiB, of which 12 KiB of data
        f.truncate(1 << 30)
        f.seek(300 << 20)
        f.write(os.urandom(12 << 10))
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    with open(disk, "r+b") as f:  # changed: the next snapshot copies it again, not links it
        f.seek(700 << 20)
        f.write(os.urandom(4096))
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    for sid in (first, second):
        copy = os.stat(ws.repo / sid / "disk.img")
        assert copy.st_size == 1 << 30 and copy.st_blocks * 512 <= 1 << 20, (sid, copy.st_blocks)
    assert _digest(ws.repo / second / "disk.img") == _digest(disk)


def _deep_tree(root, depth=20) -> None:
    """Directories nested past 4096 bytes, made with openat: no path names them whole."""
    fd = os.open(root, os.O_RDONLY)
    for level in range(depth):
        name = f"{level:02d}" + "x" * 240
        os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    out = os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.close(out)
    os.close(fd)


def test_a_path_too_long_for_rsync_fails_saying_how_to_exclude_it(ws):
    make_tree(ws.source, files=5)
    _deep_tree(ws.source)
    r = ws.run("snapshot")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    message = r.stderr.strip()
    assert message.startswith("snapmgr: error: volume data: a path in the source is longer than rsync can copy "
                              "(4096 bytes); exclude its directory (exclude = [\"/00xxx")
    assert message.endswith("/\"]) or shorten it")
    assert ws.snapshots() == []  # loudly failed, never a silent partial snapshot
    # The advice, followed, works: that directory alone is left out.
    [pattern] = json.loads(message[message.index("exclude = ") + len("exclude = "):message.index("]) or") + 1])
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "exclude": [pattern]}})
    [sid] = [ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]]
    *parents, excluded = pattern.strip("/").split("/")
    assert (ws.repo / sid / "d0" / "f0000").exists() and len(parents) > 10
    fd = os.open(ws.repo / sid, os.O_RDONLY)
    for name in parents:  # each directory down to the excluded one is in the snapshot...
        inner = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    assert excluded not in os.listdir(fd)  # ...and that one is not
    os.close(fd)


def test_quick_check_misses_a_change_that_keeps_size_and_mtime_unless_checksum(ws):
    db = ws.source / "db"
    db.write_bytes(b"A" * 4096)
    kept = os.stat(db)
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]

    def rewrite(content):
        db.write_bytes(content)
        os.utime(db, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    rewrite(b"B" * 4096)
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    assert (ws.repo / second / "db").read_bytes() == b"A" * 4096  # rsync's quick check: same size and mtime
    assert os.stat(ws.repo / second / "db").st_ino == os.stat(ws.repo / first / "db").st_ino
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "checksum": True}})
    third = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    assert (ws.repo / third / "db").read_bytes() == b"B" * 4096


def test_a_repository_inside_its_source_works_once_excluded(ws):
    make_tree(ws.source, files=5)
    repo = ws.source / "var" / ".snapshots"
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": repo}})
    r = ws.run("config", "check")
    assert r.returncode == 78 and f'exclude it (exclude = ["/var/.snapshots/"])' in r.stderr
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": repo,
                              "exclude": ["/var/.snapshots/"]}})
    first, second = (ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"] for _ in range(2))
    assert (repo / second / "var").is_dir() and not (repo / second / "var" / ".snapshots").exists()
    assert os.stat(repo / first / "d0" / "f0000").st_ino == os.stat(repo / second / "d0" / "f0000").st_ino


def test_a_reused_first_copy_drops_what_is_excluded_now(ws):
    make_tree(ws.source, files=5)
    (ws.source / "cache").mkdir()
    (ws.source / "cache" / "big").write_bytes(b"x" * 1000)
    leftover = ws.repo / "data@20200101T000000Z.partial"  # an interrupted copy, made before the exclude
    (leftover / "cache").mkdir(parents=True)
    (leftover / "cache" / "big").write_bytes(b"x" * 1000)
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "exclude": ["/cache/"]}})
    r = ws.ok("-v", "--json", "snapshot")
    assert "reusing the interrupted first copy" in r.stderr
    sid = r.json()["results"][0]["created"]["id"]
    assert (ws.repo / sid / "d0").is_dir() and not (ws.repo / sid / "cache").exists()


def test_a_run_killed_at_any_point_never_blocks_or_breaks_the_next(ws):
    # Killed before, during or after its rsync, each run is followed at once by the next:
    # rsync's helpers, which outlive a killed snapmgr by a moment, must never race the
    # next run's clean-up ("Directory not empty"), and nothing half-made may be listed.
    make_tree(ws.source, files=3000, size=500)
    ws.ok("snapshot")
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    killed = 0
    for _ in range(30):
        proc = ws.start("snapshot", "--tag", "hourly")
        try:
            proc.wait(timeout=rng.uniform(0.05, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            killed += 1
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), f"seed {seed}: exit {proc.returncode}: {err}"
        if proc.returncode == 0:  # it got the lock, so every earlier writer had exited
            assert not pids_of("rsync", str(ws.repo)), f"seed {seed}: an rsync outlived its run"
    assert killed >= 5, f"seed {seed}: the loop killed too few runs to mean anything"
    ws.ok("snapshot")
    assert not pids_of("rsync", str(ws.repo))
    assert list(ws.repo.glob("*.partial")) == [] and list(ws.repo.glob("*.deleting")) == []
    expected = tree(ws.source)
    for sid in ws.snapshots():
        assert tree(ws.repo / sid) == expected, f"seed {seed}: {sid} is not a complete copy"


def test_a_snapshot_that_cannot_be_deleted_now_does_not_keep_the_others_from_prune(ws):
    """As an LVM or ZFS snapshot that a mount or a verify is browsing: here a snapshot
    directory made immutable, which not even root can rename or remove."""
    make_tree(ws.source, files=3)
    ws.write_config(policies={"default": {"keep_last": 1}})
    ids = [ws.ok("--json", "snapshot", "--tag", "hourly").json()["results"][0]["created"]["id"] for _ in range(4)]
    stuck = ws.repo / ids[1]
    subprocess.run(["chattr", "+i", stuck], check=True)
    try:
        r = ws.run("--json", "prune")
        assert r.returncode == 1
        assert r.stderr.startswith(f"snapmgr: error: volume data: 1 of 3 snapshots to prune could not be deleted: "
                                   f"{ids[1]}: ")
        assert sorted(r.json()["results"][0]["deleted"]) == [ids[0], ids[2]] and ws.snapshots() == [ids[1], ids[3]]
    finally:
        subprocess.run(["chattr", "-i", stuck], check=True)
    ws.ok("prune")   # the next prune tries it again
    assert ws.snapshots() == [ids[3]]
