"""Quiescing with the command, fsfreeze and sqlite kinds, on real programs and real
filesystems: the order of prepare and resume, timeouts, required and optional failures,
grades and windows, the watchdog after kill -9, and recovery by the next run."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.integration.servers import free_port
from tests.integration.helpers import loop_mount, make_tree, needs_root, pids_of, wait_for, writable_within

LOG = "log"  # each command quiescer appends "<name> <phase> <volumes> <snapshot> <dry run>" here


def logger(ws, name: str, phase_cmd: str = "") -> list[str]:
    """argv of a command that appends what it was told to ws.root/log."""
    script = ("import os; open(%r, 'a').write(' '.join([%r, os.environ['SNAPMGR_PHASE'], "
              "os.environ['SNAPMGR_VOLUMES'], os.environ['SNAPMGR_SNAPSHOT'], os.environ['SNAPMGR_DRY_RUN']]) + '\\n')"
              % (str(ws.root / LOG), name))
    return [sys.executable, "-c", script + phase_cmd]


def logged(ws) -> list[list[str]]:
    path = ws.root / LOG
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def rsync_volume(ws, quiesce: list[str], **extra) -> dict:
    return {"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": quiesce, **extra}}


def created(r) -> dict:
    return r.json()["results"][0]["created"]


# Order, environment, grade -------------------------------------------------------------

def test_prepare_in_order_resume_in_reverse_with_the_environment(ws):
    make_tree(ws.source, files=5)
    ws.write_config(rsync_volume(ws, ["first", "second"]),
                    quiesce={n: {"kind": "command", "pre": logger(ws, n), "post": logger(ws, n)}
                             for n in ("first", "second")})
    snap = created(ws.ok("--json", "snapshot"))
    assert [(name, phase) for name, phase, *_ in logged(ws)] == [
        ("first", "pre"), ("second", "pre"), ("second", "post"), ("first", "post")]
    assert {tuple(rest) for _, _, *rest in logged(ws)} == {("data", snap["id"], "0")}
    record = snap["consistency"]
    assert snap["grade"] == "application" and record["degraded"] == []
    assert 0 < record["freeze_window_s"] < record["quiesce_window_s"]
    listed = ws.ok("--json", "list").json()["snapshots"][0]
    assert listed["grade"] == "application" and listed["consistency"] == record
    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["newest_grade"] == "application" and status["quiesce_window_s"] == record["quiesce_window_s"]
    assert "application, quiesced" in ws.ok("status").stdout
    assert "application" in ws.ok("list").stdout


def test_a_dry_run_runs_no_quiescer_and_says_what_it_would_do(ws):
    ws.write_config(rsync_volume(ws, ["app"]), quiesce={"app": {"kind": "command", "pre": logger(ws, "app")}})
    out = ws.ok("snapshot", "--dry-run").stdout
    assert "quiesce: app: run " in out and not logged(ws) and ws.snapshots() == []


def test_no_quiescer_is_crash_grade(ws):
    make_tree(ws.source, files=2)
    assert created(ws.ok("--json", "snapshot"))["grade"] == "crash"


# Failures ------------------------------------------------------------------------------

def test_a_hung_pre_is_killed_at_its_timeout_and_post_still_runs(ws):
    make_tree(ws.source, files=2)
    ws.write_config(rsync_volume(ws, ["hung"]), quiesce={"hung": {
        "kind": "command", "pre": logger(ws, "hung", "; import time; time.sleep(60)"), "post": logger(ws, "hung"),
        "timeout": "1s"}})
    started = time.monotonic()
    r = ws.run("snapshot")
    assert r.returncode == 1 and time.monotonic() - started < 20
    assert "quiescer hung (command)" in r.stderr and "timed out after 1s" in r.stderr
    assert "no snapshot was taken" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert [phase for _, phase, *_ in logged(ws)] == ["pre", "post"]
    assert ws.snapshots() == []
    assert not pids_of("python3", "time.sleep(60)")  # the process group was killed


def test_a_required_failure_aborts_after_resuming_what_was_prepared(ws):
    ws.write_config(rsync_volume(ws, ["ok", "broken"]), quiesce={
        "ok": {"kind": "command", "pre": logger(ws, "ok"), "post": logger(ws, "ok")},
        "broken": {"kind": "command", "pre": ["sh", "-c", "echo no database here >&2; exit 3"]}})
    r = ws.run("snapshot")
    assert r.returncode == 1 and "exited with status 3: no database here" in r.stderr
    assert [(n, p) for n, p, *_ in logged(ws)] == [("ok", "pre"), ("ok", "post")]
    assert ws.snapshots() == []
    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["state"] == "failing" and "broken" in status["last_error"]


def test_an_optional_failure_takes_a_degraded_snapshot(ws):
    make_tree(ws.source, files=2)
    ws.write_config(rsync_volume(ws, ["cache", "app"]), quiesce={
        "cache": {"kind": "command", "pre": ["false"], "required": False},
        "app": {"kind": "command", "pre": logger(ws, "app"), "post": logger(ws, "app")}})
    r = ws.ok("--json", "snapshot")
    snap = created(r)
    assert snap["grade"] == "degraded"
    [why] = snap["consistency"]["degraded"]
    assert why.startswith("cache (command): false exited with status 1")
    assert "optional quiescer cache (command)" in r.stderr
    assert [(n, p) for n, p, *_ in logged(ws)] == [("app", "pre"), ("app", "post")]


def test_an_optional_quiescer_whose_server_is_down_degrades_and_a_required_one_aborts(ws):
    make_tree(ws.source, files=2)
    nobody = {"kind": "redis", "port": free_port()}  # connection refused, at open()
    ws.write_config(rsync_volume(ws, ["cache", "app"]), quiesce={
        "cache": {**nobody, "required": False},
        "app": {"kind": "command", "pre": logger(ws, "app"), "post": logger(ws, "app")}})
    snap = created(ws.ok("--json", "snapshot"))
    [why] = snap["consistency"]["degraded"]
    assert snap["grade"] == "degraded" and why.startswith("cache (redis): Redis at 127.0.0.1:")
    assert [(n, p) for n, p, *_ in logged(ws)] == [("app", "pre"), ("app", "post")]

    ws.write_config(rsync_volume(ws, ["cache", "app"]), quiesce={
        "cache": nobody, "app": {"kind": "command", "pre": logger(ws, "app"), "post": logger(ws, "app")}})
    r = ws.run("snapshot")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "quiescer cache (redis): Redis at 127.0.0.1:" in r.stderr and "nothing was paused" in r.stderr
    assert len(logged(ws)) == 2 and len(ws.snapshots()) == 1  # nothing was paused


def test_a_failing_resume_is_reported_and_the_others_still_resume(ws):
    make_tree(ws.source, files=2)
    ws.write_config(rsync_volume(ws, ["app", "bad"]), quiesce={
        "app": {"kind": "command", "pre": logger(ws, "app"), "post": logger(ws, "app")},
        "bad": {"kind": "command", "pre": ["true"], "post": ["sh", "-c", "echo cannot restart >&2; exit 1"]}})
    r = ws.run("snapshot")
    assert r.returncode == 1 and "was taken, but resuming failed: bad (command)" in r.stderr
    assert "cannot restart" in r.stderr
    assert [(n, p) for n, p, *_ in logged(ws)] == [("app", "pre"), ("app", "post")]
    assert len(ws.snapshots()) == 1


def grow(source) -> list[str]:
    """argv of a `pre` that writes 3 MB into `source` inside the window: with rsync
    throttled to 200 kB/s, the pass in the window then lasts far past a second."""
    return [sys.executable, "-c", f"import os; open({str(source / 'grown')!r}, 'wb').write(os.urandom(3_000_000))"]


def test_a_window_past_max_window_is_cut_and_no_snapshot_is_kept(ws):
    make_tree(ws.source, files=2)
    ws.throttle_rsync(200)
    ws.write_config(rsync_volume(ws, ["app"]), quiesce={"app": {
        "kind": "command", "pre": grow(ws.source), "post": logger(ws, "app"), "max_window": "1s"}})
    r = ws.run("snapshot")
    assert r.returncode == 1 and "passed max_window (1s)" in r.stderr
    assert [p for _, p, *_ in logged(ws)] == ["post"]
    assert ws.snapshots() == []


# Groups --------------------------------------------------------------------------------

def two_volumes(ws, members: list[str], **group) -> dict:
    """Volumes a and b, and group `stack` of both with quiescer `app` (which logs)."""
    make_tree(ws.root / "src-a", files=2)
    make_tree(ws.root / "src-b", files=2)
    volumes = {v: {"backend": "rsync", "source": ws.root / f"src-{v}", "repository": ws.root / f"repo-{v}"}
               for v in "ab"}
    return {"volumes": volumes, "groups": {"stack": {"volumes": members, "quiesce": ["app"], **group}}}


def test_a_group_is_taken_inside_one_window_and_each_snapshot_records_it(ws):
    layout = two_volumes(ws, ["b", "a"])
    ws.write_config(layout["volumes"], groups=layout["groups"],
                    quiesce={"app": {"kind": "command", "pre": logger(ws, "app"), "post": logger(ws, "app")}})
    results = ws.ok("--json", "snapshot", "--group", "stack").json()["results"]
    assert [r["volume"] for r in results] == ["b", "a"]
    a, b = (r["created"] for r in sorted(results, key=lambda r: r["volume"]))
    [pre, post] = logged(ws)
    assert pre == ["app", "pre", "b", "a", b["id"], a["id"], "0"] and post[:2] == ["app", "post"]  # once for both
    window = {k: v for k, v in a["consistency"].items() if k != "manifest"}   # the manifest is each volume's own
    assert window == {k: v for k, v in b["consistency"].items() if k != "manifest"} and window["group"] == "stack"
    assert a["grade"] == "application" and a["id"].split("@")[1] == b["id"].split("@")[1]


def test_a_group_cut_by_max_window_keeps_the_members_taken_before_the_cut(ws):
    layout = two_volumes(ws, ["a", "b"], max_window="2s")
    ws.throttle_rsync(200)
    ws.write_config(layout["volumes"], groups=layout["groups"], quiesce={
        "app": {"kind": "command", "pre": grow(ws.root / "src-b"), "post": logger(ws, "app")}})
    r = ws.run("--json", "snapshot", "--group", "stack")
    assert r.returncode == 1
    by_volume = {o["volume"]: o for o in r.json()["results"]}
    assert "passed max_window (2s)" in by_volume["b"]["error"] and by_volume["b"]["created"] is None
    assert by_volume["a"]["error"] is None and by_volume["a"]["created"]["grade"] == "application"
    assert [s["volume"] for s in ws.ok("--json", "list").json()["snapshots"]] == ["a"]
    assert [p for _, p, *_ in logged(ws)] == ["post"]


# sqlite --------------------------------------------------------------------------------

LEDGER_ACCOUNTS, LEDGER_TOTAL = 20, 20_000

WRITER = r"""
import random, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA journal_mode=" + sys.argv[2])
while True:
    a, b = random.sample(range(%d), 2)
    amount = random.randint(1, 50)
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE ledger SET balance = balance - ? WHERE id = ?", (amount, a))
    time.sleep(0.001)  # a transaction caught half-way would break the total
    db.execute("UPDATE ledger SET balance = balance + ? WHERE id = ?", (amount, b))
    db.execute("COMMIT")
    time.sleep(0.01)  # a writer that never paused would starve snapmgr's lock until its timeout
""" % LEDGER_ACCOUNTS


def make_ledger(path, mode: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA journal_mode={mode}")
        db.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        db.executemany("INSERT INTO ledger VALUES (?, ?)",
                       [(i, LEDGER_TOTAL // LEDGER_ACCOUNTS) for i in range(LEDGER_ACCOUNTS)])
    db.close()


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_sqlite_snapshots_taken_under_writes_open_cleanly_with_the_ledger_balanced(ws, mode):
    db = ws.source / "app.db"
    make_ledger(db, mode)
    (ws.source / "uploads").mkdir()
    ws.write_config(rsync_volume(ws, ["db"]), quiesce={"db": {"kind": "sqlite", "databases": [db]}})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), mode])
    try:
        time.sleep(0.3)
        ids = [created(ws.ok("--json", "snapshot"))["id"] for _ in range(4)]
    finally:
        writer.kill()
        writer.wait()
    for sid in ids:
        copy = ws.root / f"{sid}.db"
        for suffix in ("", "-wal", "-journal"):
            src = ws.repo / sid / f"app.db{suffix}"
            if src.exists():
                copy.with_name(copy.name + suffix).write_bytes(src.read_bytes())
        with sqlite3.connect(copy) as check:
            assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert check.execute("SELECT sum(balance) FROM ledger").fetchone() == (LEDGER_TOTAL,)
        check.close()
    assert {s["grade"] for s in ws.ok("--json", "list").json()["snapshots"]} == {"application"}


def test_readers_keep_reading_while_the_sqlite_lock_is_held(ws):
    db = ws.source / "app.db"
    make_ledger(db, "wal")
    reader = [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], timeout=0); "
              "print(db.execute('SELECT sum(balance) FROM ledger').fetchone()[0])", str(db)]
    writer = [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], timeout=0); "
              "db.execute('UPDATE ledger SET balance = 0')", str(db)]
    ws.write_config(rsync_volume(ws, ["db", "reader", "writer"]), quiesce={
        "db": {"kind": "sqlite", "databases": [db]},
        "reader": {"kind": "command", "pre": reader},
        "writer": {"kind": "command", "pre": writer, "required": False}})
    r = ws.ok("-v", "--json", "snapshot")
    assert f"quiesce reader: pre: {LEDGER_TOTAL}" in r.stderr  # the reader read...
    snap = created(r)
    assert snap["grade"] == "degraded"  # ...and the writer was kept out
    assert "database is locked" in snap["consistency"]["degraded"][0]
    assert sqlite3.connect(db).execute("SELECT sum(balance) FROM ledger").fetchone() == (LEDGER_TOTAL,)


# fsfreeze ------------------------------------------------------------------------------

@pytest.fixture(params=["ext4", "xfs", "btrfs"])
def frozen_source(request, ws, tmp_path):
    """A volume whose source is a loop-mounted filesystem of each kind, frozen for its
    snapshots; the repository is on another filesystem."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")
    with loop_mount(tmp_path, request.param) as mnt:
        make_tree(mnt, files=20)
        ws.write_config({"data": {"backend": "rsync", "source": mnt, "repository": ws.repo, "quiesce": ["fs"]}},
                        quiesce={"fs": {"kind": "fsfreeze", "mountpoints": [mnt]}})
        yield mnt


def test_fsfreeze_freezes_for_the_snapshot_and_thaws_after(ws, frozen_source):
    probe = [sys.executable, "-c", f"import fcntl, os; fd = os.open({str(frozen_source)!r}, os.O_RDONLY); "
             "fcntl.ioctl(fd, 0xC0045877, 0)"]  # freezing a frozen filesystem fails: EBUSY
    ws.write_config({"data": {"backend": "rsync", "source": frozen_source, "repository": ws.repo,
                              "quiesce": ["fs", "probe"]}},
                    quiesce={"fs": {"kind": "fsfreeze", "mountpoints": [frozen_source]},
                             "probe": {"kind": "command", "pre": probe, "required": False}})
    snap = created(ws.ok("--json", "snapshot"))
    assert "Device or resource busy" in snap["consistency"]["degraded"][0]  # it was frozen
    assert writable_within(frozen_source, 5)
    ws.write_config({"data": {"backend": "rsync", "source": frozen_source, "repository": ws.repo,
                              "quiesce": ["fs"]}}, quiesce={"fs": {"kind": "fsfreeze", "mountpoints": [frozen_source]}})
    assert created(ws.ok("--json", "snapshot"))["grade"] == "frozen"


@needs_root
def test_fsfreeze_refuses_filesystems_snapmgr_needs(ws, tmp_path):
    with loop_mount(tmp_path, "ext4") as mnt:
        make_tree(ws.source, files=2)
        cases = {"/ (the root filesystem)": "/", f"data's snapshots, at {mnt}/repo": mnt}
        for what, mountpoint in cases.items():
            repo = mnt / "repo" if mountpoint == mnt else ws.repo
            ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": repo,
                                      "quiesce": ["fs"]}}, quiesce={"fs": {"kind": "fsfreeze", "mountpoints": [mountpoint]}})
            r = ws.run("snapshot")
            assert r.returncode == 78, r.stderr
            assert f"quiesce.fs.mountpoints: refusing to freeze '{mountpoint}': it holds {what}" in r.stderr
            assert writable_within(mnt, 5)


def test_a_mountpoint_that_is_not_one_is_a_config_error(ws):
    ws.write_config(rsync_volume(ws, ["fs"]), quiesce={"fs": {"kind": "fsfreeze", "mountpoints": [ws.source]}})
    r = ws.run("config", "check")
    assert r.returncode == 78 and f"quiesce.fs.mountpoints: item 1: '{ws.source}' is not a mountpoint" in r.stderr


# The watchdog -------------------------------------------------------------------------

def freeze_with_marker(ws, mnt, change_kb: int) -> None:
    """A volume on `mnt` whose window stops `app`, writes change_kb of new data (which the
    pass in the window copies at 500 kB/s, so a test can act while it runs), freezes
    `mnt`, and touches ws.root/frozen once all that is done."""
    ws.throttle_rsync(500)
    ws.write_config({"data": {"backend": "rsync", "source": mnt, "repository": ws.repo,
                              "quiesce": ["app", "change", "fs", "marker"]}},
                    quiesce={"app": {"kind": "command", "pre": logger(ws, "app"), "post": logger(ws, "app")},
                             "change": {"kind": "command", "pre": ["dd", "if=/dev/urandom", f"of={mnt}/d0/f0000",
                                                                   f"bs={change_kb}k", "count=1"]},
                             "fs": {"kind": "fsfreeze", "mountpoints": [mnt]},
                             "marker": {"kind": "command", "pre": ["touch", ws.root / "frozen"]}})

@needs_root
def test_kill_9_while_frozen_thaws_and_resumes_within_5s_in_20_of_20_trials(ws, tmp_path):
    with loop_mount(tmp_path, "ext4") as mnt:
        make_tree(mnt, files=40, size=50_000)
        freeze_with_marker(ws, mnt, change_kb=250)
        recovered = []
        for trial in range(20):
            (ws.root / "frozen").unlink(missing_ok=True)
            (ws.root / LOG).unlink(missing_ok=True)
            run = ws.start("snapshot")
            wait_for(lambda: (ws.root / "frozen").exists() or run.poll() is not None, what="the freeze")
            assert run.poll() is None, run.communicate()
            killed = time.monotonic()
            run.send_signal(signal.SIGKILL)
            run.wait()
            assert writable_within(mnt, 5), f"trial {trial}: still frozen after 5s"
            try:
                wait_for(lambda: [p for _, p, *_ in logged(ws)] == ["pre", "post"], timeout=5, what="post")
            except AssertionError:
                raise AssertionError(f"trial {trial}: {logged(ws)}; {run.stderr.read()}") from None
            recovered.append(time.monotonic() - killed)
        assert len(recovered) == 20 and max(recovered) < 5
        r = ws.ok("--json", "snapshot")
        assert created(r)["grade"] == "application"
        assert "was not closed by its run; quiesce watchdog: snapmgr" in r.stderr  # told once...
        assert "was not closed" not in ws.ok("list").stderr                       # ...only once


@needs_root
def test_a_window_whose_watchdog_died_too_is_recovered_by_the_next_run(ws, tmp_path):
    with loop_mount(tmp_path, "ext4") as mnt:
        make_tree(mnt, files=40, size=50_000)
        freeze_with_marker(ws, mnt, change_kb=250)  # a window of half a second, to kill in
        run = ws.start("snapshot")
        wait_for(lambda: (ws.root / "frozen").exists(), what="the freeze")
        [watchdog] = pids_of(os.path.basename(sys.executable), "snapmgr.quiesce.watchdog")
        os.kill(watchdog, signal.SIGKILL)  # first, so that it cannot act
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert not writable_within(mnt, 1)  # nobody thawed it
        r = ws.ok("list")
        assert f"was not closed by its run; recovered now: fs: thawed {mnt}; app: ran " in r.stderr
        assert len(r.stderr.splitlines()) == 1
        assert writable_within(mnt, 5)
        assert [p for _, p, *_ in logged(ws)] == ["pre", "post"]
        assert ws.ok("recover").stdout.strip() == "nothing to recover"


@needs_root
def test_a_watchdog_killed_mid_window_does_not_stop_snapmgr_resuming(ws, tmp_path):
    with loop_mount(tmp_path, "ext4") as mnt:
        make_tree(mnt, files=10)
        freeze_with_marker(ws, mnt, change_kb=500)
        run = ws.start("--json", "snapshot")
        wait_for(lambda: (ws.root / "frozen").exists(), what="the freeze")
        [watchdog] = pids_of(os.path.basename(sys.executable), "snapmgr.quiesce.watchdog")
        os.kill(watchdog, signal.SIGKILL)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert json.loads(out)["results"][0]["created"]["grade"] == "application"
        assert writable_within(mnt, 5)
        assert [p for _, p, *_ in logged(ws)] == ["pre", "post"]
