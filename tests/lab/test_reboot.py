"""Recovery at a real reboot, in two parts around it. This part loses a quiesce window as a
power cut would, with two units stopped (one enabled at boot, one started by hand) and a
command quiescer's `post` still to run, and asks the qemu runner (vagrant/lab.py) to boot
the guest again on the same disks; there the guest runs after_reboot.py, which checks
that snapmgr-recover.service resumed the window before the units came up. It runs last
(conftest.py): a later test's snapmgr would recover the window first, or remove its units."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import Workspace, held_window_command, lose_the_window, toml
from tests.lab import conftest

UNIT_DIR = Path("/etc/systemd/system")
STATE = Path("/srv/snapmgr-lab-reboot")   # not under /tmp, which is emptied at boot
ENABLED, BY_HAND = "snapmgr-lab-reboot-app.service", "snapmgr-lab-reboot-worker.service"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def test_a_window_lost_at_a_power_cut_is_left_for_the_recovery_at_the_next_boot(host):
    results = os.environ.get("SNAPMGR_LAB_RESULTS")
    if results is None:
        pytest.skip("only the qemu runner (vagrant/lab.py) boots the guest again")
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(mode=0o755, parents=True)
    ws = Workspace(STATE)
    for unit in (ENABLED, BY_HAND):
        (UNIT_DIR / unit).write_text("[Service]\nExecStart=/bin/sleep infinity\n\n"
                                     "[Install]\nWantedBy=multi-user.target\n")
    conftest.sh(host, "systemctl", "daemon-reload")
    conftest.sh(host, "systemctl", "enable", "--now", ENABLED)
    conftest.sh(host, "systemctl", "start", BY_HAND)
    held, posted = STATE / "held", STATE / "posted"
    post = [sys.executable, "-c", f"import shutil; shutil.copy({str(BOOT_ID)!r}, {str(posted)!r})"]
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                              "quiesce": ["units", "hold"]}},
                    quiesce={"units": {"kind": "systemd", "units": [ENABLED, BY_HAND], "mode": "stop"},
                             "hold": {"kind": "command", "pre": held_window_command(held), "post": post,
                                      "max_window": "10min"}})
    with open(ws.config, "a") as f:
        f.write(toml({"schedules.manual": {"on_calendar": "2099-01-01", "volumes": ["data"]}}))
    ws.ok("systemd", "install")
    lose_the_window(ws, held)
    for unit in (ENABLED, BY_HAND):
        assert host.service(unit).is_running is False, unit
    assert not posted.exists()
    shutil.copy(BOOT_ID, STATE / "boot-id-before")
    after = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={results}/junit-after-reboot.xml",
             "tests/lab/after_reboot.py"]
    Path(results, "after-reboot").write_text("\n".join(after) + "\n")
