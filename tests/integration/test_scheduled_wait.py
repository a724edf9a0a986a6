"""A scheduled run that finds its volume held by another run: it says so, naming the
holder, waits at most until its schedule runs again (or for its timeout), then fails with
the busy error, a failed run that status and check see."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from snapmgr.lock import volume_lock
from tests.integration.helpers import REPO
from tests.integration.test_systemd_units import needs_analyze, write

LEAVE_A_PROGRAM_HOLDING = """
import subprocess, sys
from pathlib import Path
from snapmgr.lock import volume_lock
with volume_lock(Path(sys.argv[1]), "data", 0) as fd:
    # As a killed run's rsync: a program that inherited the lock outlives the run.
    left = subprocess.Popen(["sleep", "120"], pass_fds=[fd], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(left.pid)
"""


@pytest.fixture
def left_holding(ws):
    """A run that exited, leaving a program it started holding the volume's lock:
    (the run's pid, the program's)."""
    done = subprocess.run([sys.executable, "-c", LEAVE_A_PROGRAM_HOLDING, str(ws.root / "run")], check=True,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    program = int(done.stdout)
    with open(ws.root / "run" / "locks" / "data.lock") as f:
        run = int(f.read())
    yield run, program
    os.kill(program, signal.SIGKILL)


@needs_analyze
def test_without_a_timeout_a_scheduled_run_waits_until_its_schedule_runs_again_then_fails(ws, left_holding):
    run, program = left_holding
    write(ws, {"fast": {"on_calendar": "*:*:0/10", "volumes": ["data"]}})
    # Started as the timer starts it, at an elapse: the next is 10s away, more than the
    # workspace's lock_wait, which would be waited for instead when it is nearer.
    time.sleep(10 - time.time() % 10)
    r = ws.run("snapshot", "--schedule", "fast")
    holder = rf"pid {run}, which has exited; still held by sleep \(pid {program}\)"
    lock = re.escape(str(ws.root / "run" / "locks" / "data.lock"))
    started, error = r.stderr.splitlines()
    told = re.fullmatch(rf"snapmgr: WARNING: volume data is busy: another snapmgr run \({holder}\) holds {lock}; "
                        rf"waiting for it up to \S+ \(until schedule fast runs again, at (.*) UTC\)", started)
    assert told, r.stderr
    assert r.returncode == 75
    assert re.fullmatch(rf"snapmgr: error: volume data: busy: another snapmgr run \({holder}\) holds {lock}; "
                        r"gave up after waiting \S+", error), r.stderr
    next_run = datetime.fromisoformat(told[1] + "+00:00")
    assert next_run.second % 10 == 0

    status = ws.ok("--json", "status").json()["volumes"][0]
    assert status["state"] == "failing" and status["last_error"] == error.split("volume data: ", 1)[1]
    assert datetime.fromisoformat(status["last_failure"].replace("Z", "+00:00")) >= next_run
    check = ws.run("check")
    assert check.returncode == 2 and "the last snapshot run failed at " in check.stdout
    assert ws.snapshots() == []


def test_a_schedule_timeout_still_sets_the_wait_and_the_run_gives_up_before_it(ws):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"], "timeout": "5s"}})
    with volume_lock(ws.root / "run", "data", 0):
        r = ws.run("snapshot", "--schedule", "hourly")
    assert r.returncode == 75
    waiting, gave_up = r.stderr.splitlines()
    # Before systemd's TimeoutStartSec, counted from the start of the process, would stop it.
    told = re.fullmatch(rf"snapmgr: WARNING: volume data is busy: another snapmgr run \(pid {os.getpid()}\) holds "
                        rf"{re.escape(str(ws.root))}/run/locks/data\.lock; waiting for it up to ([\d.]+)s "
                        rf"\(schedule hourly's timeout\)", waiting)
    assert told and 2 < float(told[1]) < 4.5, waiting
    assert gave_up == (f"snapmgr: error: volume data: busy: another snapmgr run (pid {os.getpid()}) holds "
                       f"{ws.root}/run/locks/data.lock; gave up after waiting {told[1]}s")
    assert ws.ok("--json", "status").json()["volumes"][0]["state"] == "failing"


def test_a_dry_run_that_gives_up_records_nothing(ws):
    write(ws, {"hourly": {"on_calendar": "hourly", "volumes": ["data"], "timeout": "1s"}})
    with volume_lock(ws.root / "run", "data", 0):
        assert ws.run("snapshot", "--schedule", "hourly", "--dry-run").returncode == 75
    assert ws.ok("--json", "status").json()["volumes"][0]["last_failure"] is None
