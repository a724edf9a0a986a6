"""Schedules on real systemd timers (systemd is PID 1 in the lab guest): install into
/etc/systemd/system, `systemd-analyze verify` of every unit, a timer firing every 5s
that takes tagged snapshots and prunes, a failing run seen by systemctl and by snapmgr,
the watchdog outliving a killed run inside the service (KillMode=process), the recovery
service starting what a lost window left stopped, and uninstall leaving nothing behind.

Here the recovery service is started by hand, and its ordering checked with systemctl
show; test_reboot.py restarts the guest for it."""

from __future__ import annotations

import faulthandler
import itertools
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from snapmgr.lock import volume_lock
from tests.integration.helpers import Workspace, held_window_command, lose_the_window, toml, wait_for
from tests.lab import conftest
from tests.lab.conftest import lvm_volume, zfs_volume

UNIT_DIR = Path("/etc/systemd/system")
RUN_UNIT_DIR = Path("/run/systemd/system")
# Outside /tmp, so that the services get PrivateTmp= (a workspace in /tmp turns it off).
ROOT = Path("/srv/snapmgr-lab")
WRITER = "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('x\\n'); time.sleep(0.05)\n"
_names = itertools.count(1)
HANG_S = 300
LIMIT = 120   # seconds, for any one command: a hang fails the test instead of the whole lab run


def sh(host, *argv) -> str:
    return conftest.sh(host, "timeout", LIMIT, *argv)


def run(host, command: str):
    return host.run(f"timeout {LIMIT} {command}")


@pytest.fixture(autouse=True)
def no_hang():
    """A test that hangs (its teardown too) prints every thread's stack and ends the run,
    instead of holding the lab until its time limit."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def ws():
    ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=ROOT))
    root.chmod(0o755)
    yield Workspace(root)
    shutil.rmtree(root, ignore_errors=True)


def configure(ws: Workspace, schedules: dict, volumes: dict | None = None, quiesce: dict | None = None) -> None:
    ws.write_config(volumes, policies={"default": {"keep_last": 2}}, quiesce=quiesce)
    with open(ws.config, "a") as f:
        f.write(toml({f"schedules.{n}": s for n, s in schedules.items()}))


def show(host, unit: str, prop: str) -> str:
    return sh(host, "systemctl", "show", f"--property={prop}", "--value", unit).strip()


def unit_log(host, unit: str, since: float = 0) -> str:
    return run(host, f"journalctl --no-pager --output=short-precise --since=@{int(since)} -u {unit}").stdout


@contextmanager
def logged_on_failure(host, unit: str):
    """A failure inside says what the unit logged."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{e}; {unit} logged:\n{unit_log(host, unit)}") from None


def await_a_failed_run(host, schedule: str, timeout: float) -> None:
    """Wait for a run of the schedule's service to fail, then stop its timer, so that no new
    run starts while the test looks at the last one (which fails as well). The failure is
    looked for in the log: a timer that fires again at once leaves the unit's own failed
    state too short a time to be seen."""
    service, since = f"snapmgr-{schedule}.service", time.time()   # not an earlier test's run
    with logged_on_failure(host, service):
        wait_for(lambda: f"{service}: Failed with result 'exit-code'" in unit_log(host, service, since),
                 timeout=timeout, what=f"a failed run of {service}")
        sh(host, "systemctl", "stop", f"snapmgr-{schedule}.timer")
        wait_for(lambda: show(host, service, "ActiveState") == "failed", timeout=60, what="the run to end")


def ours(name: str) -> bool:
    """snapmgr's units; not the lab's own (snapmgr-lab.service runs these tests) nor
    the tests' services."""
    return name.startswith("snapmgr-") and not name.startswith("snapmgr-lab")


def own_files() -> list[Path]:
    return sorted(p for p in UNIT_DIR.rglob("snapmgr-*") if ours(p.name))


@pytest.fixture
def installed(host, ws):
    """snapmgr's units are removed after each test, and must leave nothing behind."""
    yield
    try:
        ws.ok("systemd", "uninstall")
        assert own_files() == []
        listed = sh(host, "systemctl", "list-units", "--all", "--plain", "--no-legend", "--full", "snapmgr-*")
        left = [line for line in listed.splitlines() if line.strip() and ours(line.split()[0])]
        assert left == []
    finally:  # whatever failed, the next test starts without them
        for path in own_files():
            path.unlink()
        sh(host, "systemctl", "daemon-reload")


@pytest.fixture
def writer(host, ws):
    """A running service that writes into the workspace's source."""
    name = f"snapmgr-lab-app{next(_names)}.service"
    (ws.root / "writer.py").write_text(WRITER)
    (RUN_UNIT_DIR / name).write_text(f"[Service]\nExecStart={sys.executable} {ws.root / 'writer.py'} "
                                     f"{ws.source / 'app.log'}\n")
    sh(host, "systemctl", "daemon-reload")
    sh(host, "systemctl", "start", name)
    yield name
    run(host, f"systemctl stop {name}")
    (RUN_UNIT_DIR / name).unlink()
    sh(host, "systemctl", "daemon-reload")


def test_every_unit_passes_systemd_analyze_verify_and_install_enables_the_timers(host, ws, installed, writer):
    configure(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]},
                   "daily": {"on_calendar": "daily", "volumes": ["data"], "randomized_delay": "10min"}},
              quiesce={"app": {"kind": "systemd", "units": [writer]}})
    done = ws.ok("--json", "systemd", "install").json()
    assert done["enabled"] == ["snapmgr-hourly.timer", "snapmgr-daily.timer", "snapmgr-recover.service"]
    files = [UNIT_DIR / n for n in done["written"]]
    instance = ws.root / "snapmgr-mount@srv-snapshots.service"
    instance.write_text((UNIT_DIR / "snapmgr-mount@.service").read_text())
    out = run(host, " ".join(["systemd-analyze", "verify", *map(str, files), str(instance)]))
    assert out.rc == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    for timer in ("snapmgr-hourly.timer", "snapmgr-daily.timer"):
        assert show(host, timer, "UnitFileState") == "enabled" and show(host, timer, "ActiveState") == "active"
    assert show(host, "snapmgr-recover.service", "UnitFileState") == "enabled"
    # Recovery comes before the quiesced unit at boot, and the schedules after recovery.
    assert writer in show(host, "snapmgr-recover.service", "Before").split()
    assert "snapmgr-recover.service" in show(host, "snapmgr-hourly.service", "After").split()
    again = ws.ok("--json", "systemd", "install").json()
    assert again["written"] == [] and len(again["unchanged"]) == 6

    configure(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}},
              quiesce={"app": {"kind": "systemd", "units": [writer]}})
    assert ws.ok("--json", "systemd", "install").json()["removed"] == ["snapmgr-daily.service", "snapmgr-daily.timer"]
    assert show(host, "snapmgr-daily.timer", "LoadState") == "not-found"
    assert not (UNIT_DIR / "timers.target.wants" / "snapmgr-daily.timer").exists()


def test_a_timer_every_5s_takes_tagged_snapshots_and_prunes_them(host, ws, installed):
    configure(ws, {"fast": {"on_calendar": "*:*:0/5", "accuracy": "1s", "volumes": ["data"], "tag": "fast"},
                   "later": {"on_calendar": "2099-06-15 12:00:00", "volumes": ["data"]}})
    (ws.source / "file").write_text("data")
    ws.ok("systemd", "install")
    seen: set[str] = set()

    def pruned_after_three_runs():
        listed = ws.ok("--json", "list").json()["snapshots"]
        seen.update(s["id"] for s in listed)
        assert all(s["tags"] == ["fast"] for s in listed), listed
        # Not "between runs": in a loaded guest a run lasts as long as the timer's period.
        return len(seen) >= 3 and len(listed) == 2
    with logged_on_failure(host, "snapmgr-fast.service"):
        wait_for(pruned_after_three_runs, timeout=120, what="three timer runs, pruned to keep_last = 2")
    timers = {t["schedule"]: t for t in ws.ok("--json", "systemd", "status").json()["timers"]}
    fast, later = timers["fast"], timers["later"]
    assert fast["enabled"] == "enabled" and fast["active"] == "active"
    assert fast["last_result"] == "success" and fast["last_error"] is None and fast["last_trigger"] is not None
    # Every 5s the timer triggers again, and until that run ends systemd has no next
    # elapse for it: status says the run is under way then (it did not, and this failed).
    # In a loaded guest a run lasts the whole period, leaving no moment between two to
    # look at: the timer that never fired shows the next elapse of one that waits.
    assert fast["running"] or fast["next_elapse"] is not None, fast
    assert not later["running"] and later["next_elapse"].startswith("2099-06-15"), later
    assert later["last_trigger"] is None and later["last_result"] is None, later
    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["state"] != "failing" and status["last_success"] is not None


def test_a_failing_run_shows_in_systemctl_status_and_in_snapmgr_status(host, ws, installed):
    configure(ws, {"fast": {"on_calendar": "*:*:0/5", "accuracy": "1s", "volumes": ["data"]}},
              volumes={"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                                "retention": "default", "quiesce": ["gate"]}},
              quiesce={"gate": {"kind": "command", "pre": ["/bin/false"]}})
    ws.ok("systemd", "install")
    await_a_failed_run(host, "fast", timeout=60)
    out = run(host, "systemctl status snapmgr-fast.service")
    assert out.rc == 3 and "status=1/FAILURE" in out.stdout, out.stdout
    [fast] = ws.ok("--json", "systemd", "status").json()["timers"]
    assert fast["last_result"] == "exit-code" and fast["exit_status"] == 1
    assert fast["last_error"].startswith("volume data: quiescer gate (command): false exited with status 1"), fast
    volume = ws.ok("--json", "status").json()["volumes"][0]
    assert volume["state"] == "failing" and "false exited with status 1" in volume["last_error"]
    assert ws.snapshots() == []


def test_a_run_finding_its_volume_busy_says_so_in_the_journal_and_fails_when_its_timer_fires_again(host, ws,
                                                                                                   installed):
    configure(ws, {"fast": {"on_calendar": "*:*:0/10", "accuracy": "1s", "volumes": ["data"]}})
    with volume_lock(ws.root / "run", "data", 0):   # as a long manual snapshot would
        ws.ok("systemd", "install")
        await_a_failed_run(host, "fast", timeout=90)
    told = run(host, "journalctl --no-pager --output=cat -u snapmgr-fast.service").stdout
    assert (f"snapmgr: WARNING: volume data is busy: another snapmgr run (pid {os.getpid()}) holds "
            f"{ws.root}/run/locks/data.lock; waiting for it up to ") in told, told
    assert "(until schedule fast runs again, at " in told, told
    [fast] = ws.ok("--json", "systemd", "status").json()["timers"]
    assert fast["last_result"] == "exit-code" and fast["exit_status"] == 75
    assert fast["last_error"].startswith(f"volume data: busy: another snapmgr run (pid {os.getpid()}) holds "), fast
    volume = ws.ok("--json", "status").json()["volumes"][0]
    assert volume["state"] == "failing" and "gave up after waiting" in volume["last_error"]
    assert ws.run("check").returncode == 2

def installed_with_a_held_window(ws, writer: str, mode: str) -> Path:
    """Units installed for a volume whose window holds `writer` paused (mode stop or
    freeze) for two minutes; the file that appears once the window is open."""
    held = ws.root / "held"
    hold = held_window_command(held)
    configure(ws, {"manual": {"on_calendar": "2099-01-01", "volumes": ["data"]}},
              volumes={"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                                "quiesce": ["app", "hold"]}},
              quiesce={"app": {"kind": "systemd", "units": [writer], "mode": mode},
                       "hold": {"kind": "command", "pre": hold, "max_window": "10min"}})
    ws.ok("systemd", "install")
    return held


def test_the_recovery_service_starts_what_a_lost_window_left_stopped(host, ws, installed, writer):
    held = installed_with_a_held_window(ws, writer, "stop")
    lose_the_window(ws, held)
    assert show(host, writer, "ActiveState") == "inactive"
    sh(host, "systemctl", "start", "snapmgr-recover.service")
    wait_for(lambda: show(host, writer, "ActiveState") == "active", timeout=30, what=f"{writer} started again")
    told = run(host, "journalctl --no-pager --output=cat -u snapmgr-recover.service").stdout
    assert "recovered now: app: ran systemctl start --no-block --" in told, told
    assert "nothing to recover" in ws.ok("recover").stdout


def test_the_recovery_service_started_without_a_reboot_thaws_a_frozen_unit(host, ws, installed, writer):
    # The window was opened in this boot (its boot id says so): --boot must not skip the thaw.
    held = installed_with_a_held_window(ws, writer, "freeze")
    lose_the_window(ws, held)
    assert show(host, writer, "FreezerState") == "frozen"
    sh(host, "systemctl", "start", "snapmgr-recover.service")
    assert show(host, writer, "FreezerState") == "running"
    told = run(host, "journalctl --no-pager --output=cat -u snapmgr-recover.service").stdout
    assert f"recovered now: app: ran systemctl thaw -- {writer}" in told, told


def test_a_scheduled_run_of_lvm_and_zfs_volumes_works_inside_the_hardened_service(host, ws, installed,
                                                                                  thick_lv, dataset):
    thick_lv.write("file", b"lvm")
    configure(ws, {"cow": {"on_calendar": "2099-01-01", "volumes": ["lv", "zfs"]}},
              volumes={"lv": lvm_volume(thick_lv, snapshot_size="32M"), "zfs": zfs_volume(dataset)})
    ws.ok("systemd", "install")
    service = (UNIT_DIR / "snapmgr-cow.service").read_text()
    assert "\nProtectKernelTunables=yes\n" in service and "ProtectKernelModules= is off" in service
    out = run(host, "systemctl start snapmgr-cow.service")
    assert out.rc == 0, run(host, "journalctl --no-pager -u snapmgr-cow.service").stdout
    listed = ws.ok("--json", "list").json()["snapshots"]
    assert sorted(s["volume"] for s in listed) == ["lv", "zfs"]
    assert all(s["tags"] == ["cow"] and s["manifest"] == "blake3" for s in listed), listed


def test_the_watchdog_outlives_a_run_killed_inside_the_service_and_restarts_the_stopped_unit(host, ws, installed,
                                                                                               writer):
    held = installed_with_a_held_window(ws, writer, "stop")
    sh(host, "systemctl", "start", "--no-block", "snapmgr-manual.service")
    wait_for(held.exists, timeout=60, what="the window of the service's run")
    assert show(host, writer, "ActiveState") == "inactive"
    sh(host, "systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "snapmgr-manual.service")
    wait_for(lambda: show(host, writer, "ActiveState") == "active", timeout=60,
             what=f"the watchdog starting {writer} again")
    assert show(host, "snapmgr-manual.service", "Result") == "signal"
    assert "was not closed by its run; quiesce watchdog: snapmgr" in ws.ok("list").stderr
    [manual] = ws.ok("--json", "systemd", "status").json()["timers"]
    assert manual["last_result"] == "signal" and manual["signal"] == "SIGKILL" and manual["exit_status"] is None
    assert "signal (killed by SIGKILL)" in ws.ok("systemd", "status").stdout


def test_the_mount_template_serves_snapshots_to_everyone_and_unmounts_when_stopped(host, ws, installed):
    (ws.source / "file").write_text("served")
    configure(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}})
    ws.ok("systemd", "install")
    snap = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    where = ws.root / "served snapshots"
    where.mkdir()
    unit = f"snapmgr-mount@{sh(host, 'systemd-escape', '--path', where).strip()}.service"
    sh(host, "systemctl", "start", unit)
    try:
        # Seen from outside the unit: it has no mount namespace of its own.
        wait_for(lambda: os.path.ismount(where), timeout=60, what=f"{unit} mounting {where}")
        assert (where / "data" / snap.split("@")[1] / "file").read_text() == "served"
        assert show(host, unit, "ActiveState") == "active"
    finally:
        sh(host, "systemctl", "stop", unit)
    assert not os.path.ismount(where) and show(host, unit, "Result") == "success"
