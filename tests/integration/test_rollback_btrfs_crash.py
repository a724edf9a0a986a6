"""btrfs rollbacks cut short: each state a killed rollback can leave, made for real on a
btrfs loop device, finished by roll_back(resuming=True); and trials that SIGKILL
`snapmgr rollback --yes` at random points, after which the volume is wholly as it was or
wholly the snapshot, the pre-rollback snapshot intact, and a resume finishes.

The states made by hand are finished by the backend's resume directly; the killed runs by
`snapmgr rollback --resume`, as the journal says they were cut short."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import btrfsutil
import pytest

from snapmgr.backends import mounts
from snapmgr.backends.base import RollbackWay
from snapmgr.backends.btrfs import BtrfsBackend
from snapmgr.backends.directory import exchange
from snapmgr.errors import SnapmgrError
from tests.integration.helpers import Workspace, loop_mount, make_tree, needs_root, tree

pytestmark = needs_root
# The snapshots' own subvolume is one of them; the many make carrying them take a while.
NESTED = ("n1", "deep/n2", ".snapshots", *(f"many/s{i:03d}" for i in range(100)))
TRIALS = 20


@pytest.fixture
def vol(ws, tmp_path):
    """A btrfs volume with nested subvolumes (its snapshots in one), a target snapshot, a
    changed live state and the pre-rollback snapshot of it: what roll_back() starts from."""
    with loop_mount(tmp_path, "btrfs") as mnt:
        live = mnt / "data"
        btrfsutil.create_subvolume(live)
        for path in NESTED:
            (live / path).parent.mkdir(parents=True, exist_ok=True)
            btrfsutil.create_subvolume(live / path)
        (live / "n1" / "x").write_text("nested")
        ws.write_config({"data": {"backend": "btrfs", "subvolume": live, "snapshot_dir": live / ".snapshots"}})
        make_tree(live, files=200)
        ws.ok("snapshot")
        change(live)
        yield Volume(ws, live)


def change(live: Path) -> None:
    """The live state moves on from the target: added, removed, changed."""
    (live / "added").write_text("since")
    (live / "d0" / "f0000").unlink()
    (live / "d1" / "f0001").write_text("changed")


class Volume:
    def __init__(self, ws: Workspace, live: Path):
        self.ws, self.live = ws, live
        self.temporary = live.with_name(".data.rollback")
        self.backend = BtrfsBackend("data", {"subvolume": live, "snapshot_dir": live / ".snapshots"}, ws.root / "run")

    def target(self):
        return min(self.backend.list(), key=lambda s: s.id)

    def own(self, root: Path) -> dict:
        """The volume's own files (what its snapshots hold): not those of nested subvolumes."""
        nested = set(NESTED)
        return {p: v for p, v in tree(root).items() if not any(a in nested for a in (p, *_ancestors(p)))}

    def resume(self, target=None) -> str | None:
        """roll_back(resuming=True), given the target when the snapshots are not listed
        (their subvolume was being carried over when the rollback was killed)."""
        target = target or self.target()
        # btrfs reads what to do from the storage (rollback_way refuses while a swap
        # waits for a remount), so the way here is only a name.
        return self.backend.roll_back(target, RollbackWay("resume"), (), resuming=True)

    def assert_rolled_back(self) -> None:
        assert self.own(self.live) == self.own(self.target().path)
        assert (self.live / "n1" / "x").read_text() == "nested"
        assert not os.path.lexists(self.temporary)
        assert not btrfsutil.get_subvolume_read_only(self.live)


def test_a_swap_cut_short_at_each_step_is_finished(vol):
    target = vol.target()
    ids = [btrfsutil.subvolume_id(vol.live)]
    # Killed right after the writable snapshot was made.
    vol.ws.ok("snapshot")   # the pre-rollback snapshot, of the live subvolume
    btrfsutil.create_snapshot(target.path, vol.temporary)
    with pytest.raises(SnapmgrError, match="was left by a rollback cut short before the swap: resume it"):
        vol.backend.roll_back(target, vol.backend.rollback_way(target, vol.backend.list(), None), (), resuming=False)
    assert vol.resume() is None
    vol.assert_rolled_back()
    # Killed with one nested subvolume moved into the new tree.
    change(vol.live)
    vol.ws.ok("snapshot")
    btrfsutil.create_snapshot(target.path, vol.temporary)
    os.rmdir(vol.temporary / "n1")
    os.rename(vol.live / "n1", vol.temporary / "n1")
    assert vol.resume() is None
    vol.assert_rolled_back()
    # Killed after the swap, before the replaced subvolume was deleted.
    change(vol.live)
    vol.ws.ok("snapshot")
    before = vol.own(vol.live)
    swap_by_hand(vol, target)
    ids.append(btrfsutil.subvolume_id(vol.temporary))
    assert vol.resume() is None
    vol.assert_rolled_back()
    # Killed after all of it: nothing left to do, nothing done again.
    done = btrfsutil.subvolume_id(vol.live)
    assert vol.resume() is None and btrfsutil.subvolume_id(vol.live) == done
    vol.assert_rolled_back()
    # Swapped but not cleaned up, then a new rollback rather than a resume: it finishes the
    # earlier one first.
    change(vol.live)
    vol.ws.ok("snapshot")
    swap_by_hand(vol, target)
    change(vol.live)
    vol.ws.ok("rollback", str(target.id), "--yes")
    vol.assert_rolled_back()
    # Each pre-rollback snapshot holds a replaced subvolume, now deleted.
    assert before in [vol.own(s.path) for s in vol.backend.list()]
    assert not any(btrfsutil.subvolume_id(vol.live.parent / p) in ids for p in os.listdir(vol.live.parent)
                   if btrfsutil.is_subvolume(vol.live.parent / p))


def swap_by_hand(vol: Volume, target) -> None:
    """What a rollback killed right after the swap leaves: the replaced subvolume under
    the temporary name."""
    btrfsutil.create_snapshot(target.path, vol.temporary)
    for path in NESTED:
        os.rmdir(vol.temporary / path)
        os.rename(vol.live / path, vol.temporary / path)
    exchange(vol.live, vol.temporary)


def test_rollbacks_killed_at_random_points_leave_one_state_or_the_other(vol):
    target = vol.target()
    wanted = vol.own(target.path)
    rng = random.Random(int(os.environ.get("SNAPMGR_TRIAL_SEED", "11")))
    # A whole run first, to spread the kills over: over all of it, and over the swap's
    # steps (from the pre-rollback snapshot to the temporary name's going away).
    started = time.monotonic()
    run = vol.ws.start("rollback", str(target.id), "--yes")
    taken = after_the_snapshot(vol, run, {target.id})
    while not os.path.lexists(vol.temporary) and run.poll() is None:
        time.sleep(0.0005)
    while os.path.lexists(vol.temporary) and run.poll() is None:
        time.sleep(0.0005)
    swap = time.monotonic() - taken
    assert run.wait(timeout=120) == 0, run.communicate()
    whole = time.monotonic() - started
    outcomes: dict[str, int] = {}
    for trial in range(TRIALS):
        change(vol.live)
        old = vol.own(vol.live)
        before = {s.id for s in vol.backend.list()}
        run = vol.ws.start("rollback", str(target.id), "--yes")
        if trial % 2:
            time.sleep(rng.uniform(0, whole))
        else:
            after_the_snapshot(vol, run, before)
            time.sleep(rng.uniform(0, swap))
        run.send_signal(signal.SIGKILL)
        run.wait()
        run.stdout.close(), run.stderr.close()
        live = vol.own(vol.live)
        assert live in (old, wanted), f"trial {trial}: a mix"
        where = stage(vol, live == wanted)
        outcomes[where] = outcomes.get(where, 0) + 1
        for path in NESTED:   # each nested subvolume is in the live tree or the new one, never lost
            assert is_subvolume(vol.live / path) or is_subvolume(vol.temporary / path)
        taken = [s for s in vol.backend.list() if s.id not in before]   # found in the new tree too
        assert [vol.own(s.path) for s in taken] in ([], [old])
        # The next run finds the rollback's lock free: then one under way was cut short.
        cut_short = vol.ws.ok("--json", "status").json()["volumes"][0]["rollback"]
        if cut_short is not None:
            assert cut_short["state"] == "cut-short" and cut_short["pre_rollback"] == str(taken[0].id)
            vol.ws.ok("rollback", "--resume", "data", "--yes")
        elif live == old:
            # Killed before it changed anything (perhaps after its pre-rollback snapshot): a rollback from the start.
            assert not os.path.lexists(vol.temporary)
            vol.ws.ok("rollback", str(target.id), "--yes")
        vol.assert_rolled_back()
    print(f"{TRIALS} kills over {whole:.2f} s runs, half of them within {swap:.3f} s of the pre-rollback snapshot: "
          f"{outcomes}")


def after_the_snapshot(vol: Volume, run, before: set) -> float:
    """Once the run's pre-rollback snapshot is listed (or the run has ended): when."""
    while {s.id for s in vol.backend.list()} == before and run.poll() is None:
        time.sleep(0.001)
    return time.monotonic()


def is_subvolume(path: Path) -> bool:
    return os.path.lexists(path) and btrfsutil.is_subvolume(path)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def stage(vol: Volume, rolled_back: bool) -> str:
    """Where a kill left the rollback, for the trials' summary."""
    if not os.path.lexists(vol.temporary):
        return "rolled back" if rolled_back else "not started"
    if rolled_back:
        return "swapped, replaced subvolume not yet deleted"
    carried = sum(is_subvolume(vol.temporary / p) for p in NESTED)
    return f"new tree made, {carried} nested subvolumes carried"


@contextmanager
def mounted_by_name(tmp_path: Path) -> Iterator[tuple[Path, Path, list]]:
    """A btrfs filesystem (its top level mounted) whose subvolume /data is mounted with
    subvol= at tmp_path/live: the top level, that mountpoint, and the argv mounting it."""
    with loop_mount(tmp_path, "btrfs") as mnt:
        btrfsutil.create_subvolume(mnt / "data")
        where = tmp_path / "live"
        where.mkdir()
        device = next(m.source for m in mounts.mounts() if m.mountpoint == mnt)
        mount = ["mount", "-t", "btrfs", "-o", "subvol=/data", device, where]
        subprocess.run(mount, check=True)
        try:
            yield mnt, where, mount
        finally:
            subprocess.run(["umount", where], check=False)


def test_rollbacks_of_a_subvolume_mounted_by_name_killed_at_random_points(ws, tmp_path):
    """The same trials where the subvolume is mounted with subvol=: the swap goes through
    the top level mounted in the run directory, which a kill may leave mounted."""
    with mounted_by_name(tmp_path) as (mnt, where, mount):
        ws.write_config({"data": {"backend": "btrfs", "subvolume": where, "snapshot_dir": mnt / ".snapshots"}})
        make_tree(where, files=200)
        ws.ok("snapshot")
        vol = Volume(ws, where)
        vol.backend = BtrfsBackend("data", {"subvolume": where, "snapshot_dir": mnt / ".snapshots"},
                                   ws.root / "run")
        target = vol.target()
        wanted = vol.own(target.path)
        rng = random.Random(int(os.environ.get("SNAPMGR_TRIAL_SEED", "11")))
        for trial in range(TRIALS // 2):
            change(where)
            old = vol.own(where)
            before = {s.id for s in vol.backend.list()}
            run = ws.start("rollback", str(target.id), "--yes")
            after_the_snapshot(vol, run, before)
            time.sleep(rng.uniform(0, 0.1))
            run.send_signal(signal.SIGKILL)
            run.wait()
            run.stdout.close(), run.stderr.close()
            assert vol.own(where) == old   # the mount shows the replaced subvolume until mounted again
            assert vol.own(mnt / "data") in (old, wanted), f"trial {trial}: a mix"
            taken = [s for s in vol.backend.list() if s.id not in before]
            if taken:
                assert [vol.own(s.path) for s in taken] == [old]
                assert vol.resume(target).startswith(f"at the next mount of {str(where)!r}")
            else:
                ws.ok("rollback", str(target.id), "--yes")
            assert vol.own(mnt / "data") == wanted
            subprocess.run(["umount", where], check=True)
            subprocess.run(mount, check=True)
            assert vol.own(where) == wanted and vol.backend.rollback_pending(target.id) is None
            assert vol.resume(target) is None and not os.path.lexists(mnt / ".data.rollback")
            assert not mounts.below(ws.root / "run")
