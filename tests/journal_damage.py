"""Ways a journal gets damaged, shared by the journal's unit tests and the CLI's tests."""

import sqlite3

from snapmgr.journal import Journal


def fill(path, runs=3000):
    """A journal big enough that damage in the middle of the file hits real pages."""
    j = Journal(path)
    for i in range(runs):
        with j.run(f"volume-{i % 7}", "snapshot", i) as run:
            run.created(f"volume-{i % 7}@20261121T{i % 24:02d}0000Z")
    j.close()  # the last connection checkpoints the WAL into the file


def wrong_columns(path):
    sqlite3.connect(path).executescript(
        "DROP TABLE snapshot_events; DROP TABLE runs; CREATE TABLE runs (id INTEGER PRIMARY KEY, volume TEXT, "
        "action TEXT, pid INTEGER, started TEXT, ended TEXT, status TEXT, boot_id TEXT, start_ticks INTEGER); "
        "CREATE TABLE snapshot_events (id, run_id, snapshot, event, at)")


def missing_table(path):
    sqlite3.connect(path).executescript("DROP TABLE snapshot_events")


def damaged_pages(path):
    with open(path, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xa5" * 4096 * 20)


def not_a_database(path):
    path.write_bytes(b"this is not a database" * 1000)


# (damage, what SQLite or snapmgr calls it)
KINDS = [(not_a_database, "file is not a database"), (wrong_columns, "table runs has no column error"),
         (missing_table, "no table snapshot_events"), (damaged_pages, "database disk image is malformed")]
