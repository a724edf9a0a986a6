#!/usr/bin/env python3
"""snapmgr's FUSE mount against bindfs (a C FUSE passthrough) and direct access, side by
side in one run.

One rsync snapshot (taken by snapmgr) of a tree of FILES small files and one 512 MiB file.
Each round, in an order shuffled per round, each contender
  - `find` over the tree: cold (a fresh mount, after `echo 3 > drop_caches`), then warm;
  - `cat` of the big file: cold (a fresh mount, caches dropped), then warm.
The contenders: the snapshot directory itself (direct), `bindfs -o ro SNAPSHOT DST`, and
`snapmgr mount DST` (read at DST/VOLUME/LABEL). Prints medians, min and max, the ratios
of the medians and whether each goal of the issue is met.

Then the memory of the mount: a volume of 10 and one of 1,000 snapshots (hardlink copies
of one small snapshot, each with its sidecar as the rsync backend lays them out), `find`
over the whole mount, then the RSS of the mount process.

    ./run bench fuse                     # 100,000 files, 5 rounds
    ./run bench fuse --files 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
BIG = 512 << 20
MEASURES = ("find cold", "find warm", "read cold", "read warm")


def make_tree(root: Path, files: int, rng: random.Random) -> None:
    per_dir = 100
    for i in range(files):
        d = root / "tree" / f"dir{i // (per_dir * 100):02d}" / f"sub{(i // per_dir) % 100:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:06d}.dat").write_bytes(rng.randbytes(rng.randint(200, 4000)))
    with open(root / "big.bin", "wb") as f:
        for _ in range(BIG >> 24):
            f.write(os.urandom(1 << 24))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mounted(path: Path) -> bool:
    return any(line.split(" ")[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def wait_mounted(path: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 60
    while not mounted(path):
        if (proc and proc.poll() is not None) or time.monotonic() > deadline:
            raise SystemExit(f"fuse_bench: the mount at {path} did not come up")
        time.sleep(0.02)
    os.stat(path)  # waits for the filesystem's INIT


class Contender:
    def __init__(self, name: str):
        self.name = name
        self.times: dict[str, list[float]] = {m: [] for m in MEASURES}

    @contextmanager
    def view(self) -> Iterator[Path]:
        """The snapshot as this contender shows it, freshly mounted."""
        raise NotImplementedError

    def round(self) -> None:
        for what, argv in (("find", ["find"]), ("read", ["cat"])):
            with self.view() as root:
                target = root / ("tree" if what == "find" else "big.bin")
                drop_caches()
                for temperature in ("cold", "warm"):
                    started = time.perf_counter()
                    subprocess.run([*argv, target], check=True, stdout=subprocess.DEVNULL)
                    self.times[f"{what} {temperature}"].append(time.perf_counter() - started)


class Direct(Contender):
    def __init__(self, snapshot: Path):
        super().__init__("direct")
        self.snapshot = snapshot

    @contextmanager
    def view(self) -> Iterator[Path]:
        yield self.snapshot


class Bindfs(Contender):
    def __init__(self, snapshot: Path, mountpoint: Path):
        super().__init__("bindfs")
        self.snapshot, self.mountpoint = snapshot, mountpoint

    @contextmanager
    def view(self) -> Iterator[Path]:
        subprocess.run(["bindfs", "-o", "ro", self.snapshot, self.mountpoint], check=True)
        try:
            wait_mounted(self.mountpoint)
            yield self.mountpoint
        finally:
            subprocess.run(["fusermount3", "-u", self.mountpoint], check=True)


class Snapmgr(Contender):
    def __init__(self, config: Path, mountpoint: Path, label: str):
        super().__init__("snapmgr")
        self.config, self.mountpoint, self.label = config, mountpoint, label

    @contextmanager
    def view(self) -> Iterator[Path]:
        with snapmgr_mount(self.config, self.mountpoint):
            yield self.mountpoint / "data" / self.label


@contextmanager
def snapmgr_mount(config: Path, mountpoint: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(snapmgr(config, "mount", mountpoint), env=env())
    try:
        wait_mounted(mountpoint, proc)
        yield proc
    finally:
        subprocess.run(snapmgr(config, "umount", mountpoint), check=True, env=env())
        proc.wait(60)


def snapmgr(config: Path, *args) -> list[str]:
    return [sys.executable, "-m", "snapmgr", "--config", str(config), *map(str, args)]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def write_config(work: Path, name: str, source: Path, repository: Path) -> Path:
    config = work / f"{name}.toml"
    config.write_text(f'[settings]\nstate_dir = "{work / "state"}"\nrun_dir = "{work / "run"}"\n'
                      f'[volumes.data]\nbackend = "rsync"\nsource = "{source}"\nrepository = "{repository}"\n')
    return config


def take_snapshot(config: Path) -> str:
    out = subprocess.run(snapmgr(config, "--json", "snapshot"), check=True, capture_output=True, text=True,
                         env=env()).stdout
    return json.loads(out)["results"][0]["created"]["id"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"fuse_bench: no VmRSS for pid {pid}")


def rss_with(work: Path, count: int) -> tuple[int, int]:
    """The mount's RSS (KiB) with `count` snapshots of a small tree: after `ls -l` of the
    volume, and after a `find` over every file of every snapshot."""
    source, repo = work / f"small-{count}", work / f"repo-{count}"
    rng = random.Random(count)
    for i in range(20):
        (source / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (source / f"d{i % 4}" / f"f{i}").write_bytes(rng.randbytes(100))
    config = write_config(work, f"rss-{count}", source, repo)
    first = take_snapshot(config)
    meta = json.loads((repo / f"{first}.json").read_text())
    for i in range(1, count):
        sid = f"data@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(1_000_000_000 + i))}"
        subprocess.run(["cp", "-al", repo / first, repo / sid], check=True)
        (repo / f"{sid}.json").write_text(json.dumps(meta | {"id": sid}))
    mountpoint = work / f"mnt-rss-{count}"
    mountpoint.mkdir()
    with snapmgr_mount(config, mountpoint) as proc:
        subprocess.run(["ls", "-l", mountpoint / "data"], check=True, stdout=subprocess.DEVNULL)
        top = rss_kib(proc.pid)
        subprocess.run(["find", mountpoint], check=True, stdout=subprocess.DEVNULL)
        return top, rss_kib(proc.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to build the trees")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fuse_bench: run as root (mounts, drop_caches)")
    work = Path(tempfile.mkdtemp(prefix="snapmgr-fuse-bench-", dir=args.dir))
    try:
        return bench(work, args)
    finally:
        for mnt in work.glob("mnt-*"):
            if mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt])
        shutil.rmtree(work)


def bench(work: Path, args) -> int:
    rng = random.Random(args.seed)
    source, repo = work / "source", work / "repo"
    print(f"building {args.files} files and a {BIG >> 20} MiB file in {work} ...", flush=True)
    make_tree(source, args.files, rng)
    config = write_config(work, "bench", source, repo)
    sid = take_snapshot(config)
    mnt_bindfs, mnt_snapmgr = work / "mnt-bindfs", work / "mnt-snapmgr"
    mnt_bindfs.mkdir()
    mnt_snapmgr.mkdir()
    contenders = [Direct(repo / sid), Bindfs(repo / sid, mnt_bindfs),
                  Snapmgr(config, mnt_snapmgr, sid.partition("@")[2])]
    for round_ in range(1, args.rounds + 1):
        order = contenders[:]
        rng.shuffle(order)
        for c in order:
            c.round()
        print(f"round {round_}/{args.rounds}: " + ", ".join(
            f"{c.name} find {c.times['find cold'][-1]:.2f}/{c.times['find warm'][-1]:.2f}s "
            f"read {c.times['read cold'][-1]:.2f}/{c.times['read warm'][-1]:.2f}s" for c in contenders), flush=True)
    report(contenders, args)
    small, large = rss_with(work, 10), rss_with(work, 1000)
    print("\nmount RSS, 10 snapshots vs 1,000 (20 files each)")
    for i, after in enumerate(("ls -l of the volume", "a find over every file")):
        print(f"  after {after:<24} {small[i] / 1024:6.1f} MiB  {large[i] / 1024:6.1f} MiB  "
              f"({large[i] / small[i]:.2f}x)")
    return 0


def report(contenders: list[Contender], args) -> None:
    median = {c.name: {m: statistics.median(c.times[m]) for m in MEASURES} for c in contenders}
    print(f"\n{args.files} files + one {BIG >> 20} MiB file, {args.rounds} rounds; seconds")
    print(f"  {'':<20}{'median':>9}{'min':>9}{'max':>9}")
    for m in MEASURES:
        for c in contenders:
            values = c.times[m]
            print(f"  {m + ' ' + c.name:<20}{statistics.median(values):>9.3f}{min(values):>9.3f}{max(values):>9.3f}")
    s, b, d = median["snapmgr"], median["bindfs"], median["direct"]
    mib = BIG / (1 << 20)
    print("\nratios of the medians (goal in brackets)")
    print(f"  find cold: snapmgr/bindfs {s['find cold'] / b['find cold']:.2f}x (<= 1)   "
          f"snapmgr/direct {s['find cold'] / d['find cold']:.2f}x")
    print(f"  find warm: snapmgr/direct {s['find warm'] / d['find warm']:.2f}x (<= 1.5)   "
          f"snapmgr/bindfs {s['find warm'] / b['find warm']:.2f}x")
    print(f"  read cold: snapmgr {mib / s['read cold']:.0f} MiB/s, bindfs {mib / b['read cold']:.0f} MiB/s, "
          f"direct {mib / d['read cold']:.0f} MiB/s: "
          f"snapmgr/bindfs speed {b['read cold'] / s['read cold']:.2f}x (>= 1)")
    print(f"  read warm: snapmgr {mib / s['read warm']:.0f} MiB/s, direct {mib / d['read warm']:.0f} MiB/s: "
          f"snapmgr/direct speed {d['read warm'] / s['read warm']:.2f}x (>= 0.8)")


if __name__ == "__main__":
    sys.exit(main())
