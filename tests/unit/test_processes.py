"""Whether a run's process still runs, asked of real processes: this one, a child that
is gone, and one whose pid is taken by a process started after the run began."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from snapmgr.monitor import processes


def test_a_live_process_that_began_the_run_runs():
    assert processes.running(os.getpid(), datetime.now(timezone.utc))


def test_a_process_started_after_the_run_began_is_not_the_runs():
    # The run's own process died and the kernel gave its pid to this one.
    began = processes.started(os.getpid())
    assert began is not None and began <= datetime.now(timezone.utc)
    assert not processes.running(os.getpid(), began - timedelta(minutes=5))


def test_a_process_that_is_gone_does_not_run():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not processes.running(child.pid, datetime.now(timezone.utc))


def test_a_command_name_with_spaces_and_parentheses_does_not_confuse_the_start_time():
    before = datetime.now(timezone.utc)
    # PR_SET_NAME (15): the name /proc/PID/stat shows in parentheses, as field 2.
    child = subprocess.Popen([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(None).prctl(15, b'a) b (c'); "
                              "print(flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            assert f.read().startswith(f"{child.pid} (a) b (c) ".encode())
        began = processes.started(child.pid)
        # /proc/stat's boot time is whole seconds.
        assert began is not None and before - timedelta(seconds=1) <= began <= datetime.now(timezone.utc)
    finally:
        child.communicate(b"")
