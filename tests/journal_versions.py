"""Journals as older snapmgrs left them, for the tests of upgrading and reading them."""

import contextlib
import sqlite3

from snapmgr import journal


def as_of(path, version: int) -> None:
    """An empty journal of that schema version: the migrations up to it, and no later."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        for script in journal.MIGRATIONS[:version]:
            db.executescript(script)
        db.execute(f"PRAGMA user_version={version}")
