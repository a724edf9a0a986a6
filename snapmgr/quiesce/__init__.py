"""Quiescers, by the `kind` of a `[quiesce.NAME]` table. Database drivers are imported
only when a quiescer of their kind opens, so none of them is needed to load a config."""

from snapmgr.quiesce.base import Context, Quiescer, Spec
from snapmgr.quiesce.command import CommandQuiescer
from snapmgr.quiesce.fsfreeze import FsfreezeQuiescer
from snapmgr.quiesce.mysql import MysqlQuiescer
from snapmgr.quiesce.postgres import PostgresQuiescer
from snapmgr.quiesce.redis import RedisQuiescer
from snapmgr.quiesce.sqlite import SqliteQuiescer
from snapmgr.quiesce.systemd import SystemdQuiescer

KINDS: dict[str, type[Quiescer]] = {q.kind: q for q in (
    CommandQuiescer, SystemdQuiescer, FsfreezeQuiescer, SqliteQuiescer, PostgresQuiescer, MysqlQuiescer,
    RedisQuiescer)}
