"""The systemd quiescer on real units, with systemd as PID 1 in the lab guest: stop and
start, freeze and thaw, units that were not active left alone, and the watchdog bringing
units back after kill -9."""

from __future__ import annotations

import itertools
import signal
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import wait_for
from tests.lab.conftest import sh

UNIT_DIR = Path("/run/systemd/system")
_units = itertools.count(1)

# Appends a line to its file every 20 ms: a service writing to the volume.
WRITER = "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('x\\n'); time.sleep(0.02)\n"


@pytest.fixture
def make_unit(host, ws):
    """A factory of running writer services, each writing into the workspace's source;
    every unit made is stopped and removed afterwards."""
    made = []

    def make(start: bool = True) -> str:
        name = f"snapmgr-lab-writer{next(_units)}.service"
        (ws.root / "writer.py").write_text(WRITER)
        (UNIT_DIR / name).write_text(f"[Service]\nExecStart={sys.executable} {ws.root / 'writer.py'} "
                                     f"{ws.source / name}.log\n")
        made.append(name)
        sh(host, "systemctl", "daemon-reload")
        if start:
            sh(host, "systemctl", "start", name)
        return name
    yield make
    for name in made:
        host.run(f"systemctl stop {name}")
        (UNIT_DIR / name).unlink()
    sh(host, "systemctl", "daemon-reload")


def state(host, unit: str, prop: str) -> str:
    return sh(host, "systemctl", "show", f"--property={prop}", "--value", unit).strip()


def probe(ws, *units: str) -> list[str]:
    """argv of a command quiescer that records, inside the window, what systemd says of
    the units: ActiveState and FreezerState."""
    script = ("import subprocess, sys; out = subprocess.run(['systemctl', 'show', '--property=ActiveState,FreezerState', "
              "'--value', *sys.argv[2:]], capture_output=True, text=True).stdout; open(sys.argv[1], 'w').write(out)")
    return [sys.executable, "-c", script, str(ws.root / "inside"), *units]


def volume(ws, quiesce: list[str]) -> dict:
    return {"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": quiesce}}


def test_stop_mode_stops_the_active_units_for_the_snapshot_and_starts_them_again(host, ws, make_unit):
    running, stopped = make_unit(), make_unit(start=False)
    wait_for(lambda: (ws.source / f"{running}.log").exists(), what="the writer")
    ws.write_config(volume(ws, ["app", "probe"]), quiesce={
        "app": {"kind": "systemd", "units": [running, stopped]},
        "probe": {"kind": "command", "pre": probe(ws, running, stopped)}})
    pid_before = state(host, running, "MainPID")
    snap = ws.ok("--json", "snapshot").json()["results"][0]["created"]
    assert (ws.root / "inside").read_text().split() == ["inactive", "running", "inactive", "running"]
    assert snap["grade"] == "application"
    assert state(host, running, "ActiveState") == "active" and state(host, running, "MainPID") != pid_before
    assert state(host, stopped, "ActiveState") == "inactive"   # the administrator's stop is kept
    assert (ws.repo / snap["id"] / f"{running}.log").read_text()  # what the service wrote before its stop


def test_freeze_mode_freezes_the_units_and_thaws_them_with_the_same_processes(host, ws, make_unit):
    unit = make_unit()
    ws.write_config(volume(ws, ["app", "probe"]), quiesce={
        "app": {"kind": "systemd", "units": [unit], "mode": "freeze"},
        "probe": {"kind": "command", "pre": probe(ws, unit)}})
    pid_before = state(host, unit, "MainPID")
    ws.ok("snapshot")
    assert (ws.root / "inside").read_text().split() == ["active", "frozen"]
    assert state(host, unit, "FreezerState") == "running" and state(host, unit, "MainPID") == pid_before


def test_a_unit_that_does_not_exist_is_a_config_error_in_one_line(host, ws):
    ws.write_config(volume(ws, ["app"]), quiesce={"app": {"kind": "systemd", "units": ["no-such-thing.service"]}})
    r = ws.run("snapshot")
    assert r.returncode == 78 and "quiesce.app.units: no such unit: 'no-such-thing.service'" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and ws.snapshots() == []


@pytest.mark.parametrize("mode", ["stop", "freeze"])
def test_kill_9_in_the_window_brings_the_units_back_within_5s(host, ws, make_unit, mode):
    unit = make_unit()
    hold = [sys.executable, "-c", f"open({str(ws.root / 'held')!r}, 'w'); import time; time.sleep(60)"]
    ws.write_config(volume(ws, ["app", "hold"]), quiesce={
        "app": {"kind": "systemd", "units": [unit], "mode": mode}, "hold": {"kind": "command", "pre": hold}})
    run = ws.start("snapshot")
    wait_for(lambda: (ws.root / "held").exists() or run.poll() is not None, what="the window")
    assert run.poll() is None, run.communicate()
    assert state(host, unit, "ActiveState" if mode == "stop" else "FreezerState") in ("inactive", "frozen")
    run.send_signal(signal.SIGKILL)
    run.wait()
    wait_for(lambda: state(host, unit, "ActiveState") == "active" and state(host, unit, "FreezerState") == "running",
             timeout=5, what=f"{unit} back within 5s")
    assert "was not closed by its run" in ws.ok("list").stderr


def test_a_rollback_stops_even_a_freeze_mode_unit_and_starts_it_once_the_volume_is_back(host, ws, make_unit):
    unit = make_unit()
    wait_for(lambda: (ws.source / f"{unit}.log").exists(), what="the writer")
    ws.write_config(volume(ws, ["app", "probe"]), quiesce={
        "app": {"kind": "systemd", "units": [unit], "mode": "freeze"},
        "probe": {"kind": "command", "pre": probe(ws, unit)}})
    ws.ok("snapshot")
    [target] = ws.snapshots()
    (ws.source / "later").write_text("made after the snapshot")
    assert "app: systemctl stop " in ws.ok("--json", "rollback", target, "--dry-run").json()["services"][0]
    pid_before = state(host, unit, "MainPID")
    done = ws.ok("--json", "rollback", target, "--yes").json()
    # Stopped, not frozen: a frozen service would find its files replaced under it.
    assert (ws.root / "inside").read_text().split() == ["inactive", "running"]
    assert not (ws.source / "later").exists() and done["pre_rollback"] in ws.snapshots()
    assert state(host, unit, "ActiveState") == "active" and state(host, unit, "MainPID") != pid_before


# Answers every connection on the socket systemd passes it (LISTEN_FDS: descriptor 3).
SERVER = ("import socket\nlistening = socket.socket(fileno=3)\nwhile True:\n"
          "    conn, _ = listening.accept(); conn.sendall(b'up\\n'); conn.close()\n")


def connect(path: Path) -> str:
    """What a client gets from the socket: the service's answer, or the error's name."""
    import socket
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(str(path))
        return client.makefile().readline().strip()
    except OSError as e:
        return type(e).__name__
    finally:
        client.close()


@pytest.fixture
def socket_unit(host, ws):
    """A socket-activated service (Accept=no), started by a first connection."""
    name = f"snapmgr-lab-socket{next(_units)}"
    path = Path(f"/run/{name}.sock")
    (ws.root / "server.py").write_text(SERVER)
    (UNIT_DIR / f"{name}.socket").write_text(f"[Socket]\nListenStream={path}\nAccept=no\n")
    (UNIT_DIR / f"{name}.service").write_text(f"[Service]\nExecStart={sys.executable} {ws.root / 'server.py'}\n")
    sh(host, "systemctl", "daemon-reload")
    sh(host, "systemctl", "start", f"{name}.socket")
    yield name, path
    host.run(f"systemctl stop {name}.socket {name}.service")
    for suffix in (".socket", ".service"):
        (UNIT_DIR / f"{name}{suffix}").unlink()
    sh(host, "systemctl", "daemon-reload")


def test_a_rollback_stops_the_socket_of_a_socket_activated_service_before_it_and_starts_both(host, ws,
                                                                                            socket_unit):
    name, path = socket_unit
    assert connect(path) == "up" and state(host, f"{name}.service", "ActiveState") == "active"
    # Inside the window: a client connects, then what systemd says of the service and the socket.
    inside = ("import socket, subprocess, sys\nc = socket.socket(socket.AF_UNIX)\ntry:\n"
              "    c.connect(sys.argv[2]); got = 'connected'\nexcept OSError as e:\n    got = type(e).__name__\n"
              "states = subprocess.run(['systemctl', 'show', '--property=ActiveState', '--value', *sys.argv[3:]], "
              "capture_output=True, text=True).stdout.split()\nopen(sys.argv[1], 'w').write(' '.join([got, *states]))\n")
    ws.write_config(volume(ws, ["app", "probe"]), quiesce={
        "app": {"kind": "systemd", "units": [f"{name}.service"]},
        "probe": {"kind": "command", "pre": [sys.executable, "-c", inside, str(ws.root / "inside"), str(path),
                                             f"{name}.service", f"{name}.socket"]}})
    (ws.source / "a").write_text("one")
    ws.ok("snapshot")
    [target] = ws.snapshots()
    (ws.source / "a").write_text("two")
    services = ws.ok("--json", "rollback", target, "--dry-run").json()["services"]
    assert services[0] == (f"app: systemctl stop {name}.socket (which start them on demand), then stop "
                           f"{name}.service; then start them all (only the units that were active)"), services
    pid_before = state(host, f"{name}.service", "MainPID")
    ws.ok("rollback", target, "--yes")
    # The socket was stopped before the service: the connection found nobody listening and
    # started nothing while the files were replaced.
    got, *states = (ws.root / "inside").read_text().split()
    assert got in ("ConnectionRefusedError", "FileNotFoundError") and states == ["inactive", "inactive"]
    assert (ws.source / "a").read_text() == "one"
    assert state(host, f"{name}.socket", "ActiveState") == "active"
    assert state(host, f"{name}.service", "ActiveState") == "active"
    assert state(host, f"{name}.service", "MainPID") != pid_before and connect(path) == "up"


def test_kill_9_in_a_rollbacks_window_brings_the_socket_and_its_service_back(host, ws, socket_unit):
    name, path = socket_unit
    assert connect(path) == "up"
    (ws.source / "a").write_text("one")
    ws.write_config(volume(ws, []))
    ws.ok("snapshot")
    [target] = ws.snapshots()
    hold = [sys.executable, "-c", f"open({str(ws.root / 'held')!r}, 'w'); import time; time.sleep(60)"]
    ws.write_config(volume(ws, ["app", "hold"]), quiesce={
        "app": {"kind": "systemd", "units": [f"{name}.service"]}, "hold": {"kind": "command", "pre": hold}})
    run = ws.start("rollback", target, "--yes")
    wait_for(lambda: (ws.root / "held").exists() or run.poll() is not None, what="the window")
    assert run.poll() is None, run.communicate()
    assert state(host, f"{name}.socket", "ActiveState") == "inactive"
    run.send_signal(signal.SIGKILL)
    run.wait()
    wait_for(lambda: state(host, f"{name}.socket", "ActiveState") == "active" and
             state(host, f"{name}.service", "ActiveState") == "active", timeout=5, what="both back within 5s")
    assert connect(path) == "up"
