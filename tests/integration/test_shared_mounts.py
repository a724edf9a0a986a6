"""snapmgr.backends.shared_mounts: a browse mount used by several processes at once is
built once and taken down by the last one to leave; what a process killed while using it
left is taken down by the next one, never built upon. The mounts here are real tmpfs
(LVM snapshots and ZFS trees are tested in the lab), the other users real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from snapmgr.backends import mounts, shared_mounts
from snapmgr.errors import SnapmgrError
from tests.integration.helpers import REPO, needs_root, wait_for

pytestmark = needs_root


def mounted_below(path: Path) -> list[str]:
    return [str(m.mountpoint) for m in mounts.below(path)]


def build(target: Path) -> None:
    """What the shared mounts of these tests hold: a tmpfs, and another inside it, as a
    ZFS tree has its child datasets inside the first one's snapshot."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    (target / "inner").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target / "inner"], check=True)


def holder(target: Path) -> subprocess.Popen:
    """Another process using the shared mount at `target`, until its stdin closes."""
    script = f"""
import sys
from pathlib import Path
from snapmgr.backends import shared_mounts
from tests.integration.test_shared_mounts import build
target = Path({str(target)!r})
with shared_mounts.used(target, lambda: build(target)):
    print("ready", flush=True)
    sys.stdin.read()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline() == "ready\n"
    return proc


def killed_holder(target: Path) -> None:
    killed = holder(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "mounts" / "data@20261121T140501Z"
    yield path
    for where in reversed(mounted_below(path)):   # whatever a failed test left
        subprocess.run(["umount", "--lazy", where])


def test_a_shared_mount_is_built_once_and_taken_down_by_its_last_user(target):
    built = []

    def counted() -> None:
        built.append(target)
        build(target)

    with shared_mounts.used(target, counted) as root:
        with shared_mounts.used(target, counted):
            assert root == target and mounted_below(target) == [str(target), str(target / "inner")]
        assert len(built) == 1 and mounted_below(target) == [str(target), str(target / "inner")]
        other = holder(target)           # another process joins, and leaves
        other.communicate("")
        assert other.returncode == 0 and len(mounted_below(target)) == 2
        assert shared_mounts.in_place(target.parent, "data@") == [target]
    assert mounted_below(target) == [] and not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name + shared_mounts.GUARD]
    assert shared_mounts.in_place(target.parent, "data@") == []


def test_what_a_killed_user_left_is_taken_down_by_the_next_not_stacked(target):
    killed_holder(target)
    assert mounted_below(target) == [str(target), str(target / "inner")]
    with shared_mounts.used(target, lambda: build(target)):
        assert mounted_below(target) == [str(target), str(target / "inner")]
    assert mounted_below(target) == [] and not target.exists()


def test_release_unused_takes_down_a_killed_users_mount_and_leaves_a_live_one(tmp_path):
    live, dead = (tmp_path / "mounts" / f"data@2026112{i}T140501Z" for i in (1, 2))
    alive = holder(live)
    killed_holder(dead)
    try:
        assert shared_mounts.in_place(tmp_path / "mounts", "data@") == [live, dead]
        assert shared_mounts.release_unused(dead)
        assert not shared_mounts.release_unused(live)
        assert not shared_mounts.release_unused(tmp_path / "mounts" / "never-built")
        assert mounted_below(dead) == [] and not dead.exists()
        assert len(mounted_below(live)) == 2
    finally:
        alive.communicate("")
    assert mounted_below(live) == []


def test_a_build_that_fails_half_way_leaves_nothing_mounted(target):
    def half() -> None:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
        raise OSError("the second mount failed")

    with pytest.raises(OSError, match="second mount"), shared_mounts.used(target, half):
        pass
    assert mounted_below(target) == [] and not target.exists()
    assert not shared_mounts.release_unused(target)   # nothing left to take down


def test_a_take_down_of_its_own_undoes_a_killed_users_build_and_the_last_users(target):
    """An LVM snapshot's take-down deactivates the LV too: it runs for what a killed user
    left, before the mount is built again, and when the last user leaves."""
    taken_down = []

    def take_down() -> None:
        taken_down.append(mounted_below(target))
        shared_mounts.unmount_tree(target)

    killed_holder(target)
    with shared_mounts.used(target, lambda: build(target), take_down):
        assert taken_down == [[str(target), str(target / "inner")]]   # the killed user's
    assert len(taken_down) == 2 and mounted_below(target) == []
    killed_holder(target)
    assert shared_mounts.release_unused(target, take_down) and len(taken_down) == 3


def test_a_mount_built_in_another_mount_namespace_is_not_joined_as_an_empty_directory(target):
    """A hardened systemd unit (PrivateMounts=, ProtectSystem=) has mounts of its own: its
    build is an empty directory here, which a verify would call all missing."""
    script = f"""
import sys
from pathlib import Path
from snapmgr.backends import shared_mounts
from tests.integration.test_shared_mounts import build
target = Path({str(target)!r})
with shared_mounts.used(target, lambda: build(target)):
    print("ready", flush=True)
    sys.stdin.read()
"""
    other = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert other.stdout.readline() == "ready\n" and mounted_below(target) == []   # not seen here
        with pytest.raises(SnapmgrError, match="in use by a snapmgr process in another mount namespace"):
            with shared_mounts.used(target, lambda: build(target)):
                pass
    finally:
        other.communicate("")
    assert other.returncode == 0
    with shared_mounts.used(target, lambda: build(target)):   # once it is done, built here
        assert len(mounted_below(target)) == 2


def test_a_guard_held_too_long_is_an_error_naming_it_not_a_silent_wait(target, monkeypatch):
    monkeypatch.setattr(shared_mounts, "GUARD_TIMEOUT", 0.5)
    target.parent.mkdir(parents=True)
    guard = target.with_name(target.name + shared_mounts.GUARD)
    stuck = subprocess.Popen(["flock", guard, "sleep", "30"])   # as a holder stopped mid-build
    try:
        wait_for(lambda: subprocess.run(["flock", "-n", guard, "true"]).returncode != 0, what="the guard taken")
        with pytest.raises(SnapmgrError, match=f"{guard} is held by another snapmgr process for over 0.5 s"):
            with shared_mounts.used(target, lambda: build(target)):
                pass
    finally:
        stuck.kill()
        stuck.wait()
