"""An rsync rollback copies only the names where the volume differs from the target,
found by comparing the target with the pre-rollback snapshot taken just before, inode
by inode (snapmgr.backends.linked_trees). On real trees with real rsync, whatever was
changed since the target was taken, the volume ends up as the target holds it (rsync,
comparing contents too, finds nothing to change; the hard links are the same), what the
snapshots leave out is kept as it was, and the listed copy is the one that ran."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from snapmgr import rollback
from snapmgr.backends import linked_trees, rsync_filters
from snapmgr.config import load
from snapmgr.engine import Engine
from snapmgr.errors import SnapmgrError
from snapmgr.model import SnapshotId
from tests.integration.changing_trees import (EXAMPLES, EXCLUDE, Ops, backend_log, differences, left_out, link_groups,
                                              names, ops, signature)
from tests.integration.helpers import toml

TARGET = SnapshotId("data", "20200101T000000Z")
LISTED = "the copy lists the "
WHOLE = "the copy compares the whole tree: "


def engine_of(root: Path, service: bool) -> Engine:
    """An rsync volume on `root`/source, excludes and all; with a service, a command
    quiescer, so the pre-rollback snapshot is copied before its window and brought up to
    date in it, as for a real service."""
    quiesce = {"quiesce.svc": {"kind": "command", "pre": ["true"], "post": ["true"]}} if service else {}
    config = root / "snapmgr.toml"
    config.write_text(toml({"settings": {"state_dir": root / "state", "run_dir": root / "run"},
                            "volumes.data": {"backend": "rsync", "source": root / "source", "repository": root / "repo",
                                             "exclude": EXCLUDE, "quiesce": ["svc"] if service else []},
                            **quiesce}))
    return Engine(load(config))


# Without the explain phase: each of its runs takes a base tree and a second of rsync.
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(operations=ops, service=st.booleans())
def test_the_volume_is_the_target_whatever_changed_since(bases, tmp_path, examples, operations, service):
    root = tmp_path / f"example{next(examples)}"
    root.mkdir()
    source = root / "source"
    bases.take(source)
    engine = engine_of(root, service)
    target = engine.backend(engine.config.volumes["data"]).create(TARGET, frozenset()).path
    changed = Ops(source)
    for op in operations:
        changed.apply(op)
    kept = {path: sign for path, sign in signature(source).items() if left_out(path, sign[0])}

    before = signature(source)
    with backend_log() as log:
        try:
            done = rollback.rollback(engine, str(TARGET), False, lambda plan: True)
        except SnapmgrError as e:
            # The one refusal these operations can call for: a directory holding what the
            # excludes leave out where the target has a file (an exchange).
            assert "which the rollback keeps (the snapshots leave it out)" in str(e)
            assert signature(source) == before
            event("refused")
            return
    note("\n".join(log))

    assert differences(target, source, excluded_kept=True) == []
    among = names(target)
    assert link_groups(target, among) == link_groups(source, among)
    assert {path: sign for path, sign in signature(source).items() if left_out(path, sign[0])} == kept
    assert done.matches, done.check
    listed = [line for line in log if LISTED in line]
    whole = [line.partition(WHOLE)[2] for line in log if WHOLE in line]
    event("listed copy" if listed else "whole-tree copy")
    # The one fallback these operations can call for: most of the tree changed.
    assert listed or (len(whole) == 1 and whole[0].endswith("entries would be listed")), log


def test_two_names_of_one_file_in_the_target_split_since_are_one_file_again(bases, tmp_path):
    """A copy-and-rename editor splits a hard link: one name gets a file of its own, alike
    in all but the inode. The pre-rollback snapshot's --link-dest links it back into the
    target's one inode, so no inode shows the split; the listed copy joins the names again
    all the same, as the whole-tree copy does, because it lists every name of a linked inode."""
    source = tmp_path / "source"
    bases.take(source)   # d0/s0/f0 and d1/s1/linked are one file
    engine = engine_of(tmp_path, service=False)
    target = engine.backend(engine.config.volumes["data"]).create(TARGET, frozenset()).path
    first, linked = source / "d0/s0/f0", source / "d1/s1/linked"
    split = linked.with_name("split")
    shutil.copy2(linked, split)   # contents, mode, times and xattrs (the ACL among them)
    os.chown(split, linked.lstat().st_uid, linked.lstat().st_gid)
    os.replace(split, linked)
    assert first.lstat().st_ino != linked.lstat().st_ino

    with backend_log() as log:
        done = rollback.rollback(engine, str(TARGET), False, lambda plan: True)
    [pre] = [s.path for s in engine.backend(engine.config.volumes["data"]).list() if str(s.id) == done.pre_rollback]
    assert (pre / "d0/s0/f0").lstat().st_ino == (pre / "d1/s1/linked").lstat().st_ino   # no inode shows the split
    assert any(LISTED in line for line in log), log
    assert first.lstat().st_ino == linked.lstat().st_ino
    assert differences(target, source, excluded_kept=True) == [] and done.matches, done.check


def test_the_names_apart_are_where_the_trees_differ_and_all_names_of_a_linked_inode(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for d in ("same", "gone/deep", "moded", "replaced", "logs"):
        (old / d).mkdir(parents=True)
    for f in ("same/f", "same/changed", "gone/deep/f", "replaced/f", "same/linked", "logs/a", "same/x.tmp"):
        (old / f).write_text(f)
    os.link(old / "same/linked", old / "same/other-name")
    for name in ("logs/c", "same/y.tmp"):   # names of it the excludes leave out, never to be listed
        os.link(old / "same/linked", old / name)
    (old / "file-then-dir").write_text("a file")
    subprocess.run(["cp", "-al", old, new], check=True)   # as rsync --link-dest makes the next snapshot: files linked
    (new / "same/changed").unlink()
    (new / "same/changed").write_text("rewritten")
    (new / "same/linked").unlink()
    (new / "same/linked").write_text("its own file now")
    shutil.rmtree(new / "gone")
    shutil.rmtree(new / "replaced")
    (new / "replaced").write_text("a file where a directory was")
    (new / "file-then-dir").unlink()
    (new / "file-then-dir").mkdir()
    (new / "added").mkdir()
    (new / "added/inside").write_text("not listed: the directory goes whole")
    os.chmod(new / "moded", 0o700)
    # Left out, as the volume's excludes and snapmgr's own places are: never listed.
    (new / "logs/a").unlink()
    (new / "logs/b").write_text("b")
    (new / "same/x.tmp").unlink()
    (new / "same/x.tmp").write_text("rewritten")
    (new / "state").mkdir()
    for d in ("", "same", "gone/deep", "moded", "logs"):   # every directory its own, with its times as in old
        if (new / d).is_dir():
            os.utime(new / d, ns=(0, os.stat(old / d).st_mtime_ns))
    left_out = rsync_filters.matcher(["/state/", "logs/", "*.tmp"])

    found = linked_trees.apart(old, new, left_out)
    assert found is not None and found.entries == len(names(old)) - 2   # logs is not looked into
    # The root too: a name in it is listed.
    assert found.names == sorted([b"", b"same/changed", b"same/linked", b"same/other-name", b"gone", b"gone/deep",
                                  b"gone/deep/f", b"replaced", b"replaced/f", b"file-then-dir", b"added", b"moded"])
    # Only deeper names: their directories are rsync's to set back (--relative), the root
    # not listed. Both names of the linked inode still are: a split would not show.
    (new / "same/linked").unlink()
    os.link(old / "same/linked", new / "same/linked")
    for name in ("gone", "replaced", "file-then-dir", "added"):
        subprocess.run(["rm", "-r", new / name], check=False)
        if (old / name).exists():
            subprocess.run(["cp", "-al", old / name, new / name], check=True)
    os.chmod(new / "moded", 0o755)
    for d in ("", "same", "gone", "gone/deep", "replaced", "moded"):
        os.utime(new / d, ns=(0, os.stat(old / d).st_mtime_ns))
    assert linked_trees.apart(old, new, left_out).names == [b"same/changed", b"same/linked", b"same/other-name"]
