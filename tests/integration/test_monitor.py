"""snapmgr check and snapmgr metrics over real journals: real rsync volumes, real failing
runs, a real verify finding real damage, a real kill -9; journal rows are written by
hand only for what this host cannot produce (a window the watchdog cut, an LVM snapshot
that overflowed). The check runs as root and as the unprivileged user nobody; the
metrics go through promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from snapmgr import procfs
from snapmgr.journal import SCHEMA_VERSION
from tests import journal_damage
from tests.integration.helpers import Result, Workspace, make_tree, toml, wait_for
from tests.integration.test_verify import flip_a_byte

NOBODY_GROUP = "nogroup"
# One item of plugin performance data: 'label'=value[UOM];[warn];[crit];[min];[max]
PERF_RE = re.compile(r"'[^'=]+'=(U|-?[0-9]+(\.[0-9]+)?(s|B|%)?)(;(-?[0-9.]+)?){0,4}")


@pytest.fixture
def ws():
    """A workspace the user nobody can reach (pytest's own temporary directories are
    root's alone); the lab's tests use it too."""
    root = Path(tempfile.mkdtemp(prefix="snapmgr-monitor-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield Workspace(root)
    finally:
        shutil.rmtree(root)


def configure(ws: Workspace, schedules: dict | None = None, volume: dict | None = None, **settings) -> None:
    """One rsync volume 'data', the schedules named, and settings."""
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "retention": "default", **(volume or {})}}, **settings)
    if schedules:
        with open(ws.config, "a") as f:
            f.write(toml({f"schedules.{n}": s for n, s in schedules.items()}))


HOURLY = {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}}


def check(ws: Workspace, *args: str, user: str | None = None) -> tuple[int, str, list[str]]:
    """(exit code, status line, the lines below it) of `snapmgr check`."""
    r = run_as(ws, user, "check", *args)
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert lines and lines[0].startswith("SNAPMGR "), r
    return r.returncode, lines[0], lines[1:]


def perfdata(head: str) -> list[str]:
    """The items of the status line's performance data, each checked to be all of it."""
    text = head.split(" | ", 1)[1]
    items = re.findall(r"'[^']+'=\S+", text)
    assert " ".join(items) == text
    return items


def run_as(ws: Workspace, user: str | None, *args: str) -> Result:
    argv = (["runuser", "-u", user, "--"] if user else []) + ws.command(*args)
    p = subprocess.run(argv, capture_output=True, text=True, env=ws.env, timeout=120)
    return Result(p.returncode, p.stdout, p.stderr)


def journal(ws: Workspace) -> Path:
    return ws.root / "state" / "journal.db"


def readable_by_nobody(ws: Workspace) -> None:
    """What an administrator does for a monitoring user: the state directory and the
    journal readable by its group, writable by root only."""
    for path, mode in ((ws.root / "state", 0o750), (journal(ws), 0o640)):
        shutil.chown(path, group=NOBODY_GROUP)
        path.chmod(mode)


def older(ws: Workspace, than: float) -> None:
    """Wait until the newest snapshot is more than `than` seconds old (its id has
    one-second resolution; ages only grow)."""
    newest = ws.snapshots()[-1]
    taken = datetime.strptime(newest.split("@")[1][:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    wait_for(lambda: datetime.now(timezone.utc) - taken > timedelta(seconds=than + 0.2), timeout=than + 5,
             what="the snapshot to age")


def insert(ws: Workspace, sql: str, params: tuple) -> None:
    with sqlite3.connect(journal(ws)) as db:
        db.execute(sql, params)
    db.close()


def now_iso(offset_s: float = 0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_s)).isoformat(timespec="microseconds")


# The situations: each sets a workspace up and says what the check answers -------------

def fresh_snapshot(ws):
    configure(ws, HOURLY)
    ws.ok("snapshot")
    return 0, "SNAPMGR OK - 1 of 1 volumes OK"


def no_snapshot_yet_under_a_schedule(ws):
    configure(ws, HOURLY)
    ws.ok("status")   # creates the journal
    return 2, "SNAPMGR CRITICAL - data: it has no good snapshot"


def no_schedule_no_ages_no_alarm(ws):
    configure(ws)
    ws.ok("status")
    return 0, "SNAPMGR OK - 1 of 1 volumes OK"


def old_under_its_warn_age(ws):
    configure(ws, HOURLY, {"warn_age": "1s"})
    ws.ok("snapshot")
    older(ws, 1)
    return 1, "SNAPMGR WARNING - data: the newest good snapshot data@"


def old_under_its_crit_age(ws):
    configure(ws, volume={"crit_age": "1s"})
    ws.ok("snapshot")
    older(ws, 1)
    return 2, "SNAPMGR CRITICAL - data: the newest good snapshot data@"


def a_run_failed(ws):
    """A real failing run: a required quiescer refuses, so no snapshot is taken."""
    configure(ws, HOURLY)
    ws.ok("snapshot")
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["app"]}},
                    quiesce={"app": {"kind": "command", "pre": ["sh", "-c", "echo app says no >&2; exit 3"]}})
    assert ws.run("snapshot").returncode == 1
    return 2, "SNAPMGR CRITICAL - data: the last snapshot run failed at "


def verify_found_damage(ws):
    configure(ws, HOURLY)
    make_tree(ws.source, files=3)
    ws.ok("snapshot")
    [sid] = ws.snapshots()
    flip_a_byte(ws.repo / sid / "d1" / "f0001")
    assert ws.run("verify").returncode == 1
    return 2, f"SNAPMGR CRITICAL - data: verify found damage in {sid}"


def degraded_snapshot(ws):
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "retention": "default", "quiesce": ["cache"]}},
                    quiesce={"cache": {"kind": "command", "pre": ["false"], "required": False}})
    ws.ok("snapshot")
    return 1, "SNAPMGR WARNING - data: the newest snapshot data@"


def watchdog_cut_a_window(ws):
    # The watchdog cuts a window when snapmgr hangs inside it; written by hand, as no
    # snapmgr can be made to hang on cue here. The run it belonged to failed.
    configure(ws, HOURLY)
    ws.ok("snapshot")
    insert(ws, "INSERT INTO windows (volumes, pid, started, ended, status, plan, detail, reported) "
               "VALUES (?, 1, ?, ?, 'undone', '[]', 'resumed by the watchdog: max_window exceeded', 1)",
           ('["data"]', now_iso(), now_iso()))
    return 2, "SNAPMGR CRITICAL - data: the quiesce window opened at "


def killed_run(ws):
    configure(ws, HOURLY)
    make_tree(ws.source, files=20, size=200_000)
    ws.ok("snapshot")
    (ws.source / "new").write_bytes(os.urandom(4 << 20))
    ws.throttle_rsync(64)
    p = ws.start("snapshot")
    wait_for(lambda: [r for r in _runs(ws) if r == "running"], what="the run to start")
    with sqlite3.connect(journal(ws)) as db:
        kept = db.execute("SELECT pid, boot_id, start_ticks FROM runs WHERE status = 'running'").fetchone()
    db.close()
    assert kept == (p.pid, procfs.boot_id(), procfs.start_ticks(p.pid)) and None not in kept
    p.send_signal(signal.SIGKILL)
    p.wait()
    return 2, "SNAPMGR CRITICAL - data: the snapshot run started at "


def _runs(ws) -> list[str]:
    with sqlite3.connect(journal(ws)) as db:
        rows = [r[0] for r in db.execute("SELECT status FROM runs WHERE action = 'snapshot'")]
    db.close()
    return rows


SITUATIONS = [fresh_snapshot, no_snapshot_yet_under_a_schedule, no_schedule_no_ages_no_alarm, old_under_its_warn_age,
              old_under_its_crit_age, a_run_failed, verify_found_damage, degraded_snapshot,
              watchdog_cut_a_window, killed_run]


@pytest.mark.parametrize("situation", SITUATIONS, ids=lambda f: f.__name__)
def test_check_states_and_exit_codes(ws, situation):
    code, line = situation(ws)
    got, head, details = check(ws)
    assert (got, head[:len(line)]) == (code, line), (head, details)
    perf = perfdata(head)
    assert perf and all(PERF_RE.fullmatch(item) for item in perf), perf
    assert details[0].startswith("data: " + ("OK", "WARNING", "CRITICAL", "UNKNOWN")[code])
    as_json = run_as(ws, None, "--json", "check")
    assert as_json.returncode == code and json.loads(as_json.stdout)["exit_code"] == code
    # The metrics say the same, in a form promtool accepts.
    metrics = ws.ok("metrics").stdout
    assert f'snapmgr_check_status{{volume="data"}} {code}\n' in metrics
    promtool(metrics)


def test_a_later_successful_run_clears_a_failure_and_a_cut_window(ws):
    a_run_failed(ws)
    code, head, details = check(ws)
    assert code == 2 and "exited with status 3: app says no" in head
    watchdog_cut_a_window(ws)   # a successful snapshot first, then the cut window
    code, head, details = check(ws)
    assert code == 2 and details[1:] == [f"  CRITICAL: {head.split(' - ', 1)[1].split(' | ')[0].split(': ', 1)[1]}"]
    ws.ok("snapshot")
    code, head, details = check(ws)
    assert code == 0, (head, details)


def promtool(text: str) -> None:
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", (p.stdout, p.stderr)


def test_perfdata_and_the_detail_lines(ws):
    configure(ws, HOURLY)
    ws.ok("snapshot")
    code, head, details = check(ws)
    assert code == 0
    perf = perfdata(head)
    assert perf[0].startswith("'data age'=") and perf[0].endswith("s;5490;10980;0")
    assert perf[1:4] == ["'data snapshots'=1;;;0", "'data invalid'=0;;0;0", "'data damaged'=0;;0;0"]
    # The repository's filesystem, as the rsync backend reports it: free bytes, its size the maximum.
    assert len(perf) == 5 and re.fullmatch(r"'data free'=[0-9]+B;;;0;[0-9]+", perf[4])
    assert details[0].startswith("data: OK - 1 snapshot; newest good data@")
    assert "warning after 1h31min, critical after 3h3min (1.5x / 3x the 1h1min between runs of schedule hourly)" \
        in details[0]


# Failures of the check itself: always UNKNOWN, exit 3, on stdout -----------------------

def test_the_check_answers_unknown_when_it_cannot_tell(ws):
    configure(ws, HOURLY)
    code, head, _ = check(ws)
    assert (code, head) == (3, f"SNAPMGR UNKNOWN - journal {journal(ws)} does not exist: no run has been recorded yet")
    ws.ok("snapshot")
    for args, message in ((["nosuch"], "unknown volume 'nosuch'"), (["--bogus"], "No such option '--bogus'")):
        code, head, _ = check(ws, *args)
        assert code == 3 and head.startswith(f"SNAPMGR UNKNOWN - {message}")
    r = subprocess.run([*ws.command("check")[:3], "--config", str(ws.root / "nosuch.toml"), "check"],
                       capture_output=True, text=True, env=ws.env)
    assert r.returncode == 3 and r.stdout.startswith(f"SNAPMGR UNKNOWN - {ws.root / 'nosuch.toml'}: does not exist")
    as_json = run_as(ws, None, "--json", "check", "nosuch")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["state"] == "UNKNOWN"
    # As nobody, before the journal is made readable: UNKNOWN, never a guess.
    code, head, _ = check(ws, user="nobody")
    assert code == 3 and "Permission denied" in head


@pytest.mark.parametrize("damage,detail", journal_damage.KINDS)
def test_a_damaged_journal_is_unknown(ws, damage, detail):
    configure(ws, HOURLY)
    ws.ok("snapshot")
    damage(journal(ws))
    code, head, _ = check(ws)
    assert code == 3 and head.startswith(f"SNAPMGR UNKNOWN - journal {journal(ws)} is damaged ({detail})")


# As an unprivileged monitoring user ---------------------------------------------------------

def test_nobody_reads_the_journal_with_and_without_a_writer(ws):
    configure(ws, HOURLY)
    make_tree(ws.source, files=3)
    ws.ok("snapshot")
    readable_by_nobody(ws)
    assert not Path(f"{journal(ws)}-wal").exists()   # no writer: the file alone is the journal
    code, head, details = check(ws, user="nobody")
    assert code == 0, (head, details)
    assert details[0].startswith("snapshots as the last runs recorded them: listing them needs root")
    assert re.search(r"as listed at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", details[1])
    # The repository is root's alone: nobody could not have listed it.
    assert run_as(ws, "nobody", "list").returncode != 0
    # A writer holds the journal open: what it committed is in the -wal file only, and
    # nobody reads it there, through the -shm file it may read but not write.
    writer = sqlite3.connect(journal(ws), isolation_level=None)
    try:
        writer.execute("INSERT INTO runs (volume, action, pid, started, ended, status, error) "
                       "VALUES ('data', 'snapshot', 1, ?, ?, 'failed', 'the disk caught fire')", (now_iso(), now_iso()))
        for suffix in ("-wal", "-shm"):
            st = Path(f"{journal(ws)}{suffix}").stat()
            assert oct(st.st_mode & 0o777) == oct(0o640) and st.st_size > 0
        code, head, _ = check(ws, user="nobody")
        assert code == 2 and "the last snapshot run failed at" in head and "the disk caught fire" in head
    finally:
        writer.close()
    assert check(ws, user="nobody")[0] == 2 and not Path(f"{journal(ws)}-wal").exists()
    metrics = run_as(ws, "nobody", "metrics")
    assert metrics.returncode == 0
    promtool(metrics.stdout)


def running_row(ws: Workspace, pid: int, boot_id: str | None, ticks: int | None) -> None:
    """A snapshot run of 'data' journaled as running by process `pid`, begun now."""
    insert(ws, "INSERT INTO runs (volume, action, pid, started, status, boot_id, start_ticks) "
               "VALUES ('data', 'snapshot', ?, ?, 'running', ?, ?)", (pid, now_iso(), boot_id, ticks))


@pytest.mark.parametrize("identified", [True, False], ids=["identified", "by-an-older-snapmgr"])
def test_a_run_root_is_still_taking_is_not_killed_to_nobody_under_hidepid(ws, identified):
    # /proc mounted with hidepid=invisible (systemd's ProtectProc=invisible) hides root's
    # processes from nobody: the run's process must be asked for otherwise.
    configure(ws, HOURLY)
    make_tree(ws.source, files=3)
    ws.ok("snapshot")
    readable_by_nobody(ws)
    taking = subprocess.Popen(["sleep", "300"])
    try:
        running_row(ws, taking.pid, *((procfs.boot_id(), procfs.start_ticks(taking.pid)) if identified
                                      else (None, None)))
        script = ("import subprocess, sys\n"
                  "subprocess.run(['mount', '-t', 'proc', '-o', 'hidepid=invisible', 'proc', '/proc'], check=True)\n"
                  f"hidden = subprocess.run(['runuser', '-u', 'nobody', '--', 'test', '-e', '/proc/{taking.pid}'])\n"
                  f"print(hidden.returncode, flush=True)\n"
                  f"sys.exit(subprocess.run(['runuser', '-u', 'nobody', '--', *{ws.command('check')!r}]).returncode)\n")
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", script],
                           capture_output=True, text=True, env=ws.env, timeout=120)
    finally:
        taking.kill()
        taking.wait()
    hidden, head, *details = p.stdout.splitlines()
    assert hidden == "1", "nobody still sees root's process in /proc"
    assert (p.returncode, head.split(" | ")[0]) == (0, "SNAPMGR OK - 1 of 1 volumes OK"), (p.stdout, p.stderr)


@pytest.mark.parametrize("user", [None, "nobody"])
def test_a_run_whose_pid_another_process_holds_now_was_killed(ws, user):
    # The kernel reusing a dead run's pid, or a restart, cannot be brought about at will:
    # the rows are what a run writes, with the identity of a process other than the live
    # one holding the pid.
    configure(ws, HOURLY)
    ws.ok("snapshot")
    readable_by_nobody(ws)
    holder = subprocess.Popen(["sleep", "300"])
    try:
        boot, ticks = procfs.boot_id(), procfs.start_ticks(holder.pid)
        assert boot is not None and ticks is not None
        running_row(ws, holder.pid, boot, ticks)
        assert check(ws, user=user)[0] == 0      # its own process: still running
        for other in ((boot, ticks - 1), (str(uuid.uuid4()), ticks)):   # started earlier; another boot
            running_row(ws, holder.pid, *other)
            code, head, _ = check(ws, user=user)
            assert code == 2 and head.startswith("SNAPMGR CRITICAL - data: the snapshot run started at ") \
                and f"by pid {holder.pid} never finished: its process is gone (killed?)" in head, head
    finally:
        holder.kill()
        holder.wait()


def test_nobody_checks_a_journal_an_older_snapmgr_left_until_root_upgrades_it(ws):
    configure(ws, HOURLY)
    ws.ok("snapshot")
    with sqlite3.connect(journal(ws)) as db:   # as schema 4 had it: runs kept no identity
        db.execute("ALTER TABLE runs DROP COLUMN boot_id")
        db.execute("ALTER TABLE runs DROP COLUMN start_ticks")
        db.execute("DROP TABLE rollbacks")
        db.execute("PRAGMA user_version=4")
    db.close()
    readable_by_nobody(ws)
    taking = subprocess.Popen(["sleep", "300"])   # a run the older snapmgr is still taking
    try:
        insert(ws, "INSERT INTO runs (volume, action, pid, started, status) VALUES ('data', 'snapshot', ?, ?, "
                   "'running')", (taking.pid, now_iso()))
        assert check(ws, user="nobody")[0] == 0
    finally:
        taking.kill()
        taking.wait()
    code, head, _ = check(ws, user="nobody")
    assert code == 2 and "its process is gone (killed?)" in head, head
    ws.ok("snapshot")                                      # root's run upgrades it
    with sqlite3.connect(journal(ws)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT count(*) FROM runs WHERE boot_id IS NOT NULL").fetchone()[0] == 1
    db.close()
    assert check(ws, user="nobody")[0] == 0   # the later run that succeeded supersedes the killed one


def test_nobody_sees_an_invalid_snapshot_as_the_last_run_listed_it(ws):
    # An overflowed LVM snapshot needs the lab; what the run recorded of it is what
    # nobody reads, so that record is written here as a run writes it.
    configure(ws, HOURLY)
    ws.ok("snapshot")
    [sid] = ws.snapshots()
    with sqlite3.connect(journal(ws)) as db:
        listing = json.loads(db.execute("SELECT listing FROM observations WHERE volume = 'data'").fetchone()[0])
        listing["snapshots"][0]["invalid"] = "the snapshot overflowed (Invalid)"
        db.execute("UPDATE observations SET listing = ?", (json.dumps(listing),))
    db.close()
    readable_by_nobody(ws)
    code, head, _ = check(ws, user="nobody")
    assert code == 2 and head.startswith(
        f"SNAPMGR CRITICAL - data: {sid} is invalid (the snapshot overflowed (Invalid)) (as the run at ")
    assert check(ws)[0] == 0   # root lists the real one, which is fine


def test_a_volume_no_run_has_listed_is_unknown_to_nobody(ws):
    configure(ws, HOURLY)
    ws.ok("status")     # creates the journal; records nothing
    readable_by_nobody(ws)
    code, head, _ = check(ws, user="nobody")
    assert (code, head.split(" | ")[0]) == (
        3, "SNAPMGR UNKNOWN - data: no run has recorded its snapshots yet, and listing them needs root")


# The metrics textfile ---------------------------------------------------------------------

def test_every_run_that_changes_something_replaces_the_textfile(ws):
    textfile = ws.root / "textfile" / "snapmgr.prom"
    textfile.parent.mkdir()
    configure(ws, HOURLY, metrics_textfile=textfile)
    make_tree(ws.source, files=3)
    ws.ok("snapshot", "--dry-run")
    assert not textfile.exists()      # a dry run changes nothing
    ws.ok("snapshot")
    first = textfile.stat()
    promtool(textfile.read_text())
    assert 'snapmgr_snapshots{volume="data"} 1\n' in textfile.read_text()
    assert oct(first.st_mode & 0o777) == oct(0o644)
    ws.ok("snapshot")
    second = textfile.stat()
    assert second.st_ino != first.st_ino   # replaced by a rename, never rewritten in place
    assert 'snapmgr_snapshots{volume="data"} 2\n' in textfile.read_text()
    for args in (["verify"], ["delete", ws.snapshots()[0]]):
        before = textfile.stat().st_ino
        ws.ok(*args)
        assert textfile.stat().st_ino != before, args
    assert 'snapmgr_snapshots{volume="data"} 1\n' in textfile.read_text()
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["snapmgr.prom"]   # no temporary file left


def test_a_dry_run_the_space_guard_refuses_changes_nothing_either(ws):
    textfile = ws.root / "textfile" / "snapmgr.prom"
    textfile.parent.mkdir()
    configure(ws, HOURLY, volume={"min_free": "99%"}, metrics_textfile=textfile)
    make_tree(ws.source, files=3)
    r = ws.run("snapshot", "--dry-run")
    assert r.returncode == 1 and "refusing to snapshot: " in r.stderr, r.stderr
    assert not textfile.exists() and not journal(ws).exists()


def test_a_run_lists_anew_only_the_volumes_it_changed(ws):
    textfile = ws.root / "textfile" / "snapmgr.prom"
    textfile.parent.mkdir()
    logs = ws.root / "logs"
    logs.mkdir()
    make_tree(ws.source, files=3)
    make_tree(logs, files=3)
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo},
                     "logs": {"backend": "rsync", "source": logs, "repository": ws.root / "logs-repo"}},
                    metrics_textfile=textfile)
    ws.ok("snapshot")
    with sqlite3.connect(journal(ws)) as db:
        recorded = dict(db.execute("SELECT volume, at FROM observations"))
    db.close()
    # logs cannot be listed now; a run on data neither lists it nor records it anew.
    shutil.rmtree(ws.root / "logs-repo")
    (ws.root / "logs-repo").write_text("")
    r = ws.run("snapshot", "data")
    assert (r.returncode, r.stderr) == (0, "") and r.stdout.startswith("created data@")
    with sqlite3.connect(journal(ws)) as db:
        now = dict(db.execute("SELECT volume, at FROM observations"))
    db.close()
    assert now["logs"] == recorded["logs"] and now["data"] > recorded["data"]
    text = textfile.read_text()
    assert 'snapmgr_snapshots{volume="data"} 2\n' in text and 'snapmgr_snapshots{volume="logs"} 1\n' in text


def test_a_textfile_that_cannot_be_written_fails_the_run_loudly_but_keeps_it(ws):
    textfile = ws.root / "missing-dir" / "snapmgr.prom"
    configure(ws, HOURLY, metrics_textfile=textfile)
    r = ws.run("--json", "snapshot")
    assert r.returncode == 1
    [line] = r.stderr.splitlines()
    assert line.startswith(f"snapmgr: error: the metrics textfile {textfile} was not rewritten: No such file")
    [result] = r.json()["results"]
    assert result["ok"] and r.json()["monitoring_error"] == line.removeprefix("snapmgr: error: ")
    assert ws.snapshots() == [result["created"]["id"]]
    assert check(ws)[0] == 0     # the run itself is journaled as the success it was
