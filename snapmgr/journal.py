"""The history of runs and of snapshots created and deleted, in SQLite.

History only: the snapshot storage is the truth of what exists. WAL and a busy timeout let
a timer's run and a manual run write at once without corrupting or failing each other.

Recording is best effort: a snapshot matters more than its history, so a journal that
cannot be written (damaged, disk full, read-only) never stops a snapshot, a prune or a
delete. The first failure is kept in `failure` for the caller to report once the work is
done; a damaged journal is not written again, other failures (busy, disk full) are
retried at the next write. Reading the history raises it."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from snapmgr import procfs, trust
from snapmgr.errors import SnapmgrError, as_error

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
    """
    CREATE TABLE windows (
        id        INTEGER PRIMARY KEY,
        volumes   TEXT NOT NULL,         -- JSON list of the volumes snapshotted inside
        grp       TEXT,                  -- the group, if the window served one
        pid       INTEGER NOT NULL,
        started   TEXT NOT NULL,
        ended     TEXT,
        status    TEXT NOT NULL,         -- open, closed, undone (by the watchdog), recovered
        plan      TEXT NOT NULL,         -- JSON: each quiescer's undo actions
        grade     TEXT,
        quiesce_s REAL,
        freeze_s  REAL,
        detail    TEXT,
        reported  INTEGER NOT NULL DEFAULT 0  -- whether a later run has told of its end
    );
    CREATE INDEX windows_by_status ON windows (status, reported);
    """,
    """
    CREATE TABLE verifies (
        id         INTEGER PRIMARY KEY,
        volume     TEXT NOT NULL,
        snapshot   TEXT NOT NULL,
        source     TEXT NOT NULL,        -- verify (the command), read (a rotten file met by mount --verify)
        started    TEXT NOT NULL,
        finished   TEXT NOT NULL,
        result     TEXT NOT NULL,        -- intact, damaged, unverifiable, error
        entries    INTEGER,              -- how many entries the snapshot has now
        problems   INTEGER NOT NULL DEFAULT 0,
        detail     TEXT                  -- JSON: the problems, one line each (the first ones), or why
    );
    CREATE INDEX verifies_by_volume ON verifies (volume, finished);
    """,
    """
    CREATE TABLE observations (
        volume   TEXT PRIMARY KEY,
        at       TEXT NOT NULL,          -- when a run last listed the volume's snapshots
        listing  TEXT NOT NULL           -- JSON: what it saw (snapmgr.observed), for readers who cannot list
    );
    """,
    # The identity of a run's process (snapmgr.procfs), NULL in an older snapmgr's runs.
    """
    ALTER TABLE runs ADD COLUMN boot_id TEXT;           -- of the boot it began in
    ALTER TABLE runs ADD COLUMN start_ticks INTEGER;    -- when its process started, in clock ticks since that boot
    """,
    """
    CREATE TABLE rollbacks (
        id           INTEGER PRIMARY KEY,
        run_id       INTEGER REFERENCES runs (id),   -- the last run that worked on it (a resume's)
        volume       TEXT NOT NULL,
        target       TEXT NOT NULL,
        method       TEXT NOT NULL,
        choice       TEXT,               -- what was asked of newer snapshots: destroy-newer, keep-newer
        pre_rollback TEXT,               -- the snapshot of the volume as it was, once taken
        started      TEXT NOT NULL,
        ended        TEXT,
        state        TEXT NOT NULL,      -- begun, rolling-back, cut-short, pending, done, refused, superseded
        detail       TEXT,
        seconds      REAL
    );
    CREATE INDEX rollbacks_by_volume ON rollbacks (volume, id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# The oldest schema a reader that may not migrate the journal (a monitoring user) can
# read: the later migrations only add columns of runs it does without, as it does in the
# rows an older snapmgr wrote, and the rollbacks, of which such a journal holds none.
# The next run as root migrates the journal.
READABLE_FROM = 4
RUN_IDENTITY_SINCE = 5   # the schema from which runs keep their process's boot id and start ticks
ROLLBACKS_SINCE = 6      # the schema from which rollbacks are kept
MAX_DETAIL = 100  # problems of one verify kept in the journal; the count is kept whole
FULL_BELOW = 1 << 20  # free bytes under which a write error is most likely the full disk
# SQLite's primary result codes that mean "not now" or "not here" rather than damage.
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_UNUSABLE = {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
             sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH, sqlite3.SQLITE_NOMEM}


class JournalError(SnapmgrError):
    """The journal cannot be read or written; the snapshots themselves are not affected."""


class JournalDamaged(JournalError):
    def __init__(self, path: Path, detail: str):
        super().__init__(f"journal {path} is damaged ({detail}); move it aside with its -wal and -shm files "
                         f"and snapmgr starts a new one (the snapshots themselves are not affected)")


@dataclass(frozen=True)
class VolumeHistory:
    last_success: datetime | None
    last_failure: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class RunRecord:
    """One run of one action on one volume, as the journal has it."""

    action: str
    pid: int
    started: datetime
    ended: datetime | None
    status: str                     # running, ok, failed
    error: str | None
    boot_id: str | None = None      # the boot it began in, and when its process started
    start_ticks: int | None = None  # in clock ticks since that boot; None: not kept (an older snapmgr's run)

    @property
    def seconds(self) -> float | None:
        return (self.ended - self.started).total_seconds() if self.ended else None


@dataclass(frozen=True)
class WindowRecord:
    """How a quiesce window a volume was snapshotted in went."""

    started: datetime
    ended: datetime | None
    status: str                     # open, closed, undone (by the watchdog), recovered, recovery-failed
    detail: str | None
    quiesce_s: float | None
    freeze_s: float | None
    attempts: int = 0               # tries to resume it that failed in part


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback of a volume, as far as it went."""

    id: int
    volume: str
    target: str
    method: str
    choice: str | None
    pre_rollback: str | None
    started: datetime
    ended: datetime | None
    state: str          # begun, rolling-back, cut-short, pending, done, refused, superseded
    detail: str | None
    seconds: float | None
    run: RunRecord | None    # the last run that worked on it, to tell whether it still does

    @property
    def unfinished(self) -> bool:
        """Whether the volume may be part way between what it was and the target."""
        return self.state in UNFINISHED


UNFINISHED = ("rolling-back", "cut-short")   # rolling-back: also while its run still works on it


@dataclass(frozen=True)
class Verify:
    """One verify of one snapshot, or one rotten file met on reading."""

    volume: str
    snapshot: str
    source: str
    finished: datetime
    result: str
    entries: int | None
    problems: int
    detail: list[str]


@dataclass(frozen=True)
class Window:
    """A quiesce window that its snapmgr did not close itself."""

    id: int
    volumes: tuple[str, ...]
    pid: int
    started: datetime
    status: str
    plan: list
    detail: str | None
    boot_id: str | None = None    # of the boot it was opened in; None: unknown (an older snapmgr's window)
    attempts: int = 0             # tries to resume it that failed in part
    tried_at: datetime | None = None   # when the last of them was


class Run:
    """One running action; records the snapshots it creates and deletes."""

    def __init__(self, journal: Journal, run_id: int | None):
        self._journal, self.id = journal, run_id

    def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self._journal._finish(self.id, "ok", None)
        else:
            self._journal._finish(self.id, "failed", str(error) or type(error).__name__)

    def created(self, snapshot: str) -> None:
        self._journal._event(self.id, snapshot, "created")

    def deleted(self, snapshot: str) -> None:
        self._journal._event(self.id, snapshot, "deleted")


class Journal:
    def __init__(self, path: Path, read_only: bool = False):
        """`read_only`: for readers who may not write (a monitoring user): nothing is
        created, migrated or written, and an outdated schema is an error."""
        self.path = path
        self.read_only = read_only
        self.failure: JournalError | None = None   # the first write that failed
        self._db: sqlite3.Connection | None = None
        self._version = SCHEMA_VERSION   # of the journal opened: older for a reader that may not migrate it
        # Of a read-only connection to the file alone: the file as it was when opened.
        self._immutable: tuple[int, int, int] | None = None

    def close(self) -> None:
        """Close the connection; the next use opens another."""
        if self._db is not None:
            self._db.close()
            self._db = None

    # Reading: raises JournalError ---------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[None]:
        """The reads inside see the journal as it was at one moment (one read
        transaction), not each as a writer left it meanwhile. Inside another, it is that
        one; nothing may be recorded inside."""
        with self._guard():
            db = self._connection()
            if db.in_transaction:
                db = None
            else:
                db.execute("BEGIN")
        try:
            yield
        finally:
            if db is not None and db is self._db and db.in_transaction:
                with self._guard():
                    db.execute("COMMIT")   # of reads only: nothing to keep or lose

    def history(self, volume: str) -> VolumeHistory:
        """The volume's last successful snapshot run and its last failed run of any kind."""
        with self._guard():
            db = self._connection()
            success = db.execute(
                "SELECT max(ended) FROM runs WHERE volume = ? AND action = 'snapshot' AND status = 'ok'",
                (volume,)).fetchone()[0]
            failure = db.execute(
                "SELECT ended, error FROM runs WHERE volume = ? AND status = 'failed' ORDER BY ended DESC LIMIT 1",
                (volume,)).fetchone()
            return VolumeHistory(_parse(success), _parse(failure and failure[0]), failure and failure[1])

    def events(self, snapshot: str) -> list[tuple[str, datetime]]:
        with self._guard():
            rows = self._connection().execute(
                "SELECT event, at FROM snapshot_events WHERE snapshot = ? ORDER BY id", (snapshot,)).fetchall()
            return [(event, _parse(at)) for event, at in rows]

    def latest_verifies(self) -> list[Verify]:
        """Per snapshot, its latest verify (or file found rotten on reading), oldest first."""
        with self._guard():
            rows = self._connection().execute(
                "SELECT volume, snapshot, source, finished, result, entries, problems, detail FROM verifies "
                "WHERE id IN (SELECT max(id) FROM verifies GROUP BY snapshot) ORDER BY id").fetchall()
        return [Verify(r[0], r[1], r[2], _parse(r[3]), r[4], r[5], r[6], json.loads(r[7] or "[]")) for r in rows]

    def last_runs(self, volume: str) -> list[RunRecord]:
        """Per action, the latest run of each status (running, ok, failed), oldest first."""
        with self._guard():
            db = self._connection()
            identity = "boot_id, start_ticks" if self._version >= RUN_IDENTITY_SINCE else "NULL, NULL"
            rows = db.execute(
                f"SELECT action, pid, started, ended, status, error, {identity} FROM runs WHERE id IN "
                "(SELECT max(id) FROM runs WHERE volume = ? GROUP BY action, status) ORDER BY id", (volume,)).fetchall()
        return [RunRecord(a, pid, _parse(started), _parse(ended), status, error, boot, ticks)
                for a, pid, started, ended, status, error, boot, ticks in rows]

    def run_counts(self) -> dict[tuple[str, str, str], int]:
        """(volume, action, status) -> how many runs the journal holds."""
        with self._guard():
            rows = self._connection().execute(
                "SELECT volume, action, status, count(*) FROM runs GROUP BY volume, action, status").fetchall()
        return {(v, a, s): n for v, a, s, n in rows}

    def last_window(self, volume: str) -> WindowRecord | None:
        """The latest quiesce window the volume was snapshotted in."""
        return self._last_window(volume, "1")

    def unresumed_window(self, volume: str) -> WindowRecord | None:
        """The latest of the volume's windows not fully resumed, whatever came after it:
        an undo action failed, to be tried again, or its recovery was given up."""
        return self._last_window(volume, "w.status = 'recovery-failed' OR (w.status = 'open' AND "
                                         "coalesce(json_extract(w.plan, '$.attempts'), 0) > 0)")

    def _last_window(self, volume: str, condition: str) -> WindowRecord | None:
        with self._guard():
            row = self._connection().execute(
                "SELECT w.started, w.ended, w.status, w.detail, w.quiesce_s, w.freeze_s, "
                "coalesce(json_extract(w.plan, '$.attempts'), 0) FROM windows w, "
                f"json_each(w.volumes) v WHERE v.value = ? AND ({condition}) ORDER BY w.id DESC LIMIT 1",
                (volume,)).fetchone()
        return row and WindowRecord(_parse(row[0]), _parse(row[1]), *row[2:])

    def last_rollback(self, volume: str, states: tuple[str, ...] = ()) -> RollbackRecord | None:
        """The volume's latest rollback (in one of `states`, if given)."""
        if self._version < ROLLBACKS_SINCE:
            return None   # a reader of a journal one upgrade behind: none kept yet
        where = f" AND b.state IN ({', '.join('?' * len(states))})" if states else ""
        with self._guard():
            row = self._connection().execute(
                "SELECT b.id, b.volume, b.target, b.method, b.choice, b.pre_rollback, b.started, b.ended, b.state, "
                "b.detail, b.seconds, r.action, r.pid, r.started, r.ended, r.status, r.error, r.boot_id, "
                "r.start_ticks FROM rollbacks b LEFT JOIN runs r ON r.id = b.run_id "
                f"WHERE b.volume = ?{where} ORDER BY b.id DESC LIMIT 1", (volume, *states)).fetchone()
        if row is None:
            return None
        run = RunRecord(row[11], row[12], _parse(row[13]), _parse(row[14]), *row[15:]) if row[11] else None
        return RollbackRecord(row[0], row[1], row[2], row[3], row[4], row[5], _parse(row[6]), _parse(row[7]),
                              *row[8:11], run)

    def observations(self) -> dict[str, tuple[datetime, str]]:
        """Volume -> when a run last listed its snapshots, and what it saw (JSON text)."""
        with self._guard():
            rows = self._connection().execute("SELECT volume, at, listing FROM observations").fetchall()
        return {volume: (_parse(at), listing) for volume, at, listing in rows}

    # Recording: best effort ---------------------------------------------------------

    @contextmanager
    def run(self, volume: str, action: str, pid: int) -> Iterator[Run]:
        """Record the action; a failure is recorded with its message and re-raised."""
        run = self.begin(volume, action, pid)
        try:
            yield run
        except BaseException as e:
            run.finish(e)
            raise
        run.finish()

    def begin(self, volume: str, action: str, pid: int) -> Run:
        """`pid`: the process that runs it, whose identity is kept for monitoring to tell
        whether it still runs (snapmgr.monitor.processes)."""
        return Run(self, self._write("INSERT INTO runs (volume, action, pid, started, status, boot_id, start_ticks) "
                                     "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                                     (volume, action, pid, _now(), procfs.boot_id(), procfs.start_ticks(pid))))

    def verified(self, snapshot: str, started: datetime, result: str, entries: int | None,
                 detail: list[str]) -> None:
        """How a verify of the snapshot ended; `detail`: its problems, one line each, or why
        it could not be verified. The first MAX_DETAIL lines are kept, and the count."""
        self._verify_row(snapshot, "verify", started, result, entries, detail)

    def verify_failed(self, snapshot: str, path: str, detail: str) -> None:
        """A file of the snapshot found not to match its manifest when read (mount --verify):
        `path` as the user sees it, `detail` what did not match."""
        self._verify_row(snapshot, "read", datetime.now(timezone.utc), "damaged", None, [f"{path}: {detail}"])

    def _verify_row(self, snapshot: str, source: str, started: datetime, result: str, entries: int | None,
                    detail: list[str]) -> None:
        self._write("INSERT INTO verifies (volume, snapshot, source, started, finished, result, entries, problems, "
                    "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (snapshot.split("@", 1)[0], snapshot, source, started.isoformat(timespec="microseconds"), _now(),
                     result, entries, len(detail) if result == "damaged" else 0, json.dumps(detail[:MAX_DETAIL])))

    def window_opened(self, volumes: list[str], group: str | None, pid: int, plan: list,
                      boot_id: str | None = None) -> int | None:
        """Recorded before the first prepare, so that a run finding it still open later
        can resume what it paused, knowing whether the machine restarted since."""
        stored = {"boot_id": boot_id, "steps": plan}
        return self._write("INSERT INTO windows (volumes, grp, pid, started, status, plan) VALUES (?, ?, ?, ?, 'open', ?)",
                           (json.dumps(volumes), group, pid, _now(), json.dumps(stored)))

    def window_ended(self, window_id: int | None, status: str, detail: str | None, grade: str | None = None,
                     quiesce_s: float | None = None, freeze_s: float | None = None) -> None:
        if window_id is not None:
            # Whoever ends it first says how: the watchdog's account is not overwritten.
            self._write("UPDATE windows SET ended = ?, status = ?, detail = ?, grade = ?, quiesce_s = ?, freeze_s = ?, "
                        "reported = ? WHERE id = ? AND status = 'open'",
                        (_now(), status, detail, grade, quiesce_s, freeze_s, int(status == "closed"), window_id))

    def window_tried(self, window_id: int | None, steps: list, attempts: int, status: str, detail: str | None,
                     grade: str | None = None, quiesce_s: float | None = None, freeze_s: float | None = None) -> None:
        """A try to resume the window: its plan marked with the undo actions done, the
        tries so far, and how it stands now: `open` (an action failed, a later run tries
        it again), `recovered` or `recovery-failed`."""
        if window_id is not None:
            self._write("UPDATE windows SET plan = json_set(CASE json_type(plan) WHEN 'array' THEN "
                        "json_object('boot_id', NULL) ELSE plan END, '$.steps', json(?), '$.attempts', ?, "
                        "'$.tried_at', ?), status = ?, ended = CASE ? WHEN 'open' THEN NULL ELSE ? END, detail = ?, "
                        "grade = coalesce(?, grade), quiesce_s = coalesce(?, quiesce_s), "
                        "freeze_s = coalesce(?, freeze_s), reported = 0 "
                        "WHERE id = ? AND status IN ('open', 'recovery-failed')",
                        (json.dumps(steps), attempts, _now(), status, status, _now(), detail, grade, quiesce_s,
                         freeze_s, window_id))

    def rollback_begun(self, run: Run, volume: str, target: str, method: str, choice: str | None) -> int | None:
        return self._write("INSERT INTO rollbacks (run_id, volume, target, method, choice, started, state) "
                           "VALUES (?, ?, ?, ?, ?, ?, 'begun')", (run.id, volume, target, method, choice, _now()))

    def rollback_moved(self, rollback_id: int, state: str, detail: str | None = None, run: Run | None = None,
                       pre_rollback: str | None = None, seconds: float | None = None) -> bool:
        """The rollback is now in `state`; `run`: a resume's, which works on it from now.
        Whether that was recorded."""
        ended = None if state in ("begun", "rolling-back") else _now()
        # Done (or pending), the volume is the target, whatever earlier rollbacks left it
        # part way at: in the same transaction, so that no kill can leave one to resume.
        superseded = [("UPDATE rollbacks SET state = 'superseded', ended = coalesce(ended, ?) WHERE volume = "
                       "(SELECT volume FROM rollbacks WHERE id = ?) AND id < ? AND state IN "
                       f"({', '.join('?' * len(UNFINISHED))})", (_now(), rollback_id, rollback_id, *UNFINISHED))]
        recorded = self._write("UPDATE rollbacks SET state = ?, ended = ?, detail = coalesce(?, detail), "
                               "run_id = coalesce(?, run_id), pre_rollback = coalesce(?, pre_rollback), "
                               "seconds = coalesce(?, seconds) WHERE id = ?",
                               (state, ended, detail, run and run.id, pre_rollback, seconds, rollback_id),
                               *(superseded if state in ("done", "pending") else ()))
        return recorded is not None

    def observed(self, volume: str, at: datetime, listing: dict) -> None:
        """What listing the volume's snapshots at `at` showed. It replaces what was seen
        before, never what was seen after (two runs ending together)."""
        self._write("INSERT INTO observations (volume, at, listing) VALUES (?, ?, ?) ON CONFLICT (volume) DO UPDATE "
                    "SET at = excluded.at, listing = excluded.listing WHERE excluded.at > observations.at",
                    (volume, at.astimezone(timezone.utc).isoformat(timespec="microseconds"),
                     json.dumps(listing, sort_keys=True)))

    def window_reported(self, window_id: int) -> None:
        self._write("UPDATE windows SET reported = 1 WHERE id = ?", (window_id,))

    def unsettled_windows(self, failed: bool = False) -> list[Window]:
        """Windows left open, and those the watchdog or a recovery ended that no run has
        told of yet; `failed`: also those whose recovery failed."""
        return self._windows("status = 'open' OR reported = 0" + (" OR status = 'recovery-failed'" if failed else ""))

    def window(self, window_id: int) -> Window | None:
        """The window as it stands now."""
        return next(iter(self._windows("id = ?", (window_id,))), None)

    def _windows(self, where: str, args: tuple = ()) -> list[Window]:
        with self._guard():
            rows = self._connection().execute(
                f"SELECT id, volumes, pid, started, status, plan, detail FROM windows WHERE {where} ORDER BY id",
                args).fetchall()
        windows = []
        for i, v, pid, started, status, plan, detail in rows:
            stored = json.loads(plan)   # a plain list of steps before boot ids were kept
            if isinstance(stored, list):
                stored = {"steps": stored, "boot_id": None}
            windows.append(Window(i, tuple(json.loads(v)), pid, _parse(started), status, stored["steps"], detail,
                                  stored["boot_id"], stored.get("attempts", 0), _parse(stored.get("tried_at"))))
        return windows

    def _finish(self, run_id: int | None, status: str, error: str | None) -> None:
        if run_id is not None:
            self._write("UPDATE runs SET ended = ?, status = ?, error = ? WHERE id = ?", (_now(), status, error, run_id))

    def _event(self, run_id: int | None, snapshot: str, event: str) -> None:
        if run_id is not None:
            self._write("INSERT INTO snapshot_events (run_id, snapshot, event, at) VALUES (?, ?, ?, ?)",
                        (run_id, snapshot, event, _now()))

    def _write(self, sql: str, params: tuple, *more: tuple[str, tuple]) -> int | None:
        """Run the statement, and `more` (each a statement and its parameters), in one
        transaction; the new row's id, or None when the journal could not be written
        (then `failure` says why)."""
        if isinstance(self.failure, JournalDamaged):
            return None
        try:
            with self._guard(), self._transaction(self._connection()) as db:
                row_id = db.execute(sql, params).lastrowid
                for statement, values in more:
                    db.execute(statement, values)
                return row_id
        except JournalError as e:
            self.failure = self.failure or e
            return None

    # The database -----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None and self.read_only:
            self._db = self._open_read_only()
        if self._db is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                trust.check(self.path.parent)  # root writes here, through whatever is on the way
            except trust.Untrusted as e:
                raise JournalError(f"journal {self.path} cannot be used: {self.path.parent}: {e}") from None
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the
                # last commits, which is acceptable for history and saves an fsync per commit.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
                self._migrate(db)
                self._check_schema(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _open_read_only(self) -> sqlite3.Connection:
        """A connection that writes nothing, not even the -wal and -shm files. A WAL
        reader needs the -shm file: while a writer has the journal open it exists (with
        the journal's own mode and group, so whoever may read the journal may read it),
        and SQLite reads it without writing. When no writer has it open, its last
        connection has folded the -wal file into the database and removed both: the
        file alone is then the whole journal, read as immutable (no locks, no -shm).
        A writer starting meanwhile makes a -wal file appear, or changes the file: see
        `raced`."""
        if not self.path.is_file():
            raise JournalError(f"journal {self.path} does not exist: no run has been recorded yet")
        self._immutable = None if Path(f"{self.path}-wal").exists() else _identity(self.path)
        mode = "mode=ro" if self._immutable is None else "immutable=1"
        uri = "file:" + urllib.parse.quote(str(self.path)) + "?" + mode
        db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if not READABLE_FROM <= version <= SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} has schema version {version}, not this snapmgr's "
                                   f"({SCHEMA_VERSION}): " + ("run any snapmgr command as root to upgrade it"
                                                              if version < SCHEMA_VERSION else "upgrade snapmgr"))
            self._check_schema(db, version)
            self._version = version
        except BaseException:
            db.close()
            raise
        return db

    def raced(self) -> bool:
        """Whether a writer may have changed the journal under a read-only connection that
        read the file alone (a -wal file appeared, or the file changed, since it was
        opened): then read again after close()."""
        return self._db is not None and self._immutable is not None and \
            (Path(f"{self.path}-wal").exists() or _identity(self.path) != self._immutable)

    def _migrate(self, db: sqlite3.Connection) -> None:
        with self._transaction(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} has schema version {version}, newer than this "
                                   f"snapmgr understands ({SCHEMA_VERSION}); upgrade snapmgr")
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _check_schema(self, db: sqlite3.Connection, version: int = SCHEMA_VERSION) -> None:
        """Every table and column the migrations up to `version` make must be there: a
        journal copied from elsewhere or edited by hand can carry the right version and the
        wrong tables."""
        missing = _expected_columns(version) - _columns(db)
        if missing:
            table, column = min(missing)  # a missing table sorts before its columns
            raise JournalDamaged(self.path, f"no table {table}" if column == "*"
                                 else f"table {table} has no column {column}")

    @contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so a concurrent writer waits on the
        # busy timeout instead of failing half-way through.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (a full disk): a ROLLBACK then
            # fails, and its error would hide the one that matters.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite's and the filesystem's errors as one-line journal errors."""
        try:
            yield
        except sqlite3.Error as e:
            code = (getattr(e, "sqlite_errorcode", None) or sqlite3.SQLITE_ERROR) & 0xFF
            if code in _BUSY:
                raise JournalError(f"journal {self.path} is busy: another process held it for over "
                                   f"{BUSY_TIMEOUT_S}s") from None
            if code in _UNUSABLE:
                raise JournalError(f"journal {self.path} cannot be used: {e}{self._full()}") from None
            raise JournalDamaged(self.path, str(e)) from None
        except OSError as e:
            raise JournalError(f"journal {self.path} cannot be used: {as_error(e)}") from None

    def _full(self) -> str:
        # SQLite reports a full filesystem as "disk I/O error" as often as "disk is full".
        with contextlib.suppress(OSError):
            fs = os.statvfs(self.path.parent)
            if fs.f_bavail * fs.f_frsize < FULL_BELOW:
                return f" ({self.path.parent} is on a full filesystem)"
        return ""


@functools.cache
def _expected_columns(version: int) -> frozenset[tuple[str, str]]:
    """What the migrations up to `version` make, read from a database they built in memory."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        for script in MIGRATIONS[:version]:
            db.executescript(script)
        return frozenset(_columns(db))


def _columns(db: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, column) of every column, and (table, '*') of every table."""
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {(t, "*") for t in tables} | {
        (t, row[0]) for t in tables for row in db.execute("SELECT name FROM pragma_table_info(?)", (t,))}


def _identity(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or written."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None

