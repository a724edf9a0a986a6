"""Helpers for integration tests: real configs on disk, the real CLI as a child process.
Tests here change nothing outside their own temporary directory."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from snapmgr import procfs

REPO = Path(__file__).resolve().parents[2]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def toml(tables: dict[str, dict]) -> str:
    return "\n".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
                     for name, table in tables.items())


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class Workspace:
    """A temporary world: a source tree, a repository, state and run dirs, one config."""

    def __init__(self, root: Path):
        self.root = root
        self.source = root / "source"
        self.repo = root / "repo"
        self.config = root / "snapmgr.toml"
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        self.source.mkdir()
        self.write_config()

    def write_config(self, volumes: dict | None = None, policies: dict | None = None, quiesce: dict | None = None,
                     groups: dict | None = None, **settings) -> Path:
        tables = {"settings": {"state_dir": self.root / "state", "run_dir": self.root / "run",
                               "lock_wait": "2s", "timezone": "UTC", **settings}}
        tables |= {f"retention.{n}": p for n, p in (policies or {"default": {"keep_last": 3}}).items()}
        volumes = volumes if volumes is not None else {
            "data": {"backend": "rsync", "source": self.source, "repository": self.repo, "retention": "default"}}
        tables |= {f"volumes.{n}": v for n, v in volumes.items()}
        tables |= {f"quiesce.{n}": q for n, q in (quiesce or {}).items()}
        tables |= {f"groups.{n}": g for n, g in (groups or {}).items()}
        self.config.write_text(toml(tables))
        self.config.chmod(0o644)
        return self.config

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "snapmgr", "--config", str(self.config), *args]

    def run(self, *args: str, timeout: float = 120) -> Result:
        p = subprocess.run(self.command(*args), capture_output=True, text=True, env=self.env, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str) -> Result:
        r = self.run(*args)
        assert r.returncode == 0, f"snapmgr {' '.join(args)} failed ({r.returncode}): {r.stderr} {r.stdout[-600:]}"
        return r

    def on_terminal(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        """Run snapmgr with its stderr on a terminal (a pty): (exit code, what it showed there)."""
        leader, follower = pty.openpty()
        try:
            p = subprocess.run(self.command(*args), stdout=subprocess.PIPE, stderr=follower, env=self.env,
                               timeout=timeout)
        finally:
            os.close(follower)
        try:
            return p.returncode, os.read(leader, 65536).decode()
        finally:
            os.close(leader)

    def start(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env, **kwargs)

    def snapshots(self, *volumes: str) -> list[str]:
        return [s["id"] for s in self.ok("--json", "list", *volumes).json()["snapshots"]]

    def throttle_rsync(self, bytes_per_second_k: int) -> None:
        """Put a wrapper first on PATH that runs the real rsync slowly, so a test can act
        while a copy is under way."""
        bindir = self.root / "bin"
        bindir.mkdir(exist_ok=True)
        wrapper = bindir / "rsync"
        wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/rsync --bwlimit={bytes_per_second_k} \"$@\"\n")
        wrapper.chmod(0o755)
        self.env["PATH"] = f"{bindir}:{self.env['PATH']}"


def make_tree(root: Path, files: int = 50, size: int = 100) -> None:
    for i in range(files):
        d = root / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}").write_bytes(bytes([i % 256]) * size)


def tree(root: Path) -> dict[str, tuple]:
    """Relative path -> (mode, size, content) of every entry, for comparing copies."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else os.readlink(path) \
            if path.is_symlink() else None
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size if path.is_file() else None, content)
    return out


def wait_for(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_one_second(attempts: int = 3) -> Iterator[None]:
    """Yields at the start of a wall-clock second, up to `attempts` times, for steps that
    must fall within one second (timestamps of one-second granularity); the caller
    breaks out once they did."""
    for _ in range(attempts):
        while time.time() % 1 > 0.05:
            time.sleep(0.005)
        yield
    pytest.fail(f"the steps never fell within one second in {attempts} attempts")


def pids_of(program: str, needle: str) -> list[int]:
    """Pids of running `program` processes whose command line mentions `needle`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == program and \
                any(needle.encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


def open_paths(pid: int) -> list[str]:
    """What process `pid` has open, as its mount namespace shows the paths; a descriptor
    it closes while this looks (a daemon's threads open and close their own) is not."""
    found = []
    for descriptor in procfs.descriptors([pid]):
        try:
            found.append(descriptor.target())
        except OSError:
            continue
    return found


def held_window_command(held: Path) -> list[str]:
    """A command quiescer's `pre` that holds its window open for two minutes and creates
    `held` once it is open."""
    return [sys.executable, "-c", f"open({str(held)!r}, 'w'); import time; time.sleep(120)"]


def lose_the_window(ws: Workspace, held: Path) -> None:
    """A snapshot killed inside its window (held open by held_window_command) together
    with its watchdog, the watchdog first so that it cannot act, as a power cut would:
    the window stays open in the journal."""
    snapshot = ws.start("snapshot")
    wait_for(lambda: held.exists() or snapshot.poll() is not None, timeout=60, what="the window")
    assert snapshot.poll() is None, snapshot.communicate()
    for pid in pids_of(Path(sys.executable).name, "snapmgr.quiesce.watchdog"):
        os.kill(pid, signal.SIGKILL)
    snapshot.send_signal(signal.SIGKILL)
    snapshot.wait()


@contextmanager
def loop_mount(root: Path, fstype: str, size_mib: int = 300, mkfs_args: tuple[str, ...] = ()) -> Iterator[Path]:
    """A fresh filesystem of `fstype` on a loop device, mounted at root/mnt-<fstype>;
    thawed, unmounted and released afterwards whatever the test did to it."""
    image, mnt = root / f"{fstype}.img", root / f"mnt-{fstype}"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run([f"mkfs.{fstype}", "-q", *(["-F"] if fstype == "ext4" else []), *mkfs_args, image], check=True,
                   capture_output=True)
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)  # never leave it frozen
        # A writer that blocked on the frozen filesystem may still be on its way out; a
        # mount left behind would outlive the run (the loop device detaches with it).
        try:
            wait_for(lambda: subprocess.run(["umount", mnt], capture_output=True).returncode == 0,
                     timeout=10, what=f"umount {mnt} (busy)")
        except AssertionError:
            subprocess.run(["umount", "--lazy", mnt], check=True)
            raise


def writable_within(path: Path, seconds: float) -> bool:
    """Whether a file can be written under `path` within `seconds`. While the filesystem
    is frozen the writer blocks, even SIGKILL waits for the thaw, so it is left to die then."""
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(path / '.probe')!r}, 'w').write('x')"])
    try:
        return writer.wait(seconds) == 0
    except subprocess.TimeoutExpired:
        writer.kill()
        return False


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, loop devices)")
