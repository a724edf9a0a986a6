"""Which limit binds a ZFS volume's space (the figures a min_free share is of): pure
arithmetic over `zfs list -H -p` tables. Each table is one ZFS itself could print: every
`available` is what the kernel works out from the other columns (dsl_dir_space_available:
a quota caps `used`, a reservation not yet used adds to what the limits above leave; a
refquota caps `referenced`, a refreservation not yet used adds to what is left). The lab
(tests/lab/test_space.py) checks the same on real ZFS."""

from snapmgr.backends.base import Space
from snapmgr.backends.zfs import SPACE_COLUMNS, _space_of, _space_rows

MiB = 1 << 20


def space(*rows: str, targets: tuple[str, ...] = ()) -> Space:
    """The Space of `targets` (default: the last row) over rows written in MiB, in the
    order of SPACE_COLUMNS, and printed as `zfs list -H -p -o` would ("-" is left as is)."""
    lines = []
    for row in rows:
        name, *values = row.split()
        assert len(values) == len(SPACE_COLUMNS) - 1, row
        lines.append("\t".join([name, *(v if v == "-" else str(int(v) * MiB) for v in values)]))
    table = _space_rows("\n".join(lines) + "\n")
    return _space_of(table, list(targets) or [rows[-1].split()[0]])


def figures(where: str, size_mib: int, free_mib: int) -> Space:
    return Space(where, size_mib * MiB, free_mib * MiB)


#                       quota refquota reservation used referenced available usedbyrefreservation usedbysnapshots
POOL = "tank               0     0        0         300      1        700        0                    0"


def test_without_a_quota_a_share_is_of_the_pool():
    assert space(POOL,
                 "tank/data    0     0        0         100     60        700        0                   40") == \
        figures("pool tank", 1000, 700)


def test_its_own_quota_counts_its_children_and_snapshots():
    # used: 60 referenced, 40 in snapshots, 50 in children: all under the quota.
    assert space(POOL,
                 "tank/data  200     0        0         150     60         50        0                   40") == \
        figures("quota of tank/data", 200, 50)


def test_a_refquota_counts_only_what_the_dataset_references():
    # Its snapshots (90) are not under the refquota: used + available (190) is no size of anything.
    assert space(POOL,
                 "tank/db      0   100        0         150     60         40        0                   90") == \
        figures("refquota of tank/db", 100, 40)


def test_of_a_quota_and_a_refquota_the_one_leaving_less_room_binds():
    assert space(POOL,
                 "tank/db    120   100        0         100     30         20        0                   70") == \
        figures("quota of tank/db", 120, 20)
    assert space(POOL,
                 "tank/db    300   100        0         100     90         10        0                   10") == \
        figures("refquota of tank/db", 100, 10)


def test_an_ancestors_quota_binds_its_descendants():
    assert space("tank         0     0        0         600      1        400        0                    0",
                 "tank/home  500     0        0         450      1         50        0                    0",
                 "tank/home/alice 0  0        0         100    100         50        0                    0") == \
        figures("quota of tank/home", 500, 50)


def test_an_ancestor_over_its_quota_leaves_nothing():
    assert space("tank         0     0        0         600      1        400        0                    0",
                 "tank/home  500     0        0         520      1          0        0                    0",
                 "tank/home/alice 0  0        0         100    100          0        0                    0") == \
        figures("quota of tank/home", 500, 0)


def test_a_siblings_reservation_under_an_ancestors_quota_counts_against_it():
    # tank/app's used is tank/app/db's 150 and the 300 tank/app/cache reserves.
    assert space("tank         0     0        0         600      1        400        0                    0",
                 "tank/app   500     0        0         450      1         50        0                    0",
                 "tank/app/db  0     0        0         150    150         50        0                    0") == \
        figures("quota of tank/app", 500, 50)


def test_a_reservation_elsewhere_leaves_the_pool_less_free_but_no_smaller():
    # Another dataset reserves 800 of the pool: its root's used counts it.
    assert space("tank         0     0        0         950      1         50        0                    0",
                 "tank/data    0     0        0         100    100         50        0                    0") == \
        figures("pool tank", 1000, 50)


def test_an_ancestors_unused_reservation_is_room_the_pool_does_not_show():
    # tank/app reserves 400 and uses 100: 300 more are its own whatever the pool has left (50).
    assert space("tank         0     0        0         950      1         50        0                    0",
                 "tank/app     0     0      400         100      1        350        0                    0",
                 "tank/app/db  0     0        0         100    100        350        0                    0") == \
        figures("pool tank", 1000, 350)
    # Its quota leaves 300 of that: the quota binds, though the pool shows less.
    assert space("tank         0     0        0         950      1         50        0                    0",
                 "tank/app   400     0      400         100      1        300        0                    0",
                 "tank/app/db  0     0        0         100    100        300        0                    0") == \
        figures("quota of tank/app", 400, 300)


def test_an_unused_refreservation_is_room_above_every_quota():
    # 200 reserved, 50 referenced: 150 of used is the refreservation's, and the dataset's to take.
    assert space(POOL,
                 "tank/data  300     0        0         200     50        250      150                    0") == \
        figures("quota of tank/data", 300, 250)
    # A ZFS volume has no quota or refquota.
    assert space("tank         0     0        0         900      1        100        0                    0",
                 "tank/vol     -     -        0         210     50        260      160                    0") == \
        figures("pool tank", 1000, 260)


def test_the_target_with_least_available_decides():
    assert space(POOL,
                 "tank/a       0     0        0          10     10        700        0                    0",
                 "tank/b     100     0        0          90     90         10        0                    0",
                 targets=("tank/a", "tank/b")) == figures("quota of tank/b", 100, 10)


def test_a_quota_of_the_pools_root_binds_before_the_pool_itself():
    # The root's available is its quota's room then: on a tie the nearest limit names it.
    assert space("tank       800     0        0         300      1        500        0                    0") == \
        figures("quota of tank", 800, 500)
    assert space("tank      2000     0        0         300      1        700        0                    0") == \
        figures("pool tank", 1000, 700)
