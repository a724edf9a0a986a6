"""The journal's verifies: each verify of a snapshot, and each rotten file met on reading
(Journal.verify_failed, for mount --verify); per snapshot the latest counts."""

from __future__ import annotations

from datetime import datetime, timezone

from snapmgr.journal import MAX_DETAIL, Journal
from tests import journal_versions


def test_the_latest_verify_of_each_snapshot_is_what_counts(tmp_path):
    j = Journal(tmp_path / "journal.db")
    start = datetime.now(timezone.utc)
    j.verified("data@20261121T140501Z", start, "intact", 10, [])
    j.verified("data@20261121T150501Z", start, "damaged", 12, ["changed    '/a' (content)"])
    j.verified("home@20261121T140501Z", start, "unverifiable", None, ["it has no manifest"])
    j.verified("data@20261121T140501Z", start, "damaged", 10, ["missing    '/b'", "missing    '/c'"])
    latest = {v.snapshot: v for v in j.latest_verifies()}
    assert set(latest) == {"data@20261121T140501Z", "data@20261121T150501Z", "home@20261121T140501Z"}
    again = latest["data@20261121T140501Z"]
    assert (again.volume, again.source, again.result, again.entries, again.problems, again.detail) == \
        ("data", "verify", "damaged", 10, 2, ["missing    '/b'", "missing    '/c'"])
    assert latest["home@20261121T140501Z"].problems == 0   # unverifiable is no count of problems
    assert j.failure is None


def test_a_rotten_file_met_on_reading_is_recorded_as_damage(tmp_path):
    j = Journal(tmp_path / "journal.db")
    j.verified("data@20261121T140501Z", datetime.now(timezone.utc), "intact", 10, [])
    j.verify_failed("data@20261121T140501Z", "/d/file\nname", "content does not match the manifest")
    [v] = j.latest_verifies()
    assert (v.source, v.result, v.problems, v.detail) == \
        ("read", "damaged", 1, ["/d/file\nname: content does not match the manifest"])


def test_a_long_list_of_problems_keeps_its_count_and_the_first_lines(tmp_path):
    j = Journal(tmp_path / "journal.db")
    j.verified("data@20261121T140501Z", datetime.now(timezone.utc), "damaged", 5000,
               [f"missing    '/f{i}'" for i in range(5000)])
    [v] = j.latest_verifies()
    assert v.problems == 5000 and len(v.detail) == MAX_DETAIL and v.detail[0] == "missing    '/f0'"


def test_an_older_journal_gains_the_verifies_table(tmp_path):
    path = tmp_path / "journal.db"
    journal_versions.as_of(path, 2)
    j = Journal(path)
    j.verified("data@20261121T140501Z", datetime.now(timezone.utc), "intact", 1, [])
    assert [v.result for v in j.latest_verifies()] == ["intact"] and j.failure is None
