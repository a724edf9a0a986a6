"""A long wait for a busy volume is told: when it starts, naming the holder and how long
it will last at most, and again while it lasts. A short wait at a terminal is not."""

import logging
import multiprocessing
import os
import re
import time
from datetime import timedelta

import pytest

from snapmgr import lock, procfs, scheduled_wait
from snapmgr.config import Schedule
from snapmgr.errors import LockBusy
from snapmgr.lock import volume_lock


def _hold(run_dir, ready, release):
    with volume_lock(run_dir, "home", 0):
        ready.set()
        release.wait(60)


@pytest.fixture
def held(tmp_path):
    """Another process holds the volume `home` until the event it yields is set."""
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    p = multiprocessing.Process(target=_hold, args=(tmp_path, ready, release))
    p.start()
    assert ready.wait(10)
    yield p, release
    release.set()
    p.join()


class Told(logging.Handler):
    """The lines lock.py logs; the holder is released once a retold line arrives."""

    def __init__(self, release=None):
        super().__init__()
        self.lines, self.freed = [], release

    def emit(self, record):
        self.lines.append(record.getMessage())
        if self.freed is not None and "still waiting" in record.getMessage():
            self.freed.set()


@pytest.fixture
def told():
    handlers = []

    def attach(release=None):
        handler = Told(release)
        logging.getLogger("snapmgr.lock").addHandler(handler)
        handlers.append(handler)
        return handler
    yield attach
    for handler in handlers:
        logging.getLogger("snapmgr.lock").removeHandler(handler)


def test_a_long_wait_is_told_at_its_start_and_retold_while_it_lasts(tmp_path, held, told, monkeypatch):
    p, release = held
    monkeypatch.setattr(lock, "REPORT_EVERY_S", 0.2)
    log = told(release)
    with volume_lock(tmp_path, "home", 3600, "the reason"):
        pass   # taken once the holder, released by the first retold line, let go
    path = tmp_path / "locks" / "home.lock"
    assert log.lines[0] == (f"volume home is busy: another snapmgr run (pid {p.pid}) holds {path}; "
                            f"waiting for it up to 1h (the reason)")
    assert len(log.lines) >= 2
    for line in log.lines[1:]:
        assert re.fullmatch(rf"volume home: still waiting for another snapmgr run \(pid {p.pid}\): "
                            r"\S+ so far, at most \S+ more", line), line


def test_a_short_wait_at_a_terminal_is_not_told(tmp_path, held, told):
    log = told()
    with pytest.raises(LockBusy):
        with volume_lock(tmp_path, "home", 0.3):
            pass
    assert log.lines == []


def test_an_unattended_run_tells_even_a_short_wait_but_never_a_zero_one(tmp_path, held, told):
    p, _ = held
    log = told()
    with pytest.raises(LockBusy) as e:
        with volume_lock(tmp_path, "home", 0, "never told", unattended=True):
            pass
    assert log.lines == [] and "gave up after waiting 0s" in str(e.value)
    with pytest.raises(LockBusy) as e:
        with volume_lock(tmp_path, "home", 0.3, "the reason", unattended=True):
            pass
    assert [line.split(";")[1] for line in log.lines] == [" waiting for it up to 0.3s (the reason)"]
    assert f"pid {p.pid}" in log.lines[0] and "gave up after waiting 0.3s" in str(e.value)


def test_a_free_volume_tells_nothing(tmp_path, told):
    log = told()
    with volume_lock(tmp_path, "home", 3600, "the reason", unattended=True):
        pass
    assert log.lines == []


# How long a scheduled run waits ------------------------------------------------------------

def schedule(on_calendar="hourly", timeout=None):
    return Schedule("often", on_calendar, ("home",), (), "often", True, timedelta(0), True, timedelta(minutes=1),
                    timeout)


def test_a_schedule_timeout_sets_the_wait_and_lock_wait_is_the_least():
    # Given up before systemd's TimeoutStartSec, counted from the start of this process.
    seconds, why = scheduled_wait.of(schedule(timeout=timedelta(minutes=10)), timedelta(minutes=1))()
    assert 590 - procfs.running_for(os.getpid()) - 1 < seconds < 590 - procfs.running_for(os.getpid()) + 1
    assert why == "schedule often's timeout"
    assert scheduled_wait.of(schedule(timeout=timedelta(seconds=30)), timedelta(minutes=1))() == \
        (60, "settings.lock_wait")


def test_without_a_timeout_a_run_waits_until_its_schedule_runs_again():
    seconds, why = scheduled_wait.of(schedule("hourly"), timedelta(seconds=1))()
    assert 0 < seconds <= 3600
    assert re.fullmatch(r"until schedule often runs again, at \d{4}-\d\d-\d\d \d\d:00:00 UTC", why), why


def test_a_run_already_past_its_next_elapse_waits_lock_wait():
    wait = scheduled_wait.of(schedule("*:*:*"), timedelta(seconds=5))   # every second
    time.sleep(1.1)   # past the elapse that followed the run's start
    assert wait() == (5, "settings.lock_wait")


def test_a_schedule_whose_next_run_cannot_be_told_still_runs_waiting_lock_wait(monkeypatch, caplog):
    monkeypatch.setattr(scheduled_wait.calendar, "PROGRAM", "systemd-analyze-not-installed")
    with caplog.at_level(logging.WARNING):
        wait = scheduled_wait.of(schedule("hourly"), timedelta(seconds=5))
    assert wait() == (5, "settings.lock_wait")
    assert "cannot tell when schedule often runs again (cannot check OnCalendar 'hourly': " \
           "systemd-analyze-not-installed is not installed" in caplog.text, caplog.text
