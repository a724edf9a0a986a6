"""systemd units rendered from [schedules] into --unit-dir (what they say, that systemd
accepts them, that install rewrites only what changed and removes only its own), and
`snapshot --schedule` on real rsync volumes: what a timer's service runs.

systemd is not PID 1 here: `systemd-analyze verify` still reads the unit files as
systemd would (unknown keys, bad values, missing programs), and the lab tier
(tests/lab/test_timers.py) runs them for real."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import Workspace, held_window_command, lose_the_window, toml, wait_for

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
UNITS = ["snapmgr-hourly.service", "snapmgr-hourly.timer", "snapmgr-mount@.service", "snapmgr-recover.service"]


def write(ws: Workspace, schedules: dict, volumes: dict | None = None, quiesce: dict | None = None,
          groups: dict | None = None) -> None:
    ws.write_config(volumes, quiesce=quiesce, groups=groups)
    with open(ws.config, "a") as f:
        f.write(toml({f"schedules.{n}": s for n, s in schedules.items()}))


def two_volumes(ws: Workspace) -> dict:
    for name in ("a", "b"):
        (ws.source / name).mkdir(exist_ok=True)
        (ws.source / name / "file").write_text(name)
    return {n: {"backend": "rsync", "source": ws.source / n, "repository": ws.repo / n, "retention": "default"}
            for n in ("a", "b")}


@pytest.fixture
def units(ws) -> Path:
    return ws.root / "units"


def install(ws: Workspace, units: Path, *more: str):
    return ws.ok("--json", "systemd", "install", "--unit-dir", str(units), *more).json()


def verify(*paths: Path) -> None:
    """systemd-analyze verify, which exits 0 on mere warnings: its output must be empty."""
    done = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@needs_analyze
def test_install_renders_a_service_and_timer_per_schedule_that_systemd_accepts(ws, units):
    write(ws, {"hourly": {"on_calendar": "*:0/15", "volumes": ["data"], "randomized_delay": "5min",
                          "persistent": False, "accuracy": "10s"}},
          quiesce={"app": {"kind": "systemd", "units": ["app.service", "web.service"]}})
    done = install(ws, units)
    assert sorted(done["written"]) == sorted(UNITS) and done["removed"] == [] and done["enabled"] == []
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
    service = (units / "snapmgr-hourly.service").read_text()
    assert service.startswith(f"# Written by snapmgr from {ws.config}\n")
    assert f"\nExecStart={sys.executable} -m snapmgr --config {ws.config} snapshot --schedule hourly\n" in service
    assert "\nType=oneshot\n" in service and "\nKillMode=process\n" in service
    assert "\nNoNewPrivileges=yes\n" in service and "\nProtectKernelTunables=yes\n" in service
    timer = (units / "snapmgr-hourly.timer").read_text()
    for line in ("OnCalendar=*:0/15", "Persistent=no", "RandomizedDelaySec=300s", "AccuracySec=10s",
                 "WantedBy=timers.target"):
        assert f"\n{line}\n" in timer
    recover = (units / "snapmgr-recover.service").read_text()
    assert "\nBefore=app.service web.service\n" in recover and "\nAfter=sysinit.target local-fs.target\n" in recover
    assert f" --config {ws.config} recover --boot\n" in recover
    mount = (units / "snapmgr-mount@.service").read_text()
    assert f" --config {ws.config} mount %f\n" in mount and f" --config {ws.config} umount %f\n" in mount
    verify(*(units / u for u in UNITS if "@" not in u))
    instance = units / "snapmgr-mount@srv-snapshots.service"
    instance.write_text(mount)
    verify(instance)


@needs_analyze
def test_a_config_path_with_a_space_and_a_percent_sign_is_quoted_for_systemd(ws, units):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}})
    odd = ws.root / "my 100% config.toml"
    ws.config.rename(odd)
    ws.config = odd
    install(ws, units)
    service = (units / "snapmgr-hourly.service").read_text()
    assert f'--config "{ws.root}/my 100%% config.toml" snapshot' in service
    verify(units / "snapmgr-hourly.service")


def test_hardening_leaves_out_what_would_hide_a_path_the_service_needs(ws, units, tmp_path):
    # The workspace is under /tmp: PrivateTmp= would give the service an empty /tmp.
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data", "home"]}},
          volumes={"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo},
                   "home": {"backend": "rsync", "source": ws.source, "repository": "/root/snapmgr-never-written"}})
    install(ws, units)
    service = (units / "snapmgr-hourly.service").read_text()
    assert "\nPrivateTmp=" not in service and f"\n# PrivateTmp= is off: {ws.config} (the config) is under /tmp," in service
    assert "\nProtectHome=" not in service
    assert "# ProtectHome= is off: /root/snapmgr-never-written (volumes.home.repository) is under /root," in service
    assert "\nProtectKernelModules=yes\n" in service   # rsync loads no module


def test_lvm_and_zfs_volumes_leave_module_loading_allowed(ws, units):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["lv", "pool"]}},
          volumes={"lv": {"backend": "lvm", "lv": "vg0/data", "snapshot_size": "1G"},
                   "pool": {"backend": "zfs", "datasets": ["tank/data"]}})
    install(ws, units)
    service = (units / "snapmgr-hourly.service").read_text()
    assert "\n# ProtectKernelModules= is off: the tools of volume lv, pool may load their kernel module themselves.\n" \
        in service and "\nProtectKernelModules=" not in service
    # Nothing written is under /home or /root here (the state and run dirs are in /tmp).
    assert "\nProtectHome=read-only\n" in service


def test_install_rewrites_only_what_changed_and_removes_only_its_own_units(ws, units):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]},
               "daily": {"on_calendar": "daily", "volumes": ["data"]}})
    install(ws, units)
    before = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    again = install(ws, units)
    assert again["written"] == [] and again["removed"] == [] and len(again["unchanged"]) == 6
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir()} == before

    foreign = units / "snapmgr-weekly.service"          # the administrator's own
    foreign.write_text("[Service]\nExecStart=/bin/true\n")
    other = units / "snapmgr-other.timer"               # snapmgr's, from another config
    other.write_text("# Written by snapmgr from /etc/snapmgr/other.toml\n[Timer]\nOnCalendar=daily\n")
    write(ws, {"hourly": {"on_calendar": "*:0/30", "volumes": ["data"]}})
    changed = install(ws, units)
    # The service too: it was ordered after daily's, which shared its volume.
    assert changed["written"] == ["snapmgr-hourly.service", "snapmgr-hourly.timer"]
    assert changed["removed"] == ["snapmgr-daily.service", "snapmgr-daily.timer"]
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS + ["snapmgr-other.timer", "snapmgr-weekly.service"])
    assert "OnCalendar=*:0/30" in (units / "snapmgr-hourly.timer").read_text()

    gone = ws.ok("--json", "systemd", "uninstall", "--unit-dir", str(units)).json()
    assert gone["removed"] == sorted(UNITS)
    assert sorted(p.name for p in units.iterdir()) == ["snapmgr-other.timer", "snapmgr-weekly.service"]


def test_dry_run_says_what_would_change_and_changes_nothing(ws, units):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}})
    r = ws.ok("systemd", "install", "--unit-dir", str(units), "--dry-run")
    assert f"would write {units}/snapmgr-hourly.timer" in r.stdout.splitlines()
    assert not units.exists()
    install(ws, units)
    write(ws, {"daily": {"on_calendar": "daily", "volumes": ["data"]}})
    r = ws.ok("systemd", "install", "--unit-dir", str(units), "-n")
    assert f"would remove {units}/snapmgr-hourly.timer" in r.stdout.splitlines()
    assert (units / "snapmgr-hourly.timer").exists() and not (units / "snapmgr-daily.timer").exists()


def test_a_unit_snapmgr_did_not_write_is_never_overwritten(ws, units):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}})
    units.mkdir()
    mine = units / "snapmgr-hourly.timer"
    mine.write_text("[Timer]\nOnCalendar=weekly\n")
    r = ws.run("systemd", "install", "--unit-dir", str(units))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert f"{mine} exists and was not written by snapmgr from {ws.config}; not overwriting it" in r.stderr
    assert sorted(p.name for p in units.iterdir()) == ["snapmgr-hourly.timer"]
    assert mine.read_text() == "[Timer]\nOnCalendar=weekly\n"


@needs_analyze
@pytest.mark.parametrize("command", [("systemd", "install", "--unit-dir", "UNITS"), ("config", "check")])
def test_a_calendar_systemd_refuses_is_a_config_error_naming_the_key(ws, units, command):
    write(ws, {"hourly": {"on_calendar": "every tuesday", "volumes": ["data"]}})
    r = ws.run(*(str(units) if a == "UNITS" else a for a in command))
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1
    assert f"{ws.config}: schedules.hourly.on_calendar: 'every tuesday' is not a systemd calendar expression" \
        in r.stderr
    assert not units.exists()


def test_a_schedule_named_recover_would_clash_with_the_recovery_unit(ws, units):
    write(ws, {"recover": {"on_calendar": "hourly", "volumes": ["data"]}})
    r = ws.run("systemd", "install", "--unit-dir", str(units))
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1
    assert f"{ws.config}: schedules.recover: the name is taken: snapmgr-recover.service" in r.stderr
    assert not units.exists()


@needs_analyze
def test_config_check_prints_each_schedules_next_run(ws):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]},
               "yearly": {"on_calendar": "2099-01-01 00:00:00", "volumes": ["data"]}})
    data = ws.ok("--json", "config", "check").json()
    assert data["next_elapses"]["yearly"] == "2099-01-01T00:00:00Z"
    assert data["next_elapses"]["hourly"].endswith(":00:00Z") and data["schedules"] == ["hourly", "yearly"]
    assert "yearly    2099-01-01 00:00:00  2099-01-01T00:00:00Z" in ws.ok("config", "check").stdout


def test_status_and_a_live_install_need_a_running_systemd(ws):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"]}})
    for command in (("systemd", "status"), ("systemd", "install")):
        r = ws.run(*command)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
        assert "systemd is not running on this system" in r.stderr and "--unit-dir" in r.stderr


# snapshot --schedule ---------------------------------------------------------------------

def test_a_schedule_snapshots_its_groups_in_one_window_and_its_volumes_with_its_tag_then_prunes(ws):
    volumes = two_volumes(ws)
    volumes["c"] = {"backend": "rsync", "source": ws.source / "a", "repository": ws.repo / "c"}  # no retention
    windows = ws.root / "windows"
    count = [sys.executable, "-c", f"open({str(windows)!r}, 'a').write('window\\n')"]
    write(ws, {"often": {"on_calendar": "minutely", "groups": ["both"], "volumes": ["a", "c"]}}, volumes,
          quiesce={"count": {"kind": "command", "pre": count}}, groups={"both": {"volumes": ["a", "b"],
                                                                                  "quiesce": ["count"]}})
    first = ws.ok("--json", "snapshot", "--schedule", "often").json()["results"]
    assert sorted(r["volume"] for r in first) == ["a", "b", "c"]   # a once, with its group
    assert windows.read_text() == "window\n"                        # one window for the group; c needs none
    listed = ws.ok("--json", "list").json()["snapshots"]
    assert all(s["tags"] == ["often"] for s in listed)
    together = [s for s in listed if s["volume"] in ("a", "b")]
    assert {s["consistency"]["group"] for s in together} == {"both"}
    assert len({s["id"].split("@")[1] for s in together}) == 1       # one instant

    for _ in range(4):
        ws.ok("snapshot", "--schedule", "often")
    counts = {v: len(ws.snapshots(v)) for v in ("a", "b", "c")}
    assert counts == {"a": 3, "b": 3, "c": 5}   # keep_last = 3; c has no policy
    assert windows.read_text() == "window\n" * 5


def test_a_schedule_that_does_not_prune_keeps_everything_and_dry_run_takes_nothing(ws):
    write(ws, {"keep": {"on_calendar": "hourly", "volumes": ["data"], "prune": False, "tag": "kept"}})
    for _ in range(5):
        ws.ok("snapshot", "--schedule", "keep")
    assert len(ws.snapshots()) == 5
    r = ws.ok("snapshot", "--schedule", "keep", "--dry-run")
    assert r.stdout.startswith("would create data@") and len(ws.snapshots()) == 5
    assert {t for s in ws.ok("--json", "list").json()["snapshots"] for t in s["tags"]} == {"kept"}


def test_a_failed_volume_fails_the_scheduled_run_and_is_not_pruned(ws):
    volumes = two_volumes(ws)
    broken = ws.root / "broken"
    volumes["b"]["quiesce"] = ["gate"]
    gate = [sys.executable, "-c", f"import os, sys; sys.exit(os.path.exists({str(broken)!r}))"]
    write(ws, {"often": {"on_calendar": "minutely", "volumes": ["a", "b"]},
               "fill": {"on_calendar": "minutely", "volumes": ["a", "b"], "prune": False}}, volumes,
          quiesce={"gate": {"kind": "command", "pre": gate}})
    for _ in range(4):
        ws.ok("snapshot", "--schedule", "fill")
    broken.touch()
    r = ws.run("snapshot", "--schedule", "often")
    assert r.returncode == 1 and r.stderr.startswith("snapmgr: error: volume b: ")
    assert len(r.stderr.splitlines()) == 1
    assert len(ws.snapshots("a")) == 3 and len(ws.snapshots("b")) == 4   # b's prune skipped with its failure
    status = {s["volume"]: s for s in ws.ok("--json", "status").json()["volumes"]}
    assert status["b"]["state"] == "failing" and status["a"]["state"] != "failing"


@pytest.mark.parametrize("args, code, message", [
    (("--schedule", "nope"), 2, "unknown schedule 'nope' (configured in CONFIG: often)"),
    (("--schedule", "ofen"), 2, "unknown schedule 'ofen' (did you mean 'often'?)"),
    (("--schedule", "often", "data"), 2, "--schedule takes its volumes, groups, tag and prune from the schedule"),
    (("--schedule", "often", "--tag", "x"), 2, "give no VOLUMES, --group, --tag or --prune with it"),
])
def test_bad_schedule_arguments_are_one_line_errors(ws, args, code, message):
    write(ws, {"often": {"on_calendar": "minutely", "volumes": ["data"]}})
    r = ws.run("snapshot", *args)
    assert r.returncode == code and len(r.stderr.splitlines()) == 1
    assert message.replace("CONFIG", str(ws.config)) in r.stderr
    assert ws.snapshots() == []


@needs_analyze
def test_the_example_configs_schedule_is_a_valid_calendar_and_renders(ws, units):
    ws.config.unlink()
    ws.ok("init")
    assert list(ws.ok("--json", "config", "check").json()["next_elapses"]) == ["hourly"]
    install(ws, units)
    verify(units / "snapmgr-hourly.service", units / "snapmgr-hourly.timer")


def test_the_snapshot_window_runs_at_normal_priority_and_pruning_in_the_background(ws):
    seen = ws.root / "priority"
    probe = [sys.executable, "-c", "import os, subprocess, sys; open(sys.argv[1], 'a').write("
             "f'{os.getpriority(os.PRIO_PROCESS, 0)} ' + subprocess.run(['ionice'], capture_output=True, "
             "text=True).stdout)", str(seen)]
    volumes = {"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "retention": "default",
                        "quiesce": ["probe"]}}
    write(ws, {"often": {"on_calendar": "minutely", "volumes": ["data"]}}, volumes,
          quiesce={"probe": {"kind": "command", "pre": probe}})
    for _ in range(2):
        ws.ok("snapshot", "--schedule", "often")
    mine = f"{os.getpriority(os.PRIO_PROCESS, 0)} " + subprocess.run(["ionice"], capture_output=True, text=True).stdout
    assert seen.read_text() == mine * 2 and "idle" not in mine   # the second window after a prune
    # What a prune's programs inherit once the snapshots are taken, and what follows the
    # prune (the journal, the metrics published) runs at again:
    probe = "print(os.getpriority(os.PRIO_PROCESS, 0), subprocess.run(['ionice'], capture_output=True, " \
            "text=True).stdout.strip())"
    seen = subprocess.run([sys.executable, "-c", f"import os, subprocess; from snapmgr import priority; {probe}\n"
                           f"with priority.background(): {probe}\n{probe}"],
                          capture_output=True, text=True, env=ws.env, check=True).stdout.splitlines()
    assert seen[1] == "10 idle" and seen[2] == seen[0] != seen[1]


def test_recover_at_boot_still_runs_a_command_quiescers_post(ws):
    held, posted = ws.root / "held", ws.root / "posted"
    hold = held_window_command(held)
    post = [sys.executable, "-c", f"open({str(posted)!r}, 'w')"]
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["app"]}},
                    quiesce={"app": {"kind": "command", "pre": hold, "post": post, "max_window": "10min"}})
    lose_the_window(ws, held)
    assert not posted.exists()
    r = ws.ok("recover", "--boot")
    assert "was not closed by its run; recovered now: app: ran " in r.stdout and posted.exists()
    assert ws.ok("recover").stdout.strip() == "nothing to recover"


def failing_post(ready: Path, posted: Path) -> list[str]:
    """A `post` that fails until `ready` exists (its daemon is not up yet), and appends a
    line to `posted` each time it succeeds."""
    return [sys.executable, "-c", f"import os, sys; os.path.exists({str(ready)!r}) or sys.exit('not up yet'); "
                                  f"open({str(posted)!r}, 'a').write('posted\\n')"]


def a_lost_window_whose_post_fails_until_ready(ws) -> tuple[Path, Path]:
    """A window lost as a power cut would, whose one quiescer's `post` fails until `ready`
    exists and then appends to `posted`: (ready, posted)."""
    held, ready, posted = ws.root / "held", ws.root / "daemon-up", ws.root / "posted"
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["app"]}},
                    quiesce={"app": {"kind": "command", "pre": held_window_command(held),
                                     "post": failing_post(ready, posted), "max_window": "10min"}})
    lose_the_window(ws, held)
    return ready, posted


def as_if_tried_long_ago(ws) -> None:
    """The last try of every window as a later run sees it once RETRY_AFTER has passed."""
    with sqlite3.connect(ws.root / "state" / "journal.db") as db:
        db.execute("UPDATE windows SET plan = json_set(plan, '$.tried_at', '2000-01-01T00:00:00+00:00')")
    db.close()


def test_a_failed_undo_step_is_tried_again_alone_by_a_later_run(ws):
    held, ready, posted, db_posted = (ws.root / name for name in ("held", "daemon-up", "posted", "db-posted"))
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "quiesce": ["db", "app"]}},
                    quiesce={"db": {"kind": "command", "pre": ["true"],
                                    "post": [sys.executable, "-c", f"open({str(db_posted)!r}, 'a').write('posted\\n')"]},
                             "app": {"kind": "command", "pre": held_window_command(held),
                                     "post": failing_post(ready, posted), "max_window": "10min"}})
    lose_the_window(ws, held)
    first = ws.ok("recover", "--boot").stdout
    assert "tried to recover it now (try 1 of 3): app: FAILED: " in first and "db: ran " in first, first
    assert "a later run tries the failed steps again" in first and not posted.exists()
    check = ws.run("check")
    assert check.returncode == 2 and "is not fully resumed yet" in check.stdout, check.stdout
    ready.write_text("")
    # Neither a dry run (which changes nothing) nor a run soon after the last try tries again...
    for args in (["snapshot", "--dry-run"], ["list"]):
        assert "quiesce window" not in ws.ok(*args).stderr and not posted.exists(), args
    # ...a run once RETRY_AFTER has passed does, the failed step alone.
    as_if_tried_long_ago(ws)
    again = ws.ok("list")
    assert "recovered now: app: ran " in again.stderr and "db:" not in again.stderr, again.stderr
    assert posted.read_text() == "posted\n" and db_posted.read_text() == "posted\n"
    assert ws.ok("recover").stdout.strip() == "nothing to recover"


def test_a_failed_undo_step_is_given_up_after_three_tries_until_recover_is_asked_again(ws):
    ready, posted = a_lost_window_whose_post_fails_until_ready(ws)
    told = [ws.ok("recover").stdout for _ in range(3)]   # asked: no wait between tries
    assert "(try 1 of 3)" in told[0] and "(try 2 of 3)" in told[1], told
    assert "recovery failed 3 times, the last now: app: FAILED: " in told[2] and "snapmgr recover" in told[2], told
    as_if_tried_long_ago(ws)
    assert "quiesce window" not in ws.ok("list").stderr and not posted.exists()   # given up
    check = ws.run("check")
    assert check.returncode == 2 and "could not be resumed: recovery failed 3 times" in check.stdout, check.stdout
    ready.write_text("")
    assert "recovered now: app: ran " in ws.ok("recover").stdout and posted.exists()
    check = ws.run("check")
    assert "could not be resumed" not in check.stdout and "resumed later" in check.stdout, check.stdout


def test_a_resume_that_fails_in_the_run_is_tried_again_by_the_next(ws):
    tried, posted = ws.root / "tried", ws.root / "posted"
    # Fails the first time only: the next run's try succeeds.
    post = [sys.executable, "-c", f"import os, sys; first = not os.path.exists({str(tried)!r}); "
                                  f"open({str(tried)!r}, 'w'); first and sys.exit('not this time'); "
                                  f"open({str(posted)!r}, 'w')"]
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["app"]}},
                    quiesce={"app": {"kind": "command", "pre": ["true"], "post": post}})
    run = ws.run("snapshot")
    assert run.returncode != 0 and "not this time" in run.stderr and not posted.exists(), run.stderr
    assert "is not fully resumed yet" in ws.run("check").stdout
    again = ws.ok("recover").stdout
    assert "recovered now: app: ran " in again and posted.exists(), again


def test_an_undo_step_that_fails_in_the_watchdog_is_tried_again_by_the_next_run(ws):
    held, ready, posted = ws.root / "held", ws.root / "daemon-up", ws.root / "posted"
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["app"]}},
                    quiesce={"app": {"kind": "command", "pre": held_window_command(held),
                                     "post": failing_post(ready, posted), "max_window": "10min"}})
    snapshot = ws.start("snapshot")
    wait_for(lambda: held.exists() or snapshot.poll() is not None, timeout=60, what="the window")
    snapshot.send_signal(signal.SIGKILL)   # the watchdog takes over, and its post fails
    snapshot.wait()
    wait_for(lambda: "is not fully resumed yet" in ws.run("check").stdout, timeout=30, what="the watchdog's account")
    assert not posted.exists()
    ready.write_text("")
    again = ws.ok("recover").stdout
    assert "tried" not in again and "recovered now: app: ran " in again and posted.exists(), again


def test_a_resume_that_failed_before_the_run_was_killed_is_tried_by_the_watchdog_and_later_runs(ws):
    ready, posted, killed, a_posted = (ws.root / name for name in ("b-up", "b-posted", "killed", "a-posted"))
    # Resumed in reverse: b's post fails, then a's kills snapmgr (its parent) the first time.
    a_post = [sys.executable, "-c", f"import os, signal, sys\nif not os.path.exists({str(killed)!r}):\n"
                                    f"    open({str(killed)!r}, 'w'); os.kill(os.getppid(), signal.SIGKILL); sys.exit(1)\n"
                                    f"open({str(a_posted)!r}, 'a').write('posted\\n')"]
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo, "quiesce": ["a", "b"]}},
                    quiesce={"a": {"kind": "command", "pre": ["true"], "post": a_post},
                             "b": {"kind": "command", "pre": ["true"], "post": failing_post(ready, posted)}})
    assert ws.run("snapshot").returncode == -signal.SIGKILL
    # The watchdog ran both posts: a's, which snapmgr had not finished, and b's, which failed.
    wait_for(lambda: "is not fully resumed yet" in ws.run("check").stdout, timeout=30, what="the watchdog's account")
    assert a_posted.read_text() == "posted\n" and not posted.exists()
    ready.write_text("")
    again = ws.ok("recover").stdout
    assert "recovered now: b: ran " in again and "a:" not in again, again
    assert posted.read_text() == "posted\n" and a_posted.read_text() == "posted\n"


def test_a_window_an_earlier_version_of_the_retries_left_tried_without_a_time_is_tried_by_the_next_run(ws):
    ready, posted = a_lost_window_whose_post_fails_until_ready(ws)
    assert "(try 1 of 3)" in ws.ok("recover").stdout
    with sqlite3.connect(ws.root / "state" / "journal.db") as db:
        db.execute("UPDATE windows SET plan = json_remove(plan, '$.tried_at')")
    db.close()
    ready.write_text("")
    assert "recovered now: app: ran " in ws.ok("list").stderr and posted.exists()
