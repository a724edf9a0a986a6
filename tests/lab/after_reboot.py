"""The second part of test_reboot.py, run by the lab guest at the boot after it (and only
then: pytest collects test_*.py files, so the lab tests never include this one).
snapmgr-recover.service resumed the window lost before the restart, in this boot, before
the units the window stopped came up; then everything the first part installed goes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.integration.helpers import REPO, wait_for
from tests.lab import conftest
from tests.lab.test_reboot import BOOT_ID, BY_HAND, ENABLED, STATE, UNIT_DIR

RECOVER = "snapmgr-recover.service"


def snapmgr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapmgr", "--config", str(STATE / "snapmgr.toml"), *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


def show(host, unit: str, prop: str) -> str:
    return conftest.sh(host, "systemctl", "show", f"--property={prop}", "--value", unit).strip()


@pytest.fixture
def installed_before(host):
    yield
    snapmgr("systemd", "uninstall")
    host.run(f"systemctl disable --now {ENABLED} {BY_HAND}")
    for unit in (ENABLED, BY_HAND):
        (UNIT_DIR / unit).unlink()
    conftest.sh(host, "systemctl", "daemon-reload")
    shutil.rmtree(STATE)


def test_the_recovery_service_resumed_the_window_at_boot_before_its_units_came_up(host, installed_before):
    this_boot = BOOT_ID.read_text()
    assert (STATE / "boot-id-before").read_text() != this_boot   # a real restart
    # The lab's own unit is not ordered after the recovery: it may still be at work.
    wait_for(lambda: int(show(host, RECOVER, "ExecMainExitTimestampMonotonic")) > 0, timeout=120,
             what=f"{RECOVER} to finish")
    told = conftest.sh(host, "journalctl", "--boot", "--no-pager", "--output=cat", "--unit", RECOVER)
    assert "was not closed by its run; recovered now: " in told, told
    assert f"units: ran systemctl start --no-block -- {ENABLED} {BY_HAND}" in told, told
    for unit in (ENABLED, BY_HAND):
        wait_for(lambda u=unit: show(host, u, "ActiveState") == "active", timeout=30, what=f"{unit} started")
    # The post ran in this boot, and the recovery ended before either unit started.
    assert (STATE / "posted").read_text() == this_boot
    recovered = int(show(host, RECOVER, "ExecMainExitTimestampMonotonic"))
    for unit in (ENABLED, BY_HAND):
        assert int(show(host, unit, "ExecMainStartTimestampMonotonic")) >= recovered, unit
    again = snapmgr("recover")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to recover", again
    check = snapmgr("check")
    assert check.returncode == 2 and "was left open by its run, and resumed later" in check.stdout, check.stdout
