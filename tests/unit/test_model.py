from datetime import datetime, timedelta, timezone

import pytest

from snapmgr.model import SnapshotId, is_valid_name, parse_duration

NOW = datetime(2026, 11, 21, 14, 5, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("name", ["home", "db_1", "a.b", "x+y", "v-1", "A9"])
def test_good_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "-rf", ".hidden", "..", "a..b", "a/b", "a@b", "a b", "tab\t",
                                  "nl\n", "ctl\x01", "ü", "x" * 65])
def test_bad_names(name):
    assert not is_valid_name(name)


def test_id_format_is_utc_and_round_trips():
    local = NOW.astimezone(timezone(timedelta(hours=-5)))
    sid = SnapshotId.next_free("home", local, [])
    assert str(sid) == "home@20261121T140501Z"
    assert SnapshotId.parse(str(sid)) == sid
    assert sid.created == NOW


def test_same_second_gets_deterministic_suffixes():
    taken = []
    for expected in ("home@20261121T140501Z", "home@20261121T140501Z-1", "home@20261121T140501Z-2"):
        sid = SnapshotId.next_free("home", NOW, taken)
        assert str(sid) == expected
        taken.append(sid)
    # Another volume's ids do not matter; a freed seq is reused.
    assert str(SnapshotId.next_free("etc", NOW, taken)) == "etc@20261121T140501Z"
    assert str(SnapshotId.next_free("home", NOW, taken[1:])) == "home@20261121T140501Z"


def test_ids_order_by_time_then_seq_not_text():
    ids = [SnapshotId.parse(t) for t in ("v@20261121T140501Z-10", "v@20261121T140501Z-2",
                                         "v@20261121T140501Z", "v@20261120T235959Z")]
    assert [str(i) for i in sorted(ids)] == ["v@20261120T235959Z", "v@20261121T140501Z",
                                            "v@20261121T140501Z-2", "v@20261121T140501Z-10"]


@pytest.mark.parametrize("text", ["home", "home@", "home@2026", "-x@20261121T140501Z", "home@20261321T140501Z",
                                  "home@20261121T140501Z-0", "home@20261121T140501Z.partial", "a/b@20261121T140501Z"])
def test_bad_ids_are_refused(text):
    with pytest.raises(ValueError):
        SnapshotId.parse(text)
    assert SnapshotId.try_parse(text) is None


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15min", 900), ("36h", 36 * 3600), ("14d", 14 * 86400),
                                          ("2w", 14 * 86400), ("1y", 365 * 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_duration_m_is_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        parse_duration("5m")


@pytest.mark.parametrize("text", ["", "h", "5", "-5h", "5 hours", "1.5h"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
