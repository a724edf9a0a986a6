"""Typed errors. Each carries the exit code the CLI reports, so no layer below the CLI
needs to know about exit codes and the CLI needs no table of exception types."""

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FAILED = 1        # an operation failed (a backend command, a missing snapshot, ...)
EXIT_USAGE = 2         # bad arguments (click uses 2 as well)
EXIT_LOCKED = 75       # EX_TEMPFAIL: another run holds the volume lock
EXIT_CONFIG = 78       # EX_CONFIG: the configuration is invalid
EXIT_INTERRUPTED = 130


class SnapmgrError(Exception):
    exit_code = EXIT_FAILED


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


class Interrupted(SnapmgrError):
    """Raised by the SIGTERM handler so that every `finally` below runs (children are
    killed, locks released) exactly as on Ctrl-C."""
    exit_code = EXIT_INTERRUPTED
