import multiprocessing
import os
import signal
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
