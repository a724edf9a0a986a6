#!/usr/bin/env python3
"""`snapmgr rollback` of an rsync volume against a bare `rsync --delete`, side by side in one run.

A tree of FILES files (sizes spread as on a real system: mostly a few KiB, a few up to
1 MiB; 100 to a directory, three directories deep) is snapshotted as T; then 1% of it
changes (0.6% rewritten, 0.2% added, 0.2% deleted). Before each timed run that same change
is applied again (not timed, then an untimed `sync`), so every contender starts from the
same state; each contender but two puts the tree back as T. Contenders, in an order
shuffled each round:
- snapmgr rollback VOL@T --yes, manifest = "off" and with the default blake3 manifest
  (a volume of its own each, both on the one tree, no quiescers);
- the same, blake3, with a service to stop: a command quiescer that touches one file
  when the services stop and another when they start again, whose mtimes time the
  window (the pre-rollback snapshot's prepass runs before it, its manifest and the
  check after);
- snapmgr rollback VOL@T --dry-run: starting snapmgr and the plan alone (changes nothing);
- bare `rsync -aHAX --numeric-ids --delete T/ source/`: the goal's yardstick;
- rsync with the argv the rollback's copy runs (snapmgr.restore.argv): the cost of its
  own flags;
- bare rsync with the snapshot's argv and --link-dest into a new directory: what the
  pre-rollback snapshot costs by itself (changes nothing);
- `rsync --delete --backup --backup-dir` from T: one pass that puts T back and keeps
  aside what it replaces or deletes, the in-window cost of a rollback that would build its
  pre-rollback snapshot from T and those files after the services start again;
- `cp -al T`: the bulk of building that snapshot then (changes nothing).

snapmgr runs with -vv, whose log lines are timestamped as they arrive: without a service
to stop, the two rsync runs it starts split its wall time into the plan (with starting
Python, the lock and the writers check), the pre-rollback snapshot's rsync, the rest of
that snapshot (flush, record) with the names where it and the target are apart, the copy
of those names, and what follows it (the services running again): the pre-rollback
snapshot's manifest, the check, the journal and exit.
The first round is a warm-up and is not counted. Prints the median, min and max of each,
the ratio of each median to the bare rsync's, and the median of each of snapmgr's phases.

    ./run bench rollback                       # 100,000 files, 7 timed rounds: ~12 min on 2 CPUs
    ./run bench rollback --files 10000 --rounds 3   # under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's snapmgr, for the rollback's own rsync argv

from rsync_bench import SNAPMGR_FLAGS  # noqa: E402  (this script's directory is on sys.path)
import snapmgr.backends  # noqa: E402,F401  (first: snapmgr.restore alone is a circular import)
from snapmgr.manifest.walk import RACY_MARGIN_NS  # noqa: E402
from snapmgr.restore import argv as restore_argv  # noqa: E402

PER_DIR, FANOUT = 100, 10
MEDIAN_SIZE, SIZE_SIGMA, MAX_SIZE = 2048, 1.5, 1 << 20   # lognormal: mean ~6 KiB
SHARES = {"rewritten": 0.6, "added": 0.2, "deleted": 0.2}  # of the changed fraction
PHASES = ("plan (+ start, lock, writers)", "pre-rollback: rsync --link-dest",
          "pre-rollback: flush, record; names apart", "copy: rsync of those names", "pre-rollback manifest, check, exit")


class Content:
    """File contents cut from one random pool: fast to make, and as incompressible and
    unshared as rsync cares about (it compresses nothing and finds no duplicates locally)."""

    def __init__(self, rng: random.Random):
        self.rng, self.pool = rng, rng.randbytes(2 * MAX_SIZE)

    def size(self) -> int:
        return min(MAX_SIZE, int(self.rng.lognormvariate(math.log(MEDIAN_SIZE), SIZE_SIGMA)))

    def make(self) -> bytes:
        size, start = self.size(), self.rng.randrange(MAX_SIZE)
        return self.pool[start:start + size]


def make_tree(root: Path, files: int, content: Content) -> list[Path]:
    paths = []
    for i in range(files):
        leaf = i // PER_DIR
        d = root / f"d{leaf // FANOUT ** 2:02d}" / f"e{leaf // FANOUT % FANOUT}" / f"f{leaf % FANOUT}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i:06d}.dat"
        p.write_bytes(content.make())
        paths.append(p)
    return paths


class Change:
    """One fixed change of a fraction of the tree, which `apply` makes again and again
    (idempotent: the same bytes, the same names added and deleted, new mtimes)."""

    def __init__(self, paths: list[Path], fraction: float, content: Content, rng: random.Random):
        count = {kind: round(len(paths) * fraction * share) for kind, share in SHARES.items()}
        touched = rng.sample(paths, count["rewritten"] + count["deleted"])
        self.deleted = touched[:count["deleted"]]
        self.written = {p: content.make() for p in touched[count["deleted"]:]}
        for p in rng.sample(paths, count["added"]):
            self.written[p.with_name(f"new-{p.name}")] = content.make()

    def apply(self) -> None:
        for p in self.deleted:
            p.unlink(missing_ok=True)
        for p, data in self.written.items():
            p.write_bytes(data)


class Contender:
    def __init__(self, name: str, argv: list[str], restores: bool = True):
        self.name, self.argv, self.restores = name, argv, restores
        self.times: list[float] = []

    def run(self, env: dict) -> None:
        started = time.perf_counter()
        subprocess.run(self.argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.times.append(time.perf_counter() - started)

    def after(self) -> None:
        """Untimed clean-up after a run."""


class Rollback(Contender):
    """snapmgr rollback, its phases timed by the rsync runs its -vv log announces; or,
    given the files its quiescer touches, how long the services were stopped."""

    def __init__(self, name: str, argv: list[str], stopped: tuple[Path, Path] | None = None):
        super().__init__(name, argv)
        self.phases: list[list[float]] = []
        self.reported: list[float] = []   # the `seconds` of its --json output
        self.stopped, self.windows = stopped, []

    def run(self, env: dict) -> None:
        marks: list[float] = []
        started = time.perf_counter()
        proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
        reader.start()
        log = []
        for line in proc.stderr:
            if line.startswith(("snapmgr: DEBUG: run: rsync", "snapmgr: DEBUG: exit 0: rsync")):
                marks.append(time.perf_counter())
            log.append(line)
        proc.wait()
        reader.join()
        ended = time.perf_counter()
        if proc.returncode or not self.stopped and len(marks) != 4:
            raise SystemExit(f"{self.name} failed (exit {proc.returncode}, {len(marks)} rsync marks):\n"
                             + "".join(log[-20:]))
        self.times.append(ended - started)
        self.reported.append(json.loads(out[0])["seconds"])
        if self.stopped:
            stop, start = (p.stat().st_mtime for p in self.stopped)
            self.windows.append(start - stop)
        else:
            edges = [started, *marks, ended]
            self.phases.append([b - a for a, b in zip(edges, edges[1:])])


class Snapshots(Contender):
    """Bare rsync into a new directory linked to its previous one, as a pre-rollback snapshot."""

    def __init__(self, name: str, source: Path, repo: Path, previous: Path):
        super().__init__(name, [], restores=False)
        self.source, self.repo, self.previous, self.made = source, repo, previous, 0
        repo.mkdir()

    def run(self, env: dict) -> None:
        self.made += 1
        self.argv = ["rsync", *SNAPMGR_FLAGS, f"--link-dest={self.previous}", f"{self.source}/",
                     f"{self.repo / str(self.made)}/"]
        super().run(env)

    def after(self) -> None:
        # The newest stays for the next run to link to; the older go, untimed.
        if self.previous.parent == self.repo:
            shutil.rmtree(self.previous)
        self.previous = self.repo / str(self.made)


class BackedUp(Contender):
    def __init__(self, name: str, snapshot: Path, source: Path, aside: Path):
        super().__init__(name, ["rsync", "-aHAX", "--numeric-ids", "--delete", "--backup", f"--backup-dir={aside}",
                                f"{snapshot}/", f"{source}/"])
        self.aside = aside

    def after(self) -> None:
        if self.aside.exists():   # rsync makes it when it keeps something aside
            shutil.rmtree(self.aside)


class LinkedCopy(Contender):
    """`cp -al` of T into a new directory: the bulk of building a pre-rollback snapshot
    from T and what the pass above kept aside, once the services run again."""

    def __init__(self, name: str, snapshot: Path, copy: Path):
        super().__init__(name, ["cp", "-al", str(snapshot), str(copy)], restores=False)
        self.copy = copy

    def after(self) -> None:
        shutil.rmtree(self.copy)


def snapmgr(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snapmgr", "--config", str(config), *args]


def volume_config(work: Path, name: str, source: Path, manifest: str, stopped: tuple[Path, Path] | None = None
                  ) -> Path:
    config = work / f"{name}.toml"
    service = f'quiesce = ["service"]\n\n[quiesce.service]\nkind = "command"\npre = ["touch", "{stopped[0]}"]\n' \
              f'post = ["touch", "{stopped[1]}"]\n' if stopped else ""
    config.write_text(f'[settings]\nstate_dir = "{work / name}-state"\nrun_dir = "{work / name}-run"\n\n'
                      f'[volumes.{name}]\nbackend = "rsync"\nsource = "{source}"\nrepository = "{work / name}"\n'
                      f'manifest = "{manifest}"\n{service}')
    config.chmod(0o644)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after the warm-up")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of the files changed")
    parser.add_argument("--dir", type=Path, help="where the scratch directory goes [default: the system's temp]")
    args = parser.parse_args()
    if not shutil.which("rsync"):
        parser.error("rsync is not installed (./run bench installs it)")
    work = Path(tempfile.mkdtemp(prefix="snapmgr-rollback-bench-", dir=args.dir))
    try:
        return bench(work, args)
    finally:
        shutil.rmtree(work)


def bench(work: Path, args) -> int:
    rng = random.Random(11)
    content = Content(rng)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    source = work / "source"
    print(f"generating {args.files:,} files in {source} ...", flush=True)
    paths = make_tree(source, args.files, content)
    # As a real target is, taken well after its files were written: the check reads every
    # file whose ctime is within the racy margin before the snapshot.
    time.sleep(RACY_MARGIN_NS / 1e9)
    configs = {manifest: volume_config(work, f"vol{manifest}", source, manifest) for manifest in ("off", "blake3")}
    stopped = (work / "stopped", work / "started")
    configs["service"] = volume_config(work, "volservice", source, "blake3", stopped)
    targets = {}
    for manifest, config in configs.items():
        out = subprocess.run(snapmgr(config, "--json", "snapshot"), env=env, check=True, capture_output=True).stdout
        targets[manifest] = json.loads(out)["results"][0]["created"]
    tree = Path(targets["off"]["path"])
    change = Change(paths, args.changed, content, rng)
    contenders = [
        Rollback("snapmgr rollback", snapmgr(configs["off"], "--json", "-vv", "rollback", targets["off"]["id"],
                                             "--yes")),
        Rollback("snapmgr rollback, blake3", snapmgr(configs["blake3"], "--json", "-vv", "rollback",
                                                     targets["blake3"]["id"], "--yes")),
        Rollback("snapmgr rollback, a service", snapmgr(configs["service"], "--json", "-vv", "rollback",
                                                        targets["service"]["id"], "--yes"), stopped),
        Contender("snapmgr rollback --dry-run", snapmgr(configs["off"], "rollback", targets["off"]["id"], "--dry-run"),
                  restores=False),
        Contender("rsync --delete", ["rsync", "-aHAX", "--numeric-ids", "--delete", f"{tree}/", f"{source}/"]),
        Contender("rsync, the copy's argv", restore_argv(tree, [b""], source, dry_run=False, delete=True,
                                                         left_out=(), kept=())),
        Snapshots("rsync, the snapshot's argv", source, work / "bare-snapshots", tree),
        BackedUp("rsync --delete --backup-dir", tree, source, work / "aside"),
        LinkedCopy("cp -al T", tree, work / "linked"),
    ]
    for round_ in range(args.rounds + 1):
        for c in rng.sample(contenders, len(contenders)):
            change.apply()
            os.sync()
            c.run(env)
            c.after()
            if round_ == args.rounds and c.restores:
                check_restored(c, tree, source)
            if not round_:
                c.times.pop()
                if isinstance(c, Rollback):
                    c.reported.pop()
                    (c.windows if c.stopped else c.phases).pop()
        print(f"round {round_}: " + (", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in contenders) if round_
                                     else "warm-up, not counted"), flush=True)
    report(contenders, args)
    return 0


def check_restored(c: Contender, tree: Path, source: Path) -> None:
    """In the last round, each contender that puts the tree back is seen to have done so:
    rsync then finds nothing to change (untimed)."""
    left = subprocess.run(["rsync", "-ni", "-aHAX", "--delete", f"{tree}/", f"{source}/"], check=True,
                          capture_output=True, text=True).stdout
    if any(line.startswith(("*", ">", "c")) for line in left.splitlines()):
        raise SystemExit(f"{c.name} left the tree differing from T:\n{left[:2000]}")


def report(contenders: list[Contender], args) -> None:
    medians = {c.name: statistics.median(c.times) for c in contenders}
    base = medians["rsync --delete"]
    print(f"\nrollback of {args.files:,} files, {args.changed:.0%} changed, {args.rounds} timed rounds, "
          f"warm page cache; wall seconds")
    print(f"{'contender':32}{'median':>8}{'min':>8}{'max':>8}{'vs rsync --delete':>19}")
    for c in contenders:
        print(f"{c.name:32}{medians[c.name]:8.3f}{min(c.times):8.3f}{max(c.times):8.3f}"
              f"{medians[c.name] / base:18.2f}x")
    for c in contenders:
        if isinstance(c, Rollback) and c.stopped:
            window = statistics.median(c.windows)
            print(f"\n{c.name}: the service stopped for {window:.3f} s (median; min {min(c.windows):.3f}, max "
                  f"{max(c.windows):.3f}): {window / base:.2f}x a bare rsync --delete")
        elif isinstance(c, Rollback):
            print(f"\n{c.name}: median of each phase (its own --json seconds, which leave out the plan: "
                  f"{statistics.median(c.reported):.3f})")
            for i, phase in enumerate(PHASES):
                share = statistics.median(p[i] for p in c.phases)
                print(f"  {phase:40}{share:8.3f}{share / base:8.2f}x")


if __name__ == "__main__":
    sys.exit(main())
