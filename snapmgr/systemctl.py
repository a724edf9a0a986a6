"""`systemctl show` read into one dict of properties per unit: what the systemd quiescer
and `snapmgr systemd status` both ask systemd."""

from __future__ import annotations

from typing import Sequence

from snapmgr import sh
from snapmgr.errors import SnapmgrError, quote


def show(units: Sequence[str], properties: Sequence[str], timeout: float) -> list[dict[str, str]]:
    """The properties of each unit, from one `systemctl show`, whose blocks come in the
    order the units were named; times in UTC, numbers as systemd prints them in C."""
    out = sh.run(["systemctl", "show", f"--property={','.join(properties)}", "--", *units], timeout=timeout,
                 holds_locks=False, env={"TZ": "UTC", "LC_ALL": "C"}).stdout
    blocks = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
              for block in out.strip().split("\n\n")]
    if len(blocks) != len(units):
        raise SnapmgrError(f"systemctl show gave {len(blocks)} blocks of properties for {len(units)} units: "
                           f"{quote(out)}")
    return blocks
