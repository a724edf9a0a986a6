"""redis: a fresh RDB dump, finished before the snapshot.

`BGSAVE` (`BGSAVE SCHEDULE` when a save or an AOF rewrite is running), then INFO
persistence is polled until a save that started after prepare() has finished with
`rdb_last_bgsave_status:ok`, and no AOF rewrite is in progress. Redis writes its dump
to a temporary file and renames it, so the snapshot holds a complete dump whatever Redis
does afterwards: there is nothing to resume."""

from __future__ import annotations

import time

from snapmgr import schema
from snapmgr.errors import SnapmgrError
from snapmgr.quiesce.base import Quiescer, driver, driver_errors
from snapmgr.quiesce.secrets import read_password

POLL_S = 0.05


class RedisQuiescer(Quiescer):
    kind = "redis"
    options = {"host": schema.Field(schema.string, default="127.0.0.1"),
               "port": schema.Field(schema.port, default=6379),
               "password_file": schema.Field(schema.path(must_exist=True))}

    def __init__(self, *args):
        super().__init__(*args)
        self.client = None
        self.saved: dict = {}

    def open(self) -> None:
        redis = driver(self, "redis", "redis-py", "redis")
        password = read_password(self.context.config, f"quiesce.{self.name}.password_file", self.opts["password_file"])
        self.client = redis.Redis(host=self.opts["host"], port=self.opts["port"], password=password,
                                  socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        self._call(self.client.ping)

    def prepare(self) -> None:
        deadline = time.monotonic() + self.timeout
        before = self._persistence()
        # A save already running started before us and may miss the latest writes.
        self._call(self.client.bgsave, schedule=bool(before["rdb_bgsave_in_progress"]
                                                     or before["aof_rewrite_in_progress"]))
        while True:
            now = self._persistence()
            if not now["rdb_bgsave_in_progress"]:
                if _newer(now, before) and not now["aof_rewrite_in_progress"]:
                    self.saved = {"rdb_last_save_time": now["rdb_last_save_time"]}
                    return
                if now["rdb_last_bgsave_status"] != before["rdb_last_bgsave_status"]:
                    raise SnapmgrError("BGSAVE failed (rdb_last_bgsave_status:err); the Redis log says why")
            if time.monotonic() > deadline:
                raise SnapmgrError(f"BGSAVE did not finish within {self.timeout:g}s "
                                   f"(rdb_last_bgsave_status:{now['rdb_last_bgsave_status']})")
            time.sleep(POLL_S)

    def resume(self) -> None:
        """Nothing to undo: a dump pauses nobody."""

    def _persistence(self) -> dict:
        return self._call(self.client.info, "persistence")

    def _call(self, method, *args, **kwargs):
        with driver_errors("redis", lambda e: f"Redis at {self.opts['host']}:{self.opts['port']}: {e}"):
            return method(*args, **kwargs)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def record(self) -> dict:
        return self.saved

    def describe(self) -> str:
        return f"BGSAVE on {self.opts['host']}:{self.opts['port']} and wait for it"


def _newer(now: dict, before: dict) -> bool:
    """Whether a save succeeded since `before`: Redis 7 counts them; older ones only show
    the time of the last, to the second."""
    return now.get("rdb_saves", 0) > before.get("rdb_saves", 0) or now["rdb_last_save_time"] > before["rdb_last_save_time"]
