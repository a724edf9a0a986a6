import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from snapmgr import journal, procfs
from snapmgr.errors import SnapmgrError
from snapmgr.journal import READABLE_FROM, SCHEMA_VERSION, Journal, JournalDamaged, JournalError
from tests import journal_damage, journal_versions


def older_journal(path, version: int) -> None:
    """A journal as a snapmgr of that schema version left it, with one run of 'home' it
    began and that is still running."""
    journal_versions.as_of(path, version)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO runs (volume, action, pid, started, status) "
                   "VALUES ('home', 'snapshot', 7, '2026-11-24T09:00:00+00:00', 'running')")
    db.close()


def test_runs_and_events_are_recorded(tmp_path):
    j = Journal(tmp_path / "state" / "journal.db")
    with j.run("home", "snapshot", 42) as run:
        run.created("home@20261121T140501Z")
    with pytest.raises(SnapmgrError):
        with j.run("home", "prune", 42) as run:
            raise SnapmgrError("disk on fire")
    h = j.history("home")
    assert h.last_success is not None and h.last_failure > h.last_success
    assert h.last_error == "disk on fire"
    assert [e for e, _ in j.events("home@20261121T140501Z")] == ["created"]
    assert j.history("other").last_success is None
    assert j.failure is None


def test_schema_is_versioned(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).history("x")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Journal(path).history("x")  # reopening an up-to-date journal migrates nothing
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    with pytest.raises(JournalError, match="newer than this snapmgr understands"):
        Journal(path).history("x")


@pytest.mark.parametrize("damage,detail", journal_damage.KINDS)
def test_damage_is_named_with_what_to_do_and_recording_never_raises(tmp_path, damage, detail):
    path = tmp_path / "journal.db"
    journal_damage.fill(path)
    damage(path)
    expected = (f"journal {path} is damaged ({detail}); move it aside with its -wal and -shm files and "
                f"snapmgr starts a new one (the snapshots themselves are not affected)")
    with pytest.raises(JournalDamaged) as e:
        Journal(path).history("volume-1")
    assert str(e.value) == expected
    # What the journal records is history: the work it records goes on without it.
    j = Journal(path)
    with j.run("volume-1", "snapshot", 1) as run:
        run.created("volume-1@20261122T000000Z")
    with pytest.raises(RuntimeError, match="the job's own failure"):
        with j.run("volume-1", "prune", 1):
            raise RuntimeError("the job's own failure")
    assert str(j.failure) == expected


def test_moving_the_damaged_journal_aside_starts_a_new_one(tmp_path):
    path = tmp_path / "journal.db"
    journal_damage.fill(path, runs=10)
    journal_damage.damaged_pages(path)
    path.rename(tmp_path / "journal.db.damaged")
    j = Journal(path)
    with j.run("home", "snapshot", 1):
        pass
    assert j.history("home").last_success is not None and j.failure is None


def test_a_busy_journal_is_not_called_damaged(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "journal.db"
    Journal(path).history("x")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    j = Journal(path)
    with j.run("home", "snapshot", 1):
        pass
    assert isinstance(j.failure, JournalError) and not isinstance(j.failure, JournalDamaged)
    assert str(j.failure) == f"journal {path} is busy: another process held it for over 0.2s"
    holder.execute("ROLLBACK")


def test_a_journal_that_cannot_be_created_says_why(tmp_path):
    (tmp_path / "state").write_text("a file where the state directory should be")
    j = Journal(tmp_path / "state" / "journal.db")
    with pytest.raises(JournalError) as e:
        j.history("x")
    assert not isinstance(e.value, JournalDamaged)
    assert str(e.value) == f"journal {tmp_path}/state/journal.db cannot be used: File exists: '{tmp_path}/state'"


def _writer(path, volume, n):
    j = Journal(path)
    for i in range(n):
        with j.run(volume, "snapshot", i) as run:
            run.created(f"{volume}@2026112{i % 10}T000000Z")
    assert j.failure is None, repr(j.failure)
    j.close()


def test_concurrent_writers_do_not_corrupt_or_fail(tmp_path):
    path = tmp_path / "journal.db"
    first = Journal(path)
    first.history("x")
    first.close()  # an SQLite connection must not be open across fork(): the writers fork from here
    procs = [multiprocessing.Process(target=_writer, args=(path, f"v{p}", 50)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM runs WHERE status = 'ok'").fetchone()[0] == 200
    assert db.execute("SELECT count(*) FROM snapshot_events").fetchone()[0] == 200


def test_a_full_database_is_reported_full_not_damaged(tmp_path):
    # SQLite rolls back by itself when it runs out of room; the ROLLBACK that followed
    # failed ("no transaction is active") and was reported as damage.
    j = Journal(tmp_path / "journal.db")
    j.history("x")
    pages = j._db.execute("PRAGMA page_count").fetchone()[0]
    j._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    for i in range(300):
        with j.run("home", "snapshot", i) as run:
            run.created(f"home@20261121T{i % 24:02d}0000Z")
    assert isinstance(j.failure, JournalError) and not isinstance(j.failure, JournalDamaged)
    assert "database or disk is full" in str(j.failure)
    assert j.history("home").last_success is not None  # what fitted is there, and readable


def test_a_reader_writes_nothing_and_knows_when_a_writer_raced_it(tmp_path):
    path = tmp_path / "journal.db"
    with pytest.raises(JournalError, match="does not exist: no run has been recorded yet"):
        Journal(path, read_only=True).history("home")
    assert not path.exists()
    writer = Journal(path)
    with writer.run("home", "snapshot", 1):
        pass
    writer.close()   # the last connection folds the -wal file into the journal and removes it
    reader = Journal(path, read_only=True)
    assert reader.history("home").last_success is not None and not reader.raced()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.db"]
    # A writer starts after the reader read the bare file: the reader may have missed its
    # writes, and says so; read again, it sees them through the -wal file.
    writer = Journal(path)
    with pytest.raises(SnapmgrError):
        with writer.run("home", "prune", 2):
            raise SnapmgrError("busy")
    assert reader.raced() and reader.history("home").last_failure is None
    reader.close()
    assert reader.history("home").last_error == "busy" and not reader.raced()
    reader.close()
    writer.close()


def test_a_reader_names_a_journal_of_another_schema(tmp_path):
    path = tmp_path / "journal.db"
    older_journal(path, READABLE_FROM - 1)
    with pytest.raises(JournalError, match=f"has schema version {READABLE_FROM - 1}, not this snapmgr's "
                                           f"\\({SCHEMA_VERSION}\\): run any snapmgr command as root to upgrade it"):
        Journal(path, read_only=True).history("x")


@pytest.mark.parametrize("version", range(READABLE_FROM, SCHEMA_VERSION))
def test_a_reader_reads_a_journal_that_only_lacks_what_it_does_without(tmp_path, version):
    # A monitoring user, between an upgrade of snapmgr and its next run as root.
    path = tmp_path / "journal.db"
    older_journal(path, version)
    reader = Journal(path, read_only=True)
    [run] = reader.last_runs("home")
    assert (run.status, run.pid, run.boot_id, run.start_ticks) == ("running", 7, None, None)
    reader.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == version   # left as it was
    db.close()


def test_a_run_keeps_the_identity_of_its_process(tmp_path):
    j = Journal(tmp_path / "journal.db")
    with j.run("home", "snapshot", os.getpid()):
        mine = j.last_runs("home")[0]
    assert mine.status == "running" and mine.boot_id == procfs.boot_id() is not None
    assert mine.start_ticks == procfs.start_ticks(os.getpid()) is not None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    j.begin("home", "prune", gone.pid)   # /proc no longer tells when it started
    assert [(r.action, r.boot_id, r.start_ticks) for r in j.last_runs("home")] == [
        ("snapshot", procfs.boot_id(), mine.start_ticks), ("prune", procfs.boot_id(), None)]
    j.close()


def test_an_older_journal_gains_the_observations_table_and_its_runs_keep_no_identity(tmp_path):
    path = tmp_path / "journal.db"
    older_journal(path, 3)
    j = Journal(path)
    with j.run("home", "snapshot", os.getpid()):
        pass
    assert [(r.status, r.pid, r.boot_id) for r in j.last_runs("home")] == [
        ("running", 7, None), ("ok", os.getpid(), procfs.boot_id())]
    now = datetime.now(timezone.utc)
    j.observed("home", now, {"snapshots": []})
    assert j.history("home").last_success is not None and j.failure is None
    assert j.observations() == {"home": (now, '{"snapshots": []}')}
    # A listing older than the one recorded (its run ended later) does not replace it.
    j.observed("home", now - timedelta(seconds=1), {"snapshots": None})
    j.observed("home", now + timedelta(seconds=1), {"snapshots": [1]})
    assert j.observations() == {"home": (now + timedelta(seconds=1), '{"snapshots": [1]}')}


def test_reads_inside_reading_see_one_moment_while_a_writer_commits(tmp_path):
    path = tmp_path / "journal.db"
    writer = Journal(path)
    with writer.run("home", "snapshot", 1):
        pass
    reader = Journal(path, read_only=True)   # the writer is open: read through the -wal file
    try:
        with reader.reading():
            assert [r.status for r in reader.last_runs("home")] == ["ok"]
            with pytest.raises(SnapmgrError):
                with writer.run("home", "snapshot", 2):
                    raise SnapmgrError("disk on fire")
            with reader.reading():      # within another: that one
                assert reader.history("home").last_error is None
            assert [r.status for r in reader.last_runs("home")] == ["ok"]
        assert reader.history("home").last_error == "disk on fire"
        assert [r.status for r in reader.last_runs("home")] == ["ok", "failed"]
    finally:
        reader.close()
        writer.close()


def test_a_window_keeps_the_boot_it_was_opened_in_and_an_older_window_reads_without_one(tmp_path):
    j = Journal(tmp_path / "journal.db")
    plan = [{"name": "app", "undo": [{"run": ["true"], "env": {}, "timeout": 5}]}]
    j.window_opened(["data"], None, 123, plan, "0f5c2a7e-boot")
    # As an older snapmgr stored it: the plan alone.
    with sqlite3.connect(tmp_path / "journal.db") as c:
        c.execute("INSERT INTO windows (volumes, grp, pid, started, status, plan) VALUES "
                  "('[\"old\"]', NULL, 7, '2026-01-01T00:00:00+00:00', 'open', ?)", (json.dumps(plan),))
    c.close()
    new, old = j.unsettled_windows()
    assert (new.volumes, new.plan, new.boot_id) == (("data",), plan, "0f5c2a7e-boot")
    assert (old.volumes, old.plan, old.boot_id) == (("old",), plan, None)
    j.close()


def test_a_try_keeps_the_marked_plan_also_of_an_older_windows_plain_list_and_the_unresumed_stay_found(tmp_path):
    j = Journal(tmp_path / "journal.db")
    plan = [{"name": "app", "undo": [{"run": ["true"], "env": {}, "timeout": 5}]}]
    new = j.window_opened(["data"], None, 123, plan, "0f5c2a7e-boot")
    with sqlite3.connect(tmp_path / "journal.db") as c:
        old = c.execute("INSERT INTO windows (volumes, grp, pid, started, status, plan) VALUES "
                        "('[\"old\"]', NULL, 7, '2026-01-01T00:00:00+00:00', 'open', ?)", (json.dumps(plan),)).lastrowid
    c.close()
    marked = [{"name": "app", "undo": [{"run": ["true"], "env": {}, "timeout": 5, "done": True}]}]
    j.window_tried(new, marked, 1, "open", "app: FAILED: no", grade="application", quiesce_s=0.5)
    j.window_tried(old, marked, 3, "recovery-failed", "given up")
    assert [w.id for w in j.unsettled_windows()] == [new, old]   # each try is told once
    j.window_reported(old)
    [first] = j.unsettled_windows()
    assert (first.plan, first.attempts, first.boot_id, first.status, first.detail, first.tried_at is not None) == \
        (marked, 1, "0f5c2a7e-boot", "open", "app: FAILED: no", True)
    second = j.window(old)
    assert (second.plan, second.attempts, second.boot_id, second.status) == (marked, 3, None, "recovery-failed")
    assert [w.id for w in j.unsettled_windows(failed=True)] == [new, old]
    # A later window of the volume that closed cleanly hides neither.
    later = j.window_opened(["data"], None, 124, plan, "0f5c2a7e-boot")
    j.window_ended(later, "closed", None)
    assert j.last_window("data").status == "closed"
    unresumed = j.unresumed_window("data")
    assert (unresumed.status, unresumed.attempts, unresumed.quiesce_s, unresumed.ended) == ("open", 1, 0.5, None)
    assert j.unresumed_window("old").status == "recovery-failed"
    j.window_tried(new, plan, 2, "recovered", "recovered now")
    assert j.unresumed_window("data") is None and j.window(new).status == "recovered"
    j.close()
