"""snapmgr.backends.remount on a real loop device: a filesystem taken off every place it is
mounted and put back there as it was, and left mounted when a mount cannot be let go of."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapmgr.backends import mounts, remount
from tests.integration.helpers import needs_root

pytestmark = needs_root


@pytest.fixture
def device(tmp_path):
    """An ext4 filesystem on a loop device of its own (not `mount -o loop`, whose device
    goes with its last unmount), mounted at one/ and again at two/, each with options of its own."""
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    loop = Path(subprocess.run(["losetup", "-f", "--show", image], check=True, capture_output=True,
                               text=True).stdout.strip())
    places = {"one": "noatime,nodev", "two": "nosuid"}
    try:
        for name, options in places.items():
            (tmp_path / name).mkdir()
            subprocess.run(["mount", "-o", options, loop, tmp_path / name], check=True)
        yield loop
    finally:
        for m in reversed(mounts.mounts()):
            if m.source == str(loop) or m.mountpoint.parent == tmp_path:
                subprocess.run(["umount", m.mountpoint], check=False)
        subprocess.run(["losetup", "-d", loop], check=True)


def mounted(device: Path) -> dict[str, set[str]]:
    number = remount.device_number(device)
    return {m.mountpoint.name: set(m.options.split(",")) for m in mounts.mounts() if m.device == number}


def test_taken_off_everywhere_then_put_back_as_it_was(tmp_path, device):
    record = tmp_path / "run" / "data.rollback-mounts"
    before = mounted(device)
    assert {"noatime", "nodev"} <= before["one"] and "nosuid" in before["two"] - before["one"]

    assert remount.taken_off(device, record, resuming=False) is None
    assert mounted(device) == {} and record.exists()
    remount.put_back(device, record)
    assert mounted(device) == before and not record.exists()


def test_put_back_by_a_later_process_from_the_record(tmp_path, device):
    record = tmp_path / "record"
    before = mounted(device)
    assert remount.taken_off(device, record, resuming=False) is None
    # A resumed rollback sees nothing mounted: the record still says where it was.
    assert remount.taken_off(device, record, resuming=True) is None
    remount.put_back(device, record)
    assert mounted(device) == before


def test_a_busy_mount_leaves_every_mount_in_place(tmp_path, device):
    record = tmp_path / "record"
    before = mounted(device)
    holder = subprocess.Popen(["sleep", "600"], cwd=tmp_path / "one")
    try:
        why = remount.taken_off(device, record, resuming=False)
    finally:
        holder.kill()
        holder.wait()
    assert why.startswith(f"{str(tmp_path / 'one')!r} cannot be unmounted (") and "busy" in why
    assert mounted(device) == before          # two/ was unmounted first, and is back


def test_a_bound_directory_is_not_unmounted(tmp_path, device):
    (tmp_path / "one" / "dir").mkdir()
    (tmp_path / "bound").mkdir()
    subprocess.run(["mount", "--bind", tmp_path / "one" / "dir", tmp_path / "bound"], check=True)
    before = mounted(device)
    why = remount.taken_off(device, tmp_path / "record", resuming=False)
    assert why == f"{device} is also mounted at {str(tmp_path / 'bound')!r} (a directory of it, bound there)"
    assert mounted(device) == before
