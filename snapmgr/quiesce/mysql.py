"""mysql: MariaDB and MySQL, through PyMySQL on a connection held open for the window.

MariaDB 10.4 and later: `BACKUP STAGE START ... BLOCK_COMMIT`, which flushes what can
be flushed while writes go on and blocks only commits at the end. Other servers:
`FLUSH TABLES`, then `FLUSH TABLES WITH READ LOCK`. Either way the binary log position
(and GTID) is read while commits are blocked and kept with the snapshot, so a restored
copy can become a replica. The locks end with the session, so a dead snapmgr releases
them: nothing is left for the watchdog."""

from __future__ import annotations

import re
from pathlib import Path

from snapmgr import schema
from snapmgr.errors import SnapmgrError
from snapmgr.quiesce.base import Quiescer, driver, driver_errors
from snapmgr.quiesce.secrets import read_password

BACKUP_STAGES = ("START", "FLUSH", "BLOCK_DDL", "BLOCK_COMMIT")
BACKUP_STAGE_SINCE = (10, 4)


class MysqlQuiescer(Quiescer):
    kind = "mysql"
    options = {"socket": schema.Field(schema.path(), default=Path("/run/mysqld/mysqld.sock")),
               "user": schema.Field(schema.string, default="root"),
               "password_file": schema.Field(schema.path(must_exist=True))}

    def __init__(self, *args):
        super().__init__(*args)
        self.db = None
        self.version = ""
        self.position: dict = {}
        self.staged = False

    @property
    def mariadb_stages(self) -> bool:
        m = re.match(r"(\d+)\.(\d+)", self.version)
        return "mariadb" in self.version.lower() and bool(m) and (int(m[1]), int(m[2])) >= BACKUP_STAGE_SINCE

    def open(self) -> None:
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

    def prepare(self) -> None:
        self.staged = True
        if self.mariadb_stages:
            for stage in BACKUP_STAGES:
                self._sql(f"BACKUP STAGE {stage}")
        else:
            self._sql("FLUSH TABLES")
            self._sql("FLUSH TABLES WITH READ LOCK")
        self.position = self._binlog_position()

    def _binlog_position(self) -> dict:
        status = self._sql("SHOW MASTER STATUS")
        gtid_variable = "gtid_binlog_pos" if "mariadb" in self.version.lower() else "gtid_executed"
        gtid = self._sql(f"SELECT @@GLOBAL.{gtid_variable}")[0][0]
        return {"binlog_file": status[0][0] if status else None, "binlog_position": status[0][1] if status else None,
                "gtid": gtid or None}

    def resume(self) -> None:
        if self.staged:
            self.staged = False
            self._sql("BACKUP STAGE END" if self.mariadb_stages else "UNLOCK TABLES")

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
