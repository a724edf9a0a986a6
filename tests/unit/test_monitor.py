"""The monitoring's pure parts: allowed ages from schedules, the findings a volume's
status gives, the plugin's number and perfdata format, the exposition format."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from snapmgr import config as configuration, observed
from snapmgr.backends.base import Space
from snapmgr.engine import VolumeStatus
from snapmgr.journal import RunRecord, VolumeHistory, WindowRecord
from snapmgr.model import Snapshot, SnapshotId
from snapmgr.monitor import check, metrics
from snapmgr.monitor.state import (CRITICAL, OK, UNKNOWN, WARNING, Ages, Health, VolumeHealth, ages_of, assess,
                                   span, worst)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
H, M, S = timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1)
INTERVALS = {"hourly": H, "daily": 24 * H, "*:0/15": timedelta(minutes=15)}


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (45, "45s"), (60, "1min"), (5400, "1h30min"), (7205, "2h"),
                                          (90061, "1d1h"), (-3, "0s")])
def test_span(seconds, text):
    assert span(timedelta(seconds=seconds)) == text


def test_worst_puts_unknown_between_ok_and_warning():
    assert worst([]) == OK
    assert worst([OK, UNKNOWN]) == UNKNOWN
    assert worst([UNKNOWN, WARNING]) == WARNING
    assert worst([WARNING, CRITICAL, UNKNOWN]) == CRITICAL


def config(tmp_path: Path, volume: dict | None = None, schedules: dict | None = None, groups: dict | None = None):
    (tmp_path / "src").mkdir()
    rsync = {"backend": "rsync", "source": str(tmp_path / "src")}
    doc = {"volumes": {"data": {**rsync, "repository": str(tmp_path / "r"), **(volume or {})},
                       "other": {**rsync, "repository": str(tmp_path / "o")}},
           "groups": groups or {}, "schedules": schedules or {}}
    return configuration.parse(tmp_path / "snapmgr.toml", doc)


@pytest.mark.parametrize("volume,schedules,groups,warn,crit,source", [
    ({}, {}, {}, None, None, "no schedule covers it and it sets no warn_age or crit_age"),
    ({}, {"s": {"on_calendar": "hourly", "volumes": ["other"]}}, {}, None, None, "no schedule covers it"),
    # The gap: the calendar's, plus the schedule's accuracy (1min by default) and random delay.
    ({}, {"h": {"on_calendar": "hourly", "volumes": ["data"]}}, {}, 1.5 * (H + M), 3 * (H + M),
     "1.5x / 3x the 1h1min between runs of schedule h"),
    ({}, {"d": {"on_calendar": "daily", "volumes": ["data"], "randomized_delay": "12h", "accuracy": "1s"}}, {},
     1.5 * (36 * H + S), 3 * (36 * H + S), "the 1d12h between runs of schedule d"),
    ({}, {"d": {"on_calendar": "daily", "volumes": ["data"]}, "q": {"on_calendar": "*:0/15", "groups": ["g"]}},
     {"g": {"volumes": ["data", "other"]}}, 1.5 * 16 * M, 3 * 16 * M, "schedule q"),
    ({"warn_age": "2h"}, {"h": {"on_calendar": "hourly", "volumes": ["data"]}}, {}, 2 * H, 3 * (H + M),
     "warn_age / crit_age of the volume, else 1.5x / 3x"),
    ({"crit_age": "1h"}, {"h": {"on_calendar": "hourly", "volumes": ["data"]}}, {}, None, H, "of the volume, else"),
    ({"warn_age": "1d", "crit_age": "2d"}, {"h": {"on_calendar": "hourly", "volumes": ["data"]}}, {}, 24 * H, 48 * H,
     "warn_age / crit_age of the volume"),
    ({"crit_age": "1d"}, {}, {}, None, 24 * H, "warn_age / crit_age of the volume"),
])
def test_ages_come_from_the_volume_then_from_the_shortest_covering_schedule(tmp_path, volume, schedules, groups,
                                                                             warn, crit, source):
    cfg = config(tmp_path, volume, schedules, groups)
    ages = ages_of(cfg, cfg.volumes["data"], INTERVALS.__getitem__)
    assert (ages.warn, ages.crit) == (warn, crit)
    assert source in ages.source


def snap(stamp: str, **kwargs) -> Snapshot:
    return Snapshot(SnapshotId("data", stamp), Path("/x"), **kwargs)


GOOD = snap("20261124T113000Z", record={"grade": "application"})
STATUS = VolumeStatus("data", "rsync", 1, GOOD, VolumeHistory(None, None, None), newest_good=GOOD)


def run(action: str, status: str, minutes_ago: float, pid: int = 1, error: str | None = None) -> RunRecord:
    started = NOW - timedelta(minutes=minutes_ago)
    return RunRecord(action, pid, started, None if status == "running" else started + timedelta(seconds=5),
                     status, error)


def window(status: str, minutes_ago: float, attempts: int = 0) -> WindowRecord:
    at = NOW - timedelta(minutes=minutes_ago)
    return WindowRecord(at, None if status == "open" else at + timedelta(seconds=2), status,
                        "the watchdog resumed it", 0.5, None, attempts)


@pytest.mark.parametrize("change,live,ages,expected", [
    ({}, True, Ages(H, 2 * H, ""), []),
    ({}, True, Ages(timedelta(minutes=20), H, ""), [(WARNING, "the newest good snapshot data@20261124T113000Z is "
                                                              "30min old (warning after 20min)")]),
    ({}, True, Ages(None, timedelta(minutes=20), ""), [(CRITICAL, "is 30min old (critical after 20min)")]),
    ({}, True, Ages(None, None, ""), []),
    ({"newest_good": None, "snapshots": 0, "newest": None}, True, Ages(H, 2 * H, ""),
     [(CRITICAL, "it has no good snapshot")]),
    ({"newest_good": None, "snapshots": 0, "newest": None}, True, Ages(H, None, ""),
     [(WARNING, "it has no good snapshot")]),
    ({"newest_good": None, "snapshots": 0, "newest": None}, True, Ages(None, None, ""), []),
    ({"snapshots": None, "problem": "Not a directory: '/r'"}, True, Ages(H, 2 * H, ""),
     [(CRITICAL, "its snapshots cannot be listed: Not a directory: '/r'")]),
    ({"snapshots": None, "problem": "no run has recorded its snapshots yet"}, False, Ages(H, 2 * H, ""),
     [(UNKNOWN, "no run has recorded its snapshots yet, and listing them needs root")]),
    ({"snapshots": None, "problem": "lvs failed", "observed_at": NOW - H}, False, None,
     [(CRITICAL, "its snapshots cannot be listed (as the run at 2026-11-24 11:00:00 UTC listed them): lvs failed")]),
    ({"invalid": ("data@20261124T113000Z",), "problem": "data@20261124T113000Z is invalid (overflowed)",
      "newest_good": None}, True, None, [(CRITICAL, "data@20261124T113000Z is invalid (overflowed)")]),
    ({"damaged": ("data@20261124T113000Z",)}, True, None,
     [(CRITICAL, "verify found damage in data@20261124T113000Z")]),
    ({"runs": (run("snapshot", "failed", 10, error="no space left"),)}, True, None,
     [(CRITICAL, "the last snapshot run failed at 2026-11-24 11:50:05 UTC: no space left")]),
    ({"runs": (run("snapshot", "failed", 10), run("snapshot", "ok", 5))}, True, None, []),
    ({"runs": (run("snapshot", "ok", 10), run("prune", "failed", 9, error="busy"))}, True, None,
     [(CRITICAL, "the last prune run failed at 2026-11-24 11:51:05 UTC: busy")]),
    ({"runs": (run("delete", "failed", 9, error="busy"),)}, True, None, []),
    ({"runs": (run("snapshot", "ok", 10), run("snapshot", "running", 1, pid=4242))}, True, None,
     [(CRITICAL, "the snapshot run started at 2026-11-24 11:59:00 UTC by pid 4242 never finished")]),
    ({"runs": (run("snapshot", "running", 30, pid=4242), run("snapshot", "ok", 10))}, True, None, []),
    ({"last_window": window("undone", 20), "runs": (run("snapshot", "ok", 21),)}, True, None,
     [(CRITICAL, "the quiesce window opened at 2026-11-24 11:40:00 UTC was cut by the watchdog: the watchdog")]),
    ({"last_window": window("recovered", 20)}, True, None,
     [(CRITICAL, "was left open by its run, and resumed later")]),
    ({"last_window": window("undone", 20), "runs": (run("snapshot", "ok", 10),)}, True, None, []),
    ({"last_window": window("closed", 20)}, True, None, []),
    ({"last_window": window("open", 1)}, True, None, []),
    # Not fully resumed: a later window, or a later snapshot that succeeded, says nothing of
    # the failed step.
    ({"unresumed_window": window("open", 20, attempts=2), "last_window": window("closed", 5),
      "runs": (run("snapshot", "ok", 10),)}, True, None,
     [(CRITICAL, "the quiesce window opened at 2026-11-24 11:40:00 UTC is not fully resumed yet: the watchdog")]),
    ({"unresumed_window": window("recovery-failed", 20), "runs": (run("snapshot", "ok", 10),)}, True, None,
     [(CRITICAL, "could not be resumed: ")]),
    ({"newest": replace(GOOD, record={"grade": "degraded", "degraded": ["cache (redis): refused"]})}, True, None,
     [(WARNING, "the newest snapshot data@20261124T113000Z is degraded: cache (redis): refused")]),
])
def test_findings(change, live, ages, expected):
    found = assess(replace(STATUS, **change), ages, NOW, live, alive=lambda run: run.pid != 4242)
    assert [f.state for f in found] == [state for state, _ in expected]
    for f, (_, text) in zip(found, expected):
        assert text in f.text


def health(status: VolumeStatus = STATUS, ages: Ages | None = Ages(H, 2 * H, "schedule h")) -> Health:
    good = status.newest_good
    return Health([VolumeHealth(status, ages, good and NOW - good.created, ())], NOW, True,
                  {("data", "snapshot", "ok"): 3, ("data", "snapshot", "running"): 1})


def test_perfdata_numbers_are_the_plugin_format():
    spaced = replace(STATUS, space=Space("/srv (ext4)", 10 << 30, 1 << 30),
                     newest=replace(GOOD, record={"grade": "frozen", "quiesce_window_s": 0.1234567}))
    assert check.perfdata(health(spaced)) == (
        "'data age'=1800s;3600;7200;0 'data snapshots'=1;;;0 'data invalid'=0;;0;0 'data damaged'=0;;0;0 "
        "'data quiesce window'=0.123s;;;0 'data free'=1073741824B;;;0;10737418240")
    unknown = replace(STATUS, newest_good=None, newest=None, snapshots=None, problem="x")
    assert check.perfdata(health(unknown, None)) == "'data age'=U;;;0"


def test_the_exposition_passes_promtool_and_escapes_label_values():
    spaced = replace(STATUS, space=Space("/srv", 100, 40, held=7), runs=(run("snapshot", "ok", 10),),
                     last_window=window("closed", 10))
    text = metrics.exposition(health(spaced))
    for line in ('snapmgr_space_free_bytes{volume="data"} 40', 'snapmgr_snapshots_held_bytes{volume="data"} 7',
                 'snapmgr_snapshot_grade{volume="data",grade="application"} 1',
                 'snapmgr_last_run_duration_seconds{volume="data",action="snapshot"} 5.0',
                 'snapmgr_runs_total{volume="data",action="snapshot",status="ok"} 3',
                 'snapmgr_age_critical_seconds{volume="data"} 7200.0'):
        assert line + "\n" in text
    assert "running" not in text   # a counter of runs that have not ended would go down
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert metrics._label('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def test_a_listing_goes_through_the_journal_whole_or_says_it_cannot_be_read():
    listing = observed.Listing([replace(GOOD, invalid="overflowed", record={"grade": "frozen", "quiesce_window_s": 1.5,
                                                                            "quiescers": {"pg": "a backup label"}})],
                               space=Space("pool tank", 100, 40, held=7))
    back = observed.load(json.dumps(observed.dump(listing)), NOW)
    [s] = back.snapshots
    assert (s.id, s.invalid, s.record, back.space, back.at) == (
        GOOD.id, "overflowed", {"grade": "frozen", "quiesce_window_s": 1.5}, listing.space, NOW)
    failed = observed.load(json.dumps(observed.dump(observed.Listing(None, "lvs failed"))), NOW)
    assert (failed.snapshots, failed.problem) == (None, "lvs failed")
    for text in ("not json", "{}", '{"snapshots": [{"id": "nonsense"}], "problem": null, "space": null}'):
        unreadable = observed.load(text, NOW)
        assert unreadable.snapshots is None and unreadable.at is None
        assert unreadable.problem.startswith("what the run at 2026-11-24 12:00:00 UTC recorded of its snapshots "
                                             "cannot be read (")


def test_the_plugin_output_has_no_bar_but_the_one_before_the_perfdata():
    error = "rsync exited with status 11: rsync: write failed | rsync error: error in file IO (code 11)\nat main.c"
    failed = replace(STATUS, runs=(run("snapshot", "failed", 10, error=error),))
    judged = Health([VolumeHealth(failed, None, None, tuple(assess(failed, None, NOW, True)))], NOW, True, {})
    head, *details = check.text(judged).split("\n")
    assert head.count("|") == 1 and head.split(" | ", 1)[1] == check.perfdata(judged)
    assert "write failed / rsync error" in head and not any("|" in line for line in details)
    assert sum("the last snapshot run failed" in line for line in details) == 1
    assert "error in file IO (code 11)\\nat main.c" in details[-1]
    assert "|" not in check.failure_text("cannot read the journal: a | b")
