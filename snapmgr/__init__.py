"""snapmgr: consistent filesystem snapshots for Linux."""

__version__ = "0.1.0"
