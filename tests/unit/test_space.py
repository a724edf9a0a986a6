"""The free-space floor a volume's Space is held to (Space.shortfall): pure arithmetic."""

import pytest

from snapmgr.backends.base import Space
from snapmgr.backends.lvm import _pool_percent
from snapmgr.errors import SnapmgrError
from snapmgr.model import parse_min_free

MiB = 1 << 20


def test_a_size_floor_is_met_at_exactly_the_floor():
    space = Space("/srv (ext4)", 100 * MiB, 10 * MiB)
    assert space.shortfall(parse_min_free("10M")) is None
    assert space.shortfall(parse_min_free("11M")) == "/srv (ext4) has 10.0MiB free, below min_free 11M (11.0MiB)"


def test_a_share_floor_is_of_the_whole_size_and_says_so():
    space = Space("refquota of tank/db", 1 << 30, 50 * MiB)
    assert space.shortfall(parse_min_free("4%")) is None
    assert space.shortfall(parse_min_free("5%")) == \
        "refquota of tank/db has 50.0MiB free, below min_free 5% (51.2MiB of 1.0GiB)"


def test_what_a_snapshot_takes_at_once_counts_against_the_floor():
    # A thick LVM snapshot carves its whole size out of the volume group.
    space = Space("volume group vg0", 1 << 30, 300 * MiB, needs=256 * MiB)
    assert space.shortfall(parse_min_free("40M")) is None
    assert space.shortfall(parse_min_free("64M")) == (
        "volume group vg0 has 300.0MiB free and the snapshot would take 256.0MiB of it at once, below min_free "
        "64M (64.0MiB)")


def test_an_inactive_thin_pool_is_an_error_saying_so():
    # LVM reports an empty data_percent for an inactive pool (a report row as lvs gives it).
    pool = {"lv_name": "pool", "data_percent": "", "metadata_percent": "12.50"}
    assert _pool_percent("vg0", pool, "metadata_percent") == 12.5
    with pytest.raises(SnapmgrError, match=r"^thin pool vg0/pool reports no data_percent \(is it inactive\? "):
        _pool_percent("vg0", pool, "data_percent")
