"""Whether a run's process still runs, asked of real processes: a child of this test that
runs, one that is gone, one the row's boot or start time does not match (as after a
restart, or when the kernel gave a dead run's pid to a new process), and the rows an
older snapmgr wrote, which keep no identity and are judged by the wall clock."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from snapmgr import procfs
from snapmgr.monitor import processes


@pytest.fixture
def child():
    """A process of this test that runs until the test ends."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield p
    finally:
        p.communicate(b"")


def identity(pid: int) -> tuple[str, int]:
    boot, ticks = procfs.boot_id(), procfs.start_ticks(pid)
    assert boot is not None and ticks is not None
    return boot, ticks


def test_the_process_that_began_the_run_runs(child):
    assert processes.running(child.pid, datetime.now(timezone.utc), *identity(child.pid))


def test_a_process_that_is_gone_does_not_run():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    began = identity(p.pid)
    p.wait()
    assert not processes.running(p.pid, datetime.now(timezone.utc), *began)


def test_a_run_of_another_boot_does_not_run_though_its_pid_does(child):
    _, ticks = identity(child.pid)
    assert not processes.running(child.pid, datetime.now(timezone.utc), str(uuid.uuid4()), ticks)


def test_a_process_started_later_than_the_runs_own_is_not_the_runs(child):
    # The row says its process started when this test's did: the child holding the pid
    # now started later, so the run's own process died and the kernel reused its pid.
    boot, mine = identity(os.getpid())
    assert identity(child.pid)[1] > mine
    assert not processes.running(child.pid, datetime.now(timezone.utc), boot, mine)


def test_the_wall_clock_does_not_enter_into_an_identified_run(child):
    # A clock stepped a day either way since the run began changes nothing.
    for step in (timedelta(days=1), -timedelta(days=1)):
        assert processes.running(child.pid, datetime.now(timezone.utc) + step, *identity(child.pid))


def test_an_older_snapmgrs_run_is_judged_by_when_its_process_started(child):
    began = processes.started(child.pid)
    assert began is not None and began <= datetime.now(timezone.utc)
    assert processes.running(child.pid, datetime.now(timezone.utc), None, None)
    # The run began minutes before the process that holds its pid now.
    assert not processes.running(child.pid, began - timedelta(minutes=5), None, None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not processes.running(gone.pid, datetime.now(timezone.utc), None, None)


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
        assert processes.running(child.pid, before, *identity(child.pid))
    finally:
        child.communicate(b"")
