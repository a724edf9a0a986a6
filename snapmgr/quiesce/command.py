"""command: a `pre` program before the snapshot and a `post` program after it (argv
lists, never a shell). `post` runs whenever `pre` started, also when `pre` failed or
timed out, so it must be safe to run after a partial `pre` (and twice, after a crash)."""

from __future__ import annotations

import logging
import shlex

from snapmgr import schema, sh
from snapmgr.quiesce import undo
from snapmgr.quiesce.base import Quiescer

log = logging.getLogger(__name__)


class CommandQuiescer(Quiescer):
    kind = "command"
    options = {"pre": schema.Field(schema.argv, required=True), "post": schema.Field(schema.argv)}

    def env(self, phase: str) -> dict[str, str]:
        # SNAPMGR_PHASE stays pre or post in a rollback too: a script shared by both that
        # branches on it must still stop and start its service. SNAPMGR_ACTION tells them apart.
        return {"SNAPMGR_PHASE": phase,
                "SNAPMGR_ACTION": self.context.purpose,
                "SNAPMGR_QUIESCER": self.name,
                "SNAPMGR_VOLUMES": " ".join(self.context.volumes),
                "SNAPMGR_SNAPSHOT": " ".join(self.context.snapshots),
                "SNAPMGR_DRY_RUN": "1" if self.context.dry_run else "0"}

    def undo(self) -> list[dict]:
        post = self.opts["post"]
        return [undo.run_action(post, self.env("post"), self.timeout)] if post else []

    def prepare(self) -> None:
        self._run("pre")

    def resume(self) -> None:
        if self.opts["post"]:
            self._run("post")

    def _run(self, phase: str) -> None:
        # holds_locks=False: a `post` that starts a service must not pass the volume lock on to it.
        result = sh.run(self.opts[phase], timeout=self.timeout, env=self.env(phase), check=False, holds_locks=False)
        for stream in (result.stdout, result.stderr):
            for line in stream.splitlines():
                log.info("quiesce %s: %s: %s", self.name, phase, line)
        if result.returncode != 0:
            raise sh.CommandError(result.argv, result.returncode, result.stderr)

    def describe(self) -> str:
        post = f", then {shlex.join(self.opts['post'])}" if self.opts["post"] else ""
        return f"run {shlex.join(self.opts['pre'])}{post}"
