"""sqlite: a checkpoint, then a write lock held for the window.

`PRAGMA wal_checkpoint(TRUNCATE)` moves committed pages into the database file, then
`BEGIN IMMEDIATE` on a connection held open through the snapshot keeps every writer out,
so the file, its `-wal` and its `-journal` are captured as one committed state. Readers
keep working. The lock ends with snapmgr's process, so the watchdog has nothing to undo."""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

from snapmgr import schema
from snapmgr.errors import SnapmgrError, quote
from snapmgr.quiesce.base import Quiescer


class SqliteQuiescer(Quiescer):
    kind = "sqlite"
    in_rollback = "server"
    options = {"databases": schema.Field(schema.list_of(schema.path(must_exist=True), non_empty=True),
                                         required=True)}

    def __init__(self, *args):
        super().__init__(*args)
        self.connections: dict[Path, sqlite3.Connection] = {}
        self.modes: dict[str, str] = {}

    def open(self) -> None:
        for path in self.opts["databases"]:
            # isolation_level=None: transactions are exactly the statements sent here.
            db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=rw", uri=True, timeout=self.timeout,
                                 isolation_level=None)
            self.connections[path] = db
            try:
                self.modes[str(path)] = db.execute("PRAGMA journal_mode").fetchone()[0]
            except sqlite3.DatabaseError as e:
                raise SnapmgrError(f"quiesce {self.name}: {quote(path)} is not a usable SQLite database: {e}") from None

    def prepare(self) -> None:
        for path, db in self.connections.items():
            try:
                if self.modes[str(path)] == "wal":
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise SnapmgrError(f"{quote(path)}: cannot lock it for writing within {self.timeout:g}s: {e}") from None

    def resume(self) -> None:
        for db in self.connections.values():
            if db.in_transaction:
                db.execute("ROLLBACK")

    def close(self) -> None:
        for db in self.connections.values():
            db.close()
        self.connections.clear()

    def record(self) -> dict:
        return {"journal_modes": self.modes}

    def describe(self) -> str:
        return "checkpoint and write-lock " + ", ".join(map(str, self.opts["databases"]))
