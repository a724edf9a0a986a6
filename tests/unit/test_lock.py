import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from snapmgr.errors import LockBusy
from snapmgr.lock import volume_lock


def _hold(run_dir, ready, seconds):
    with volume_lock(run_dir, "home", 0):
        ready.set()
        time.sleep(seconds)


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(seconds=30):
        ready = multiprocessing.Event()
        p = multiprocessing.Process(target=_hold, args=(tmp_path, ready, seconds))
        p.start()
        assert ready.wait(10)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()
        p.join()


def test_a_second_run_waits_then_names_the_holder(tmp_path, holder):
    p = holder()
    started = time.monotonic()
    with pytest.raises(LockBusy) as e:
        with volume_lock(tmp_path, "home", 0.5):
            pass
    assert time.monotonic() - started >= 0.5
    assert f"pid {p.pid}" in str(e.value) and "home.lock" in str(e.value)
    with volume_lock(tmp_path, "other", 0):  # other volumes are not blocked
        pass


def test_a_waiter_gets_the_lock_when_the_holder_finishes(tmp_path, holder):
    holder(seconds=0.5)
    with volume_lock(tmp_path, "home", 10):
        assert (tmp_path / "locks" / "home.lock").read_text().strip() == str(os.getpid())


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    p = holder()
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    with volume_lock(tmp_path, "home", 0):
        pass


def _churn(run_dir, stop):
    while not stop.is_set():
        with volume_lock(run_dir, "home", 10):
            time.sleep(0.0005)


def test_a_waiter_always_names_the_holder(tmp_path):
    # Holders come and go as fast as they can; every waiter that gives up must still
    # have read a pid, never an empty or half-written file.
    stop = multiprocessing.Event()
    churners = [multiprocessing.Process(target=_churn, args=(tmp_path, stop)) for _ in range(2)]
    for p in churners:
        p.start()
    messages = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            with volume_lock(tmp_path, "home", 0):
                pass
        except LockBusy as e:
            messages.append(str(e))
    stop.set()
    for p in churners:
        p.join()
    assert len(messages) > 1000
    assert not [m for m in messages if "pid unknown" in m], f"{len(messages)} waits"
    assert all(re.search(r"\(pid \d+(, which has exited: a program it started is still finishing)?\)", m)
               for m in messages)


def test_programs_started_under_the_lock_keep_it_after_their_run_is_killed(tmp_path):
    # A run that dies while a program it started is still busy, as snapmgr killed
    # mid-rsync: the program (here a shell that ignores the SIGTERM its parent's death
    # sends) keeps the lock until it exits, and a waiter is told so.
    started = tmp_path / "started"
    script = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from pathlib import Path\n"
              f"from snapmgr import sh; from snapmgr.lock import volume_lock\n"
              f"with volume_lock(Path({str(tmp_path)!r}), 'home', 0) as fd, sh.holding(fd):\n"
              f"    sh.run(['sh', '-c', \"trap '' TERM; touch {started}; sleep 2\"])\n")
    run = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while not started.exists():
        assert time.monotonic() < deadline, "the program never started"
        time.sleep(0.01)
    run.kill()
    run.wait()
    with pytest.raises(LockBusy) as e:
        with volume_lock(tmp_path, "home", 0.2):
            pass
    assert f"(pid {run.pid}, which has exited: a program it started is still finishing)" in str(e.value)
    waited = time.monotonic()
    with volume_lock(tmp_path, "home", 10):  # free once the program is done
        assert time.monotonic() - waited > 0.5
