"""What `snapmgr systemd status` prints of states systemd reports but a host without
systemd cannot produce: a run killed by a signal, a machine rebooted since the last run,
a run under way (the lab checks that systemd reports them so: tests/lab/test_timers.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from snapmgr import render
from snapmgr.systemd_install import TimerState

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=timezone.utc)
BASE = TimerState("fast", "snapmgr-fast.timer", "snapmgr-fast.service", "enabled", "active",
                  datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc), datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc),
                  False, "success", 0, None)


def row(t: TimerState) -> str:
    return render.timers_table([t], NOW).splitlines()[1]


def test_a_run_killed_by_a_signal_says_which_not_an_exit_status():
    killed = replace(BASE, last_result="signal", exit_status=None, signal="SIGKILL")
    assert "signal (killed by SIGKILL)" in row(killed) and "exit" not in row(killed)
    assert render.timer_json(killed)["signal"] == "SIGKILL" and render.timer_json(killed)["exit_status"] is None
    failed = replace(BASE, last_result="exit-code", exit_status=1)
    assert "exit-code (exit 1)" in row(failed) and render.timer_json(failed)["signal"] is None


def test_after_a_reboot_a_timer_that_triggered_before_says_no_run_since_boot():
    assert "none since boot" in row(replace(BASE, last_result=None, exit_status=None))
    assert "never ran" in row(replace(BASE, last_result=None, exit_status=None, last_trigger=None))


def test_while_a_run_is_under_way_the_next_run_comes_after_it():
    line = row(replace(BASE, running=True, next_elapse=None))
    assert "after this run" in line and "running" in line
