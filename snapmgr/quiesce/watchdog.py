"""The watchdog: a process of its own that resumes a window when snapmgr cannot.

It is started before the first prepare with the plan of every quiescer's undo actions,
and told of each step over a pipe: `started` before a prepare, `resuming` and `resumed`
around a resume, `closed` when all is done. It acts when the pipe closes without
`closed` (snapmgr was killed, ran out of memory, crashed), when told to `abandon`, or
when the window outlives its deadline: then it kills snapmgr (which ends its database
sessions and their locks), waits for it to be gone, and undoes every step that was
started and not resumed, in reverse order. Only after the thaw does it write anything:
one line per action on stderr, and the outcome in the journal.

The deadline is max_window after the first prepare; while snapmgr resumes a step it is
moved to that step's own timeout, so a slow `post` is not taken for a hang."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from snapmgr import sh
from snapmgr.errors import SnapmgrError, one_line
from snapmgr.journal import Journal
from snapmgr.quiesce import undo

GRACE_S = 5.0          # beyond a deadline, before the watchdog takes over
READY_TIMEOUT_S = 30.0
DEATH_TIMEOUT_S = 30.0  # for a killed snapmgr to finish its last system call and exit


class Watchdog:
    """snapmgr's end of the pipe."""

    def __init__(self, plan: dict, fds: list[int]):
        self.lost = False
        self.abandoned = False
        read_end, self._pipe = os.pipe()
        try:
            self.process = sh.spawn([sys.executable, "-m", "snapmgr.quiesce.watchdog"], stdin=read_end,
                                    stdout=subprocess.PIPE, pass_fds=fds)
        finally:
            os.close(read_end)
        self.tell(plan=plan)
        self._await_ready()

    def _await_ready(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            ready = sel.select(READY_TIMEOUT_S) and self.process.stdout.readline() == b"ready\n"
        if not ready:
            self.process.kill()
            self.process.wait()
            raise SnapmgrError(f"the quiesce watchdog did not start within {READY_TIMEOUT_S:g}s; nothing was paused")

    def tell(self, **message) -> None:
        """Best effort: a watchdog that died (killed by hand, by the OOM killer) must not
        stop this process from resuming; `lost` says it happened."""
        if self.lost:
            return
        try:
            os.write(self._pipe, json.dumps(message).encode() + b"\n")
        except OSError:
            self.lost = True

    def close(self) -> None:
        """All resumed: the watchdog exits without doing anything."""
        self.tell(closed=True)
        self._done()

    def abandon(self, reason: str) -> None:
        """Hand over: the watchdog undoes at once what was not resumed, and this process
        goes on without waiting for it."""
        self.abandoned = True
        try:
            self.tell(abandon=reason)
        finally:
            os.close(self._pipe)

    def _done(self) -> None:
        os.close(self._pipe)
        self.process.stdout.close()
        self.process.wait()


# The watchdog process ----------------------------------------------------------------------

def main() -> int:
    lines = _Lines(sys.stdin.fileno())
    plan = lines.next(None)["plan"]
    os.write(sys.stdout.fileno(), b"ready\n")
    steps = plan["steps"]
    started: list[int] = []
    resumed: set[int] = set()
    deadline = None
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        message = lines.next(wait)
        if message is _Lines.TIMEOUT:
            reason = f"the window passed its deadline (max_window {plan['max_window']:g}s); killed snapmgr " \
                     f"(pid {plan['main']}) to take over"
            _kill_and_wait(plan["main"], lines)
            break
        if message is _Lines.EOF:
            reason = f"snapmgr (pid {plan['main']}) ended in the middle of the window"
            break
        now = time.monotonic()
        if "started" in message:
            started.append(message["started"])
            deadline = deadline or now + plan["max_window"] + GRACE_S
        elif "resuming" in message:
            deadline = max(deadline or now, now + steps[message["resuming"]]["timeout"] + GRACE_S)
        elif "resumed" in message:
            resumed.add(message["resumed"])
        elif "window" in message:
            plan["window"] = message["window"]
        elif "abandon" in message:
            reason = message["abandon"]
            break
        elif "closed" in message:
            return 0
    pending = [i for i in reversed(started) if i not in resumed]
    undo.mark_done(steps, pending)   # the others were resumed by snapmgr, or never paused
    _report(plan, reason, perform_all([steps[i] for i in pending], inherited_fds=True))
    return 0


@dataclass
class Performed:
    lines: list[str]   # one for each action
    failed: int        # actions that failed
    held: bool = False  # a gate holds the rest back: a later try is due, whatever the tries so far


def perform_all(steps: list[dict], inherited_fds: bool, restarted: bool = False,
                queue: bool = False) -> Performed:
    """Every undo action of the steps not done yet, in order; a failure is noted and the
    rest go on, but after a gate's (quiesce.mounted), which holds back the rest (if any
    is left to do). Each action done is marked so in its step ("done"), so that a later
    try repeats only what is not; a gate's never is: it is looked at every time."""
    lines, failed = [], 0
    for n, step in enumerate(steps):
        for action in step["undo"]:
            if action.get("done"):
                continue
            try:
                lines.append(f"{step['name']}: {undo.perform(action, inherited_fds, restarted, queue)}")
                action["done"] = not step.get("gate")
            except (SnapmgrError, OSError) as e:
                if not step.get("gate"):
                    lines.append(f"{step['name']}: FAILED: {e}")
                    failed += 1
                    continue
                held = [s["name"] for s in steps[n + 1:] if any(not a.get("done") for a in s["undo"])]
                if held:   # they wait, not done, for a later try
                    lines.append(f"{step['name']}: {e}; not resumed until then: {', '.join(held)}")
                    return Performed(lines, failed + 1, held=True)
    return Performed(lines, failed)


def _kill_and_wait(pid: int, lines: _Lines) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # Its end of the pipe closes when it has exited: only then is no freeze of its still
    # in progress, and its database sessions are gone.
    deadline = time.monotonic() + DEATH_TIMEOUT_S
    while lines.next(max(0.0, deadline - time.monotonic())) not in (_Lines.EOF, _Lines.TIMEOUT):
        pass


def _report(plan: dict, reason: str, performed: Performed) -> None:
    lines = performed.lines
    summary = f"quiesce watchdog: {reason}; " + ("; ".join(lines) if lines else "nothing was left to resume")
    try:
        os.write(sys.stderr.fileno(), f"snapmgr: WARNING: {one_line(summary)}\n".encode())
    except OSError:
        pass  # snapmgr's terminal may be gone with it
    if plan.get("journal") and plan.get("window") is not None:
        journal = Journal(Path(plan["journal"]))
        if performed.failed:  # a later run tries the failed actions again; any run, while a gate holds them
            journal.window_tried(plan["window"], plan["steps"], 0 if performed.held else 1, "open", summary)
        else:
            journal.window_ended(plan["window"], "undone", summary)
        journal.close()


class _Lines:
    """JSON lines from a pipe, with a timeout."""

    EOF = object()
    TIMEOUT = object()

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    def next(self, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not sel.select(wait):
                    return self.TIMEOUT
                data = os.read(self.fd, 65536)
                if not data:
                    return self.EOF
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


if __name__ == "__main__":
    # Signals meant for snapmgr (Ctrl-C, a service stop) are not for us: the watchdog ends
    # when its work is done. Handlers, not SIG_IGN, which the programs it runs would inherit.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    sys.exit(main())
