import errno
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from snapmgr.errors import LockBusy, SnapmgrError
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
    # Holders come and go as fast as they can: the lock file, read at any moment, holds
    # a pid (never empty or half-written), and every waiter that gives up names one.
    stop = multiprocessing.Event()
    churners = [multiprocessing.Process(target=_churn, args=(tmp_path, stop)) for _ in range(2)]
    for p in churners:
        p.start()
    path = tmp_path / "locks" / "home.lock"
    while not path.exists():
        time.sleep(0.01)
    reads, deadline = [], time.monotonic() + 2
    while time.monotonic() < deadline:
        reads.append(path.read_text())
    messages, deadline = [], time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            with volume_lock(tmp_path, "home", 0):
                pass
        except LockBusy as e:
            messages.append(str(e))
    stop.set()
    for p in churners:
        p.join()
    assert len(reads) > 10_000 and len(messages) > 100
    assert not [r for r in reads if not re.fullmatch(r"\d+\n", r)], f"of {len(reads)} reads"
    assert not [m for m in messages if not re.search(r"\(pid \d+\)", m)], f"of {len(messages)} waits"


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
    assert re.search(rf"\(pid {run.pid}, which has exited; still held by sh \(pid \d+\), sleep \(pid \d+\)\)",
                     str(e.value)), str(e.value)
    waited = time.monotonic()
    with volume_lock(tmp_path, "home", 10):  # free once the program is done
        assert time.monotonic() - waited > 0.5


def _race(run_dir, start, results):
    start.wait()
    try:
        with volume_lock(run_dir, "home", 0):
            results.put(("held", os.getpid()))
            time.sleep(0.2)
    except LockBusy as e:
        results.put(("busy", str(e)))


def test_racing_to_create_the_lock_file_never_shows_it_empty(tmp_path):
    # The lock file does not exist yet: every racer may be the one to create it.
    for round_ in range(15):
        run_dir = tmp_path / str(round_)
        start, results = multiprocessing.Event(), multiprocessing.Queue()
        racers = [multiprocessing.Process(target=_race, args=(run_dir, start, results)) for _ in range(8)]
        for p in racers:
            p.start()
        start.set()
        outcomes = [results.get(timeout=30) for _ in racers]
        for p in racers:
            p.join()
        pids = {p.pid for p in racers}
        held = [pid for kind, pid in outcomes if kind == "held"]
        busy = [int(re.search(r"\(pid (\d+)", m)[1]) for kind, m in outcomes if kind == "busy"]
        assert len(held) == 1 and len(busy) == 7, outcomes
        assert set(busy) <= pids, outcomes  # a racer's pid, never 'unknown'
        assert list((run_dir / "locks").iterdir()) == [run_dir / "locks" / "home.lock"]  # no drafts left


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_run_dir_another_user_can_write_is_refused(tmp_path):
    shared = tmp_path / "run"
    (shared / "locks").mkdir(parents=True)
    os.chown(shared / "locks", 65534, 65534)
    with pytest.raises(SnapmgrError) as e:
        with volume_lock(shared, "home", 0):
            pass
    assert str(e.value) == (f"{shared}/locks: is owned by uid 65534, not root; refusing to use it "
                            f"(chown root {shared}/locks)")
    os.chown(shared / "locks", 0, 0)
    shared.chmod(0o777)
    with pytest.raises(SnapmgrError, match=f"directory {shared} on the way to it is writable by group or others"):
        with volume_lock(shared, "home", 0):
            pass


def test_a_lock_file_that_is_a_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "home.lock").symlink_to(victim)
    with pytest.raises(OSError) as e:
        with volume_lock(tmp_path, "home", 0):
            pass
    assert e.value.errno == errno.ELOOP
    assert victim.read_text() == "precious\n"
