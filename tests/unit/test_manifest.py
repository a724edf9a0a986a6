"""Manifests: the walk, hashing, reuse rules, the file format and compare, on real trees
in a temporary directory (the hashes are checked against b3sum and sha256sum)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from snapmgr import manifest
from snapmgr.manifest import Change, Entry, ManifestDamaged, ScanError, ScanStats, compare, scan
from snapmgr.manifest import hashing
from snapmgr.manifest import xattrs


SID = "data@20261121T140501Z"


def tree(root: Path) -> Path:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "a.txt").write_text("alpha\n")
    (root / "b.bin").write_bytes(os.urandom(100_000))
    (root / "empty").write_bytes(b"")
    os.symlink("dir/sub/a.txt", root / "link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "b.bin", "user.note", b"kept")
    return root


def entries(root: Path, algorithm="blake3", **kw) -> list[Entry]:
    return list(scan(root, algorithm, **kw))


def test_walk_order_is_sorted_by_components_with_each_directory_first(tmp_path):
    for name in ["a-b", "a/z", "a/b/c", "a.x", "b"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    paths = [e.path for e in entries(tmp_path, None)]
    assert paths == [b"", b"a", b"a/b", b"a/b/c", b"a/z", b"a-b", b"a.x", b"b"]
    assert paths == sorted(paths, key=manifest.walk_key)


def test_kinds_targets_xattrs_and_hashes_are_recorded(tmp_path):
    root = tree(tmp_path)
    found = {e.path: e for e in entries(root)}
    assert {p: e.kind for p, e in found.items()} == {
        b"": "d", b"dir": "d", b"dir/sub": "d", b"dir/sub/a.txt": "f", b"b.bin": "f", b"empty": "f",
        b"link": "l", b"fifo": "p"}
    assert found[b"link"].target == b"dir/sub/a.txt" and found[b"link"].digest is None
    assert found[b"b.bin"].xattrs is not None and found[b"empty"].xattrs is None
    b3 = subprocess.run(["b3sum", "--no-names", root / "b.bin", root / "empty"], capture_output=True, text=True,
                        check=True).stdout.split()
    assert [found[b"b.bin"].digest, found[b"empty"].digest] == b3
    st = os.lstat(root / "b.bin")
    assert (found[b"b.bin"].size, found[b"b.bin"].mtime_ns, found[b"b.bin"].ino) == (st.st_size, st.st_mtime_ns,
                                                                                      st.st_ino)


@pytest.mark.parametrize("size", [0, 1, hashing.READ_SIZE + 7, hashing.LARGE + 3])
@pytest.mark.parametrize("algorithm,tool", [("blake3", "b3sum"), ("sha256", "sha256sum")])
def test_hash_file_matches_the_standard_tools(tmp_path, size, algorithm, tool):
    f = tmp_path / "f"
    f.write_bytes(os.urandom(size))
    expected = subprocess.run([tool, f], capture_output=True, text=True, check=True).stdout.split()[0]
    assert manifest.hash_file(f, algorithm) == expected
    [digest] = hashing.hash_many([(os.fsencode(f), size)], algorithm)
    assert digest == expected


def test_many_files_are_hashed_in_parallel_batches_in_order(tmp_path):
    files = []
    for i in range(hashing.BATCH_FILES * 3 + 5):
        p = tmp_path / f"f{i}"
        p.write_bytes(str(i).encode() * (i % 50))
        files.append((os.fsencode(p), p.stat().st_size))
    digests = hashing.hash_many(files, "sha256", workers=2)
    assert digests == [hashlib.sha256(Path(os.fsdecode(p)).read_bytes()).hexdigest() for p, _ in files]


def test_a_vanished_file_is_unreadable_with_its_reason(tmp_path):
    [why] = hashing.hash_many([(os.fsencode(tmp_path / "missing"), 1)], "blake3")
    assert isinstance(why, hashing.Unreadable) and "No such file" in why.reason


KILLED_WORKER_SCAN = """
import multiprocessing, os, signal, sys, threading, time
from snapmgr.manifest import ScanError, scan

def kill_a_worker():
    while not multiprocessing.active_children():
        time.sleep(0.001)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

threading.Thread(target=kill_a_worker, daemon=True).start()
try:
    list(scan(sys.argv[1], "sha256"))
except ScanError as e:
    print("ScanError:", e)
"""


def test_a_killed_hashing_process_is_a_scan_error_not_a_hang(tmp_path):
    for i in range(hashing.BATCH_FILES * 12):
        (tmp_path / f"f{i:05d}").write_bytes(os.urandom(20000))
    # The timeout only guards the test run from the hang it tests for.
    out = subprocess.run([sys.executable, "-c", KILLED_WORKER_SCAN, tmp_path], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(Path(manifest.__file__).parents[2])})
    assert out.stdout == "ScanError: a hashing process died (killed, or out of memory?)\n", out.stderr


STOPPED_WITH_BATCHES_QUEUED = """
import os, sys
from snapmgr.manifest import hashing
# Opening a fifo waits for a writer: the workers stay busy and the batches queue up, each
# far bigger than a pipe holds.
fifo = os.path.join(sys.argv[1], "x" * 200 + "/" + "fifo")
try:
    with hashing.Hashing("sha256", workers=2) as h:
        for i in range(hashing.BATCH_FILES * 2 * hashing.IN_FLIGHT):
            h.add(i, os.fsencode(os.path.dirname(fifo) + "/" * 1000 + "fifo"), 1)
        raise KeyboardInterrupt   # Ctrl-C, SIGTERM: stopped with every worker busy
except KeyboardInterrupt:
    print("stopped")
"""


def test_stopping_with_batches_queued_for_busy_workers_does_not_hang(tmp_path):
    (tmp_path / ("x" * 200)).mkdir()
    os.mkfifo(tmp_path / ("x" * 200) / "fifo")
    # The timeout only guards the test run from the hang it tests for (CPython gh-94777:
    # a queue's feeder thread blocked on a full pipe no live process reads).
    out = subprocess.run([sys.executable, "-c", STOPPED_WITH_BATCHES_QUEUED, tmp_path], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(manifest.__file__).parents[2])})
    assert (out.returncode, out.stdout) == (0, "stopped\n"), out.stderr


def test_the_walk_waits_when_the_workers_have_enough_batches(tmp_path, monkeypatch):
    files = []
    for i in range(hashing.BATCH_FILES * 24):
        p = tmp_path / f"f{i:05d}"
        p.write_bytes(b"x" * 10000)
        files.append((os.fsencode(p), 10000))
    most = 0
    submit = hashing.ProcessPoolExecutor.submit

    def counting_submit(pool, *args):   # a spy: the real pool does the work
        nonlocal most
        future = submit(pool, *args)
        most = max(most, sum(1 for f in pending if not f.done()) + 1)
        pending.append(future)
        return future

    pending = []
    monkeypatch.setattr(hashing.ProcessPoolExecutor, "submit", counting_submit)
    with hashing.Hashing("sha256", workers=2) as h:
        for i, (path, size) in enumerate(files):
            h.add(i, path, size)   # results not taken meanwhile: a walk far ahead of the hashing
        assert len(list(h.results())) == len(files)
    assert 0 < most <= 2 * hashing.IN_FLIGHT


UNPRIVILEGED_SCAN = """
import sys
from snapmgr.manifest import ScanError, ScanStats, scan
try:
    list(scan(sys.argv[1], "blake3"))
except ScanError as e:
    print("strict:", e)
stats = ScanStats()
found = [e.path for e in scan(sys.argv[1], "blake3", strict=False, stats=stats)]
print("lenient:", found, stats.unreadable)
"""


def test_what_cannot_be_read_stops_a_strict_scan_and_is_listed_by_a_lenient_one(tmp_path):
    # Root reads everything: the scan runs as nobody, in a tree nobody may partly read.
    root = Path(tempfile.mkdtemp(prefix="manifest-"))
    try:
        root.chmod(0o755)
        (root / "open.txt").write_text("x")
        (root / "secret.txt").write_text("y")
        (root / "secret.txt").chmod(0o600)
        (root / "closed").mkdir(mode=0o700)
        out = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", UNPRIVILEGED_SCAN, root],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(Path(manifest.__file__).parents[2])}).stdout
    finally:
        shutil.rmtree(root)
    assert "strict: '/closed' cannot be read: Permission denied" in out
    assert "lenient: [b'', b'closed', b'open.txt', b'secret.txt'] [(b'closed', 'Permission denied'), " \
           "(b'secret.txt', 'Permission denied')]" in out


def test_unknown_algorithm_is_one_clear_error(tmp_path):
    with pytest.raises(manifest.hashing.SnapmgrError, match="unknown hash algorithm 'md5'"):
        entries(tmp_path, "md5")


# Reuse --------------------------------------------------------------------------------

def test_unchanged_files_reuse_their_hashes_and_written_ones_are_hashed(tmp_path):
    root = tree(tmp_path / "t")
    first = entries(root)
    (root / "dir" / "sub" / "a.txt").write_text("beta\n")
    stats = ScanStats()
    second = entries(root, previous=first, stats=stats)
    assert (stats.hashed, stats.reused) == (1, 2)
    assert [c.path for c in compare(first, second) if "content" in c.what] == [b"dir/sub/a.txt"]
    assert second == entries(root)  # reuse gives what hashing all would


def test_a_changed_ctime_forbids_reuse_unless_the_snapshots_share_inodes(tmp_path):
    root = tree(tmp_path / "t")
    first = entries(root)
    os.link(root / "b.bin", tmp_path / "hardlink")   # what rsync --link-dest does: ctime moves
    assert os.lstat(root / "b.bin").st_ctime_ns != next(e for e in first if e.path == b"b.bin").ctime_ns
    strict, shared = ScanStats(), ScanStats()
    entries(root, previous=first, stats=strict)
    entries(root, previous=first, stats=shared, shares_inodes=True)
    assert (strict.hashed, strict.reused) == (1, 2)
    assert (shared.hashed, shared.reused) == (0, 3)


def test_xattrs_set_in_place_on_a_shared_inode_are_read_again(tmp_path):
    root = tree(tmp_path / "t")
    first = entries(root)
    a = root / "dir" / "sub" / "a.txt"
    os.setxattr(a, "user.note", b"set in the repository, in place")
    [found] = [e for e in entries(root, previous=first, shares_inodes=True) if e.path == b"dir/sub/a.txt"]
    assert found.xattrs is not None and found.xattrs == xattrs.of_path(os.fsencode(a))


def test_a_new_inode_at_the_same_path_is_hashed_even_with_the_same_size_and_mtime(tmp_path):
    root = tree(tmp_path / "t")
    first = entries(root)
    a = root / "dir" / "sub" / "a.txt"
    st = a.stat()
    a.rename(tmp_path / "old")   # keeps the old inode alive, so the number is not reused
    a.write_text("gamma\n")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    stats = ScanStats()
    second = entries(root, previous=first, stats=stats, shares_inodes=True)
    assert stats.hashed == 1
    assert {c.path: c.what for c in compare(first, second)}[b"dir/sub/a.txt"] >= {"content"}


# Compare ---------------------------------------------------------------------------------

def E(path: bytes, kind="f", **kw) -> Entry:
    fields = dict(mode=0o644, uid=0, gid=0, size=1, mtime_ns=1, ino=1, ctime_ns=1, nlink=1, rdev=0, target=None,
                  xattrs=None, digest="00")
    return Entry(path, kind, **(fields | kw))


def test_compare_reports_added_removed_and_what_changed_in_walk_order():
    old = [E(b"", "d"), E(b"a", "d"), E(b"a/x"), E(b"b", digest="11"), E(b"c"), E(b"d", mode=0o600, uid=1)]
    new = [E(b"", "d"), E(b"a", "d"), E(b"a/y"), E(b"b", digest="22"), E(b"c", "l", target=b"x"),
           E(b"d", mode=0o644, uid=2, gid=3, mtime_ns=5, xattrs="ab")]
    assert list(compare(old, new)) == [
        Change(b"a/x", "removed"), Change(b"a/y", "added"), Change(b"b", "changed", frozenset({"content"})),
        Change(b"c", "changed", frozenset({"type"})),
        Change(b"d", "changed", frozenset({"mode", "owner", "group", "mtime", "xattrs"}))]
    assert list(compare(new, new)) == []
    assert list(compare([], new)) == [Change(e.path, "added") for e in new]


def test_compare_merges_by_components_not_by_bytes():
    # b"a-b" < b"a/b" as bytes, but a's contents come before a-b in walk order.
    old = [E(b"a", "d"), E(b"a/b"), E(b"a-b")]
    assert list(compare(old, old)) == []
    assert list(compare(old, [E(b"a", "d"), E(b"a-b")])) == [Change(b"a/b", "removed")]


# The stored file ---------------------------------------------------------------------------

def test_save_and_load_round_trip_with_lookup(tmp_path):
    root = tree(tmp_path / "t")
    original = entries(root)
    assert manifest.save(tmp_path / "records", SID, "blake3", original) == len(original)
    stored = manifest.load(tmp_path / "records", SID)
    assert stored.algorithm == "blake3" and stored.snapshot == SID
    assert list(stored.entries()) == original
    assert stored.lookup(b"link").target == b"dir/sub/a.txt" and stored.lookup(b"nope") is None
    assert manifest.load(tmp_path / "records", "data@20261121T140502Z") is None
    manifest.delete(tmp_path / "records", SID)
    assert manifest.load(tmp_path / "records", SID) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop-end", "wrong-count"])
def test_a_damaged_manifest_is_reported_never_half_read(tmp_path, damage):
    root = tree(tmp_path / "t")
    manifest.save(tmp_path, SID, "sha256", entries(root, "sha256"))
    path = manifest.manifest_path(tmp_path, SID)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "garbage":
        path.write_bytes(b"\x1f\x8b" + os.urandom(200))
    elif damage == "drop-end":
        path.write_bytes(gzip.compress(b"".join(lines[:-1])))
    else:
        path.write_bytes(gzip.compress(b"".join(lines[:-2] + lines[-1:])))
    with pytest.raises(ManifestDamaged, match="manifest"):
        stored = manifest.load(tmp_path, SID)
        list(stored.entries())


def test_a_failed_write_leaves_no_manifest_and_no_temporary(tmp_path):
    def broken():
        yield E(b"")
        raise OSError(5, "Input/output error")
    with pytest.raises(OSError):
        manifest.save(tmp_path, SID, "blake3", broken())
    assert list(tmp_path.iterdir()) == []


def test_a_walk_without_hashes_takes_none_from_the_previous_manifest(tmp_path):
    root = tree(tmp_path / "t")
    stats = ScanStats()
    walked = entries(root, None, previous=entries(root), stats=stats)
    assert all(e.digest is None for e in walked) and (stats.hashed, stats.reused) == (0, 0)
    assert next(e for e in walked if e.path == b"b.bin").xattrs is not None


def test_a_stream_gives_the_entries_of_a_scan_as_their_hashes_come(tmp_path):
    root = tmp_path / "t"
    for i in range(hashing.BATCH_FILES * 4):
        (root / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 7}" / f"f{i}").write_bytes(str(i).encode() * 100)
    stats = ScanStats()
    streamed = manifest.stream(root, "sha256", stats=stats)
    first = next(streamed)
    assert first.path == b"" and stats.entries == 0      # nothing is complete yet
    assert [first, *streamed] == entries(root, "sha256")
    assert (stats.entries, stats.hashed) == (hashing.BATCH_FILES * 4 + 8, hashing.BATCH_FILES * 4)


SAVE_ONE = """
import sys
from pathlib import Path
from snapmgr import manifest
manifest.save(Path(sys.argv[1]), "v@20260101T000000Z", "blake3", manifest.scan(sys.argv[1], "blake3"))
"""


def test_the_directory_is_synced_after_the_manifest_is_renamed_into_place(tmp_path):
    # A power cut can undo a rename whose directory was not synced: strace shows the order.
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-o", trace, "-e", "trace=openat,rename,renameat,renameat2,fsync",
                    sys.executable, "-c", SAVE_ONE, tmp_path], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path(manifest.__file__).parents[2])})
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines() if " " in line]
    renamed = next(i for i, c in enumerate(calls) if c.startswith("rename") and ".manifest.gz.tmp" in c)
    opened = next(c for c in calls[renamed:] if c.startswith("openat") and f'"{tmp_path}"' in c and "O_DIRECTORY" in c)
    fd = opened.rsplit("= ", 1)[1]
    assert f"fsync({fd})" in " ".join(calls[calls.index(opened):])


def test_the_walk_module_is_not_shadowed_by_the_scan_function():
    import importlib
    walk = importlib.import_module("snapmgr.manifest.walk")
    assert manifest.scan is walk.scan and manifest.walk is walk   # the module reachable under its own name


def _leaf_entries(directory_fd: int) -> None:
    """A file with an xattr, a symlink with one of its own (trusted.*: root), a fifo."""
    w = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=directory_fd)
    os.write(w, b"deep" * 50000)
    os.setxattr(w, "user.note", b"on the file")
    os.close(w)
    os.symlink(b"leaf", b"link", dir_fd=directory_fd)
    link = os.open(b"link", os.O_PATH | os.O_NOFOLLOW, dir_fd=directory_fd)
    os.setxattr(f"/proc/self/fd/{link}", "trusted.note", b"on the link")
    os.close(link)
    os.mkfifo(b"fifo", dir_fd=directory_fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set a trusted.* xattr on a symlink")
def test_a_tree_deeper_than_path_max_is_walked_hashed_and_its_xattrs_read(tmp_path):
    # btrfs, ZFS and LVM snapshots can hold such trees: every path of it is longer than
    # the kernel takes, so it is only reached a directory at a time.
    deep, shallow = tmp_path / "deep", tmp_path / "shallow"
    deep.mkdir()
    shallow.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    for i in range(20):   # 20 names of 250 bytes: 5 KB of path
        name = b"%03d" % i + b"d" * 247
        os.mkdir(name, dir_fd=fd)
        fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    _leaf_entries(fd)
    os.close(fd)
    fd = os.open(shallow, os.O_RDONLY)
    _leaf_entries(fd)
    os.close(fd)
    found = entries(deep)
    assert len(found) == 24 and len(found[-1].path) > 4096
    wanted = {e.path: e for e in entries(shallow)}
    for e in found[-3:]:
        name = e.path.rsplit(b"/", 1)[1]
        assert (e.kind, e.digest, e.xattrs, e.target) == \
            (wanted[name].kind, wanted[name].digest, wanted[name].xattrs, wanted[name].target)
    assert wanted[b"leaf"].xattrs != wanted[b"link"].xattrs is not None   # the link's own, not its target's
