"""One quiesce window: prepare in order, take the snapshots, resume in reverse.

The promises, in the order the code keeps them:
- everything the window needs is opened before it starts (Window.open), and the
  watchdog is running before the first prepare;
- resume() runs for every quiescer whose prepare() started, whatever failed in between,
  and a failing resume does not stop the others; Ctrl-C and SIGTERM wait until all
  resumes are done;
- past max_window everything resumes and the snapshots not yet taken are abandoned
  (SIGALRM here; the watchdog if this process cannot);
- nothing is written while the window is open: log records are held in memory and
  emitted after the last resume, and the caller records the rest afterwards."""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

from snapmgr.errors import ConfigError, Interrupted, SnapmgrError, as_error
from snapmgr.quiesce.base import Quiescer
from snapmgr.quiesce.watchdog import Watchdog

log = logging.getLogger(__name__)
T = TypeVar("T")
HELD_LOG_RECORDS = 10_000


class QuiesceFailed(SnapmgrError):
    """A required quiescer could not prepare: no snapshot was taken."""


class WindowOverrun(SnapmgrError):
    """The window lasted longer than max_window: the snapshots not yet taken are not taken."""


@dataclass
class Report:
    """How the window went: what the snapshots taken in it record."""

    grade: str = "crash"
    degraded: list[str] = field(default_factory=list)      # "name: why" of each optional failure
    resume_failures: list[str] = field(default_factory=list)
    unresumed: list[int] = field(default_factory=list)     # the quiescers whose resume failed, by index
    quiesce_s: float | None = None
    freeze_s: float | None = None
    records: dict[str, dict] = field(default_factory=dict)  # what each quiescer keeps with the snapshot

    def as_meta(self) -> dict:
        return {"grade": self.grade, "degraded": self.degraded, "quiesce_window_s": self.quiesce_s,
                "freeze_window_s": self.freeze_s, "quiescers": self.records}


class Window:
    def __init__(self, quiescers: Sequence[Quiescer], max_window: float):
        self.quiescers = list(quiescers)
        self.max_window = max_window
        self.report = Report()
        self._opened: list[Quiescer] = []

    def open(self) -> None:
        """Connect, load and open everything, before anything is paused. An optional
        quiescer that cannot open (its server is down) is left out, and the snapshot
        marked degraded; a configuration it refuses is an error all the same."""
        for q in list(self.quiescers):
            self._opened.append(q)  # close() also releases what a failed open() got
            try:
                q.open()
            except (ConfigError, Interrupted):
                raise
            except (SnapmgrError, OSError) as e:
                self._failed(q, e, "nothing was paused")
                self.quiescers.remove(q)

    def plan(self) -> list[dict]:
        """What the watchdog, or a later run, does to resume each quiescer without us."""
        return [{"name": q.name, "undo": q.undo(), "timeout": q.timeout} | ({"gate": True} if q.gates else {})
                for q in self.quiescers]

    @staticmethod
    def descriptors(plan: list[dict]) -> list[int]:
        """The descriptors the plan's undo actions use, for the watchdog to inherit."""
        return [a["fd"] for step in plan for a in step["undo"] if a.get("fd") is not None]

    def close(self) -> None:
        for q in reversed(self._opened):
            try:
                q.close()
            except Exception as e:  # a connection that broke meanwhile: nothing is left to undo
                log.debug("closing %s: %s", q.name, e)
        self._opened.clear()

    def hold(self, take: Callable[[], T], watchdog: Watchdog) -> T:
        """Prepare, take(), resume; the Report says how it went."""
        started: list[int] = []
        begun = time.monotonic()
        held = released = None
        with _logs_held():
            try:
                with _overrun_alarm(self.max_window):
                    for i, q in enumerate(self.quiescers):
                        watchdog.tell(started=i)
                        started.append(i)
                        self._prepare(q)
                    held = time.monotonic()
                    return take()
            finally:
                released = time.monotonic()
                with _signals_deferred():
                    self._resume_all(started, watchdog)
                ended = time.monotonic()
                self.report.quiesce_s = round(ended - begun, 6)
                self.report.freeze_s = round(released - held, 6) if held else None
                self.report.grade = self._grade()

    def _prepare(self, q: Quiescer) -> None:
        try:
            q.prepare()
        except (Interrupted, WindowOverrun):
            raise
        except (SnapmgrError, OSError) as e:
            self._failed(q, e, "everything was resumed")

    def _failed(self, q: Quiescer, e: SnapmgrError | OSError, settled: str) -> None:
        """A required quiescer's failure ends the snapshot; an optional one's degrades it."""
        why = f"{q.name} ({q.kind}): {as_error(e)}"
        if q.spec.required:
            raise QuiesceFailed(f"quiescer {why}; {settled} and no snapshot was taken") from None
        log.warning("optional quiescer %s; the snapshot is marked degraded", why)
        self.report.degraded.append(why)

    def _resume_all(self, started: list[int], watchdog: Watchdog) -> None:
        try:
            held: list[int] = []   # the quiescers a failed gate holds back
            for i in reversed(started):
                q = self.quiescers[i]
                if held:
                    held.append(i)
                    self.report.unresumed.append(i)
                    continue
                watchdog.tell(resuming=i)
                try:
                    q.resume()
                except (SnapmgrError, OSError) as e:
                    failure = f"{q.name} ({q.kind}): {as_error(e)}"
                    log.error("resuming quiescer %s", failure)
                    self.report.resume_failures.append(failure)
                    self.report.unresumed.append(i)   # the watchdog, if it must act, tries it too
                    if q.gates:
                        held.append(i)
                else:
                    self.report.records[q.name] = q.record()
                    watchdog.tell(resumed=i)
            if held[1:]:
                self.report.resume_failures.append(
                    "not resumed until then: " + ", ".join(self.quiescers[i].name for i in held[1:]))
        except BaseException as e:
            watchdog.abandon(f"snapmgr failed while resuming: {e!r}")
            raise
        watchdog.close()

    def _grade(self) -> str:
        if self.report.degraded:
            return "degraded"
        if not self.quiescers:
            return "crash"
        return "frozen" if all(q.holds == "filesystem" for q in self.quiescers) else "application"


@contextmanager
def _overrun_alarm(seconds: float) -> Iterator[None]:
    def overrun(signum, frame):
        raise WindowOverrun(f"the quiesce window passed max_window ({seconds:g}s) before this snapshot was "
                            f"taken; everything was resumed")
    previous = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM while resuming take effect once every resume has run."""
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


@contextmanager
def _logs_held() -> Iterator[None]:
    """Log records are kept in memory while the window is open: stderr may be a file on
    a frozen filesystem."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    held: list[logging.LogRecord] = []
    keeper = logging.Handler()
    keeper.emit = lambda record: held.append(record) if len(held) < HELD_LOG_RECORDS else None
    root.handlers[:] = [keeper]
    try:
        yield
    finally:
        root.handlers[:] = handlers
        for record in held:
            root.handle(record)
