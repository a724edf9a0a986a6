"""btrfs rollbacks after an earlier one, on a real btrfs loop device: the undo of a rollback
cut short before its swap (a rollback to its pre-rollback snapshot, which puts the nested
subvolumes it carried back first), and a subvolume mounted with subvol= written to while
the mount still showed the subvolume a rollback replaced (kept, not deleted)."""

from __future__ import annotations

import os
import subprocess

import btrfsutil

from snapmgr.backends import mounts
from snapmgr.journal import Journal
from tests.integration.helpers import make_tree, needs_root, tree
from tests.integration.test_rollback_btrfs_crash import (NESTED, Volume, change, is_subvolume,  # noqa: F401
                                                         mounted_by_name, vol)

pytestmark = needs_root


def cut_short_before_the_swap(vol: Volume, target) -> str:
    """What a rollback to `target` killed while carrying the nested subvolumes leaves: the
    new tree, two of them in it (the snapshots' own one too), and the journal's record of
    a rollback cut short, with its pre-rollback snapshot (returned)."""
    vol.ws.ok("snapshot")
    pre = str(max(s.id for s in vol.backend.list()))
    btrfsutil.create_snapshot(target.path, vol.temporary)
    for path in ("n1", ".snapshots"):
        os.rmdir(vol.temporary / path)
        os.rename(vol.live / path, vol.temporary / path)
    journal = Journal(vol.ws.root / "state" / "journal.db")
    with journal.run("data", "rollback", os.getpid()) as run:
        record = journal.rollback_begun(run, "data", str(target.id), "swap", None)
        journal.rollback_moved(record, "rolling-back", run=run, pre_rollback=pre)
        journal.rollback_moved(record, "cut-short", "killed")
    return pre


def rollback_state(vol: Volume):
    return vol.ws.ok("--json", "status").json()["volumes"][0]["rollback"]


def test_a_rollback_cut_short_before_its_swap_is_undone_by_one_to_its_pre_rollback_snapshot(vol):
    target = vol.target()
    pre = cut_short_before_the_swap(vol, target)
    before = vol.own(vol.live)
    # The same rollback again, not resumed, is refused as changing nothing: the cut-short
    # record stays the one told of.
    refused = vol.ws.run("rollback", str(target.id), "--yes")
    assert refused.returncode == 1 and "was left by a rollback cut short before the swap" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert rollback_state(vol)["state"] == "cut-short" and rollback_state(vol)["pre_rollback"] == pre
    vol.ws.ok("rollback", pre, "--yes")
    assert vol.own(vol.live) == before
    assert (vol.live / "n1" / "x").read_text() == "nested"
    assert all(is_subvolume(vol.live / path) for path in NESTED)
    assert not os.path.lexists(vol.temporary)
    assert rollback_state(vol) is None
    # And the volume rolls back as ever afterwards.
    vol.ws.ok("rollback", str(target.id), "--yes")
    vol.assert_rolled_back()


def test_a_replaced_subvolume_written_to_while_still_mounted_is_kept(ws, tmp_path):
    with mounted_by_name(tmp_path) as (mnt, where, mount):
        replaced = mnt / ".data.rollback"
        ws.write_config({"data": {"backend": "btrfs", "subvolume": where, "snapshot_dir": mnt / ".snapshots"}})
        make_tree(where, files=20)
        ws.ok("snapshot")
        [target] = ws.snapshots()

        def rolled_back_then_mounted_again(written: bool) -> None:
            change(where)
            ws.ok("rollback", target, "--yes")
            assert mounts.mounted_at(where) is not None and os.path.lexists(replaced)
            tree(where)   # read (atimes) whether written to or not
            if written:   # the services, started again, write to what the mount shows
                (where / "late").write_text("kept")
            subprocess.run(["umount", where], check=True)
            subprocess.run(mount, check=True)

        # Not written to after the swap, only read: the next rollback deletes it.
        rolled_back_then_mounted_again(written=False)
        # The reads alone moved its ctransid past its pre-rollback snapshot's transaction.
        btrfsutil.sync(replaced)
        pre = btrfsutil.subvolume_info(mnt / ".snapshots" / ws.snapshots()[-1])
        assert btrfsutil.subvolume_info(replaced).ctransid > pre.otransid
        first = btrfsutil.subvolume_id(replaced)
        rolled_back_then_mounted_again(written=True)
        assert btrfsutil.subvolume_id(replaced) != first
        # Written to: the next rollback refuses, keeping it, and changes nothing.
        change(where)
        live = btrfsutil.subvolume_id(where)
        refused = ws.run("rollback", target, "--yes")
        assert refused.returncode == 1 and "was written to after its pre-rollback snapshot" in refused.stderr
        assert "'/.data.rollback'" in refused.stderr.splitlines()[-1] and "Traceback" not in refused.stderr
        assert (replaced / "late").read_text() == "kept"
        assert btrfsutil.subvolume_id(where) == live and (where / "added").exists()
        assert ws.ok("--json", "status").json()["volumes"][0]["rollback"] is None   # nothing to resume
        # Once it is dealt with as told, rollbacks go on.
        btrfsutil.delete_subvolume(replaced)
        ws.ok("rollback", target, "--yes")
