"""changes.ctimes_now: a volume's entries and their ctimes, real find on a real tree, as a
rollback's check takes them when the services start again."""

from __future__ import annotations

import os

from snapmgr.backends.changes import ctimes_now


def test_every_entry_with_its_ctime_but_the_directories_pruned(tmp_path):
    root = tmp_path / "vol"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_text("x")
    (root / "l").symlink_to("nowhere")
    pruned = root / "re[po]*"   # a name find would take as a pattern
    (pruned / "snapshot").mkdir(parents=True)
    (root / "rep-x").mkdir()     # which that pattern, unescaped, would prune too
    listed = ctimes_now(root, False, (), [pruned, tmp_path / "elsewhere", root])
    assert set(listed) == {b"", b"d", b"d/e", b"d/e/f", b"l", b"rep-x"}
    assert listed == {p: os.lstat(os.path.join(root, os.fsdecode(p))).st_ctime_ns for p in listed}


def test_a_name_that_is_not_utf8_makes_it_decline(tmp_path):
    (tmp_path / os.fsdecode(b"caf\xe9")).write_text("x")
    assert ctimes_now(tmp_path, False, (), []) is None
