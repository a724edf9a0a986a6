"""The btrfs backend on a real btrfs filesystem, loop-mounted by the fixture."""

import errno
import json
import os
import subprocess

import pytest

from tests.integration.helpers import make_tree, needs_root, tree

pytestmark = needs_root


@pytest.fixture
def btrfs(tmp_path):
    image, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    subprocess.run(["mkfs.btrfs", "-q", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
    try:
        subprocess.run(["btrfs", "subvolume", "create", mnt / "data"], check=True, capture_output=True)
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)  # the loop device detaches with it


@pytest.fixture
def bws(ws, btrfs):
    ws.write_config({"data": {"backend": "btrfs", "subvolume": btrfs / "data",
                              "snapshot_dir": btrfs / ".snapshots", "retention": "default"}},
                    {"default": {"keep_last": 2}})
    make_tree(btrfs / "data", files=20)
    return ws


def test_snapshot_is_read_only_subvolume_with_metadata(bws, btrfs):
    sid = bws.ok("--json", "snapshot", "--tag", "hourly").json()["results"][0]["created"]["id"]
    snap = btrfs / ".snapshots" / sid
    assert os.stat(snap).st_ino == 256  # a subvolume root
    show = subprocess.run(["btrfs", "subvolume", "show", snap], capture_output=True, text=True, check=True).stdout
    assert "readonly" in show.split("Flags:")[1].splitlines()[0]
    with pytest.raises(OSError) as e:
        (snap / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    assert tree(snap) == tree(btrfs / "data")
    meta = json.loads((btrfs / ".snapshots" / f"{sid}.json").read_text())
    assert meta["tags"] == ["hourly"] and meta["backend"] == "btrfs" and meta["source"] == str(btrfs / "data")


def test_snapshot_is_a_point_in_time(bws, btrfs):
    first = bws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    (btrfs / "data" / "d0" / "f0000").write_bytes(b"later")
    second = bws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    assert (btrfs / ".snapshots" / first / "d0" / "f0000").read_bytes() != b"later"
    assert (btrfs / ".snapshots" / second / "d0" / "f0000").read_bytes() == b"later"
    assert bws.snapshots() == [first, second]


def test_delete_and_prune_remove_subvolumes(bws, btrfs):
    ids = [bws.ok("--json", "snapshot", "--tag", "hourly").json()["results"][0]["created"]["id"] for _ in range(4)]
    bws.ok("delete", ids[0])
    assert not (btrfs / ".snapshots" / ids[0]).exists()
    assert not (btrfs / ".snapshots" / f"{ids[0]}.json").exists()
    result = bws.ok("--json", "prune").json()["results"][0]
    assert result["deleted"] == [ids[1]]
    assert bws.snapshots() == ids[2:]
    listed = subprocess.run(["btrfs", "subvolume", "list", "-o", btrfs / ".snapshots"],
                            capture_output=True, text=True, check=True).stdout
    names = {line.rsplit("/", 1)[-1] for line in listed.splitlines()}  # ids[1] may be a prefix of ids[2]
    assert ids[1] not in names and ids[3] in names


def test_a_plain_directory_is_refused(bws, btrfs):
    (btrfs / "plain").mkdir()
    bws.write_config({"data": {"backend": "btrfs", "subvolume": btrfs / "plain",
                               "snapshot_dir": btrfs / ".snapshots"}})
    r = bws.run("snapshot")
    assert r.returncode == 1
    assert r.stderr.strip() == f"snapmgr: error: volume data: {btrfs / 'plain'} is not a btrfs subvolume"
    assert bws.snapshots() == []


def test_a_snapshot_dir_on_another_filesystem_fails_cleanly(bws, btrfs, tmp_path):
    bws.write_config({"data": {"backend": "btrfs", "subvolume": btrfs / "data",
                               "snapshot_dir": tmp_path / "elsewhere"}})
    r = bws.run("snapshot")
    assert r.returncode == 1
    assert r.stderr.startswith(f"snapmgr: error: volume data: cannot snapshot {btrfs / 'data'} into "
                               f"{tmp_path / 'elsewhere'} (it must be on the subvolume's btrfs filesystem): ")
    assert r.stderr.count("\n") == 1
    assert list((tmp_path / "elsewhere").iterdir()) == []  # no orphan metadata left behind
