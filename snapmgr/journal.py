"""The history of runs and of snapshots created and deleted, in SQLite.

History only: the snapshot storage is the truth of what exists. WAL and a busy timeout let
a timer's run and a manual run write at once without corrupting or failing each other."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from snapmgr.errors import SnapmgrError

BUSY_TIMEOUT_S = 30
# Each entry upgrades the schema from version i to i + 1.
MIGRATIONS = (
    """
    CREATE TABLE runs (
        id       INTEGER PRIMARY KEY,
        volume   TEXT NOT NULL,
        action   TEXT NOT NULL,          -- snapshot, delete, prune
        pid      INTEGER NOT NULL,
        started  TEXT NOT NULL,          -- ISO 8601, UTC
        ended    TEXT,
        status   TEXT NOT NULL,          -- running, ok, failed
        error    TEXT
    );
    CREATE INDEX runs_by_volume ON runs (volume, action, status, started);
    CREATE TABLE snapshot_events (
        id       INTEGER PRIMARY KEY,
        run_id   INTEGER NOT NULL REFERENCES runs (id),
        snapshot TEXT NOT NULL,
        event    TEXT NOT NULL,          -- created, deleted
        at       TEXT NOT NULL
    );
    CREATE INDEX events_by_snapshot ON snapshot_events (snapshot);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class VolumeHistory:
    last_success: datetime | None
    last_failure: datetime | None
    last_error: str | None


class Run:
    """One running action; records the snapshots it creates and deletes."""

    def __init__(self, journal: Journal, run_id: int):
        self._journal, self.id = journal, run_id

    def created(self, snapshot: str) -> None:
        self._journal._event(self.id, snapshot, "created")

    def deleted(self, snapshot: str) -> None:
        self._journal._event(self.id, snapshot, "deleted")


class Journal:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the last
            # commits, which is acceptable for history and saves an fsync per commit.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise SnapmgrError(f"journal {path}: {e}") from None

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SnapmgrError(f"journal {self.path} has schema version {version}, newer than this "
                                   f"snapmgr understands ({SCHEMA_VERSION}); upgrade snapmgr")
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock up front, so a concurrent writer waits on the
        # busy timeout instead of failing half-way through.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def run(self, volume: str, action: str, pid: int) -> Iterator[Run]:
        """Record the action; a failure is recorded with its message and re-raised."""
        with self._transaction():
            run_id = self._db.execute(
                "INSERT INTO runs (volume, action, pid, started, status) VALUES (?, ?, ?, ?, 'running')",
                (volume, action, pid, _now())).lastrowid
        try:
            yield Run(self, run_id)
        except BaseException as e:
            self._finish(run_id, "failed", str(e) or type(e).__name__)
            raise
        self._finish(run_id, "ok", None)

    def _finish(self, run_id: int, status: str, error: str | None) -> None:
        with self._transaction():
            self._db.execute("UPDATE runs SET ended = ?, status = ?, error = ? WHERE id = ?",
                             (_now(), status, error, run_id))

    def _event(self, run_id: int, snapshot: str, event: str) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO snapshot_events (run_id, snapshot, event, at) VALUES (?, ?, ?, ?)",
                             (run_id, snapshot, event, _now()))

    def history(self, volume: str) -> VolumeHistory:
        """The volume's last successful snapshot run and its last failed run of any kind."""
        success = self._db.execute(
            "SELECT max(ended) FROM runs WHERE volume = ? AND action = 'snapshot' AND status = 'ok'",
            (volume,)).fetchone()[0]
        failure = self._db.execute(
            "SELECT ended, error FROM runs WHERE volume = ? AND status = 'failed' ORDER BY ended DESC LIMIT 1",
            (volume,)).fetchone()
        return VolumeHistory(_parse(success), _parse(failure and failure[0]), failure and failure[1])

    def events(self, snapshot: str) -> list[tuple[str, datetime]]:
        rows = self._db.execute("SELECT event, at FROM snapshot_events WHERE snapshot = ? ORDER BY id",
                                (snapshot,)).fetchall()
        return [(event, _parse(at)) for event, at in rows]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
