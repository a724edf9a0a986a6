"""Which fstab line, if any, says how a btrfs subvolume is mounted (by subvol= or
subvolid=): what decides whether a rollback can take effect at its next mount."""

from pathlib import Path

from snapmgr.backends import btrfs_rollback


def test_the_line_of_the_mountpoint_is_found_with_its_options(tmp_path, monkeypatch):
    fstab = tmp_path / "fstab"
    fstab.write_text("# /srv/data was on another disk\n"
                     "#UUID=old /srv/data btrfs subvolid=300 0 0\n"
                     "UUID=abc / ext4 errors=remount-ro 0 1\n"
                     "\n"
                     "UUID=def\t/srv/my\\040data  btrfs  noatime,subvol=/@data,compress=zstd:3  0 0\n")
    monkeypatch.setattr(btrfs_rollback, "FSTAB", fstab)
    assert btrfs_rollback.fstab_options(Path("/srv/my data")) == {"noatime": "", "subvol": "/@data",
                                                                  "compress": "zstd:3"}
    assert btrfs_rollback.fstab_options(Path("/srv/data")) is None   # commented out
    monkeypatch.setattr(btrfs_rollback, "FSTAB", tmp_path / "none")
    assert btrfs_rollback.fstab_options(Path("/")) is None
