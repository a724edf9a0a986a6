"""`snapmgr mount` of a config's volumes, each entered lazily as LVM snapshots are (its
backend declared one that mounts) and each entry counted: every browse_root() call
appends the snapshot's id as a line to LOG. Other users are let in (--allow-other).

    python -m tests.integration.counting_mount CONFIG MOUNTPOINT LOG"""

from __future__ import annotations

import sys
from pathlib import Path

from snapmgr import config as configuration
from snapmgr.backends.base import Backend
from snapmgr.engine import Engine
from snapmgr.fuse import lifecycle


def counted(backend: Backend, log: Path) -> Backend:
    class Counted(type(backend)):
        browse_mounts = True

        def browse_root(self, snapshot):
            with log.open("a") as f:
                f.write(f"{snapshot.id}\n")
            return super().browse_root(snapshot)

    return Counted(backend.volume, backend.opts, backend.run_dir)


def main(config: str, mountpoint: str, log: str) -> None:
    backends = Engine(configuration.load(Path(config))).browsable()
    lifecycle.serve(lifecycle.prepare(Path(mountpoint)), {name: counted(b, Path(log)) for name, b in backends.items()},
                    lifecycle.MountOptions(allow_other=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
