"""OnCalendar expressions read by systemd-analyze: the next elapses, the longest gap, and
a one-line error for what systemd refuses."""

from datetime import time, timedelta
from zoneinfo import ZoneInfo

import pytest

from snapmgr import calendar


def test_interval_is_the_longest_gap():
    assert calendar.interval("*:0/15") == timedelta(minutes=15)
    assert calendar.interval("hourly") == timedelta(hours=1)
    assert calendar.interval("Mon..Fri 09:00") == timedelta(days=3)   # over the weekend


def test_interval_spans_a_weekend_beyond_the_first_elapses():
    # 9 elapses a weekday: the first 16 never reach the weekend's gap, Fri 17:00 to Mon 09:00.
    assert calendar.interval("Mon..Fri *-*-* 09..17:00:00") == timedelta(hours=64)
    assert calendar.interval("*:0/1") == timedelta(minutes=1)   # capped, and still right


def test_elapses_are_in_order_and_utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    times = calendar.elapses("daily", 3)
    assert len(times) == 3 and times == sorted(times)
    assert all(t.utcoffset() == timedelta(0) and (t.hour, t.minute) == (0, 0) for t in times)


# Atlantic/Reykjavik is UTC by another name (GMT): systemd prints no "(in UTC)" line then.
@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata", "Atlantic/Reykjavik", "Etc/GMT"])
def test_elapses_follow_the_machines_time_zone_as_systemds_timers_do(monkeypatch, zone):
    monkeypatch.setenv("TZ", zone)
    times = calendar.elapses("daily", 3)
    assert all(t.utcoffset() == timedelta(0) and t.astimezone(ZoneInfo(zone)).time() == time(0, 0) for t in times)
    assert calendar.interval("*:0/15") == timedelta(minutes=15)


@pytest.mark.parametrize("expression, reason", [
    ("bogus", "'bogus' is not a systemd calendar expression"),
    ("--help", "'--help' is not a systemd calendar expression"),
    ("2020-01-01", "'2020-01-01' never elapses again"),
    ("daily\nhourly", "is not a systemd calendar expression"),
])
def test_refused(expression, reason):
    with pytest.raises(calendar.CalendarError, match=reason) as e:
        calendar.interval(expression)
    assert "\n" not in str(e.value)


def test_once_is_no_schedule():
    with pytest.raises(calendar.CalendarError, match="elapses once only"):
        calendar.interval("2100-01-01 00:00:00")
