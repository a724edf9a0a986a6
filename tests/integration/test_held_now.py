"""changes.held_now, real find on real trees, and how a rollback's check takes a listing
made when the services started again (rollback._as_listed) against real changes since."""

from __future__ import annotations

import os
from pathlib import Path

from snapmgr.backends.changes import held, held_now
from snapmgr.manifest import Change
from snapmgr.rollback import _as_listed


def as_listed_now(root: Path) -> dict[bytes, object]:
    listing = held_now(root, (), [])
    assert listing is not None
    return listing.entries()


def test_every_entry_as_lstat_sees_it_but_the_directories_pruned(tmp_path):
    real = tmp_path / "vol"
    (real / "d" / "e").mkdir(parents=True)
    (real / "d" / "e" / "a name\nwith a newline").write_text("x")
    (real / "l").symlink_to("nowhere")
    pruned = real / "re[po]*"   # a name find would take as a pattern
    (pruned / "snapshot").mkdir(parents=True)
    (real / "rep-x").mkdir()     # which that pattern, unescaped, would prune too
    root = tmp_path / "link"     # a root reached through a symlink
    root.symlink_to(real)
    listed = held_now(root, (), [pruned, tmp_path / "elsewhere", real]).entries()
    assert set(listed) == {b"", b"d", b"d/e", b"d/e/a name\nwith a newline", b"l", b"rep-x"}
    assert listed == {p: held(os.lstat(os.path.join(real, os.fsdecode(p)))) for p in listed}


def test_a_name_that_is_not_utf8_makes_it_decline(tmp_path):
    as_listed_now(tmp_path)
    (tmp_path / os.fsdecode(b"caf\xe9")).write_text("x")
    assert held_now(tmp_path, (), []) is None


def test_what_changed_since_the_listing_is_left_out_and_what_it_still_shows_is_kept(tmp_path):
    for name in ("kept", "rewritten", "chmodded", "removed-since"):
        (tmp_path / name).write_text("one")
    (tmp_path / "chmodded").chmod(0o600)
    listed = as_listed_now(tmp_path)
    (tmp_path / "made-since").write_text("new")
    (tmp_path / "removed-since").unlink()
    os.replace(tmp_path / "made-since", tmp_path / "rewritten")        # another inode now
    (tmp_path / "chmodded").write_text("two")                          # its ctime moves, its mode stays
    (tmp_path / "late").write_text("late")
    changes = [
        Change(b"kept", "changed", frozenset({"content"})),             # as listed: kept whole
        Change(b"rewritten", "changed", frozenset({"content", "mode"})),  # mode 0644 then and now
        Change(b"chmodded", "changed", frozenset({"mode", "content"})),  # its mode is still the listed one
        Change(b"removed-since", "removed"),                            # listed, gone since: the services'
        Change(b"never", "removed"),                                    # not there when listed: the rollback's
        Change(b"late", "added"),                                       # made since: the services'
        Change(b"kept", "added"),                                       # there when listed: the rollback's
    ]
    kept, left_out = _as_listed(tmp_path, changes, listed)
    assert kept == [changes[0], Change(b"rewritten", "changed", frozenset({"mode"})),
                    Change(b"chmodded", "changed", frozenset({"mode"})), changes[4], changes[6]]
    assert left_out == 4
