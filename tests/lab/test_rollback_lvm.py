"""snapmgr rollback of LVM volumes on real thick and thin LVs: a thick one merges the
snapshot (now, or at the next activation when the origin cannot be let go of), a thin one
puts a thin snapshot of the target in the volume's place, keeping every snapshot."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from snapmgr import config, rollback
from snapmgr.backends import lvm_rollback
from snapmgr.engine import Engine
from snapmgr.errors import Interrupted
from snapmgr.model import SnapshotId
from tests.integration.helpers import pids_of, wait_for
from tests.lab.conftest import VG, LogicalVolume, lv_report, lvm_volume, sh
from tests.lab.test_lvm import backend_of

MERGE_WAIT = 120   # seconds a merge of a few MiB may take in the emulated guest, at most


@pytest.fixture
def tidy(host):
    """Removes the snapshots of volume `data`, whatever their origin has become, before
    the LV fixtures remove the LVs (it is set up after them, so torn down before)."""
    yield
    for row in lv_report(host, "@snapmgr.volume.data"):
        sh(host, "lvremove", "-y", f"{VG}/{row['lv_name']}")


def files(lv: LogicalVolume) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in lv.mountpoint.iterdir() if p.is_file()}


def change(lv: LogicalVolume) -> None:
    lv.write("a", b"two")
    (lv.mountpoint / "b").unlink()
    lv.write("c", b"new")


def snapshot_then_change(ws, lv: LogicalVolume) -> str:
    lv.write("a", b"one")
    lv.write("b", b"keep")
    ws.ok("snapshot", "data")
    [target] = ws.snapshots()
    change(lv)
    return target


def all_lv_names(host) -> set[str]:
    out = sh(host, "lvs", "-a", "--noheadings", "-o", "lv_name", VG)
    return {line.strip().strip("[]") for line in out.splitlines()}


def lv_of(ws, snapshot_id: str) -> str:
    return next(s.meta["lv"] for s in backend_of(ws).list() if str(s.id) == snapshot_id).split("/")[1]


def test_thick_rollback_merges_now_consumes_the_target_and_the_pre_rollback_snapshot_undoes_it(host, ws, thick_lv,
                                                                                                tidy):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="32M")})
    sh(host, "mount", "-o", "remount,noatime", thick_lv.mountpoint)
    target = snapshot_then_change(ws, thick_lv)
    target_lv = lv_of(ws, target)
    before = files(thick_lv)

    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert plan["takes_effect"] == "now" and f"{target} is consumed by the merge" in plan["method"]
    assert files(thick_lv) == before and target_lv in all_lv_names(host)

    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert files(thick_lv) == {"a": b"one", "b": b"keep"}
    mount = host.mount_point(str(thick_lv.mountpoint))
    assert mount.exists and "noatime" in mount.options     # mounted again as it was
    assert target_lv not in all_lv_names(host)          # consumed
    safety = done["pre_rollback"]
    assert ws.snapshots() == [safety]
    assert backend_of(ws).rollback_pending(SnapshotId.parse(target)) is None

    # The pre-rollback snapshot is thick too: the rollback to it merges it.
    ws.ok("--json", "rollback", safety, "--yes")
    assert files(thick_lv) == before
    assert len(ws.snapshots()) == 1 and safety not in ws.snapshots()
    assert host.mount_point(str(thick_lv.mountpoint)).exists


def test_thick_rollback_refused_when_the_pre_rollback_snapshot_could_not_hold_the_merge(host, ws, thick_lv, tidy):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="48M")})
    ws.ok("snapshot", "data")
    [target] = ws.snapshots()
    thick_lv.write("big", b"\xab" * (24 << 20))    # the target's store now holds 24 MiB the merge writes back
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="8M")})
    ws.ok("snapshot", "data")                      # a newer one with 8 MiB of room
    [_, newer] = ws.snapshots()

    r = ws.run("rollback", target, "--yes")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "would be invalidated; set snapshot_size to at least" in r.stderr and "nothing was changed" in r.stderr
    assert ws.snapshots() == [target, newer] and (thick_lv.mountpoint / "big").exists()

    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="48M")})
    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    [fate] = plan["newer"]
    assert fate["snapshot"] == newer and fate["fate"].startswith("at risk: the merge copies up to")


def test_thick_rollback_deferred_while_the_origin_is_busy_then_completed_by_hand(host, ws, thick_lv, tidy):
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="32M")})
    target = snapshot_then_change(ws, thick_lv)
    backend = backend_of(ws)
    [snapshot] = backend.list()
    before = files(thick_lv)
    # A process whose working directory is on the volume keeps it from being unmounted.
    blocker = subprocess.Popen(["sleep", "600"], cwd=thick_lv.mountpoint)
    try:
        ws.ok("rollback", target, "--yes")
        assert files(thick_lv) == before                      # not merged yet
        pending = backend.rollback_pending(snapshot.id)
        assert pending.startswith(f"merge pending: {snapshot.meta['lv']} is merged into {thick_lv.path} at its next "
                                  f"activation")
        r = ws.run("snapshot", "data")
        assert r.returncode == 1 and "a snapshot is being merged into it" in r.stderr
    finally:
        blocker.kill()
        blocker.wait()

    sh(host, "umount", thick_lv.mountpoint)
    sh(host, "lvchange", "--refresh", thick_lv.path)
    deadline = time.monotonic() + MERGE_WAIT
    while backend.rollback_pending(snapshot.id) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    sh(host, "mount", f"/dev/{thick_lv.path}", thick_lv.mountpoint)
    assert backend.rollback_pending(snapshot.id) is None
    assert files(thick_lv) == {"a": b"one", "b": b"keep"}
    assert snapshot.meta["lv"].split("/")[1] not in all_lv_names(host)
    ws.ok("snapshot", "data")                                 # snapshots work again


def test_thick_rollback_stopped_once_the_merge_has_begun_is_resumed(host, ws, thick_lv, tidy):
    # A service, whose quiescer writes "pre" and "post" to a log: never started again
    # while the volume is off its mountpoint.
    log = ws.root / "services"
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="48M") | {"quiesce": ["app"]}},
                    quiesce={"app": {"kind": "command", **{
                        phase: [sys.executable, "-c", f"open({str(log)!r}, 'a').write({phase + chr(10)!r})"]
                        for phase in ("pre", "post")}}})
    target = snapshot_then_change(ws, thick_lv)
    log.unlink()
    thick_lv.write("big", b"\xcd" * (24 << 20))   # a merge that lasts beyond lvconvert's first look at it
    target_lv = lv_of(ws, target)
    proc = ws.start("rollback", target, "--yes")
    # Stopped while lvconvert waits for the merge it began, the volume unmounted.
    wait_for(lambda: pids_of("lvconvert", target_lv), timeout=120, what="the rollback's lvconvert --merge")
    wait_for(lambda: lv_report(host, thick_lv.path)[0]["lv_attr"][0] == "O", timeout=120, what="the merge to begin")
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "the rollback was cut short" in err, err
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"]["state"] == "cut-short"
    assert not host.mount_point(str(thick_lv.mountpoint)).exists
    assert log.read_text().split() == ["pre"] and f"{thick_lv.mountpoint}' is not mounted" in err, err

    plan = ws.ok("rollback", "--resume", "data", "--dry-run").stdout
    assert f"it finishes the rollback to {target} begun at" in plan and "is finished" in plan
    done = ws.ok("--json", "rollback", "--resume", "data", "--yes").json()
    assert files(thick_lv) == {"a": b"one", "b": b"keep"} and host.mount_point(str(thick_lv.mountpoint)).exists
    assert log.read_text().split()[-1] == "post"   # started again once it was mounted
    assert target_lv not in all_lv_names(host) and ws.snapshots() == [done["pre_rollback"]]
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"] is None
    ws.ok("snapshot", "data")                                 # snapshots work again


def test_thin_rollback_keeps_every_snapshot_and_is_undone_by_another(host, ws, thin_lv, tidy):
    ws.write_config({"data": lvm_volume(thin_lv)})
    sh(host, "lvchange", "--addtag", "owner.web", thin_lv.path)
    sh(host, "lvchange", "--setautoactivation", "n", thin_lv.path)
    target = snapshot_then_change(ws, thin_lv)
    ws.ok("snapshot", "data")
    before = files(thin_lv)

    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert plan["takes_effect"] == "now" and "every snapshot is kept" in plan["method"]
    assert [n["fate"] for n in plan["newer"]] == ["kept"]

    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert files(thin_lv) == {"a": b"one", "b": b"keep"}
    safety = done["pre_rollback"]
    assert len(ws.snapshots()) == 3 and {target, safety} <= set(ws.snapshots())
    [row] = lv_report(host, thin_lv.path)
    assert row["origin"] == lv_of(ws, target)
    assert row["lv_attr"][4] == "a" and row["lv_attr"][9] != "k"   # active, and not skipped at boot
    assert row["lv_tags"] == "owner.web"
    assert sh(host, "lvs", "--noheadings", "-o", "lv_autoactivation", thin_lv.path).strip() == ""
    assert not [n for n in all_lv_names(host) if "_rb_" in n]
    assert host.mount_point(str(thin_lv.mountpoint)).exists

    ws.ok("rollback", safety, "--yes")
    assert files(thin_lv) == before
    assert len(ws.snapshots()) == 4 and {target, safety} <= set(ws.snapshots())
    # Every snapshot still shows what it held.
    with backend_of(ws).browse_root(next(s for s in backend_of(ws).list() if str(s.id) == target)) as root:
        assert (root / "a").read_bytes() == b"one"


def test_thin_rollback_cut_short_after_the_rename_is_reported_and_resumed(host, ws, thin_lv, tidy, monkeypatch):
    ws.write_config({"data": lvm_volume(thin_lv)})
    target = snapshot_then_change(ws, thin_lv)
    real = lvm_rollback.lvm

    def killed_at_lvcreate(argv, timeout):
        # A kill -9 cannot be aimed between two LVM commands: stop as it would, before the lvcreate.
        if argv[0] == "lvcreate":
            raise KeyboardInterrupt
        return real(argv, timeout)

    monkeypatch.setattr(lvm_rollback, "lvm", killed_at_lvcreate)
    with pytest.raises(Interrupted, match="the rollback was cut short"):
        rollback.rollback(Engine(config.load(ws.config)), target, False, lambda plan: True)
    monkeypatch.undo()
    assert thin_lv.name not in all_lv_names(host) and not host.mount_point(str(thin_lv.mountpoint)).exists

    r = ws.run("snapshot", "data")
    [error] = [line for line in r.stderr.splitlines() if line.startswith("snapmgr: error:")]
    assert r.returncode == 1 and f"a rollback was cut short after renaming it to {VG}/{thin_lv.name}_rb_" in error
    [pre] = set(ws.snapshots()) - {target}

    plan = ws.ok("rollback", "--resume", "data", "--dry-run").stdout
    assert f"it finishes the rollback to {target} begun at" in plan and "takes the place of" in plan
    done = ws.ok("--json", "rollback", "--resume", "data", "--yes").json()
    assert done["pre_rollback"] == pre and done["before_resume"] is None   # unmounted: nothing new to keep
    assert files(thin_lv) == {"a": b"one", "b": b"keep"} and host.mount_point(str(thin_lv.mountpoint)).exists
    assert not [n for n in all_lv_names(host) if "_rb_" in n]
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"] is None
    assert set(ws.snapshots()) == {target, pre}
