"""mysql: MariaDB and MySQL, through PyMySQL on a connection held open for the window.

MariaDB 10.4 and later: `BACKUP STAGE START ... BLOCK_COMMIT`, which flushes what can
be flushed while writes go on and blocks only commits at the end. Other servers:
`FLUSH TABLES`, then `FLUSH TABLES WITH READ LOCK`, on MySQL 8.0 and later inside
`LOCK INSTANCE FOR BACKUP`. Either way the binary log position (and GTID) is read while
commits are blocked and kept with the snapshot, so a restored copy can become a replica.
The locks end with the session, so a dead snapmgr releases them: nothing is left for
the watchdog.

None of these stops InnoDB flushing pages in the background: only an atomic snapshot
(btrfs, LVM, ZFS) of a server held so is consistent, and a copy made file by file (rsync)
is refused."""

from __future__ import annotations

import re
from pathlib import Path

from snapmgr import schema
from snapmgr.errors import SnapmgrError
from snapmgr.quiesce.base import Quiescer, driver, driver_errors
from snapmgr.quiesce.secrets import read_password

BACKUP_STAGES = ("START", "FLUSH", "BLOCK_DDL", "BLOCK_COMMIT")
BACKUP_STAGE_SINCE = (10, 4)         # MariaDB
BACKUP_LOCK_SINCE = (8, 0)           # MySQL: LOCK INSTANCE FOR BACKUP
BINARY_LOG_STATUS_SINCE = (8, 2)     # MySQL: SHOW MASTER STATUS renamed, and gone in 8.4


def release(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


class MysqlQuiescer(Quiescer):
    kind = "mysql"
    in_rollback = "server"
    options = {"socket": schema.Field(schema.path(), default=Path("/run/mysqld/mysqld.sock")),
               "user": schema.Field(schema.string, default="root"),
               "password_file": schema.Field(schema.path(must_exist=True))}

    def __init__(self, *args):
        super().__init__(*args)
        self.db = None
        self.version = ""
        self.lock: tuple[str, ...] = ()
        self.unlock: tuple[str, ...] = ()
        self.position: dict = {}
        self.locked = False

    def open(self) -> None:
        if self.context.copied:
            # Blocking commits does not stop InnoDB flushing pages and writing redo, so a
            # copy made file by file over some seconds may not recover.
            raise self._unfit("kind", f"{', '.join(self.context.copied)} is copied file by file (rsync) while "
                                      f"InnoDB goes on writing pages, so the copy might not recover: snapshot the "
                                      f"data with btrfs, LVM or ZFS, or stop the server with a systemd quiescer")
        pymysql = driver(self, "pymysql", "PyMySQL", "mysql")
        password = read_password(self.context.config, f"quiesce.{self.name}.password_file", self.opts["password_file"])
        timeout = max(1, int(self.timeout))
        try:
            self.db = pymysql.connect(unix_socket=str(self.opts["socket"]), user=self.opts["user"],
                                      password=password or "", connect_timeout=timeout, read_timeout=timeout,
                                      write_timeout=timeout, autocommit=True)
        except pymysql.Error as e:
            raise SnapmgrError(f"quiesce {self.name}: cannot connect to {self.opts['socket']}: {e.args[-1]}") from None
        self.version = self._sql("SELECT VERSION()")[0][0]
        # Waits for a lock (a long query holding a table) end at the timeout, not never.
        self._sql(f"SET SESSION lock_wait_timeout = {timeout}")
        mariadb, since = "mariadb" in self.version.lower(), release(self.version)
        if mariadb and since >= BACKUP_STAGE_SINCE:
            self.lock, self.unlock = tuple(f"BACKUP STAGE {stage}" for stage in BACKUP_STAGES), ("BACKUP STAGE END",)
        elif not mariadb and since >= BACKUP_LOCK_SINCE:
            # The backup lock alone lets DML go on (it serves tools that copy the redo log
            # as it grows), so the read lock is still what stops commits; the backup lock
            # adds what the read lock lets through: files created, renamed or removed
            # (PURGE BINARY LOGS) and InnoDB changes written without redo. It needs BACKUP_ADMIN.
            self.lock = ("LOCK INSTANCE FOR BACKUP", "FLUSH TABLES", "FLUSH TABLES WITH READ LOCK")
            self.unlock = ("UNLOCK TABLES", "UNLOCK INSTANCE")
        else:
            self.lock, self.unlock = ("FLUSH TABLES", "FLUSH TABLES WITH READ LOCK"), ("UNLOCK TABLES",)

    def prepare(self) -> None:
        for statement in self.lock:
            self._sql(statement)
            self.locked = True
        self.position = self._binlog_position()

    def _binlog_position(self) -> dict:
        mariadb = "mariadb" in self.version.lower()
        # MariaDB keeps SHOW MASTER STATUS (SHOW BINLOG STATUS is only its alias, since 10.5.2).
        renamed = not mariadb and release(self.version) >= BINARY_LOG_STATUS_SINCE
        status = self._sql("SHOW BINARY LOG STATUS" if renamed else "SHOW MASTER STATUS")
        gtid = self._sql(f"SELECT @@GLOBAL.{'gtid_binlog_pos' if mariadb else 'gtid_executed'}")[0][0]
        return {"binlog_file": status[0][0] if status else None, "binlog_position": status[0][1] if status else None,
                "gtid": gtid or None}

    def resume(self) -> None:
        locked, self.locked = self.locked, False
        # A lost connection (a statement timed out) took its locks with it.
        if locked and self.db.open:
            for statement in self.unlock:
                self._sql(statement)

    def _sql(self, statement: str) -> tuple:
        with driver_errors("pymysql", lambda e: f"{statement}: {e.args[-1]}"), self.db.cursor() as cursor:
            cursor.execute(statement)
            return cursor.fetchall()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def record(self) -> dict:
        return {"server_version": self.version, **self.position}

    def describe(self) -> str:
        return f"BACKUP STAGE or FLUSH TABLES WITH READ LOCK on {self.opts['socket']}, recording the binlog position"
