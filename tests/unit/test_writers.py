"""Who holds a directory, read from /proc: writers (what a rollback refuses while they
run) and any user at all (what keeps a filesystem there from being unmounted)."""

from __future__ import annotations

import subprocess

from snapmgr.writers import open_for_writing, using


def test_a_process_working_in_a_directory_uses_it_without_writing(tmp_path):
    (tmp_path / "inside").mkdir()
    reader = subprocess.Popen(["sleep", "600"], cwd=tmp_path / "inside")
    elsewhere = subprocess.Popen(["sleep", "600"], cwd="/")
    try:
        assert using(tmp_path)[reader.pid] == "sleep"
        assert elsewhere.pid not in using(tmp_path)
        assert reader.pid not in open_for_writing(tmp_path)
    finally:
        for p in (reader, elsewhere):
            p.kill()
            p.wait()


def test_a_process_with_a_file_open_for_writing_is_both(tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as f:
        writer = subprocess.Popen(["sleep", "600"], stdout=f)
    try:
        assert open_for_writing(tmp_path)[writer.pid] == "sleep" and using(tmp_path)[writer.pid] == "sleep"
    finally:
        writer.kill()
        writer.wait()
