"""Retention: worked examples of borg's semantics, then properties checked by hypothesis."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from snapmgr.model import Policy, Snapshot, SnapshotId
from snapmgr.retention import decide

UTC = timezone.utc
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def snap(when: datetime, *tags: str, seq: int = 0) -> Snapshot:
    sid = SnapshotId("v", when.strftime("%Y%m%dT%H%M%SZ"), seq)
    return Snapshot(sid, Path("/x") / str(sid), frozenset(tags))


def reasons(snapshots, policy, now=NOW, tz=UTC) -> dict[str, str]:
    return {str(d.snapshot.id): (d.reason if d.keep else "PRUNE") for d in decide(snapshots, policy, now, tz)}


def hourly_snaps(hours: int) -> list[Snapshot]:
    return [snap(NOW - timedelta(hours=h)) for h in range(hours)]


def test_daily_keeps_newest_of_each_day():
    snaps = hourly_snaps(72)  # three days and a bit, one per hour
    r = reasons(snaps, Policy("p", daily=2))
    kept = {k: v for k, v in r.items() if v != "PRUNE"}
    assert kept == {"v@20261121T120000Z": "daily #1", "v@20261120T230000Z": "daily #2"}


def test_a_rule_does_not_count_what_an_earlier_rule_kept():
    # keep_last 2 keeps 12:00 and 11:00 of the 21st; daily's first period (the 21st) is
    # used up by them, so daily's two picks are the 20th and the 19th.
    r = reasons(hourly_snaps(72), Policy("p", keep_last=2, daily=2))
    assert r["v@20261121T120000Z"] == "keep_last #1"
    assert r["v@20261121T110000Z"] == "keep_last #2"
    assert r["v@20261120T230000Z"] == "daily #1"
    assert r["v@20261119T230000Z"] == "daily #2"
    assert sum(v != "PRUNE" for v in r.values()) == 4


def test_within_keeps_everything_inside_the_window():
    r = reasons(hourly_snaps(10), Policy("p", keep_within=timedelta(hours=3)))
    assert [v for v in r.values()][:3] == ["within 3h"] * 3
    assert list(r.values())[3:] == ["PRUNE"] * 7


def test_oldest_is_kept_when_a_rule_runs_short():
    snaps = [snap(NOW - timedelta(days=d)) for d in range(3)]
    r = reasons(snaps, Policy("p", daily=7))
    assert r["v@20261119T120000Z"] == "daily #3"
    snaps = [snap(NOW - timedelta(minutes=m)) for m in range(3)]  # one day only
    r = reasons(snaps, Policy("p", daily=7))
    assert r == {"v@20261121T120000Z": "daily #1", "v@20261121T115900Z": "PRUNE",
                 "v@20261121T115800Z": "daily #2 (oldest)"}


def test_weeks_are_iso_weeks():
    # 2026-01-04 is a Sunday and still in ISO week 2026-W01; Monday 2026-01-05 starts W02.
    # 2025-12-29 (Monday) starts ISO week 2026-W01, so the 28th is the last of 2025-W52.
    days = [datetime(2026, 1, d, 12, tzinfo=UTC) for d in (5, 4)] + \
           [datetime(2025, 12, d, 12, tzinfo=UTC) for d in (29, 28)]
    r = reasons([snap(d) for d in days], Policy("p", weekly=3), now=days[0])
    assert [r[str(snap(d).id)] for d in days] == ["weekly #1", "weekly #2", "PRUNE", "weekly #3"]


def test_periods_are_counted_in_the_given_timezone():
    # 23:30 UTC on the 20th is already the 21st in Tokyo: one day in Tokyo, two in UTC.
    snaps = [snap(datetime(2026, 11, 21, 1, 0, tzinfo=UTC)), snap(datetime(2026, 11, 20, 23, 30, tzinfo=UTC))]
    from zoneinfo import ZoneInfo
    tokyo = reasons(snaps, Policy("p", daily=5), tz=ZoneInfo("Asia/Tokyo"))
    utc = reasons(snaps, Policy("p", daily=5), tz=UTC)
    assert list(tokyo.values()) == ["daily #1", "daily #2 (oldest)"]
    assert list(utc.values()) == ["daily #1", "daily #2"]


def test_protected_are_kept_and_do_not_use_up_periods():
    snaps = [snap(NOW, "manual"), snap(NOW - timedelta(minutes=1)), snap(NOW - timedelta(days=1), "pre-rollback")]
    r = reasons(snaps, Policy("p", daily=1))
    assert r == {"v@20261121T120000Z": "protected (tag manual)", "v@20261121T115900Z": "daily #1",
                 "v@20261120T120000Z": "protected (tag pre-rollback)"}


def test_newest_survives_even_when_no_rule_keeps_it():
    snaps = [snap(NOW - timedelta(days=30)), snap(NOW - timedelta(days=31))]
    r = reasons(snaps, Policy("p", keep_within=timedelta(days=1)))
    assert r == {"v@20261022T120000Z": "newest (always kept)", "v@20261021T120000Z": "PRUNE"}


def test_same_second_snapshots_are_separate_for_keep_last():
    snaps = [snap(NOW, seq=2), snap(NOW, seq=1), snap(NOW)]
    r = reasons(snaps, Policy("p", keep_last=2))
    assert r == {"v@20261121T120000Z-2": "keep_last #1", "v@20261121T120000Z-1": "keep_last #2",
                 "v@20261121T120000Z": "PRUNE"}


# Properties ---------------------------------------------------------------------------

RULES = ("keep_last", "hourly", "daily", "weekly", "monthly", "yearly")

snapshot_sets = st.lists(
    st.tuples(st.integers(0, 3 * 365 * 24 * 60),                     # minutes before NOW
              st.sampled_from([(), (), (), ("hourly",), ("manual",), ("pre-rollback",)])),
    min_size=0, max_size=60, unique_by=lambda t: t[0],
).map(lambda items: [snap(NOW - timedelta(minutes=m), *tags) for m, tags in items])

policies = st.builds(
    Policy, st.just("p"),
    keep_within=st.one_of(st.none(), st.integers(1, 24 * 90).map(lambda h: timedelta(hours=h))),
    **{rule: st.integers(0, 12) for rule in RULES},
)


def kept(snapshots, policy) -> set:
    return {d.snapshot.id for d in decide(snapshots, policy, NOW, UTC) if d.keep}


@settings(max_examples=300, deadline=None)
@given(snapshot_sets, policies)
def test_newest_is_never_pruned(snapshots, policy):
    if snapshots:
        assert max(s.id for s in snapshots) in kept(snapshots, policy)


@settings(max_examples=300, deadline=None)
@given(snapshot_sets, policies)
def test_pruning_is_idempotent(snapshots, policy):
    first = kept(snapshots, policy)
    survivors = [s for s in snapshots if s.id in first]
    assert kept(survivors, policy) == first


@settings(max_examples=300, deadline=None)
@given(snapshot_sets, policies)
def test_no_rule_keeps_more_than_its_count(snapshots, policy):
    for rule in RULES:
        used = [d for d in decide(snapshots, policy, NOW, UTC) if d.reason.startswith(rule + " #")]
        assert len(used) <= getattr(policy, rule)


@settings(max_examples=300, deadline=None)
@given(snapshot_sets, policies, st.sampled_from(RULES), st.integers(1, 12))
def test_adding_a_rule_never_prunes_more(snapshots, policy, rule, extra):
    stronger = Policy(**{**policy.__dict__, rule: getattr(policy, rule) + extra})
    assert kept(snapshots, policy) <= kept(snapshots, stronger)


@settings(max_examples=300, deadline=None)
@given(snapshot_sets, policies)
def test_protected_snapshots_survive(snapshots, policy):
    protected = {s.id for s in snapshots if s.tags & {"manual", "pre-rollback"}}
    assert protected <= kept(snapshots, policy)


@settings(max_examples=200, deadline=None)
@given(snapshot_sets, policies)
def test_every_decision_has_a_reason(snapshots, policy):
    decisions = decide(snapshots, policy, NOW, UTC)
    assert len(decisions) == len(snapshots)
    assert all(d.reason for d in decisions)
    assert [d.snapshot.id for d in decisions] == sorted((s.id for s in snapshots), reverse=True)


@settings(max_examples=200, deadline=None)
@given(snapshot_sets, policies, st.integers(1, 24 * 400))
def test_adding_keep_within_never_prunes_more(snapshots, policy, hours):
    window = timedelta(hours=hours) + (policy.keep_within or timedelta(0))
    wider = Policy(**{**policy.__dict__, "keep_within": window})
    assert kept(snapshots, policy) <= kept(snapshots, wider)


def test_snapshots_with_unreadable_metadata_are_protected():
    damaged = Snapshot(snap(NOW - timedelta(days=9)).id, Path("/x"), meta_readable=False)
    r = reasons([snap(NOW), damaged], Policy("p", keep_last=1))
    assert r == {"v@20261121T120000Z": "keep_last #1", "v@20261112T120000Z": "protected (metadata unreadable)"}


def test_invalid_snapshots_are_pruned_and_take_no_period():
    good = [snap(NOW - timedelta(days=d)) for d in (2, 3)]
    broken = replace(snap(NOW - timedelta(days=1)), invalid="overflowed")
    broken_manual = replace(snap(NOW - timedelta(hours=1), "manual"), invalid="overflowed")
    decisions = {d.snapshot.id: d for d in decide(good + [broken, broken_manual], Policy("p", daily=2), NOW, UTC)}
    assert (decisions[broken.id].keep, decisions[broken.id].reason) == (False, "invalid (overflowed)")
    assert decisions[broken_manual.id].keep          # protected wins: the user decides
    assert all(decisions[s.id].keep for s in good)   # the broken one took no day from them
