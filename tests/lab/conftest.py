"""Fixtures of the lab tier: real LVM and ZFS on the scratch disks the qemu runner
attaches (vagrant/lab.py), inside the guest, as root. Each test gets its own logical
volumes or datasets and removes them, so tests do not depend on each other's leftovers.

System state is asserted through pytest-testinfra's `host` fixture (the local backend);
what snapmgr says is asserted through its CLI, as in the integration tier."""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path

import pytest

from tests.integration.helpers import Workspace

LVM_DISK = Path("/dev/disk/by-id/virtio-snapmgr-lvm")
ZFS_DISK = Path("/dev/disk/by-id/virtio-snapmgr-zfs")
VG = "labvg"
POOL = "labpool"
_names = itertools.count(1)


def pytest_collection_modifyitems(config, items):
    if not LVM_DISK.exists() or not ZFS_DISK.exists():
        raise pytest.UsageError("tests/lab runs inside the lab guest: use ./run lab-test (vagrant/lab.py)")
    # The test that leaves a window for the recovery at the next boot runs last: every later
    # test's snapmgr would recover it first, or remove its units.
    items.sort(key=lambda item: item.path.name == "test_reboot.py")


def sh(host, *argv: str) -> str:
    """Run a command through testinfra and return its stdout, failing the test on error."""
    return host.check_output(shlex.join(str(a) for a in argv))


def lv_report(host, *selection: str) -> list[dict]:
    out = sh(host, "lvs", "--reportformat", "json", "-o", "lv_name,lv_attr,lv_tags,origin,segtype,data_percent",
             *selection)
    return json.loads(out)["report"][0]["lv"]


@pytest.fixture(scope="module")  # the scope of testinfra's host
def vg(host):
    sh(host, "pvcreate", "-ff", "-y", LVM_DISK)
    sh(host, "vgcreate", VG, LVM_DISK)
    yield VG
    sh(host, "vgremove", "-ff", "-y", VG)
    sh(host, "pvremove", "-ff", "-y", LVM_DISK)


class LogicalVolume:
    """An LV with a filesystem, mounted where the test can write to it."""

    def __init__(self, host, name: str, mountpoint: Path, fstype: str):
        self.host, self.name, self.mountpoint, self.fstype = host, name, mountpoint, fstype

    @property
    def path(self) -> str:
        return f"{VG}/{self.name}"

    def format_and_mount(self) -> None:
        # ext4 otherwise zeroes its inode tables from a kernel thread after the mount:
        # megabytes of writes that can overflow a small thick snapshot taken meanwhile.
        eager = ["-E", "lazy_itable_init=0"] if self.fstype == "ext4" else []
        sh(self.host, f"mkfs.{self.fstype}", "-q", *eager, f"/dev/{self.path}")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        sh(self.host, "mount", f"/dev/{self.path}", self.mountpoint)

    def write(self, name: str, data: bytes) -> None:
        (self.mountpoint / name).write_bytes(data)
        sh(self.host, "sync", "-f", self.mountpoint / name)

    def remove(self) -> None:
        if self.host.mount_point(str(self.mountpoint)).exists:
            sh(self.host, "umount", self.mountpoint)
        # Its snapshots first: a thick origin cannot go while they exist.
        for row in lv_report(self.host, VG):
            if row["origin"] == self.name:
                sh(self.host, "lvremove", "-y", f"{VG}/{row['lv_name']}")
        sh(self.host, "lvremove", "-y", self.path)


@pytest.fixture
def thick_lv(host, vg, tmp_path):
    name = f"thick{next(_names)}"
    lv = LogicalVolume(host, name, tmp_path / name, "ext4")
    sh(host, "lvcreate", "-q", "-y", "-L", "128M", "-n", lv.name, vg)
    lv.format_and_mount()
    yield lv
    lv.remove()


@pytest.fixture
def thin_pool(host, vg):
    """A pool of its own per test, so that filling it cannot disturb another test."""
    name = f"pool{next(_names)}"
    sh(host, "lvcreate", "-q", "-y", "--type", "thin-pool", "-L", "96M", "-n", name, vg)
    yield name
    sh(host, "lvremove", "-y", f"{vg}/{name}")


@pytest.fixture
def thin_lv(host, vg, thin_pool, tmp_path):
    name = f"thin{next(_names)}"
    lv = LogicalVolume(host, name, tmp_path / name, "xfs")
    sh(host, "lvcreate", "-q", "-y", "--type", "thin", "-V", "300M", "--thinpool", thin_pool, "-n", lv.name, vg)
    lv.format_and_mount()
    yield lv
    lv.remove()


@pytest.fixture(scope="module")  # the scope of testinfra's host
def pool(host):
    sh(host, "modprobe", "zfs")
    sh(host, "zpool", "create", "-f", "-m", f"/{POOL}", POOL, ZFS_DISK)
    yield POOL
    sh(host, "zpool", "destroy", "-f", POOL)


@pytest.fixture
def dataset(host, pool):
    """A fresh dataset `labpool/tN` with two children, destroyed with its snapshots."""
    name = f"{pool}/t{next(_names)}"
    for child in ("", "/a", "/b"):
        sh(host, "zfs", "create", name + child)
    yield name
    sh(host, "zfs", "destroy", "-r", name)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path)


def lvm_volume(lv: LogicalVolume, **options) -> dict:
    return {"backend": "lvm", "lv": lv.path, "retention": "default", **options}


def zfs_volume(*datasets: str, **options) -> dict:
    return {"backend": "zfs", "datasets": list(datasets), "retention": "default", **options}
