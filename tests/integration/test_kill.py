"""A program killed by snapmgr is gone with all its processes by the time sh.run
returns: rsync's receiver, forked from it, must not still be writing into a copy that
is about to be removed. The helper here sleeps uninterruptibly in a write to a frozen
filesystem, so SIGKILL takes effect only once the filesystem thaws."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from snapmgr import sh
from tests.integration.helpers import loop_mount, needs_root

pytestmark = needs_root


class Stop(Exception):
    pass


def state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_the_whole_process_group_is_gone_when_run_returns(tmp_path):
    with loop_mount(tmp_path, "ext4", size_mib=32) as mnt:
        pidfile = tmp_path / "helper.pid"
        helper = (f"import os\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                  f"with open({str(mnt / 'out')!r}, 'wb', buffering=0) as f:\n"
                  f"    while True: f.seek(0); f.write(b'x' * 4096)\n")
        parent = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {helper!r}])\n"
                  f"time.sleep(600)\n")
        frozen, group = threading.Event(), []
        thaw = threading.Timer(1.0, subprocess.run, (["fsfreeze", "--unfreeze", mnt],))

        def stop_when():
            written = pidfile.read_text() if pidfile.exists() else ""
            if not written or not os.path.exists(mnt / "out"):
                return None
            pid = int(written)
            if not frozen.is_set():
                subprocess.run(["fsfreeze", "--freeze", mnt], check=True)
                frozen.set()
            if state(pid) != "D":
                return None
            group.append(os.getpgid(pid))
            thaw.start()   # SIGKILL reaches the helper once this is done
            return Stop()

        try:
            with pytest.raises(Stop):
                sh.run([sys.executable, "-c", parent], stop_when=stop_when, timeout=60)
            with pytest.raises(ProcessLookupError):
                os.killpg(group[0], 0)
        finally:
            thaw.cancel()
            subprocess.run(["fsfreeze", "--unfreeze", mnt], capture_output=True)
