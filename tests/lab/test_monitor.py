"""snapmgr check on a real LVM volume, as root and as the unprivileged user nobody, who
cannot run lvs: a thick snapshot that overflowed is CRITICAL to root at once, and to
nobody once a run has listed it."""

from __future__ import annotations

import shutil
from pathlib import Path

import snapmgr
from tests.integration.test_monitor import check, readable_by_nobody, run_as, ws  # noqa: F401 (ws: a fixture)
from tests.lab.conftest import lvm_volume


def readable_package(ws) -> None:
    """The guest's copy of the project is root's alone: nobody runs a copy of the package."""
    lib = ws.root / "lib"
    shutil.copytree(Path(snapmgr.__file__).parent, lib / "snapmgr", ignore=shutil.ignore_patterns("__pycache__"))
    ws.env["PYTHONPATH"] = str(lib)


def test_an_overflowed_snapshot_as_root_and_as_nobody(ws, thick_lv):  # noqa: F811
    readable_package(ws)
    ws.write_config({"data": lvm_volume(thick_lv, snapshot_size="4M", crit_age="1h")}, {"default": {"keep_last": 5}})
    ws.ok("snapshot", "data")
    readable_by_nobody(ws)
    denied = run_as(ws, "nobody", "list")
    assert denied.returncode == 1 and "lvs exited with status" in denied.stderr, denied
    code, head, details = check(ws, user="nobody")
    assert code == 0, (head, details)
    assert details[0].startswith("snapshots as the last runs recorded them: listing them needs root")

    # 16 MiB of new data cannot fit in 4 MiB of snapshot space: LVM drops the snapshot.
    thick_lv.write("big", b"\xab" * (16 << 20))
    code, head, _ = check(ws)
    assert code == 2 and "is invalid (overflowed" in head
    # nobody sees what the last run listed: the overflow came after it.
    assert check(ws, user="nobody")[0] == 0
    ws.ok("snapshot", "data")
    code, head, _ = check(ws, user="nobody")
    assert code == 2 and "is invalid (overflowed" in head and "(as the run at " in head
    metrics = run_as(ws, "nobody", "metrics")
    assert metrics.returncode == 0 and 'snapmgr_invalid_snapshots{volume="data"} 1\n' in metrics.stdout
