"""Holding off the signals that end a run (Ctrl-C, SIGTERM, the window's alarm) across a
step that must not be cut in two: the signals wait, blocked, and act when it is done.

Only for steps that run no program: a blocked mask is inherited across exec, and a
program started meanwhile would never see the signals meant for it."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

ENDING = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM}


@contextmanager
def signals_held() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
