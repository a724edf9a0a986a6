#!/usr/bin/env python3
"""`snapmgr diff` between two rsync snapshots against bare `rsync -n`, side by side in one run.

Contenders, on the same two snapshots (FILES files, 1% of them rewritten between them):
- snapmgr diff from the two snapshots' manifests (nothing on disk is walked);
- snapmgr diff by walking both snapshots (it reads only the files that are not the same
  inode on both sides, i.e. the rewritten ones);
- snapmgr diff --quick (walks, reads nothing);
- bare `rsync -ni -aHAX --delete A/ B/`: rsync's own quick check (size and mtime);
- bare `rsync -ni -aHAX --delete --checksum A/ B/`: what rsync needs to see a rewrite
  that kept size and mtime, which the walk above sees too.
Each round runs every contender once in a shuffled order, after an untimed `sync`;
the first round is a warm-up. Prints median, min and max wall time and the ratio of
each median to bare rsync's.

    ./run bench diff                 # 100,000 files, 7 timed rounds
    ./run bench diff --files 20000 --rounds 3
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

from bench.rsync_bench import change, make_tree  # noqa: E402
from snapmgr.manifest import save, scan  # noqa: E402


def snapmgr(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snapmgr", "--config", str(config), *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(9)
    with tempfile.TemporaryDirectory(prefix="snapmgr-diff-bench-") as tmp:
        work = Path(tmp)
        source, repo = work / "source", work / "repo"
        source.mkdir()
        config = work / "snapmgr.toml"
        config.write_text(f'[settings]\nstate_dir = "{work / "state"}"\nrun_dir = "{work / "run"}"\n'
                          f'[volumes.data]\nbackend = "rsync"\nsource = "{source}"\nrepository = "{repo}"\n'
                          'manifest = "off"\n')
        env = dict(os.environ, PYTHONPATH=str(REPO))
        paths = make_tree(source, args.files, rng)
        ids = []
        for step in range(2):
            if step:
                change(paths, 0.01, rng)
            out = subprocess.run(snapmgr(config, "--json", "snapshot"), env=env, check=True, capture_output=True).stdout
            ids.append(json.loads(out)["results"][0]["created"]["id"])
        a, b = ids
        # The snapshots indexed a second time, in a repository of their own, with manifests.
        indexed = work / "indexed"
        indexed.mkdir()
        for sid in ids:
            subprocess.run(["cp", "-al", repo / sid, indexed / sid], check=True)
            subprocess.run(["cp", repo / f"{sid}.json", indexed / f"{sid}.json"], check=True)
            save(indexed, sid, "blake3", scan(indexed / sid, "blake3"))
        with_manifests = work / "indexed.toml"
        with_manifests.write_text(config.read_text().replace(f'repository = "{repo}"', f'repository = "{indexed}"'))
        contenders = {
            "snapmgr diff (manifests)": snapmgr(with_manifests, "diff", a, b),
            "snapmgr diff (walk)": snapmgr(config, "diff", a, b),
            "snapmgr diff --quick": snapmgr(config, "diff", "--quick", a, b),
            "rsync -n (quick check)": ["rsync", "-ni", "-aHAX", "--delete", f"{repo / a}/", f"{repo / b}/"],
            "rsync -n --checksum": ["rsync", "-ni", "-aHAX", "--delete", "--checksum", f"{repo / a}/", f"{repo / b}/"],
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.rounds + 1):
            order = list(contenders)
            rng.shuffle(order)
            for name in order:
                os.sync()
                started = time.perf_counter()
                subprocess.run(contenders[name], env=env, check=True, stdout=subprocess.DEVNULL)
                if round_:
                    times[name].append(time.perf_counter() - started)
        base = statistics.median(times["rsync -n (quick check)"])
        print(f"diff of two rsync snapshots: {args.files} files, 1% rewritten, {args.rounds} timed rounds")
        print(f"{'contender':28} {'median':>8} {'min':>8} {'max':>8} {'vs rsync -n':>12}")
        for name, t in times.items():
            median = statistics.median(t)
            print(f"{name:28} {median:8.3f} {min(t):8.3f} {max(t):8.3f} {median / base:11.2f}x")


if __name__ == "__main__":
    main()
