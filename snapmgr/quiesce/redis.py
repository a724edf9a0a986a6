"""redis: a fresh RDB dump, finished before the snapshot.

A save already running began before the window and may miss the latest writes, so it is
waited for first; then `BGSAVE SCHEDULE` (which waits for an AOF rewrite in progress),
and INFO persistence is polled until a save that started after that point has ended,
with `rdb_last_bgsave_status:ok`. Redis writes its dump to a temporary file and renames
it, so the snapshot holds a complete dump whatever Redis does afterwards: there is
nothing to resume."""

from __future__ import annotations

import time

from snapmgr import schema
from snapmgr.errors import SnapmgrError
from snapmgr.quiesce.base import Quiescer, driver, driver_errors
from snapmgr.quiesce.secrets import read_password

POLL_S = 0.05


class RedisQuiescer(Quiescer):
    kind = "redis"
    in_rollback = "server"
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
        before = self._until(deadline, lambda now: not now["rdb_bgsave_in_progress"], "the save already running")
        if "rdb_saves" not in before:
            # Before Redis 7 a new save shows only as a later second of rdb_last_save_time:
            # ours must not end in the same second as the last one.
            before = self._until(deadline, lambda now: self._call(self.client.time)[0] > now["rdb_last_save_time"],
                                 "the second of the last save")
        try:
            self._call(self.client.bgsave, schedule=True)
        except SnapmgrError as e:
            # Someone else's save started since `before`: it serves as well as ours.
            if "already in progress" not in str(e):
                raise
        after = self._until(deadline, lambda now: _save_ended(now, before) and not now["aof_rewrite_in_progress"],
                            "BGSAVE")
        if after["rdb_last_bgsave_status"] != "ok":
            raise SnapmgrError("BGSAVE failed (rdb_last_bgsave_status:err); the Redis log says why")
        self.saved = {"rdb_last_save_time": after["rdb_last_save_time"]}

    def _until(self, deadline: float, done, what: str) -> dict:
        """INFO persistence once `done` holds; an error past the deadline."""
        while not done(now := self._persistence()):
            if time.monotonic() > deadline:
                raise SnapmgrError(f"{what} did not finish within {self.timeout:g}s "
                                   f"(rdb_last_bgsave_status:{now['rdb_last_bgsave_status']})")
            time.sleep(POLL_S)
        return now

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


def _save_ended(now: dict, before: dict) -> bool:
    """Whether a save that started after `before` has ended, well or not. Redis 7 counts
    saves as they start; older ones show only the time of the last success (to the
    second) and whether the last save failed."""
    if now["rdb_bgsave_in_progress"]:
        return False
    if "rdb_saves" in now:
        return now["rdb_saves"] > before["rdb_saves"]
    return now["rdb_last_save_time"] > before["rdb_last_save_time"] or \
        now["rdb_last_bgsave_status"] != before["rdb_last_bgsave_status"]
