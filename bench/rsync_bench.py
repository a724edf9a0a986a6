#!/usr/bin/env python3
"""snapmgr's rsync backend against rsnapshot and bare rsync, side by side in one run.

Contenders: snapmgr without manifests (doing what the others do), snapmgr with its
default BLAKE3 manifest (what verify needs, which no other contender records), snapmgr
with `checksum = true`, rsnapshot, bare `rsync -a`, bare rsync with snapmgr's flags, and bare rsync with the flags snapmgr used before it added
--sparse and --delete-excluded (so the cost of those two is measured, not assumed).

A generated tree of FILES small files; before each round 1% of them change; then every
contender takes one hardlink snapshot against its own previous one, in an order shuffled
each round (a fixed rotation gave each contender the same predecessor every time, and
position in a round changes timings here by up to a second), each after an untimed `sync`.
The first round (a full copy) is a warm-up and is not counted. Prints the median, min and max wall time of each and the
ratios of the medians.

    ./run bench                      # 100,000 files, 9 timed rounds
    ./run bench --files 20000 --rounds 3
    ./run bench --cold               # each run starts with an empty page cache
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What snapmgr's rsync backend runs (rsync.py), for the bare rsync to match.
SNAPMGR_FLAGS = ["-aHAX", "--numeric-ids", "--delete", "--delete-excluded", "--sparse", "--stats",
                 "--modify-window=-1", "--open-noatime"]


def make_tree(root: Path, files: int, rng: random.Random) -> list[Path]:
    paths = []
    per_dir = 100
    for i in range(files):
        d = root / f"dir{i // (per_dir * 100):02d}" / f"sub{(i // per_dir) % 100:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i:06d}.dat"
        p.write_bytes(rng.randbytes(rng.randint(200, 4000)))
        paths.append(p)
    return paths


def change(paths: list[Path], fraction: float, rng: random.Random) -> None:
    for p in rng.sample(paths, int(len(paths) * fraction)):
        p.write_bytes(rng.randbytes(rng.randint(200, 4000)))


class Contender:
    cold = False  # drop the page cache before each run, as after a reboot or a big job

    def __init__(self, name: str, work: Path):
        self.name, self.work = name, work
        self.times: list[float] = []

    def argv(self, round_: int) -> list[str]:
        raise NotImplementedError

    def run(self, round_: int, timed: bool) -> None:
        argv = self.argv(round_)
        # Start from a clean page cache of dirty data: snapmgr flushes the filesystem
        # (syncfs) before naming a snapshot, and must pay for its own writes only, not
        # for the previous contender's.
        os.sync()
        if self.cold:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - started
        if timed:
            self.times.append(elapsed)


class BareRsync(Contender):
    def __init__(self, name: str, work: Path, source: Path, flags: list[str]):
        super().__init__(name, work)
        self.source, self.flags = source, flags
        self.repo = work / name.replace(" ", "_")
        self.repo.mkdir()

    def argv(self, round_: int) -> list[str]:
        link = [f"--link-dest={self.repo / str(round_ - 1)}"] if round_ else []
        return ["rsync", *self.flags, *link, f"{self.source}/", f"{self.repo / str(round_)}/"]


class Snapmgr(Contender):
    def __init__(self, name: str, work: Path, source: Path, checksum: bool = False, manifest: str = "off"):
        super().__init__(name, work)
        slug = self.name.replace(" ", "-")
        self.config = work / f"{slug}.toml"
        self.config.write_text(
            f'[settings]\nstate_dir = "{work}/state"\nrun_dir = "{work}/run"\n\n'
            f'[volumes.bench]\nbackend = "rsync"\nsource = "{source}"\nrepository = "{work}/{slug}"\n'
            f'checksum = {"true" if checksum else "false"}\nmanifest = "{manifest}"\n')
        self.config.chmod(0o644)

    def argv(self, round_: int) -> list[str]:
        return [sys.executable, "-m", "snapmgr", "--config", str(self.config), "snapshot", "--tag", "bench"]


class Rsnapshot(Contender):
    def __init__(self, work: Path, source: Path, rounds: int):
        super().__init__("rsnapshot", work)
        self.config = work / "rsnapshot.conf"
        # rsnapshot wants tabs between fields, and trailing slashes on directories.
        self.config.write_text("\n".join("\t".join(fields) for fields in (
            ("config_version", "1.2"),
            ("snapshot_root", f"{work}/rsnapshot/"),
            ("cmd_rsync", shutil.which("rsync")),
            ("link_dest", "1"),
            ("lockfile", f"{work}/rsnapshot.pid"),
            ("retain", "bench", str(rounds + 2)),
            ("backup", f"{source}/", "localhost/"),
        )) + "\n")

    def argv(self, round_: int) -> list[str]:
        return ["rsnapshot", "-c", str(self.config), "bench"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds after the warm-up")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of files changed per round")
    parser.add_argument("--dir", type=Path, help="work directory [default: a temporary one, removed after]")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    args = parser.parse_args()
    Contender.cold = args.cold
    for program in ("rsync", "rsnapshot"):
        if not shutil.which(program):
            parser.error(f"{program} is not installed (./run bench installs it)")

    work = Path(tempfile.mkdtemp(prefix="snapmgr-bench-", dir=args.dir))
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        return bench(work, args)
    finally:
        shutil.rmtree(work)


def bench(work: Path, args) -> int:
    rng = random.Random(42)
    source = work / "source"
    print(f"generating {args.files:,} files in {source} ...", flush=True)
    paths = make_tree(source, args.files, rng)
    contenders = [
        Snapmgr("snapmgr", work, source),
        Snapmgr("snapmgr manifest", work, source, manifest="blake3"),
        Snapmgr("snapmgr checksum", work, source, checksum=True),
        BareRsync("rsync -a", work, source, ["-a"]),
        BareRsync("rsync same", work, source, SNAPMGR_FLAGS),
        BareRsync("rsync before", work, source, [f for f in SNAPMGR_FLAGS if f not in ("--sparse", "--delete-excluded")]),
        Rsnapshot(work, source, args.rounds),
    ]
    for round_ in range(args.rounds + 1):
        if round_:
            change(paths, args.changed, rng)
        order = rng.sample(contenders, len(contenders))
        for c in order:
            c.run(round_, timed=round_ > 0)
        print(f"round {round_}{' (warm-up, full copy)' if not round_ else ''}: "
              + ", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in contenders if round_ and c.times), flush=True)
    report(contenders, args)
    return 0


def report(contenders: list[Contender], args) -> None:
    medians = {c.name: statistics.median(c.times) for c in contenders}
    print(f"\n{args.files:,} files, {args.changed:.0%} changed per round, {args.rounds} rounds, "
          f"{'cold' if args.cold else 'warm'} page cache; wall seconds per snapshot")
    print(f"{'contender':<18}{'median':>8}{'min':>8}{'max':>8}")
    for c in contenders:
        print(f"{c.name:<18}{medians[c.name]:>8.3f}{min(c.times):>8.3f}{max(c.times):>8.3f}")
    print("\nrsync same: snapmgr's flags; rsync before: without --sparse --delete-excluded\n")
    for a, b in (("snapmgr", "rsync same"), ("snapmgr", "rsync -a"), ("snapmgr", "rsnapshot"),
                 ("snapmgr manifest", "snapmgr"), ("snapmgr checksum", "snapmgr"), ("rsync same", "rsync before"), ("rsnapshot", "rsync -a")):
        print(f"{a:>16} / {b:<12} = {medians[a] / medians[b]:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
