"""snapmgr rollback of rsync volumes: the plan, the dry run, the question, the protected
pre-rollback snapshot that undoes it, what the snapshots leave out kept, and the services
stopped for the whole of it (command quiescers here; systemd units in the lab)."""

from __future__ import annotations

import json
import os
import pty
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapmgr.backends.changes import fine_ctimes
from tests.integration.helpers import Workspace, loop_mount, make_tree, needs_root, pids_of, wait_for

QUIESCE_LOG = "quiesce.log"


def rsync_volume(ws: Workspace, quiescers: dict | None = None) -> None:
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "exclude": ["cache/"],
                              "quiesce": list(quiescers or ())}}, quiesce=quiescers)


def state(ws: Workspace) -> dict[str, str]:
    return {str(p.relative_to(ws.source)): p.read_text() for p in sorted(ws.source.rglob("*")) if p.is_file()}


def snapshot_then_change(ws: Workspace) -> str:
    (ws.source / "cache").mkdir()
    for name, text in {"a": "one", "b": "keep", "cache/x": "cached"}.items():
        (ws.source / name).write_text(text)
    ws.ok("snapshot")
    [target] = ws.snapshots()
    (ws.source / "a").write_text("two")
    (ws.source / "b").unlink()
    (ws.source / "c").write_text("new")
    (ws.source / "cache" / "x").write_text("cached later")
    return target


def test_a_rollback_puts_the_volume_back_keeps_what_snapshots_leave_out_and_is_undone_by_another(ws):
    rsync_volume(ws)
    target = snapshot_then_change(ws)
    before = state(ws)
    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert state(ws) == {"a": "one", "b": "keep", "cache/x": "cached later"}   # the excluded cache is kept
    # Verified against the snapshot's manifest: the two files the copy wrote ('a', rewritten
    # the same size, and 'b', brought back), by content.
    assert done["check"] == (f"the volume matches {target}: every entry by its metadata, and by content each "
                             f"file written since it was taken (2 read, against its manifest)") and done["matches"]
    assert done["dry_run"] is False
    safety = done["pre_rollback"]
    snapshots = ws.ok("--json", "list").json()["snapshots"]
    listed = {s["id"]: s["tags"] for s in snapshots}
    assert listed == {target: ["manual"], safety: ["pre-rollback"]}
    # Its manifest, written once the services ran again.
    assert {s["id"]: s["manifest"] for s in snapshots}[safety] == "blake3"
    # The pre-rollback snapshot undoes it; that rollback takes one of its own.
    again = ws.ok("--json", "rollback", safety, "--yes").json()
    assert state(ws) == before and again["check"].startswith(f"the volume matches {safety}: ") and again["matches"]
    assert len(ws.snapshots()) == 3
    runs = ws.ok("--json", "status").json()["volumes"][0]
    assert runs["last_error"] is None


def test_a_directory_made_since_to_hold_what_the_snapshots_leave_out_is_kept_and_no_difference(ws):
    rsync_volume(ws)
    target = snapshot_then_change(ws)
    (ws.source / "new" / "cache").mkdir(parents=True)
    (ws.source / "new" / "cache" / "x").write_text("left out of every snapshot")
    (ws.source / "new" / "other").write_text("not left out")
    done = ws.ok("--json", "rollback", target, "--yes").json()
    assert state(ws) == {"a": "one", "b": "keep", "cache/x": "cached later",
                         "new/cache/x": "left out of every snapshot"}
    assert done["matches"], done["check"]


def test_a_directory_holding_what_the_snapshots_leave_out_where_the_target_has_a_file_is_refused(ws):
    rsync_volume(ws)
    make_tree(ws.source / "bulk", files=100)
    target = snapshot_then_change(ws)
    (ws.source / "a").unlink()
    (ws.source / "a" / "cache").mkdir(parents=True)
    (ws.source / "a" / "cache" / "x").write_text("left out of every snapshot")
    before = state(ws)
    r = ws.run("rollback", target, "--yes")
    error = r.stderr.splitlines()[-1]   # after the plan
    assert r.returncode == 1 and error.startswith("snapmgr: error: 'a' is a directory holding 'a/cache', which the "
                                                  "rollback keeps") and error.endswith("nothing was changed")
    assert state(ws) == before


def test_snapmgrs_own_directories_inside_the_source_are_neither_rolled_back_nor_checked(ws):
    # A source holding snapmgr's state (as source = "/" does): its journal, written while
    # the volume rolls back, is kept as it is and is no difference.
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo}},
                    state_dir=ws.source / "state")
    make_tree(ws.source / "bulk", files=100)   # so that the copy lists the few names apart
    target = snapshot_then_change(ws)
    (ws.source / "state" / "made-since").write_text("not in the target")
    r = ws.ok("-vv", "--json", "rollback", target, "--yes")
    done = r.json()
    assert "the copy lists the " in r.stderr
    assert done["matches"] and done["check"].endswith("snapmgr's own directories, which no rollback changes, "
                                                      "left out: 'state'")
    assert (ws.source / "state" / "journal.db").exists() and (ws.source / "a").read_text() == "one"
    assert (ws.source / "state" / "made-since").exists()


@pytest.mark.parametrize("manifest", ["blake3", "off"])
def test_the_check_reads_what_was_written_since_and_finds_a_rewrite_the_copy_skipped(ws, manifest):
    """rsync skips a file whose size and mtime match the snapshot's (its quick check); the
    check reads every file written since the snapshot, so a rewrite that kept both (its
    mtime set back, as `touch -r` and archivers do) is found, against the manifest or,
    without one, the snapshot's own file; and the command fails, the rollback done."""
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "manifest": manifest}})
    (ws.source / "same").write_text("one")
    ws.ok("snapshot")
    [target] = ws.snapshots()
    then = os.stat(ws.source / "same")
    (ws.source / "same").write_text("two")
    os.utime(ws.source / "same", ns=(then.st_atime_ns, then.st_mtime_ns))
    r = ws.run("--json", "rollback", target, "--yes")
    done = r.json()
    # Without a manifest, the snapshot's file is read too.
    against = "1 read, against its manifest" if manifest != "off" else "2 read, against its files"
    assert r.returncode == 1 and done["matches"] is False and done["pre_rollback"]
    assert done["check"] == (f"the volume DIFFERS from {target} in 1 entry (snapmgr diff {target} live lists "
                             f"them), compared by metadata, and by content each file written since it was taken "
                             f"({against})")
    assert (ws.source / "same").read_text() == "two"
    assert ws.ok("diff", target, "live").stdout == "c..... /same\n"


def test_a_dry_run_shows_the_plan_and_changes_nothing(ws):
    rsync_volume(ws)
    target = snapshot_then_change(ws)
    ws.ok("snapshot")
    before, snapshots = state(ws), ws.snapshots()
    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    assert state(ws) == before and ws.snapshots() == snapshots and plan["pre_rollback"] is None
    assert (plan["losses"]["added"], plan["losses"]["removed"]) == (1, 1)
    assert "+ 'c'" in plan["losses"]["shown"] and "- 'b'" in plan["losses"]["shown"]
    assert plan["newer"] == [{"snapshot": snapshots[1], "fate": "kept"}] and plan["services"] == []
    text = ws.ok("rollback", target, "--dry-run").stdout
    assert text.startswith("dry run, nothing changed:\nroll data back to " + target) and "pre-rollback" in text


def test_off_a_terminal_it_asks_for_yes_and_on_one_it_asks(ws):
    rsync_volume(ws)
    target = snapshot_then_change(ws)
    before = state(ws)
    refused = ws.run("rollback", target)
    assert refused.returncode == 2 and "off a terminal, --yes says to go ahead" in refused.stderr
    assert state(ws) == before and ws.snapshots() == [target]
    assert "not confirmed: nothing was changed" in answered(ws, ["rollback", target], "n")
    assert state(ws) == before and ws.snapshots() == [target]
    shown = answered(ws, ["rollback", target], "y")
    assert "roll data back to" in shown and "roll back? [y/N]" in shown
    assert state(ws)["a"] == "one" and len(ws.snapshots()) == 2


def answered(ws: Workspace, args: list[str], answer: str) -> str:
    """Run snapmgr with stdin and stderr on a terminal, answering its question."""
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(ws.command(*args), stdin=follower, stdout=subprocess.PIPE, stderr=follower, env=ws.env)
        os.write(leader, answer.encode() + b"\n")
        p.wait(timeout=60)
    finally:
        os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return shown.decode()


def test_the_services_are_stopped_for_the_whole_rollback_and_told_it_is_one(ws):
    log = ws.root / QUIESCE_LOG
    probe = ("import json, os, sys; open(sys.argv[1], 'a').write(json.dumps([os.environ['SNAPMGR_ACTION'], "
             "os.environ['SNAPMGR_PHASE'], open(sys.argv[2]).read(), sorted(os.listdir(sys.argv[3]))]) + '\\n')")
    step = [sys.executable, "-c", probe, str(log), str(ws.source / "a"), str(ws.repo)]
    rsync_volume(ws, {"app": {"kind": "command", "pre": step, "post": step}})
    target = snapshot_then_change(ws)
    log.unlink()
    plan = ws.ok("--json", "rollback", target, "--dry-run").json()
    [services] = plan["services"]
    assert services.startswith(f"app: run {sys.executable} -c ") and ", then " in services
    done = ws.ok("--json", "rollback", target, "--yes").json()
    pre, post = (json.loads(line) for line in log.read_text().splitlines())
    # Stopped before the pre-rollback snapshot was taken, started once the volume was back;
    # its prepass ran before they stopped (its partial copy was there), as for any quiesced snapshot.
    assert pre[:3] == ["rollback", "pre", "two"] and done["pre_rollback"] not in pre[3]
    assert f"{done['pre_rollback']}.partial" in pre[3]
    assert post[:3] == ["rollback", "post", "one"] and done["pre_rollback"] in post[3]
    # Taken with the services stopped: as good as a quiesced snapshot.
    grades = {s["id"]: s["grade"] for s in ws.ok("--json", "list").json()["snapshots"]}
    assert grades[done["pre_rollback"]] == "application"


@needs_root
@pytest.mark.parametrize("stamps", ["fine", "whole seconds"])
def test_what_the_services_change_once_started_again_is_left_out_of_the_check_and_nothing_else(ws, tmp_path, stamps):
    """Where ctimes are finer than a second, the volume is compared with the snapshot once
    the services run again, leaving out what they changed since (as the volume listed
    when they started shows); where they keep whole seconds, while the services still
    wait. Either way a difference the rollback left is found."""
    # ext4 keeps whole seconds in 128-byte inodes.
    with loop_mount(tmp_path, "ext4", mkfs_args=("-I", "256" if stamps == "fine" else "128")) as mnt:
        ws.source = mnt / "src"
        ws.source.mkdir()
        assert fine_ctimes(ws.source) == (stamps == "fine")
        # Started after the rollback, the service rewrites one file, makes another and
        # deletes a third, all in the directory that holds the difference the rollback leaves.
        service = ("import os, sys; d = sys.argv[1]; os.environ['SNAPMGR_ACTION'] == 'rollback' and ["
                   "open(os.path.join(d, 'a'), 'w').write('service'), open(os.path.join(d, 'd'), 'w').write('new'), "
                   "os.remove(os.path.join(d, 'b'))]")
        rsync_volume(ws, {"app": {"kind": "command", "pre": ["true"],
                                  "post": [sys.executable, "-c", service, str(ws.source)]}})
        (ws.source / "same").write_text("one")
        target = snapshot_then_change(ws)
        # Of another size: in the snapshot's second, the copy would skip a rewrite that kept it.
        (ws.source / "a").write_text("twenty")
        # Rewritten keeping its size and mtime: the copy skips it, the check finds it.
        then = os.stat(ws.source / "same")
        (ws.source / "same").write_text("two")
        os.utime(ws.source / "same", ns=(then.st_atime_ns, then.st_mtime_ns))
        r = ws.run("--json", "rollback", target, "--yes")
        done = r.json()
        assert state(ws) == {"a": "service", "cache/x": "cached later", "d": "new", "same": "two"}
        assert r.returncode == 1 and done["matches"] is False
        assert done["check"].startswith(f"the volume DIFFERS from {target} in 1 entry "), done["check"]
        # 'a', 'b' and 'd', and the directory that holds them.
        left_out = "; 4 entries the services changed once they ran again left out"
        assert done["check"].endswith(left_out) == (stamps == "fine"), done["check"]


def test_a_snapshot_taken_while_the_question_waits_makes_the_rollback_refuse(ws):
    rsync_volume(ws)
    target = snapshot_then_change(ws)
    before = state(ws)
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(ws.command("rollback", target), stdin=follower, stdout=subprocess.PIPE,
                             stderr=follower, env=ws.env)
        shown = b""
        while b"roll back?" not in shown:
            shown += os.read(leader, 65536)
        ws.ok("snapshot")   # the plan shown no longer says what becomes of every newer snapshot
        os.write(leader, b"y\n")
        p.wait(timeout=60)
        shown += os.read(leader, 65536)
    finally:
        os.close(follower)
        os.close(leader)
    assert p.returncode == 1 and b"changed while the plan was shown" in shown, shown
    assert state(ws) == before and len(ws.snapshots()) == 2


def test_a_database_quiescer_needs_a_systemd_one_to_stop_its_server(ws):
    db = ws.source / "app.db"
    sqlite3.connect(db).close()
    rsync_volume(ws, {"db": {"kind": "sqlite", "databases": [str(db)]}})
    target = snapshot_then_change(ws)
    before = state(ws)
    refused = ws.run("rollback", target, "--yes")
    assert refused.returncode != 0 and "quiescer db (sqlite) of volume data cannot keep its server off the files " \
        "a rollback replaces: add a systemd quiescer" in refused.stderr, refused.stderr
    assert state(ws) == before and ws.snapshots() == [target]


def slow_rollback(ws: Workspace, log: Path) -> tuple[str, dict, dict]:
    """A volume with a command quiescer whose pre and post write "pre" and "post" to `log`,
    a snapshot, then a change whose copy back takes half a minute: (the snapshot, the
    volume as it is, as the snapshot holds it)."""
    big = ws.source / "big.bin"
    rsync_volume(ws, {"app": {"kind": "command", **{
        phase: [sys.executable, "-c", f"open({str(log)!r}, 'a').write({phase + chr(10)!r})"]
        for phase in ("pre", "post")}}})
    big.write_bytes(b"1" * 3_000_000)
    (ws.source / "a-gone").write_text("deleted since")
    ws.ok("snapshot")
    [target] = ws.snapshots()
    then = state(ws)
    big.write_bytes(b"3" * 3_000_000)
    (ws.source / "a-gone").unlink()
    ws.ok("snapshot")   # so that the pre-rollback snapshot links big.bin instead of copying it
    ws.throttle_rsync(100)
    return target, state(ws), then


def services(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_a_rollback_stopped_mid_copy_is_told_of_until_resumed_and_the_services_are_back_meanwhile(ws):
    log = ws.root / "services"
    target, before, then = slow_rollback(ws, log)
    proc = ws.start("rollback", target, "--yes")
    wait_for(lambda: pids_of("rsync", f"{ws.repo / target}/./"), timeout=60, what="the rollback's rsync to start")
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped by SIGTERM; the rollback was cut short" in err, err
    pre = err.rsplit("snapmgr rollback ", 1)[1].split(" puts the volume back")[0]
    assert services(log)[-2:] == ["pre", "post"]   # the services are back
    assert [s["tags"] for s in ws.ok("--json", "list").json()["snapshots"] if s["id"] == pre] == [["pre-rollback"]]
    ws.env["PATH"] = os.environ["PATH"]
    # Every run tells of it; the check is critical; status shows it; prune keeps the target.
    told = ws.ok("list")
    assert f"the rollback to {target} begun at" in told.stderr and "snapmgr rollback --resume data" in told.stderr
    check = ws.run("check")
    assert check.returncode == 2 and f"rollback to {target}" in check.stdout and "cut short" in check.stdout
    status = ws.ok("--json", "status").json()["volumes"][0]["rollback"]
    assert status["state"] == "cut-short" and status["target"] == target and status["pre_rollback"] == pre
    # What settles it cannot be deleted meanwhile.
    kept = ws.run("delete", target)
    assert kept.returncode == 1 and "is what settles the rollback to" in kept.stderr and target in ws.snapshots()
    # A snapshot of the volume meanwhile holds a mix: degraded, saying why.
    ws.ok("snapshot")
    [mixed] = [s for s in ws.ok("--json", "list").json()["snapshots"] if s["grade"] == "degraded"]
    assert f"taken while the rollback to {target} was cut short" in mixed["consistency"]["degraded"][0]
    # A resume refused before it changed anything leaves the rollback cut short.
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(60)", str(ws.source / "a-gone")],
                              stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"open\n"
        refused = ws.run("rollback", "--resume", "data", "--yes")
    finally:
        writer.kill()
        writer.wait()
    assert refused.returncode == 1 and "is still written by" in refused.stderr, refused.stderr
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"]["state"] == "cut-short"
    # The resume: no new pre-rollback snapshot; the volume is the target; nothing is told any more.
    plan = ws.ok("rollback", "--resume", "data", "--dry-run").stdout
    assert f"it finishes the rollback to {target} begun at" in plan and "(what was written since the cut" in plan
    log.unlink()
    (ws.source / "written-since-the-cut").write_text("kept")   # by the services the watchdog started again
    done = ws.ok("--json", "rollback", "--resume", "data", "--yes").json()
    assert done["pre_rollback"] == pre and done["resumes"] and services(log) == ["pre", "post"]
    assert state(ws) == then and len(ws.snapshots()) == 5
    kept = {s["id"]: s["path"] for s in ws.ok("--json", "list").json()["snapshots"]}[done["before_resume"]]
    assert (Path(kept) / "written-since-the-cut").read_text() == "kept"
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"] is None
    # The newest snapshot (the resume's own, of the volume as the cut left it) is degraded: a warning, no more.
    after = ws.run("check")
    assert after.returncode == 1 and "rollback --resume" not in after.stdout and "cut short" not in ws.ok("list").stderr
    # ... and undone by the pre-rollback snapshot, as a finished rollback is.
    ws.ok("rollback", pre, "--yes")
    assert state(ws) == before
    assert ws.run("rollback", "--resume", "data", "--yes").stderr.strip() == \
        "snapmgr: error: volume data has no rollback cut short to resume"


@needs_root
def test_services_are_not_started_again_over_a_volume_a_rollback_killed_took_off_its_mountpoint(ws):
    """An LVM merge or a ZFS swap takes the volume off its mountpoint; killed then, the
    watchdog would start the services on the bare directory underneath, where what they
    write vanishes once the volume is mounted over it. Here the volume (a tmpfs) goes
    away mid-copy, then snapmgr is killed: the services wait until it is mounted again."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", ws.source], check=True)
    try:
        log = ws.root / "services"
        target, _, _ = slow_rollback(ws, log)
        plan = ws.ok("--json", "rollback", target, "--dry-run").json()
        assert plan["services"][-1] == f"mounted: the services start again only once {ws.source} is mounted again"
        log.unlink()
        proc = ws.start("rollback", target, "--yes")
        copying = wait_for(lambda: pids_of("rsync", f"{ws.repo / target}/./"), timeout=60,
                           what="the rollback's rsync to start")
        subprocess.run(["umount", "--lazy", ws.source], check=True)
        for pid in (proc.pid, *copying):   # its rsync too, which would hold the volume's lock a while
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not pids_of(os.path.basename(sys.executable), "snapmgr.quiesce.watchdog"),
                 what="the watchdog to finish")
        assert services(log) == ["pre"]
        held = ws.run("recover")
        assert f"'{ws.source}' is not mounted" in held.stdout + held.stderr and "not resumed until then: app" in \
            held.stdout + held.stderr, held
        assert services(log) == ["pre"]
        # A try the gate held back is no try: the very next run, whatever it is, tries again.
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", ws.source], check=True)
        ws.run("list")
        assert services(log) == ["pre", "post"]
    finally:
        while os.path.ismount(ws.source):
            subprocess.run(["umount", "--lazy", ws.source], check=True)


def test_a_rollback_cut_short_is_settled_by_rolling_back_to_its_pre_rollback_snapshot(ws):
    target, before, _ = slow_rollback(ws, ws.root / "services")
    proc = ws.start("--json", "rollback", target, "--yes")
    wait_for(lambda: pids_of("rsync", f"{ws.repo / target}/./"), timeout=60, what="the rollback's rsync to start")
    proc.terminate()
    proc.communicate(timeout=60)
    ws.env["PATH"] = os.environ["PATH"]
    [pre] = [s["id"] for s in ws.ok("--json", "list").json()["snapshots"] if s["tags"] == ["pre-rollback"]]
    # Pruning keeps what a resume needs, the target, however old.
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "retention": "one"}},
                    {"one": {"keep_last": 1}})
    [pruned] = ws.ok("--json", "prune", "--dry-run").json()["results"]
    reasons = {d["id"]: d["reason"] for d in pruned["decisions"]}
    assert reasons[target] == "protected (the target of a rollback cut short)", reasons
    ws.ok("rollback", pre, "--yes")
    assert state(ws) == before
    assert ws.ok("--json", "status").json()["volumes"][0]["rollback"] is None


@pytest.mark.parametrize("trial", range(8))
def test_kill_9_at_a_random_point_never_leaves_a_mix_that_looks_finished(ws, trial):
    log = ws.root / "services"
    target, before, then = slow_rollback(ws, log)
    ws.throttle_rsync(1000)   # the copy back takes about 3 s: the kill lands anywhere in the rollback
    delay = random.Random(trial).uniform(0.3, 5)
    proc = ws.start("rollback", target, "--yes")
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    # The watchdog starts the services again, if the run had stopped them.
    wait_for(lambda: services(log)[-1:] != ["pre"], timeout=60, what="the watchdog to start the services again")
    ws.env["PATH"] = os.environ["PATH"]
    # Once the watchdog is gone too, a run finds the rollback's lock free: then it was cut short.
    wait_for(lambda: (ws.ok("--json", "status").json()["volumes"][0]["rollback"] or {}).get("state") != "rolling-back",
             timeout=60, what="the killed rollback's lock to be free")
    told = ws.ok("list").stderr
    status = ws.ok("--json", "status").json()["volumes"][0]["rollback"]
    now = state(ws)
    if status is None:   # nothing changed, or it finished: then it says so
        assert now in (before, then), f"killed after {delay:.2f}s: a mix, not told of"
    else:
        assert status["state"] == "cut-short" and "snapmgr rollback --resume data" in told
        ws.ok("rollback", "--resume", "data", "--yes")
        assert state(ws) == then
    assert services(log)[-1:] != ["pre"], f"killed after {delay:.2f}s: the services were left stopped"


def test_every_quiescer_of_the_volume_and_of_its_groups_must_stop_its_service(ws):
    # Optional for snapshots, required for a rollback: a service left writing would race it.
    rsync_volume(ws, {"app": {"kind": "command", "pre": ["false"], "required": False}})
    target = snapshot_then_change(ws)
    before = state(ws)
    refused = ws.run("rollback", target, "--yes")
    assert refused.returncode != 0 and "quiescer app (command): false exited with status 1" in refused.stderr
    assert state(ws) == before and len(ws.snapshots()) == 1
    # A group's quiescer pauses what writes to its volumes: a rollback of one stops it too.
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo}},
                    quiesce={"shared": {"kind": "command", "pre": ["true"]}},
                    groups={"stack": {"volumes": ["data"], "quiesce": ["shared"]}})
    [services] = ws.ok("--json", "rollback", target, "--dry-run").json()["services"]
    assert services == "shared: run true"


def test_a_process_still_writing_to_the_volume_with_the_services_stopped_is_named_and_nothing_changes(ws):
    # As a database server whose quiescer stopped another service: it still has its files open.
    rsync_volume(ws)
    target = snapshot_then_change(ws)
    before = state(ws)
    writer = subprocess.Popen([sys.executable, "-c", f"import sys, time; f = open({str(ws.source / 'a')!r}, 'a'); "
                               f"print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"open\n"
        name = open(f"/proc/{writer.pid}/comm").read().strip()
        refused = ws.run("rollback", target, "--yes")
    finally:
        writer.kill()
        writer.wait()
    assert refused.returncode != 0 and f"is still written by '{name}' (pid {writer.pid})" in refused.stderr, \
        refused.stderr
    assert "nothing was changed" in refused.stderr and state(ws) == before and ws.snapshots() == [target]
    ws.ok("rollback", target, "--yes")   # once it is gone


@needs_root
def test_a_source_whose_filesystem_is_not_mounted_is_refused(ws, tmp_path):
    with loop_mount(tmp_path, "ext4") as mnt:
        source = mnt / "src"
        source.mkdir()
        (source / "a").write_text("one")
        ws.write_config({"data": {"backend": "rsync", "source": source, "repository": ws.repo}})
        ws.ok("snapshot")
        [target] = ws.snapshots()
        subprocess.run(["umount", mnt], check=True)
        try:
            source.mkdir()   # the same path, on the filesystem underneath
            refused = ws.run("rollback", target, "--yes")
            assert refused.returncode != 0 and f"'{source}' is not on the filesystem {target} was taken from (is it " \
                "mounted?)" in refused.stderr, refused.stderr
            assert list(source.iterdir()) == [] and ws.snapshots() == [target]
            source.rmdir()
        finally:
            subprocess.run(["mount", "-o", "loop", tmp_path / "ext4.img", mnt], check=True)
