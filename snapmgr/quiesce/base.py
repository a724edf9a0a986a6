"""The quiescer protocol: what the window may ask of any way of pausing a service.

A quiescer serves one `[quiesce.NAME]` table for one window. Everything it needs while
services are paused (modules, connections, descriptors) it gets in open(), before the
window starts; prepare() pauses, resume() undoes it. What undo() returns is handed to
the watchdog, a separate process, so that it can resume by itself when snapmgr dies
mid-window: quiescers whose pause ends with snapmgr's own process (a database session)
return nothing. Quiescers never import the engine, the CLI or each other."""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Mapping

from snapmgr.errors import ConfigError, SnapmgrError
from snapmgr.schema import Field


@dataclass(frozen=True)
class Spec:
    """One `[quiesce.NAME]` table, checked."""

    name: str
    kind: str
    timeout: timedelta          # for prepare() and for resume(), each
    required: bool
    max_window: timedelta
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Context:
    """What a quiescer may know of the window it serves."""

    config: Path
    volumes: tuple[str, ...]
    snapshots: tuple[str, ...]
    dry_run: bool
    # Paths snapmgr writes or runs from while the window is open (state_dir, run_dir, its
    # Python, the repositories being written), by what they are: never to be frozen.
    busy_paths: Mapping[str, Path]
    # The volumes whose snapshots are copies made file by file (rsync), not one instant.
    copied: tuple[str, ...] = ()
    # What the window is for: "snapshot", or "rollback" (services stopped while the
    # volume's files are replaced).
    purpose: str = "snapshot"


class Quiescer(abc.ABC):
    kind: ClassVar[str]
    # The kind's own keys of a `[quiesce.NAME]` table, checked by the config loader.
    options: ClassVar[Mapping[str, Field]]
    # What prepare() holds still: the application's own state, or only a filesystem
    # (which decides the snapshot's grade: application or frozen).
    holds: ClassVar[str] = "application"
    # In a rollback's window: "pause" (as for a snapshot, adapted to it), "skip" (nothing
    # to do: a frozen filesystem could not be written), or "server" (a database session
    # cannot keep a server off files being replaced: a systemd quiescer must stop it).
    in_rollback: ClassVar[str] = "pause"
    # Whether the quiescers paused before it stay paused while its resume fails (it is
    # resumed first): a condition for starting them again, not a pause of its own.
    gates: ClassVar[bool] = False

    def __init__(self, spec: Spec, context: Context):
        self.spec = spec
        self.context = context
        self.opts = spec.options

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def timeout(self) -> float:
        return self.spec.timeout.total_seconds()

    def _unfit(self, key: str, reason: str) -> ConfigError:
        """The quiescer's configuration does not fit this system (a unit that does not
        exist, a server too old): a configuration error, never merely a degraded
        snapshot, however optional the quiescer."""
        return ConfigError(self.context.config, f"quiesce.{self.name}.{key}", reason)

    def open(self) -> None:
        """Load, connect and open what the window needs; nothing is paused yet."""

    def undo(self) -> list[dict]:
        """Actions that undo prepare() without this process (see quiesce.undo), for the
        watchdog and for the recovery of a window nobody closed."""
        return []

    @abc.abstractmethod
    def prepare(self) -> None:
        """Pause, within `timeout` seconds; raise SnapmgrError (or OSError) on failure."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Undo prepare(), also after it failed half-way, within `timeout` seconds."""

    def close(self) -> None:
        """Release what open() took."""

    def record(self) -> dict:
        """What to keep with the snapshot (a backup label, a binlog position)."""
        return {}

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what prepare() and resume() do, for --dry-run."""


def driver(quiescer: Quiescer, module: str, what: str, extra: str):
    """A database driver, imported only when a quiescer of its kind is used."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise quiescer._unfit("kind", f"{quiescer.kind} needs {what}, which is not installed: "
                                      f"pip install 'snapmgr[{extra}]'") from None


@contextmanager
def driver_errors(package: str, describe: Callable[[Exception], str]) -> Iterator[None]:
    """The errors of a driver imported lazily (so its exception classes are not at hand
    here) as one-line SnapmgrErrors; anything else passes through."""
    try:
        yield
    except Exception as e:
        if not type(e).__module__.startswith(package):
            raise
        raise SnapmgrError(describe(e)) from None
