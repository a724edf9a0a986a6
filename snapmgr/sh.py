"""The one way snapmgr runs a program: an argv list (never a shell), a timeout, the command
line logged at debug level, output captured, and a typed error on failure."""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import shlex
import signal
import subprocess
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from snapmgr.errors import SnapmgrError, quote

log = logging.getLogger(__name__)

STDERR_EXCERPT_LINES = 5
STOP_POLL = 0.1   # seconds between two asks of a run's stop_when
# How long a killed program's other processes may take to be gone: one in uninterruptible
# sleep (a write to a frozen filesystem, a hung NFS server) dies only when that ends.
KILL_WAIT = 5.0
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_held: ContextVar[tuple[int, ...]] = ContextVar("held", default=())


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(SnapmgrError):
    """A program exited non-zero (or was killed by a signal)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        self.argv, self.returncode, self.stderr = tuple(argv), returncode, stderr
        super().__init__(f"{self.program} {self._how()}{self._excerpt()}")

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name

    def _how(self) -> str:
        if self.returncode < 0:
            return f"was killed by {signal.Signals(-self.returncode).name}"
        return f"exited with status {self.returncode}"

    def _excerpt(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        return ": " + " | ".join(lines[-STDERR_EXCERPT_LINES:]) if lines else ""


class CommandTimeout(CommandError):
    def __init__(self, argv: Sequence[str], timeout: float, stderr: str):
        self.timeout = timeout
        super().__init__(argv, -signal.SIGKILL, stderr)

    def _how(self) -> str:
        return f"timed out after {self.timeout:g}s and was killed"


class CommandNotFound(SnapmgrError):
    def __init__(self, program: str):
        super().__init__(f"program {quote(program)} is not installed (not found on PATH)")


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child: be sent `sig` when snapmgr dies. A child must not outlive snapmgr: an
    orphaned rsync would keep writing into a snapshot the next run is about to reuse or
    delete, and any child holds the volume lock the next run waits for."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig)


@contextmanager
def holding(fd: int) -> Iterator[None]:
    """Every program started inside keeps `fd` open until it exits, and so do the
    processes it forks: a flock on it lasts until the last of them is gone."""
    token = _held.set(_held.get() + (fd,))
    try:
        yield
    finally:
        _held.reset(token)


def run(
    argv: Sequence[str | os.PathLike],
    *,
    timeout: float | None = None,
    check: bool = True,
    capture: bool = True,
    on_stdout: Callable[[str], None] | None = None,
    holds_locks: bool = True,
    env: Mapping[str, str] | None = None,
    stop_when: Callable[[], Exception | None] | None = None,
) -> Completed:
    """Run argv and wait for it.

    capture=False lets the child write straight to our stdout/stderr (used by the demo).
    on_stdout receives each stdout chunk as it arrives (split on CR and LF, for progress).
    holds_locks=False keeps the descriptors of `holding` from the program: for programs
    that close what they inherit anyway (LVM, with a warning), or that may rightly leave
    a process running (one that starts a service).
    env adds variables to the environment snapmgr was started with.
    stop_when is asked every STOP_POLL seconds while the program runs (with capture);
    when it returns an error, the program is killed and that error raised.
    """
    argv = tuple(os.fspath(a) for a in argv)
    log.debug("run: %s", shlex.join(argv))
    pipe = subprocess.PIPE if capture else None
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe,
            start_new_session=True, preexec_fn=die_with_parent, pass_fds=_held.get() if holds_locks else (),
            env=None if env is None else {**os.environ, **env},
        )
    except FileNotFoundError:
        raise CommandNotFound(argv[0]) from None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        out, err = _collect(proc, deadline, on_stdout, stop_when) if capture else ("", "")
        try:
            proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # the pipes closed, but the program still runs
            raise _Deadline(err) from None
    except _Deadline as d:
        _kill(proc)
        raise CommandTimeout(argv, timeout, d.stderr) from None
    except BaseException:
        _kill(proc)
        raise
    result = Completed(argv, proc.returncode, out, err)
    log.debug("exit %d: %s", proc.returncode, argv[0])
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, err)
    return result


class _Deadline(Exception):
    def __init__(self, stderr: str):
        self.stderr = stderr


def _collect(proc: subprocess.Popen, deadline: float | None, on_stdout, stop_when) -> tuple[str, str]:
    """Read stdout and stderr until both close, without letting either pipe fill up."""
    chunks = {proc.stdout: [], proc.stderr: []}
    pending = ""
    asked = time.monotonic()
    with selectors.DefaultSelector() as sel:
        for stream in chunks:
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            wait = None if deadline is None else deadline - now
            if wait is not None and wait <= 0:
                raise _Deadline(_decode(chunks[proc.stderr]))
            if stop_when is not None:
                if now - asked >= STOP_POLL:
                    asked = now
                    if (stop := stop_when()) is not None:
                        raise stop
                wait = STOP_POLL if wait is None else min(wait, STOP_POLL)
            for key, _ in sel.select(wait):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fileobj].append(data)
                if on_stdout and key.fileobj is proc.stdout:
                    pending = _emit_lines(pending + data.decode(errors="replace"), on_stdout)
    proc.stdout.close()
    proc.stderr.close()
    return _decode(chunks[proc.stdout]), _decode(chunks[proc.stderr])


def _emit_lines(text: str, on_stdout) -> str:
    *complete, rest = text.replace("\r", "\n").split("\n")
    for line in complete:
        if line:
            on_stdout(line)
    return rest


def _decode(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode(errors="replace")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group (rsync forks helpers), reap it, and wait a
    while for the helpers to be gone: what the caller does next (remove a partial copy)
    must not race a receiver still writing."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    log.warning("processes of %s are still there %gs after being killed", proc.args[0], KILL_WAIT)


def spawn(argv: Sequence[str | os.PathLike], *, stdin: int, stdout: int | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start a helper that must outlive snapmgr (the quiesce watchdog): its own session,
    so a Ctrl-C at the terminal does not reach it, and no death signal from its parent.
    It inherits the locks being held, so the next run waits until it is done."""
    argv = tuple(os.fspath(a) for a in argv)
    log.debug("spawn: %s", shlex.join(argv))
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, start_new_session=True,
                            pass_fds=tuple(dict.fromkeys((*_held.get(), *pass_fds))))
