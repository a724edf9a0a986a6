"""The names of the datasets a ZFS rollback makes beside a volume's dataset, and how
the backend finds its way back from them to the live dataset."""

from __future__ import annotations

from pathlib import Path

from snapmgr.backends.zfs import ZfsBackend, beside


def backend(*datasets: str) -> ZfsBackend:
    return ZfsBackend("data", {"datasets": datasets, "recursive": True}, Path("/run/snapmgr"))


def test_beside_a_dataset_are_its_clone_and_the_datasets_it_replaced_not_their_children():
    assert beside("tank/data", "tank/data")
    assert beside("tank/data", "tank/data.rollback-tmp")
    assert beside("tank/data", "tank/data.pre-rollback-20261124T145530Z-1")
    assert not beside("tank/data", "tank/data.pre-rollback-20261124T145530Z/child")
    assert not beside("tank/data", "tank/data/child")
    assert not beside("tank/data", "tank/database")
    assert not beside("tank/data", "tank/data.other")


def test_a_dataset_below_one_a_rollback_made_has_its_live_name_below_the_volumes():
    zfs = backend("tank/a", "tank/data")
    assert zfs._live_name("tank/data.pre-rollback-20261124T145530Z") == "tank/data"
    assert zfs._live_name("tank/data.pre-rollback-20261124T145530Z/c/d") == "tank/data/c/d"
    assert zfs._live_name("tank/data.rollback-tmp/c") == "tank/data/c"
    assert zfs._live_name("tank/data/c") == "tank/data/c"
    assert zfs._live_name("tank/a.pre-rollback-20261124T145530Z") == "tank/a"
