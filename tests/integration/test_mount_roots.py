"""The mount's browse roots (snapmgr.fuse.roots) under concurrent requests: a snapshot is
entered by one request at a time and never while it is being left, however the
requests for it interleave. The snapshots are real rsync snapshots; the backend is
rsync's own, held at chosen points by the test so that the interleaving is certain."""

from __future__ import annotations

import errno
import threading
from contextlib import contextmanager

import pyfuse3
import pytest
import trio
import trio.testing

from snapmgr import config as configuration
from snapmgr.engine import Engine
from snapmgr.fuse.roots import Roots
from snapmgr.fuse.tree import Listed
from tests.integration.helpers import make_tree
from tests.integration.test_mount import snapshot

SLOT = 1


class Held:
    """Wraps rsync's browse_root: each entry waits for the test to let it go on, its
    leaving too, and every entry is counted."""

    def __init__(self):
        self.entries = 0
        self.inside = 0
        self.most_inside = 0
        self.reached: list[threading.Event] = []     # set once entry i has begun
        self.go: list[threading.Event] = []          # let entry i go on
        self.leaving = threading.Event()             # set once a leave has begun
        self.may_leave = threading.Event()
        self._guard = threading.Lock()

    def _event(self, events: list[threading.Event], i: int) -> threading.Event:
        with self._guard:
            while len(events) <= i:
                events.append(threading.Event())
            return events[i]

    def reached_entry(self, i: int) -> threading.Event:
        return self._event(self.reached, i)

    def let_go(self, i: int) -> None:
        self._event(self.go, i).set()

    def let_all_go(self) -> None:
        for i in range(self.entries + 1):
            self.let_go(i)
        self.may_leave.set()

    @contextmanager
    def around(self, browse):
        with self._guard:
            i, self.entries = self.entries, self.entries + 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            self.reached_entry(i).set()
            self._event(self.go, i).wait()
            with browse as path:
                yield path
                self.leaving.set()
                self.may_leave.wait()
        finally:
            with self._guard:
                self.inside -= 1


def held_backend(ws, held: Held, mounts: bool):
    """The workspace's rsync backend, its browse_root held by `held`; `mounts` says
    whether it is to be treated as one that mounts (entered in a worker thread)."""
    real = Engine(configuration.load(ws.config)).browsable()["data"]

    class HeldRsync(type(real)):
        browse_mounts = mounts

        def browse_root(self, snapshot):
            return held.around(super().browse_root(snapshot))

    return HeldRsync(real.volume, real.opts, real.run_dir)


def roots_of(backend, idle: float = 300.0) -> Roots:
    [listed] = [Listed(SLOT, s, backend) for s in backend.list()]
    return Roots({SLOT: listed}.get, idle)


@pytest.fixture
def held():
    held = Held()
    yield held
    held.let_all_go()   # a failed test must not leave worker threads waiting


async def wait_in_thread(event: threading.Event) -> None:
    await trio.to_thread.run_sync(event.wait)


def test_a_failed_entry_lets_one_waiter_in_and_no_one_beside_it(ws, held):
    make_tree(ws.source, files=3)
    sid = snapshot(ws)
    backend = held_backend(ws, held, mounts=True)
    roots = roots_of(backend)
    stored = ws.repo / sid
    away = ws.repo / "away"
    outcomes = {}
    held.may_leave.set()

    async def enter(who: str) -> None:
        try:
            outcomes[who] = await roots.enter(SLOT)
        except pyfuse3.FUSEError as e:
            outcomes[who] = e.errno

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(enter, "first")
            await wait_in_thread(held.reached_entry(0))
            nursery.start_soon(enter, "second")
            await trio.testing.wait_all_tasks_blocked()   # the second waits for the first
            stored.rename(away)                           # so the first one's entry fails
            held.let_go(0)
            await wait_in_thread(held.reached_entry(1))   # the second one enters now
            away.rename(stored)
            nursery.start_soon(enter, "third")
            await trio.testing.wait_all_tasks_blocked()
            held.let_all_go()

    trio.run(main)
    roots.release_all()
    assert outcomes == {"first": errno.EIO, "second": bytes(stored), "third": bytes(stored)}
    # The third found the second's entry: it did not enter the snapshot beside it.
    assert held.entries == 2 and held.most_inside == 1


def test_a_snapshot_being_left_is_entered_again_only_once_left(ws, held):
    make_tree(ws.source, files=3)
    snapshot(ws)
    # Entered in the loop itself: an entry that need not wait finishes before anyone else runs.
    backend = held_backend(ws, held, mounts=False)
    roots = roots_of(backend, idle=0)
    entered_again = trio.Event()
    seen = {}

    async def enter_again() -> None:
        await roots.enter(SLOT)
        entered_again.set()

    async def main():
        held.let_go(0)
        held.let_go(1)
        await roots.enter(SLOT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(roots.release_idle_forever)
            await wait_in_thread(held.leaving)            # idle at once: being left now
            nursery.start_soon(enter_again)
            await trio.testing.wait_all_tasks_blocked()
            seen["entered while being left"] = entered_again.is_set()
            held.may_leave.set()
            await entered_again.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    roots.release_all()
    assert seen == {"entered while being left": False}
    assert held.entries == 2 and held.most_inside == 1
