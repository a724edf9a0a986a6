"""FIFREEZE and FITHAW, the ioctls behind fsfreeze(8), on any descriptor of the filesystem."""

from __future__ import annotations

import errno
import fcntl

# _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def freeze(fd: int) -> None:
    fcntl.ioctl(fd, FIFREEZE, 0)


def thaw(fd: int) -> bool:
    """Thaw; False when the filesystem was not frozen, which is not an error."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True
