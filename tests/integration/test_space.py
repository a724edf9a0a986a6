"""Space guards on real filesystems: an rsync repository on a small loop-mounted ext4,
btrfs with and without quotas. The floor (min_free) refuses a snapshot before anything is
copied or paused, stops an rsync copy before the repository fills, and status shows the
figures."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.helpers import loop_mount, make_tree, needs_root, pids_of

pytestmark = needs_root
MiB = 1 << 20


@pytest.fixture
def small_repo(tmp_path):
    """A 64 MiB ext4 for the repository; the source stays on the machine's own disk."""
    with loop_mount(tmp_path, "ext4", size_mib=64) as mnt:
        yield mnt


def rsync_volume(ws, repo, **keys) -> dict:
    return {"data": {"backend": "rsync", "source": ws.source, "repository": repo / "snaps", "retention": "default",
                     **keys}}


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def write_files(root, count: int, size: int) -> None:
    """Incompressible files, so that no filesystem stores them smaller than they are."""
    for i in range(count):
        (root / f"big{i:03d}").write_bytes(os.urandom(size))


def last_run_failed_with(ws, text: str) -> dict:
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert status["state"] == "failing" and text in status["last_error"], status
    return status


def test_a_snapshot_below_min_free_is_refused_as_a_failed_run_with_the_figures(ws, small_repo):
    make_tree(ws.source, files=10)
    ws.write_config(rsync_volume(ws, small_repo, min_free="96%"))
    r = ws.run("snapshot")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    st = os.statvfs(small_repo)
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    assert r.stderr.strip() == (f"snapmgr: error: volume data: refusing to snapshot: {small_repo} (ext4) has "
                                f"{free / MiB:.1f}MiB free, below min_free 96% ({size * 0.96 / MiB:.1f}MiB of "
                                f"{size / MiB:.1f}MiB)")
    assert ws.snapshots() == []
    # Nothing was copied: the refusal came before rsync ran.
    assert not (small_repo / "snaps").exists() or list((small_repo / "snaps").iterdir()) == []
    status = last_run_failed_with(ws, "below min_free 96%")
    assert status["space"]["below_min_free"] and status["space"]["min_free_bytes"] == int(size * 0.96)
    assert "BELOW min_free 96%" in ws.ok("status").stdout
    dry = ws.run("snapshot", "--dry-run")
    assert dry.returncode == 1 and "refusing to snapshot: " in dry.stderr

    # A floor the filesystem meets lets the snapshot through, in bytes as in a share.
    ws.write_config(rsync_volume(ws, small_repo, min_free="8M"))
    ws.ok("snapshot")
    assert len(ws.snapshots()) == 1


def test_a_group_with_one_member_below_its_floor_takes_none(ws, small_repo, tmp_path):
    make_tree(ws.source, files=10)
    other = tmp_path / "other"
    other.mkdir()
    make_tree(other, files=5)
    volumes = rsync_volume(ws, small_repo)
    volumes["files"] = {"backend": "rsync", "source": other, "repository": small_repo / "files",
                        "min_free": "99%"}
    ws.write_config(volumes, groups={"app": {"volumes": ["data", "files"]}})
    r = ws.run("--json", "snapshot", "--group", "app")
    assert r.returncode == 1
    results = r.json()["results"]
    assert [x["ok"] for x in results] == [False, False]
    for x in results:
        assert x["error"].startswith("refusing to snapshot group app, none of its volumes is taken")
        assert "volume files: " in x["error"] and "below min_free 99%" in x["error"]
    assert ws.snapshots() == []
    for status in ws.ok("--json", "status").json()["volumes"]:
        assert status["state"] == "failing" and "refusing to snapshot group app" in status["last_error"]


@pytest.mark.parametrize("throttled", [True, False], ids=["watched", "burst"])
def test_a_copy_that_would_fill_the_repository_is_stopped_and_removed(ws, small_repo, throttled):
    # 60 MiB of source into a repository with about 55 MiB free and a floor of 16 MiB:
    # slowed down, the watch stops rsync at the floor; at full speed, rsync may fill the
    # filesystem between two looks and fail with ENOSPC. Either way the run fails with
    # the figures and nothing of the copy is left.
    write_files(ws.source, 60, MiB)
    ws.write_config(rsync_volume(ws, small_repo, min_free="16M"))
    if throttled:
        ws.throttle_rsync(20000)
    before = free_bytes(small_repo)
    r = ws.run("snapshot")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "error: volume data: stopped copying into data@" in r.stderr and ".partial and removed it: " in r.stderr
    assert "min_free 16M" in r.stderr
    if throttled:
        assert f"{small_repo} (ext4) has " in r.stderr and "below min_free 16M (16.0MiB)" in r.stderr
    assert pids_of("rsync", str(small_repo)) == []
    assert os.listdir(small_repo / "snaps") == []          # no .partial, no .deleting, no sidecar
    assert free_bytes(small_repo) >= before - MiB          # the space is back
    assert ws.snapshots() == []
    last_run_failed_with(ws, "stopped copying into")


def test_the_watch_also_guards_the_pass_after_a_prepass(ws, small_repo):
    # With a quiescer, most of the copy is made before the window and the window's pass
    # copies what changed since: here the prepass fits, and the window's pass would not.
    write_files(ws.source, 20, MiB)
    grow = ws.root / "grow.py"
    grow.write_text(f"import os\nfor i in range(40):\n    open({str(ws.source)!r} + f'/late{{i:03d}}', 'wb')"
                    f".write(os.urandom({MiB}))\n")
    volumes = rsync_volume(ws, small_repo, min_free="16M", quiesce=["grow"])
    ws.write_config(volumes, quiesce={"grow": {"kind": "command", "pre": ["python3", str(grow)],
                                               "post": ["true"]}})
    r = ws.run("snapshot")
    assert r.returncode == 1, r.stderr
    assert "stopped copying into" in r.stderr and "min_free 16M" in r.stderr
    assert os.listdir(small_repo / "snaps") == []
    last_run_failed_with(ws, "stopped copying into")


@pytest.fixture
def few_inodes(tmp_path):
    """A tmpfs with room for 40 inodes: creating files there soon fails with ENOSPC."""
    mnt = tmp_path / "few-inodes"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=40", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


@pytest.mark.parametrize("floor", [{}, {"min_free": "1M"}], ids=["no-floor", "min_free"])
def test_a_prepass_that_runs_out_of_space_fails_before_any_service_is_paused(ws, few_inodes, floor):
    # rsync exits 23 when it cannot create files, as when some vanish; a prepass accepts
    # that from a changing source, but not when the repository is full.
    make_tree(ws.source, files=100)
    log = ws.root / "quiesced.log"
    volumes = rsync_volume(ws, few_inodes, quiesce=["app"], **floor)
    ws.write_config(volumes, quiesce={"app": {"kind": "command", "pre": ["touch", str(log)], "post": ["true"]}})
    r = ws.run("snapshot")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "No space left on device" in r.stderr
    assert not log.exists()        # the services were never paused
    assert ws.snapshots() == []
    last_run_failed_with(ws, "No space left on device")


def test_status_shows_what_rsync_snapshots_hold_and_what_is_free(ws, small_repo):
    write_files(ws.source, 4, 256 << 10)          # 1 MiB in all
    ws.write_config(rsync_volume(ws, small_repo, min_free="8M"))
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    (ws.source / "big000").write_bytes(os.urandom(100_000))
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]

    [status] = ws.ok("--json", "status").json()["volumes"]
    space = status["space"]
    assert status["space_error"] is None
    assert space["where"] == f"{small_repo} (ext4)"
    st = os.statvfs(small_repo)
    assert space["size_bytes"] == st.f_blocks * st.f_frsize
    assert abs(space["free_bytes"] - free_bytes(small_repo)) < MiB   # the same df figure, give or take a commit
    # The first copied all of the source, the second only the file that changed.
    assert space["held_bytes"] == MiB + 100_000
    assert (space["min_free"], space["min_free_bytes"], space["below_min_free"]) == ("8M", 8 * MiB, False)
    assert {first, second}   # both exist
    table = ws.ok("status").stdout
    assert "SPACE (HELD; FREE)" in table
    assert f"1.1MiB; {space['free_bytes'] / MiB:.1f}MiB of " in table and f"free in {small_repo} (ext4)" in table


def test_a_prepass_is_counted_in_what_the_snapshot_holds(ws, small_repo):
    write_files(ws.source, 4, 256 << 10)
    ws.write_config(rsync_volume(ws, small_repo, quiesce=["noop"]),
                    quiesce={"noop": {"kind": "command", "pre": ["true"], "post": ["true"]}})
    ws.ok("snapshot")
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert status["space"]["held_bytes"] == MiB


@pytest.fixture
def btrfs(tmp_path):
    with loop_mount(tmp_path, "btrfs", size_mib=256) as mnt:
        subprocess.run(["btrfs", "subvolume", "create", mnt / "data"], check=True, capture_output=True)
        yield mnt


def btrfs_volume(mnt, **keys) -> dict:
    return {"data": {"backend": "btrfs", "subvolume": mnt / "data", "snapshot_dir": mnt / ".snapshots",
                     "retention": "default", **keys}}


def test_btrfs_space_without_quotas_is_the_filesystems_and_a_floor_refuses(ws, btrfs):
    make_tree(btrfs / "data", files=10)
    ws.write_config(btrfs_volume(btrfs))
    ws.ok("snapshot")
    [status] = ws.ok("--json", "status").json()["volumes"]
    space = status["space"]
    st = os.statvfs(btrfs)
    assert space["where"] == f"{btrfs} (btrfs)" and space["size_bytes"] == st.f_blocks * st.f_frsize
    assert 0 < space["free_bytes"] <= space["size_bytes"]
    assert space["held_bytes"] is None and "quotas are off" in space["note"]

    ws.write_config(btrfs_volume(btrfs, min_free="99%"))
    r = ws.run("snapshot")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert f"volume data: refusing to snapshot: {btrfs} (btrfs) has " in r.stderr and "below min_free 99% (" in r.stderr
    assert len(ws.snapshots()) == 1
    last_run_failed_with(ws, "below min_free 99%")


def test_the_floor_needs_the_free_figure_only(ws, btrfs):
    # What the snapshots hold is read with the btrfs program (qgroup show); without it
    # the filesystem's free space is still known, and that is all min_free asks for.
    subprocess.run(["btrfs", "quota", "enable", btrfs], check=True)
    make_tree(btrfs / "data", files=10)
    ws.write_config(btrfs_volume(btrfs, min_free="1M"))
    ws.env["PATH"] = str(ws.root / "no-programs")
    ws.ok("snapshot")
    assert len(ws.snapshots()) == 1
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert "'btrfs' is not installed" in status["space_error"]


def test_status_lists_each_volume_once(ws, small_repo, monkeypatch):
    from snapmgr import config
    from snapmgr.backends.rsync import RsyncBackend
    from snapmgr.engine import Engine

    make_tree(ws.source, files=5)
    volumes = rsync_volume(ws, small_repo, min_free="1M")
    volumes["logs"] = {**volumes["data"], "repository": small_repo / "logs"}
    ws.write_config(volumes)
    ws.ok("snapshot")
    listed = []
    original = RsyncBackend.list
    monkeypatch.setattr(RsyncBackend, "list", lambda self: listed.append(self.volume) or original(self))
    statuses = Engine(config.load(ws.config)).status()
    assert sorted(listed) == ["data", "logs"]
    assert [(s.volume, s.snapshots, s.space.held) for s in statuses] == [("data", 1, 500), ("logs", 1, 500)]


def test_btrfs_with_quotas_shows_what_each_snapshot_alone_holds(ws, btrfs):
    subprocess.run(["btrfs", "quota", "enable", btrfs], check=True)
    ws.write_config(btrfs_volume(btrfs))
    (btrfs / "data" / "a").write_bytes(os.urandom(4 * MiB))
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    # Replaced in the live subvolume: the first snapshot alone keeps the old 4 MiB.
    (btrfs / "data" / "a").unlink()
    (btrfs / "data" / "b").write_bytes(os.urandom(2 * MiB))
    second = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    (btrfs / "data" / "b").unlink()
    subprocess.run(["btrfs", "quota", "rescan", "-w", btrfs], check=True, capture_output=True)

    from snapmgr import config
    from snapmgr.engine import Engine
    from snapmgr.model import SnapshotId
    engine = Engine(config.load(ws.config))
    backend = engine.backend(engine.config.volumes["data"])
    space = backend.space(backend.list())
    each = {str(k): v for k, v in space.held_each.items()}
    assert set(each) == {first, second}
    assert 4 * MiB <= each[first] < 5 * MiB and 2 * MiB <= each[second] < 3 * MiB
    assert space.held == sum(each.values()) and "out of date" not in space.note
    [status] = ws.ok("--json", "status").json()["volumes"]
    assert status["space"]["held_bytes"] == space.held
    assert SnapshotId.parse(first) in space.held_each
