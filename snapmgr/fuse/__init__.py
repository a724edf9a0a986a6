"""The read-only FUSE mount (`snapmgr mount`): every snapshot of the chosen volumes under
one tree, MOUNTPOINT/VOLUME/LABEL/..., read through the backends' browse_root().

  inodes.py       stable FUSE inode numbers: a snapshot's slot, then the file's own inode
  tree.py         the virtual top levels (root, volumes, labels, latest, .by-tag), refreshed
  roots.py        browse roots entered lazily and released when idle (LVM mounts)
  passthrough.py  the snapshots' contents, as stored
  filesystem.py   the FUSE operations: dispatch, and EROFS for every change
  connection.py   whether a mount's server answers (live, dead, stuck), and aborting it
  lifecycle.py    mounting, stale mounts, --daemon, signals, unmounting

pyfuse3 and trio are optional: imported here, when a mount is asked for."""

from __future__ import annotations

from snapmgr.errors import SnapmgrError

INSTALL_HINT = "apt install python3-pyfuse3 python3-trio fuse3 (or pip install 'snapmgr[fuse]')"


def require_pyfuse3() -> None:
    """Fail with one line naming what to install when the FUSE bindings are missing."""
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        raise SnapmgrError(f"snapmgr mount needs pyfuse3 and trio ({e.name} is missing): {INSTALL_HINT}") from None
