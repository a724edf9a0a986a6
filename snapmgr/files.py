"""Replacing a file that another program reads (systemd a unit, node_exporter a metrics
textfile): it sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to a temporary file beside `path` (a rename within one filesystem is
    atomic; its name starts with '.' and ends in .tmp, which neither reader picks up),
    sync it and rename it over `path`; then sync the directory, so that the rename
    itself survives a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)   # readers may run as users of their own
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
