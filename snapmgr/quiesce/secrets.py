"""Passwords come from a file of their own, never from the config: the config is
readable by whoever may read settings, the password file only by root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from snapmgr import trust
from snapmgr.errors import ConfigError, as_error


def read_password(config: Path, key: str, path: Path | None) -> str | None:
    """The first line of the file at `path` (None when no file is configured)."""
    if path is None:
        return None
    try:
        trust.check(path)
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            raise trust.Untrusted(f"is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                                  f"chmod 600 {path}")
        with open(path) as f:
            return f.readline().rstrip("\r\n")
    except trust.Untrusted as e:
        raise ConfigError(config, key, f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = as_error(e) if isinstance(e, OSError) else "is not UTF-8 text"
        raise ConfigError(config, key, f"{path}: {reason}") from None
