import multiprocessing
import sqlite3

import pytest

from snapmgr.errors import SnapmgrError
from snapmgr.journal import SCHEMA_VERSION, Journal


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


def test_schema_is_versioned(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Journal(path).close()  # reopening an up-to-date journal migrates nothing
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    with pytest.raises(SnapmgrError, match="newer than this snapmgr understands"):
        Journal(path)


def test_a_corrupt_journal_is_a_clear_error(tmp_path):
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SnapmgrError, match=f"journal {path}: file is not a database"):
        Journal(path)


def _writer(path, volume, n):
    j = Journal(path)
    for i in range(n):
        with j.run(volume, "snapshot", i) as run:
            run.created(f"{volume}@2026112{i % 10}T000000Z")
    j.close()


def test_concurrent_writers_do_not_corrupt_or_fail(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
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
