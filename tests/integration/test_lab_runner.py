"""The lab runner's own safety on this machine: what it removes and what it runs."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from snapmgr import sh
from tests.integration.helpers import REPO, pids_of

_spec = importlib.util.spec_from_file_location("lab", REPO / "vagrant" / "lab.py")
lab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab)


def test_removing_a_killed_build_unmounts_before_deleting(tmp_path):
    """A build killed mid-way leaves the host's /dev bound in its chroot; deleting the
    leftover must not delete what the bind mount shows."""
    host_dir = tmp_path / "host-dev"
    host_dir.mkdir()
    (host_dir / "null").write_text("precious")
    leftover = tmp_path / "cache" / "abc.partial"
    (leftover / "rootfs" / "dev").mkdir(parents=True)
    subprocess.run(["mount", "--bind", host_dir, leftover / "rootfs" / "dev"], check=True)
    lab.remove_tree(leftover)
    assert not leftover.exists()
    assert (host_dir / "null").read_text() == "precious"


def test_the_image_key_follows_its_inputs(tmp_path, monkeypatch):
    before = lab.Image(tmp_path).dir
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in lab.IMAGE_INPUTS:
        (inputs / name).write_bytes((lab.HERE / name).read_bytes())
    monkeypatch.setattr(lab, "HERE", inputs)
    assert lab.Image(tmp_path).dir == before
    with open(inputs / "provision.sh", "a") as f:
        f.write("\n# one more package\n")
    assert lab.Image(tmp_path).dir != before


def test_options_alone_still_run_the_lab_tier_and_paths_choose():
    assert lab.guest_command("test", ["-x", "-k", "thin"])[-4:] == ["tests/lab", "-x", "-k", "thin"]
    chosen = lab.guest_command("test", ["tests/lab/test_zfs.py"])
    assert chosen[-1] == "tests/lab/test_zfs.py" and "tests/lab" not in chosen
    assert lab.guest_command("bench", ["--rounds", "3"]) == ["python3", "bench/lab_bench.py", "--rounds", "3"]


def test_a_hung_guest_is_killed_at_the_deadline(tmp_path):
    # A machine with nothing to boot: the firmware waits forever, as a hung guest would.
    argv = ["qemu-system-x86_64", "-nographic", "-no-reboot", "-nic", "none", "-m", "64",
            "-name", f"hung-{tmp_path.name}"]
    with pytest.raises(sh.CommandTimeout):
        lab.run_guest(argv, tmp_path / "console.log", timeout=3)
    assert pids_of("qemu-system-x86_64", f"hung-{tmp_path.name}") == []
    assert (tmp_path / "console.log").exists()
