#!/usr/bin/env python3
"""snapmgr's LVM and ZFS snapshots against the bare tools, side by side in one run, inside
the lab guest (`./run lab-bench`; it needs the lab's scratch disks and root).

For each kind (LVM thick, LVM thin, ZFS), every round takes one snapshot with the bare
command (`lvcreate -s`, `zfs snapshot`), one with the `snapmgr snapshot` command, and one
through snapmgr's engine in this process, in an order shuffled each round; all three are
removed, untimed, before the next round. The command's figure includes Python's start-up;
the in-process one does not, which separates start-up from snapmgr's own work (listing,
lock, journal, guards). Prints medians, min and max, and the ratios of the medians.

    ./run lab-bench                  # 9 timed rounds after one warm-up
    ./run lab-bench --rounds 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = str(REPO)   # for the snapmgr command, too

from snapmgr import config  # noqa: E402
from snapmgr.engine import Engine  # noqa: E402
from tests.integration.helpers import toml  # noqa: E402

LVM_DISK = "/dev/disk/by-id/virtio-snapmgr-lvm"
ZFS_DISK = "/dev/disk/by-id/virtio-snapmgr-zfs"
VG, POOL = "benchvg", "benchpool"
VOLUMES = {
    "thick": {"backend": "lvm", "lv": f"{VG}/thick", "snapshot_size": "64M"},
    "thin": {"backend": "lvm", "lv": f"{VG}/thin"},
    "zfs": {"backend": "zfs", "datasets": [f"{POOL}/data"]},
}
BARE = {
    "thick": ["lvcreate", "-q", "-s", "-L", "64M", "-n", "bare", f"{VG}/thick"],
    "thin": ["lvcreate", "-q", "-s", "-n", "bare", f"{VG}/thin"],
    "zfs": ["zfs", "snapshot", f"{POOL}/data@bare"],
}
UNDO_BARE = {
    "thick": ["lvremove", "-q", "-y", f"{VG}/bare"],
    "thin": ["lvremove", "-q", "-y", f"{VG}/bare"],
    "zfs": ["zfs", "destroy", f"{POOL}/data@bare"],
}


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def set_up(work: Path) -> Path:
    """A VG with a thick LV (ext4) and a thin LV (xfs), and a pool with a dataset, all
    mounted with some data, so that snapshots freeze and flush real filesystems."""
    run("pvcreate", "-ff", "-y", LVM_DISK)
    run("vgcreate", VG, LVM_DISK)
    run("lvcreate", "-q", "-y", "-L", "256M", "-n", "thick", VG)
    run("lvcreate", "-q", "-y", "--type", "thin-pool", "-L", "1G", "-n", "pool", VG)
    run("lvcreate", "-q", "-y", "--type", "thin", "-V", "300M", "--thinpool", "pool", "-n", "thin", VG)
    for lv, fs in (("thick", "ext4"), ("thin", "xfs")):
        run(f"mkfs.{fs}", "-q", f"/dev/{VG}/{lv}")
        (work / lv).mkdir()
        run("mount", f"/dev/{VG}/{lv}", str(work / lv))
    run("modprobe", "zfs")
    run("zpool", "create", "-f", "-m", f"/{POOL}", POOL, ZFS_DISK)
    run("zfs", "create", f"{POOL}/data")
    for place in (work / "thick", work / "thin", Path(f"/{POOL}/data")):
        for i in range(200):
            (place / f"f{i}").write_bytes(random.randbytes(8192))
    path = work / "snapmgr.toml"
    path.write_text(toml({"settings": {"state_dir": work / "state", "run_dir": work / "run"},
                          **{f"volumes.{name}": table for name, table in VOLUMES.items()}}))
    path.chmod(0o644)
    return path


def tear_down(work: Path) -> None:
    subprocess.run(["zpool", "destroy", "-f", POOL])
    for lv in ("thick", "thin"):
        subprocess.run(["umount", str(work / lv)])
    subprocess.run(["vgremove", "-ff", "-y", VG])
    subprocess.run(["pvremove", "-ff", "-y", LVM_DISK])


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench(config_path: Path, rounds: int) -> dict[tuple[str, str], list[float]]:
    engine = Engine(config.load(config_path))
    command = [sys.executable, "-m", "snapmgr", "--config", str(config_path), "snapshot", "--tag", "bench"]
    times: dict[tuple[str, str], list[float]] = {}
    rng = random.Random(7)
    for round_ in range(rounds + 1):
        for kind in VOLUMES:
            contenders = {
                "bare": lambda kind=kind: run(*BARE[kind]),
                "snapmgr": lambda kind=kind: run(*command, kind),
                "in-process": lambda kind=kind: _check(engine.snapshot([kind], {"bench"})),
            }
            for name in rng.sample(list(contenders), len(contenders)):
                elapsed = timed(contenders[name])
                if round_:
                    times.setdefault((kind, name), []).append(elapsed)
            run(*UNDO_BARE[kind])
            _check(engine.delete([str(s.id) for s in engine.list([kind])]))
        print(f"round {round_}{' (warm-up)' if not round_ else ''} done", flush=True)
    return times


def _check(outcomes) -> None:
    for o in outcomes:
        if o.error:
            raise SystemExit(f"lab_bench: snapmgr failed on {o.volume}: {o.error}")


def report(times: dict[tuple[str, str], list[float]], rounds: int) -> None:
    print(f"\n{rounds} rounds; wall seconds per snapshot (qemu guest)")
    print(f"{'kind':<7}{'contender':<12}{'median':>8}{'min':>8}{'max':>8}")
    for (kind, name), values in times.items():
        print(f"{kind:<7}{name:<12}{statistics.median(values):>8.3f}{min(values):>8.3f}{max(values):>8.3f}")
    print()
    for kind in VOLUMES:
        bare = statistics.median(times[(kind, "bare")])
        for name in ("snapmgr", "in-process"):
            print(f"{kind:<6} {name:<10} / bare = {statistics.median(times[(kind, name)]) / bare:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds after the warm-up")
    args = parser.parse_args()
    if not Path(LVM_DISK).exists():
        parser.error(f"{LVM_DISK} is missing: run this in the lab guest (./run lab-bench)")
    with tempfile.TemporaryDirectory(prefix="snapmgr-lab-bench-") as work:
        try:
            times = bench(set_up(Path(work)), args.rounds)
        finally:
            tear_down(Path(work))
    report(times, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
