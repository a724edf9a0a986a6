"""Typed errors. Each carries the exit code the CLI reports, so no layer below the CLI
needs to know about exit codes and the CLI needs no table of exception types."""

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FAILED = 1        # an operation failed (a backend command, a missing snapshot, ...)
EXIT_USAGE = 2         # bad arguments (click uses 2 as well)
EXIT_SOFTWARE = 70     # EX_SOFTWARE: a bug in snapmgr (an exception nothing expected)
EXIT_LOCKED = 75       # EX_TEMPFAIL: another run holds the volume lock
EXIT_CONFIG = 78       # EX_CONFIG: the configuration is invalid
EXIT_INTERRUPTED = 130


def quote(text: object) -> str:
    """User-supplied text as a message shows it: quoted, and escaped as Python's repr
    escapes it, so that a newline, a NUL or a quote inside it is seen, not obeyed."""
    return repr(str(text))


def one_line(message: str) -> str:
    """The last guard of the one-line promise, applied to every error and log line on
    the way out: whatever a message quotes (an OS error's file name, a program's stderr)
    cannot break the line or send escape sequences to a terminal."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class SnapmgrError(Exception):
    exit_code = EXIT_FAILED


class SpaceRefused(SnapmgrError):
    """A snapshot refused, or a copy stopped, at the volume's free-space floor (min_free)."""


class UsageError(SnapmgrError):
    exit_code = EXIT_USAGE


class ConfigError(SnapmgrError):
    exit_code = EXIT_CONFIG

    def __init__(self, file, key: str | None, reason: str):
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else f"{file}"
        super().__init__(f"{where}: {reason}")


class LockBusy(SnapmgrError):
    exit_code = EXIT_LOCKED


def as_error(e: SnapmgrError | OSError) -> SnapmgrError:
    """An OSError (disk full, permission denied) as a snapmgr error naming its file."""
    if isinstance(e, SnapmgrError):
        return e
    return SnapmgrError(f"{e.strerror or e}: {quote(e.filename)}" if e.filename else str(e.strerror or e))


class Interrupted(SnapmgrError):
    """Raised by the SIGTERM handler so that every `finally` below runs (children are
    killed, locks released) exactly as on Ctrl-C."""
    exit_code = EXIT_INTERRUPTED


class RollbackRefused(SnapmgrError):
    """A backend's rollback that stopped before changing anything (its message says so):
    the volume is as it was, so no rollback was cut short."""
