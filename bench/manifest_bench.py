#!/usr/bin/env python3
"""snapmgr's manifests against b3sum and sha256sum, side by side in one run.

(a) Hashing a whole tree: snapmgr writing a full manifest (walk, parallel hashing, the
    gzip'd file) against `b3sum` (blake3) and `sha256sum` (sha256) given every file of
    the same tree on their command lines (in batches of BATCH names, as xargs would). Two
    trees: FILES small files of mixed sizes, and a few large files.
(b) Incremental: before each round, CHANGED of the small files are rewritten; then a
    manifest reusing the previous one's hashes (the btrfs/ZFS/LVM rule: same inode and
    ctime) against a full manifest of the same tree.

The page cache is warm for everyone (one untimed warm-up round first), unless --cold.
Every contender runs as its own process; the order is shuffled in each round. Prints the
median, min and max wall time of each and the ratios of the medians.

    ./run bench manifest                       # 100,000 files, 4 x 256 MiB, 5 timed rounds
    ./run bench manifest --files 20000 --rounds 3 --large 2
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
BATCH = 4000   # names per b3sum / sha256sum command line
MANIFEST = """
import sys
from pathlib import Path
from snapmgr import manifest
root, algorithm, out, previous = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
before = manifest.load(out.parent, previous).entries() if previous else None
manifest.save(out.parent, out.name, algorithm, manifest.scan(root, algorithm, before))
"""


def make_small(root: Path, files: int, rng: random.Random) -> list[Path]:
    """Sizes spread from a few bytes to 64 KiB, most of them small, as in a home or a code tree."""
    paths = []
    for i in range(files):
        d = root / f"dir{i // 10000:02d}" / f"sub{(i // 100) % 100:02d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i:06d}.dat"
        p.write_bytes(rng.randbytes(int(2 ** rng.uniform(4, 16))))
        paths.append(p)
    return paths


def make_large(root: Path, count: int, mib: int) -> None:
    root.mkdir(parents=True)
    for i in range(count):
        with open(root / f"large{i}.bin", "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))


class Contender:
    cold = False

    def __init__(self, name: str, group: str):
        self.name, self.group = name, group
        self.times: list[float] = []

    def commands(self) -> list[list[str]]:
        raise NotImplementedError

    def run(self, timed: bool) -> None:
        commands = self.commands()
        os.sync()
        if self.cold:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        started = time.perf_counter()
        for argv in commands:
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        if timed:
            self.times.append(time.perf_counter() - started)


class Tool(Contender):
    """b3sum or sha256sum over every file of a tree, the file list made before the clock starts."""

    def __init__(self, tool: str, group: str, tree: Path):
        super().__init__(tool, group)
        self.tool, self.tree = tool, tree

    def commands(self) -> list[list[str]]:
        files = sorted(str(Path(d, f)) for d, _, fs in os.walk(self.tree) for f in fs)
        return [[self.tool, "--", *files[i:i + BATCH]] for i in range(0, len(files), BATCH)]


class Manifest(Contender):
    def __init__(self, name: str, group: str, tree: Path, algorithm: str, out: Path, previous: Path | None = None):
        super().__init__(name, group)
        self.tree, self.algorithm, self.out, self.previous = tree, algorithm, out, previous

    def commands(self) -> list[list[str]]:
        return [[sys.executable, "-c", MANIFEST, str(self.tree), self.algorithm, str(self.out),
                 self.previous.name if self.previous else ""]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=4, help="how many large files")
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of small files changed per round")
    parser.add_argument("--dir", type=Path, help="work directory [default: a temporary one, removed after]")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    args = parser.parse_args()
    Contender.cold = args.cold
    for program in ("b3sum", "sha256sum"):
        if not shutil.which(program):
            parser.error(f"{program} is not installed (./run bench installs it)")
    work = Path(tempfile.mkdtemp(prefix="snapmgr-manifest-bench-", dir=args.dir))
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        return bench(work, args)
    finally:
        shutil.rmtree(work)


def bench(work: Path, args) -> int:
    rng = random.Random(42)
    small, large, out = work / "small", work / "large", work / "manifests"
    out.mkdir()
    print(f"generating {args.files:,} small files and {args.large} x {args.large_mib} MiB ...", flush=True)
    paths = make_small(small, args.files, rng)
    make_large(large, args.large, args.large_mib)
    base = out / "bench@20000101T000000Z"        # the previous manifest of the incremental case
    contenders = [
        Tool("b3sum", "small", small), Manifest("snapmgr blake3", "small", small, "blake3", out / "b3"),
        Tool("sha256sum", "small", small), Manifest("snapmgr sha256", "small", small, "sha256", out / "sha"),
        Tool("b3sum", "large", large), Manifest("snapmgr blake3", "large", large, "blake3", out / "b3l"),
        Tool("sha256sum", "large", large), Manifest("snapmgr sha256", "large", large, "sha256", out / "shal"),
        Manifest("full", "incremental", small, "blake3", out / "full"),
        Manifest("incremental", "incremental", small, "blake3", out / "incr", previous=base),
    ]
    for round_ in range(args.rounds + 1):
        # The incremental contender's previous manifest is of the tree before this round's changes.
        Manifest("", "", small, "blake3", base).run(timed=False)
        for p in rng.sample(paths, int(len(paths) * args.changed)):
            p.write_bytes(rng.randbytes(int(2 ** rng.uniform(4, 16))))
        for c in rng.sample(contenders, len(contenders)):
            c.run(timed=round_ > 0)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{c.group}/{c.name} {c.times[-1]:.2f}s" for c in contenders),
                  flush=True)
    report(contenders, args)
    return 0


def report(contenders: list[Contender], args) -> None:
    med = {(c.group, c.name): statistics.median(c.times) for c in contenders}
    print(f"\n{args.files:,} small files (16 B - 64 KiB), {args.large} x {args.large_mib} MiB, {args.rounds} rounds, "
          f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPUs; wall seconds")
    print(f"{'tree':<13}{'contender':<16}{'median':>8}{'min':>8}{'max':>8}")
    for c in contenders:
        print(f"{c.group:<13}{c.name:<16}{med[c.group, c.name]:>8.3f}{min(c.times):>8.3f}{max(c.times):>8.3f}")
    print("\nspeed of snapmgr against the bare tool (>= 0.8x is the goal):")
    for group in ("small", "large"):
        for ours, tool in (("snapmgr blake3", "b3sum"), ("snapmgr sha256", "sha256sum")):
            print(f"  {group:<6} {ours} = {med[group, tool] / med[group, ours]:.2f}x {tool}")
    print(f"\nincremental at {args.changed:.0%} churn / full manifest = "
          f"{med['incremental', 'incremental'] / med['incremental', 'full']:.3f}x (<= 0.1x is the goal)")


if __name__ == "__main__":
    sys.exit(main())
