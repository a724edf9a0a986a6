#!/usr/bin/env python3
"""snapmgr's manifests against b3sum and sha256sum, side by side in one run.

(a) Hashing a whole tree: snapmgr writing a full manifest (walk, parallel hashing, the
    gzip'd file) against `b3sum` (blake3) and `sha256sum` (sha256) run as an
    administrator would, `xargs -0 -n 4000 b3sum --` over every file of the same tree
    (the list is made before the clock starts). Two trees: FILES small files (the rsync
    bench's tree, 200 B - 4 KB each), and a few large files.
(b) Incremental: before each round, CHANGED of the files are rewritten; then a manifest
    reusing the previous one's hashes (the btrfs/ZFS/LVM rule: same inode and ctime)
    against a full manifest of the same tree. Two trees: the small files, where a
    manifest costs mostly per entry (an lstat, a row read and a row written, whatever
    is hashed), with a walk that hashes nothing (`walk`) to show that floor; and MEDIA
    files of 1 MiB (photos, uploads), where it costs mostly hashing.

The page cache is warm for everyone (one untimed warm-up round first), unless --cold.
Every contender is a process of its own, in an order shuffled each round. Prints the
median, min and max wall time of each and the ratios of the medians.

    ./run bench manifest                       # 100,000 files, 4 x 256 MiB, 2,000 x 1 MiB, 5 rounds
    ./run bench manifest --files 20000 --rounds 3 --large 2 --media 500
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from rsync_bench import Contender, change, make_tree  # (this script's directory is on sys.path)

REPO = Path(__file__).resolve().parents[1]
BATCH = 4000   # names per b3sum / sha256sum command line
# What the engine runs for a snapshot's manifest, in a process of its own like the tools.
MANIFEST = """
import sys
from pathlib import Path
from snapmgr import manifest
root, algorithm, out, previous = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
before = manifest.load(out.parent, previous).entries() if previous else None
manifest.save(out.parent, out.name, algorithm, manifest.stream(root, algorithm, before))
"""
# The part of any manifest that no reuse saves: every entry's lstat and xattrs.
WALK = """
import sys
from snapmgr import manifest
for _ in manifest.stream(sys.argv[1], None):
    pass
"""


class Tool(Contender):
    def __init__(self, tool: str, group: str, tree: Path, work: Path):
        super().__init__(tool, work)
        self.tool, self.group = tool, group
        self.listing = work / f"{group}.files"
        if not self.listing.exists():
            names = sorted(os.fsencode(Path(d, f)) for d, _, fs in os.walk(tree) for f in fs)
            self.listing.write_bytes(b"\0".join(names) + b"\0")

    def argv(self, round_: int) -> list[str]:
        return ["xargs", "-0", "-a", str(self.listing), "-n", str(BATCH), self.tool, "--"]


class Manifest(Contender):
    def __init__(self, name: str, group: str, tree: Path, algorithm: str, out: Path, previous: Path | None = None):
        super().__init__(name, out.parent)
        self.group, self.tree, self.algorithm, self.out, self.previous = group, tree, algorithm, out, previous

    def argv(self, round_: int) -> list[str]:
        return [sys.executable, "-c", MANIFEST, str(self.tree), self.algorithm, str(self.out),
                self.previous.name if self.previous else ""]


class Walk(Contender):
    def __init__(self, group: str, tree: Path, work: Path):
        super().__init__("walk", work)
        self.group, self.tree = group, tree

    def argv(self, round_: int) -> list[str]:
        return [sys.executable, "-c", WALK, str(self.tree)]


def make_large(root: Path, count: int, mib: int) -> list[Path]:
    root.mkdir(parents=True)
    paths = [root / f"large{i}.bin" for i in range(count)]
    for path in paths:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    return paths


def rewrite(paths: list[Path], fraction: float, rng: random.Random) -> None:
    for p in rng.sample(paths, round(len(paths) * fraction)):
        p.write_bytes(os.urandom(p.stat().st_size))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=4, help="how many large files")
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--media", type=int, default=2000, help="how many 1 MiB files in the incremental case")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of files changed per round")
    parser.add_argument("--dir", type=Path, help="where to make the trees [default: a temporary directory]")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    args = parser.parse_args()
    missing = [p for p in ("b3sum", "sha256sum", "xargs") if not shutil.which(p)]
    if missing:
        parser.error(f"{', '.join(missing)} not installed (./run bench installs them)")
    Contender.cold = args.cold
    os.environ["PYTHONPATH"] = str(REPO)
    with tempfile.TemporaryDirectory(prefix="snapmgr-manifest-bench-", dir=args.dir) as work:
        return bench(Path(work), args)


def bench(work: Path, args) -> int:
    rng = random.Random(42)
    small, large, media, out = work / "small", work / "large", work / "media", work / "manifests"
    out.mkdir()
    print(f"generating {args.files:,} small files, {args.large} x {args.large_mib} MiB, "
          f"{args.media:,} x 1 MiB ...", flush=True)
    paths = make_tree(small, args.files, rng)
    make_large(large, args.large, args.large_mib)
    media_paths = make_large(media, args.media, 1)
    # The previous manifests of the incremental cases.
    base, media_base = out / "bench@20000101T000000Z", out / "media@20000101T000000Z"
    contenders = [
        Tool("b3sum", "small", small, work), Manifest("snapmgr blake3", "small", small, "blake3", out / "b3"),
        Tool("sha256sum", "small", small, work), Manifest("snapmgr sha256", "small", small, "sha256", out / "sha"),
        Tool("b3sum", "large", large, work), Manifest("snapmgr blake3", "large", large, "blake3", out / "b3l"),
        Tool("sha256sum", "large", large, work), Manifest("snapmgr sha256", "large", large, "sha256", out / "shal"),
        Manifest("full", "incremental", small, "blake3", out / "full"),
        Manifest("incremental", "incremental", small, "blake3", out / "incr", previous=base),
        Walk("incremental", small, work),
        Manifest("full", "incr. media", media, "blake3", out / "mfull"),
        Manifest("incremental", "incr. media", media, "blake3", out / "mincr", previous=media_base),
    ]
    for round_ in range(args.rounds + 1):
        # The incremental contenders' previous manifests are of the trees before this round's changes.
        Manifest("", "", small, "blake3", base).run(round_, timed=False)
        Manifest("", "", media, "blake3", media_base).run(round_, timed=False)
        change(paths, args.changed, rng)
        rewrite(media_paths, args.changed, rng)
        for c in rng.sample(contenders, len(contenders)):
            c.run(round_, timed=round_ > 0)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{c.group}/{c.name} {c.times[-1]:.2f}s" for c in contenders),
                  flush=True)
    report(contenders, args)
    return 0


def report(contenders: list[Contender], args) -> None:
    med = {(c.group, c.name): statistics.median(c.times) for c in contenders}
    print(f"\n{args.files:,} small files, {args.large} x {args.large_mib} MiB, {args.rounds} rounds, "
          f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} CPUs; wall seconds")
    print(f"{'tree':<13}{'contender':<16}{'median':>8}{'min':>8}{'max':>8}")
    for c in contenders:
        print(f"{c.group:<13}{c.name:<16}{med[c.group, c.name]:>8.3f}{min(c.times):>8.3f}{max(c.times):>8.3f}")
    print("\nspeed of snapmgr against the bare tool (>= 0.8x is the goal):")
    for group in ("small", "large"):
        for ours, tool in (("snapmgr blake3", "b3sum"), ("snapmgr sha256", "sha256sum")):
            print(f"  {group:<6} {ours} = {med[group, tool] / med[group, ours]:.2f}x {tool}")
    print(f"\nincremental at {args.changed:.0%} churn / full manifest (<= 0.1x is the goal):")
    print(f"  {args.files:,} small files: {med['incremental', 'incremental'] / med['incremental', 'full']:.3f}x "
          f"(a walk alone, the floor: {med['incremental', 'walk'] / med['incremental', 'full']:.3f}x)")
    print(f"  {args.media:,} media files: "
          f"{med['incr. media', 'incremental'] / med['incr. media', 'full']:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
