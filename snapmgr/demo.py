"""`snapmgr demo`: the main job, end to end, on a generated sample directory.

Everything runs through the real CLI as a child process, and each command is printed
before it runs, so the demo doubles as a tour of the commands."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

import click

from snapmgr import sh

CONFIG = """\
# The demo's configuration: one rsync volume over a generated sample directory.
[settings]
state_dir = "{work}/state"
run_dir = "{work}/run"
timezone = "UTC"

[retention.demo]
keep_last = 2

[volumes.sample]
backend = "rsync"
source = "{work}/sample"
repository = "{work}/snapshots"
exclude = ["*.tmp"]
retention = "demo"
"""


def run_demo(workdir: Path | None) -> None:
    work = Path(workdir or tempfile.mkdtemp(prefix="snapmgr-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "snapmgr.toml"
    config.write_text(CONFIG.format(work=work))
    config.chmod(0o644)
    sample = work / "sample"
    _make_sample(sample)
    _say(f"A sample directory of {sum(1 for _ in sample.rglob('*'))} entries is in {sample}; "
         f"the config is {config}:")
    click.echo(config.read_text())

    def snapmgr(*args: str) -> None:
        click.echo(click.style(f"$ snapmgr --config {shlex.quote(str(config))} {shlex.join(args)}", fg="cyan"))
        sh.run([sys.executable, "-m", "snapmgr", "--config", config, *args], capture=False)
        click.echo()

    snapmgr("config", "check")
    _say("A first snapshot, by hand: it is tagged 'manual', which prune never removes.")
    snapmgr("snapshot", "sample")
    for round_ in (1, 2, 3):
        _change(sample, round_)
        snapmgr("snapshot", "sample", "--tag", "hourly")
    snapmgr("list")
    _show_sharing(work / "snapshots")
    _say("The policy keeps the last 2; the manual snapshot is protected.")
    snapmgr("prune", "--dry-run")
    snapmgr("prune")
    snapmgr("list")
    snapmgr("status")
    _say(f"Done. Everything is in {work}; remove it with: rm -rf {shlex.quote(str(work))}")


def _say(text: str) -> None:
    click.echo(click.style(f"# {text}", bold=True))


def _make_sample(root: Path) -> None:
    for d in range(5):
        folder = root / f"project-{d}" / "src"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(20):
            (folder / f"file-{f}.txt").write_text(f"project {d}, file {f}\n" * (f + 1))
    (root / "notes.txt").write_text("first version\n")
    (root / "scratch.tmp").write_text("excluded by the config\n")


def _change(root: Path, round_: int) -> None:
    _say(f"Changing the sample: notes.txt edited, one file added, one deleted (round {round_}).")
    with open(root / "notes.txt", "a") as f:
        f.write(f"edit {round_}\n")
    (root / f"added-{round_}.txt").write_text("new\n")
    (root / "project-0" / "src" / f"file-{round_}.txt").unlink()


def _show_sharing(repository: Path) -> None:
    snapshots = sorted(p for p in repository.iterdir() if p.is_dir())
    unchanged = os.stat(snapshots[-1] / "project-1" / "src" / "file-0.txt")
    changed = [os.stat(s / "notes.txt").st_ino for s in snapshots]
    _say(f"Unchanged files are one inode shared by every snapshot: project-1/src/file-0.txt has "
         f"{unchanged.st_nlink} links; notes.txt changed each time and has {len(set(changed))} distinct inodes.")
