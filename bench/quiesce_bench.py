#!/usr/bin/env python3
"""snapmgr's quiesce windows against the bare tools, side by side in one run: the two
goals of quiescing.

A. btrfs. A sqlite quiescer holds a database inside a subvolume of a loop-mounted btrfs
   image while snapmgr snapshots the subvolume. Its freeze window (how long the quiescer
   is held for the take itself) against the wall time of a bare
   `btrfs subvolume snapshot -r` of the same subvolume on the same filesystem.
   Goal: freeze window <= 1.5x bare + 5 ms. (fsfreeze cannot stand in for sqlite here:
   snapmgr refuses to freeze the filesystem it snapshots into.)
B. rsync. A sqlite quiescer on a database in a tree of FILES small files. snapmgr copies
   once unquiesced, then holds the quiescer for a short second pass; its quiesce window
   against one rsync run with snapmgr's own argv over the same changes, linked to its own
   previous copy: how long a one-pass tool would hold the quiescer.
   Goal: quiesce window <= 10% of that pass.

Before each round a fraction of the files in both trees change and rows are added to both
databases, through a connection left open as an application's would be (so the quiescer
has a WAL to checkpoint); then the four contenders run in an order shuffled each round,
each after an untimed `sync`. The first round (a full copy) is a warm-up and is not
counted. snapmgr's windows are read from the newest snapshot's record
(`snapmgr --json status`); the bare tools are timed around the process. Prints the
median, min and max of each, the ratios of the medians and whether each goal is met by
the medians.
Needs root and a free loop device, which it releases.

    ./run bench quiesce                      # 100,000 files, 7 timed rounds
    ./run bench quiesce --files 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's snapmgr, for the rsync argv below

from rsync_bench import change, make_tree  # noqa: E402  (this script's directory is on sys.path)
from snapmgr.config import load  # noqa: E402
from snapmgr.engine import Engine  # noqa: E402

BTRFS_FILES = 2_000
ROWS_PER_ROUND = 1_000
GOAL_FREEZE_RATIO, GOAL_FREEZE_SLACK_S = 1.5, 0.005
GOAL_WINDOW_FRACTION = 0.10
LABEL_WIDTH = 56


class Contender:
    """Something timed once a round; run() returns its measures in seconds by name, of
    which `headline` is the one each round's progress line shows."""

    headline = "wall"

    def __init__(self, name: str):
        self.name = name
        self.measures: dict[str, list[float]] = {}

    def run(self, round_: int) -> dict[str, float]:
        raise NotImplementedError

    def record(self, measured: dict[str, float]) -> None:
        for key, seconds in measured.items():
            self.measures.setdefault(key, []).append(seconds)


class Snapmgr(Contender):
    """`snapmgr snapshot VOLUME`: the windows of its record, and the whole run's wall time."""

    def __init__(self, name: str, config: Path, volume: str, headline: str):
        super().__init__(name)
        self.config, self.volume, self.headline = config, volume, headline

    def cli(self, *args: str) -> dict:
        return json.loads(checked([sys.executable, "-m", "snapmgr", "--config", self.config, "--json", *args]))

    def run(self, round_: int) -> dict[str, float]:
        started = time.perf_counter()
        created = self.cli("snapshot", "--tag", "bench", self.volume)["results"][0]["created"]["id"]
        wall = time.perf_counter() - started
        status = self.cli("status", self.volume)["volumes"][0]
        if (status["newest"], status["newest_grade"]) != (created, "application"):
            sys.exit(f"{self.volume}: the newest snapshot is {status['newest']} ({status['newest_grade']}), "
                     f"not {created} (application)")
        return {"freeze": status["freeze_window_s"], "quiesce": status["quiesce_window_s"], "wall": wall}


class Bare(Contender):
    """A bare tool writing into DEST/<round>, timed around the process."""

    def __init__(self, name: str, dest: Path):
        super().__init__(name)
        self.dest = dest
        dest.mkdir()

    def argv(self, round_: int) -> list:
        raise NotImplementedError

    def run(self, round_: int) -> dict[str, float]:
        argv = self.argv(round_)
        started = time.perf_counter()
        checked(argv)
        return {"wall": time.perf_counter() - started}


class BareBtrfs(Bare):
    def __init__(self, dest: Path, subvolume: Path):
        super().__init__("btrfs bare", dest)
        self.subvolume = subvolume

    def argv(self, round_: int) -> list:
        return ["btrfs", "subvolume", "snapshot", "-r", self.subvolume, self.dest / str(round_)]


class BareRsync(Bare):
    """One pass with the very argv snapmgr's rsync backend runs, against its own previous copy."""

    def __init__(self, dest: Path, config: Path, volume: str):
        super().__init__("rsync bare", dest)
        loaded = load(config)
        self.backend = Engine(loaded).backend(loaded.volumes[volume])

    def argv(self, round_: int) -> list:
        latest = self.dest / str(round_ - 1) if round_ else None
        return self.backend._argv(self.dest / str(round_), latest, progress=False)


def checked(argv: list) -> str:
    """argv's stdout; its stderr in the exit message if it fails (the work directory is
    still cleaned up)."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(map(str, argv))} exited with {result.returncode}: {result.stderr.strip()}")
    return result.stdout


# The world -------------------------------------------------------------------------

@contextmanager
def btrfs_mounted(work: Path, size_mib: int = 1024) -> Iterator[Path]:
    """A fresh btrfs on a loop device, mounted at work/mnt; unmounted (which releases
    the loop device) whatever happens."""
    image, mnt = work / "btrfs.img", work / "mnt"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    checked(["mkfs.btrfs", "-q", image])
    mnt.mkdir()
    checked(["mount", "-o", "loop", image, mnt])
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def open_app_db(path: Path) -> sqlite3.Connection:
    """The application's connection: WAL, and no checkpoints of its own, so the
    quiescer's checkpoint has the round's rows to move."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE IF NOT EXISTS rows (payload BLOB)")
    return db


def add_rows(db: sqlite3.Connection, rng: random.Random) -> None:
    db.execute("BEGIN")
    db.executemany("INSERT INTO rows VALUES (?)", ((rng.randbytes(100),) for _ in range(ROWS_PER_ROUND)))
    db.execute("COMMIT")


def write_config(work: Path, mnt: Path, subvolume: Path, source: Path) -> Path:
    q = json.dumps  # a JSON string is a valid TOML basic string
    config = work / "snapmgr.toml"
    config.write_text(
        f'[settings]\nstate_dir = {q(str(work / "state"))}\nrun_dir = {q(str(work / "run"))}\n\n'
        f'[quiesce.app-btrfs]\nkind = "sqlite"\ndatabases = [{q(str(subvolume / "app.db"))}]\n\n'
        f'[quiesce.app-rsync]\nkind = "sqlite"\ndatabases = [{q(str(source / "app.db"))}]\n\n'
        f'[volumes.btrfs]\nbackend = "btrfs"\nsubvolume = {q(str(subvolume))}\n'
        f'snapshot_dir = {q(str(mnt / "snapshots"))}\nquiesce = ["app-btrfs"]\n\n'
        f'[volumes.rsync]\nbackend = "rsync"\nsource = {q(str(source))}\n'
        f'repository = {q(str(work / "repository"))}\nquiesce = ["app-rsync"]\n')
    config.chmod(0o644)
    return config


# The run ---------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000, help="files in the rsync tree (B)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after the warm-up")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of files changed per round")
    parser.add_argument("--dir", type=Path, help="work directory [default: a temporary one, removed after]")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (loop devices, mounts, snapmgr itself)")
    for program in ("rsync", "btrfs", "mkfs.btrfs"):
        if not shutil.which(program):
            parser.error(f"{program} is not installed (./run bench installs it)")

    work = Path(tempfile.mkdtemp(prefix="snapmgr-quiesce-bench-", dir=args.dir))
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        with btrfs_mounted(work) as mnt:
            return bench(work, mnt, args)
    finally:
        shutil.rmtree(work)


def bench(work: Path, mnt: Path, args) -> int:
    rng = random.Random(42)
    subvolume, source = mnt / "data", work / "source"
    checked(["btrfs", "subvolume", "create", subvolume])
    print(f"generating {BTRFS_FILES:,} files in {subvolume} and {args.files:,} in {source} ...", flush=True)
    trees = [make_tree(subvolume, BTRFS_FILES, rng), make_tree(source, args.files, rng)]
    dbs = [open_app_db(subvolume / "app.db"), open_app_db(source / "app.db")]
    try:
        config = write_config(work, mnt, subvolume, source)
        contenders = [Snapmgr("btrfs snapmgr", config, "btrfs", headline="freeze"),
                      BareBtrfs(mnt / "bare", subvolume),
                      Snapmgr("rsync snapmgr", config, "rsync", headline="quiesce"),
                      BareRsync(work / "bare-rsync", config, "rsync")]
        for round_ in range(args.rounds + 1):
            if round_:
                for paths, db in zip(trees, dbs):
                    change(paths, args.changed, rng)
                    add_rows(db, rng)
            for c in rng.sample(contenders, len(contenders)):
                os.sync()  # each pays for its own writes only
                measured = c.run(round_)
                if round_:
                    c.record(measured)
            print(progress(round_, contenders), flush=True)
    finally:
        for db in dbs:
            db.close()
    report(*contenders, args)
    return 0


def progress(round_: int, contenders: list[Contender]) -> str:
    if not round_:
        return "round 0 (warm-up, full copy)"
    return f"round {round_}: " + ", ".join(f"{c.name} {c.headline} {c.measures[c.headline][-1]:.4f}s"
                                            for c in contenders)


def report(btrfs: Snapmgr, bare_btrfs: Bare, rsync: Snapmgr, bare_rsync: Bare, args) -> None:
    def table(title: str, rows: list[tuple[str, Contender, str]]) -> None:
        print(title)
        for label, contender, key in rows:
            values = contender.measures[key]
            print(f"  {label:<{LABEL_WIDTH}}{statistics.median(values):>9.4f}{min(values):>9.4f}{max(values):>9.4f}")

    def median(c: Contender, key: str) -> float:
        return statistics.median(c.measures[key])

    print(f"\n{args.rounds} timed rounds, {args.changed:.0%} of the files changed per round")
    print(f"  {'seconds':<{LABEL_WIDTH}}{'median':>9}{'min':>9}{'max':>9}")
    table(f"A. btrfs, {BTRFS_FILES:,} files and a sqlite quiescer", [
        ("snapmgr freeze window (sqlite held for the take)", btrfs, "freeze"),
        ("snapmgr quiesce window (first prepare to last resume)", btrfs, "quiesce"),
        ("bare btrfs subvolume snapshot -r", bare_btrfs, "wall"),
        ("snapmgr snapshot, the whole run", btrfs, "wall")])
    freeze, bare = median(btrfs, "freeze"), median(bare_btrfs, "wall")
    limit = GOAL_FREEZE_RATIO * bare + GOAL_FREEZE_SLACK_S
    print(f"  freeze / bare = {freeze / bare:.2f}x; goal freeze <= {GOAL_FREEZE_RATIO}x bare + "
          f"{GOAL_FREEZE_SLACK_S * 1000:g} ms = {limit:.4f}s: {'met' if freeze <= limit else 'MISSED'}")

    table(f"B. rsync, {args.files:,} files and a sqlite quiescer", [
        ("snapmgr quiesce window (the pass after the prepass)", rsync, "quiesce"),
        ("snapmgr freeze window", rsync, "freeze"),
        ("bare rsync with snapmgr's argv: one quiesced pass", bare_rsync, "wall"),
        ("snapmgr snapshot, the whole run (prepass and window)", rsync, "wall")])
    window, one_pass = median(rsync, "quiesce"), median(bare_rsync, "wall")
    print(f"  window / one pass = {window / one_pass:.1%}; goal <= {GOAL_WINDOW_FRACTION:.0%}: "
          f"{'met' if window <= GOAL_WINDOW_FRACTION * one_pass else 'MISSED'}")

if __name__ == "__main__":
    sys.exit(main())
