"""The units of the timers after review: the recovery unit at boot beside a quiesced
socket, schedules that share a volume ordered, a run's start timeout, groups of a
schedule that overlap, and hardening that follows symlinks."""

from __future__ import annotations

import fcntl
import os

import pytest

from tests.integration.test_systemd_units import install, needs_analyze, two_volumes, units, verify, write  # noqa: F401 (a fixture)


@needs_analyze
def test_the_recovery_unit_makes_no_ordering_cycle_with_a_quiesced_socket(ws, units):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}},
          quiesce={"app": {"kind": "systemd", "units": ["app.socket", "app.service"]}})
    install(ws, units)
    recover = (units / "snapmgr-recover.service").read_text()
    for line in ("DefaultDependencies=no", "After=sysinit.target local-fs.target", "Conflicts=shutdown.target",
                 "Before=shutdown.target", "Before=app.service app.socket", "TimeoutStartSec=5min"):
        assert f"\n{line}\n" in recover
    (units / "app.socket").write_text("[Socket]\nListenStream=/run/snapmgr-test-app.sock\n")
    (units / "app.service").write_text("[Service]\nExecStart=/bin/true\n")
    # What boot pulls in: the socket (default dependencies: before sockets.target, itself
    # before basic.target) and the recovery unit, ordered before the socket.
    (units / "boot-test.target").write_text(
        "[Unit]\nWants=snapmgr-recover.service app.socket basic.target\n"
        "After=snapmgr-recover.service app.socket basic.target\n")
    verify(units / "boot-test.target", units / "snapmgr-recover.service")


@needs_analyze
def test_schedules_sharing_a_volume_run_one_after_the_other_in_order_of_name(ws, units):
    volumes = two_volumes(ws)
    write(ws, {"b-daily": {"on_calendar": "daily", "groups": ["both"]},
               "a-hourly": {"on_calendar": "hourly", "volumes": ["a"]},
               "c-other": {"on_calendar": "hourly", "volumes": ["b"]},
               "d-alone": {"on_calendar": "hourly", "volumes": ["b"], "timeout": "121min"}},
          volumes, groups={"both": {"volumes": ["a", "b"]}})
    install(ws, units)
    text = {n: (units / f"snapmgr-{n}.service").read_text() for n in ("a-hourly", "b-daily", "c-other", "d-alone")}
    assert "\nAfter=snapmgr-" not in text["a-hourly"]
    assert "\nAfter=snapmgr-a-hourly.service\n" in text["b-daily"]
    assert "\nAfter=snapmgr-b-daily.service\n" in text["c-other"]
    assert "\nAfter=snapmgr-b-daily.service snapmgr-c-other.service\n" in text["d-alone"]
    assert "\nTimeoutStartSec=infinity\n" in text["a-hourly"] and "\nTimeoutStartSec=7260s\n" in text["d-alone"]
    verify(*(units / f"snapmgr-{n}.service" for n in text))


def test_a_schedule_whose_groups_share_a_volume_is_refused_naming_key_and_volume(ws):
    volumes = two_volumes(ws)
    write(ws, {"nightly": {"on_calendar": "daily", "groups": ["ab", "b"]}}, volumes,
          groups={"ab": {"volumes": ["a", "b"]}, "b": {"volumes": ["b"]}})
    r = ws.run("config", "check")
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1
    assert f"{ws.config}: schedules.nightly.groups: groups 'ab' and 'b' both take volume 'b'" in r.stderr


@pytest.mark.parametrize("timeout", ["0s", "soon"])
def test_a_bad_timeout_is_a_config_error_naming_the_key(ws, timeout):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"], "timeout": timeout}})
    r = ws.run("config", "check")
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1
    assert f"{ws.config}: schedules.hourly.timeout: " in r.stderr


def test_hardening_resolves_symlinks_of_the_paths_it_checks(ws, units):
    link = ws.root / "repository-link"
    link.symlink_to("/root/snapmgr-never-written")
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}},
          volumes={"data": {"backend": "rsync", "source": ws.source, "repository": link}})
    install(ws, units)
    service = (units / "snapmgr-hourly.service").read_text()
    assert "\nProtectHome=" not in service
    assert (f"# ProtectHome= is off: {link} (which is /root/snapmgr-never-written) (volumes.data.repository) "
            f"is under /root,") in service


def test_a_scheduled_run_waits_for_a_busy_volume_beyond_lock_wait(ws):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"], "timeout": "10min"}})
    (ws.root / "run" / "locks").mkdir(parents=True, mode=0o700)
    # As another run holding the volume (the flock goes with the descriptor):
    held = os.open(ws.root / "run" / "locks" / "data.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        scheduled = ws.start("snapshot", "--schedule", "hourly")
        # A plain snapshot started after it gives up after lock_wait, while the scheduled run still waits.
        r = ws.run("snapshot", "data")
        assert r.returncode == 75 and "gave up after waiting 2s" in r.stderr   # the lock_wait of the workspace
        assert scheduled.poll() is None
    finally:
        os.close(held)
    out, err = scheduled.communicate(timeout=120)
    assert scheduled.returncode == 0, err
    assert len(ws.snapshots("data")) == 1


@needs_analyze
@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_unit_dir_refuses_a_directory_systemd_reads_its_units_from(ws, command):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}})
    # /run/systemd/system resolved through a symlink of the test's own.
    link = ws.root / "alias"
    link.symlink_to("/run/systemd/system")
    for where in ("/etc/systemd/system", "/lib/systemd/system/", str(link)):
        r = ws.run("systemd", command, "--unit-dir", where)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        shown = where.rstrip("/")
        assert f"--unit-dir '{shown}': systemd reads its units from there; leave out --unit-dir" in r.stderr


@needs_analyze
def test_config_check_warns_of_a_schedule_whose_tag_is_protected(ws):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"], "tag": "manual"},
               "daily": {"on_calendar": "daily", "volumes": ["data"]}})
    r = ws.ok("config", "check")
    assert f"{ws.config}: schedules.hourly.tag: 'manual' is a protected tag: retention never prunes" in r.stderr
    assert "schedules.daily" not in r.stderr
