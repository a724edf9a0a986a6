#!/usr/bin/env python3
"""How long a btrfs rollback takes: `snapmgr rollback VOLUME@ID --yes` of a subvolume of
FILES small files (the rsync bench's tree) on a loop-mounted btrfs image, each round after
1% of the files changed and an untimed `sync`, against the bare steps it is built on (a
writable `btrfs subvolume snapshot` of the target, renameat2 RENAME_EXCHANGE, a delete of
the replaced subvolume) timed in this process.

snapmgr's time is the whole command (its start, the plan with its change summary against
the snapshot, the pre-rollback snapshot, the swap, the comparison after it), and the
rollback's own `seconds` from its --json output (everything after the confirmation). Prints
the median, min and max of each.
Needs root and a free loop device, which it releases.

    ./run bench rollback_btrfs                      # 10,000 files, 5 timed rounds
    ./run bench rollback_btrfs --files 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rsync_bench import change, make_tree  # noqa: E402  (this script's directory is on sys.path)
from snapmgr.backends.directory import exchange  # noqa: E402

import btrfsutil  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(11)
    with tempfile.TemporaryDirectory(prefix="snapmgr-rollback-bench-") as work:
        work = Path(work)
        image, mnt = work / "btrfs.img", work / "mnt"
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(max(1 << 30, args.files * 16 << 10))
        subprocess.run(["mkfs.btrfs", "-q", image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
        try:
            print(run(work, mnt, args.files, args.rounds, rng))
        finally:
            subprocess.run(["umount", mnt], check=True)


def run(work: Path, mnt: Path, files: int, rounds: int, rng: random.Random) -> str:
    live = mnt / "data"
    btrfsutil.create_subvolume(live)
    paths = make_tree(live, files, rng)
    config = work / "snapmgr.toml"
    config.write_text(f'[settings]\nstate_dir = "{work / "state"}"\nrun_dir = "{work / "run"}"\n'
                      f'[volumes.data]\nbackend = "btrfs"\nsubvolume = "{live}"\n'
                      f'snapshot_dir = "{mnt / ".snapshots"}"\n')
    snapmgr = [sys.executable, "-m", "snapmgr", "--config", str(config), "--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([*snapmgr, "snapshot"], check=True, capture_output=True, env=env)
    [target] = json.loads(subprocess.run([*snapmgr, "list"], check=True, capture_output=True, env=env,
                                         text=True).stdout)["snapshots"]
    whole, inside, bare = [], [], []
    for _ in range(rounds):
        change(paths, 0.01, rng)
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        done = subprocess.run([*snapmgr, "rollback", target["id"], "--yes"], check=True, capture_output=True,
                              env=env, text=True)
        whole.append(time.perf_counter() - started)
        inside.append(json.loads(done.stdout)["seconds"])
        change(paths, 0.01, rng)
        subprocess.run(["sync"], check=True)
        started = time.perf_counter()
        temporary = mnt / ".data.bare"
        btrfsutil.create_snapshot(mnt / ".snapshots" / target["id"], temporary)
        exchange(live, temporary)
        btrfsutil.delete_subvolume(temporary)
        bare.append(time.perf_counter() - started)
    return "\n".join(f"{name:<48} median {statistics.median(times):7.3f} s  min {min(times):7.3f}  "
                     f"max {max(times):7.3f}" for name, times in [
                         (f"snapmgr rollback --yes ({files} files, whole command)", whole),
                         ("snapmgr rollback, its own seconds", inside),
                         ("bare: snapshot, RENAME_EXCHANGE, delete", bare)])


if __name__ == "__main__":
    main()
