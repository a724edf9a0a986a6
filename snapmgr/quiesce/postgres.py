"""postgres: through psycopg 3 on a connection held open for the window.

`backup` (the default) runs pg_backup_start() before the snapshot and pg_backup_stop()
after it, on the same session, and keeps the backup_label and tablespace_map it returns
with the snapshot: restored beside the data directory with the WAL archived up to the
stop position, they make even a non-atomic copy (an rsync volume) recover to a
consistent state. `checkpoint` runs CHECKPOINT first, so that the crash recovery of an
atomic snapshot (btrfs, LVM, ZFS) is short. If snapmgr dies, the session ends and
PostgreSQL aborts the backup by itself: nothing is left for the watchdog."""

from __future__ import annotations


from snapmgr import schema
from snapmgr.errors import SnapmgrError
from snapmgr.quiesce.base import Quiescer, driver, driver_errors
from snapmgr.quiesce.secrets import read_password

# pg_stop_backup(exclusive => false, wait_for_archive): its stop says whether to wait for
# the WAL to be archived. 9.6 lacks the second argument.
WAIT_FOR_ARCHIVE_SINCE = 100000
RENAMED_SINCE = 150000        # pg_backup_start / pg_backup_stop
NOT_IN_PROGRESS = "55000"     # object_not_in_prerequisite_state: no backup to stop


class PostgresQuiescer(Quiescer):
    kind = "postgres"
    in_rollback = "server"
    options = {"host": schema.Field(schema.string, default="/var/run/postgresql"),
               "port": schema.Field(schema.port, default=5432),
               "user": schema.Field(schema.string, default="postgres"),
               "dbname": schema.Field(schema.string, default="postgres"),
               "password_file": schema.Field(schema.path(must_exist=True)),
               "mode": schema.Field(schema.choice("backup", "checkpoint"), default="backup")}

    def __init__(self, *args):
        super().__init__(*args)
        self.db = None
        self.version = 0
        self.backing_up: str | None = None   # "maybe" while the start runs, "yes" once it returned
        self.stopped: dict = {}

    def open(self) -> None:
        if self.opts["mode"] == "checkpoint" and self.context.copied:
            raise self._unfit("mode", f"\"checkpoint\" is only as good as a crash, and {', '.join(self.context.copied)} "
                                      f"is copied file by file (rsync), which no crash ever left: use mode = "
                                      f"\"backup\", or an atomic backend (btrfs, LVM, ZFS)")
        psycopg = driver(self, "psycopg", "psycopg 3", "postgres")
        password = read_password(self.context.config, f"quiesce.{self.name}.password_file", self.opts["password_file"])
        try:
            self.db = psycopg.connect(host=self.opts["host"], port=self.opts["port"], user=self.opts["user"],
                                      dbname=self.opts["dbname"], password=password, autocommit=True,
                                      connect_timeout=max(1, int(self.timeout)), application_name="snapmgr")
            self.version = self.db.info.server_version
            self.db.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
        except psycopg.Error as e:
            raise SnapmgrError(f"quiesce {self.name}: cannot connect to PostgreSQL at {self.opts['host']}:"
                               f"{self.opts['port']}: {_first_line(e)}") from None
        if self.opts["mode"] == "backup" and self.version < WAIT_FOR_ARCHIVE_SINCE:
            raise self._unfit("mode", f"PostgreSQL {self.db.info.server_version} is too old for \"backup\" "
                                      f"(10 or later can); use mode = \"checkpoint\"")

    def prepare(self) -> None:
        if self.opts["mode"] == "checkpoint":
            self._sql("CHECKPOINT")
            return
        label = "snapmgr " + " ".join(self.context.snapshots)
        start = "pg_backup_start(%s, true)" if self.version >= RENAMED_SINCE else "pg_start_backup(%s, true, false)"
        self.backing_up = "maybe"  # a start cut short by the timeout may still have begun
        self._sql(f"SELECT {start}", (label,))
        self.backing_up = "yes"

    def resume(self) -> None:
        if not self.backing_up:
            return
        began, self.backing_up = self.backing_up, None
        archiving = self._sql("SELECT current_setting('archive_mode') <> 'off'")[0]
        stop = "pg_backup_stop(%s)" if self.version >= RENAMED_SINCE else "pg_stop_backup(false, %s)"
        # "Not in progress" is expected only of a start that failed. After a start that
        # returned, the same SQLSTATE means the backup is unusable (the server was
        # promoted meanwhile): an error, not a snapshot graded as application-consistent.
        stopped = self._sql(f"SELECT lsn::text, labelfile, spcmapfile FROM {stop}", (archiving,),
                            unless=NOT_IN_PROGRESS if began == "maybe" else None)
        if stopped is None:
            return
        lsn, label, spcmap = stopped
        self.stopped = {"stop_lsn": lsn, "backup_label": label, "tablespace_map": spcmap or None,
                        "wal_archived": archiving}

    def _sql(self, statement: str, params: tuple = (), unless: str | None = None) -> tuple | None:
        """The first row; None when the statement failed with SQLSTATE `unless`."""
        with driver_errors("psycopg", lambda e: f"{statement.split('(')[0]}: {_first_line(e)}"):
            try:
                return self.db.execute(statement, params).fetchone()
            except Exception as e:
                if unless is None or getattr(e, "sqlstate", None) != unless:
                    raise
                return None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def record(self) -> dict:
        return {"mode": self.opts["mode"], "server_version": self.version, **self.stopped}

    def describe(self) -> str:
        what = "pg_backup_start, then pg_backup_stop" if self.opts["mode"] == "backup" else "CHECKPOINT"
        return f"{what} on {self.opts['host']}:{self.opts['port']}"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
