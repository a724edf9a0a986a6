"""`snapmgr mount` / `umount`: real FUSE mounts of real rsync and btrfs snapshots, read
through the kernel by root and by an unprivileged user."""

from __future__ import annotations

import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.helpers import make_tree, needs_root, pids_of, tree, wait_for

pytestmark = needs_root
FSTYPE = "fuse.snapmgr"


def mounted_type(path: Path) -> str | None:
    """The type of the topmost mount at `path`, from /proc/self/mountinfo (bytes: a
    mount point may have any name)."""
    found = None
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        fields, _, rest = line.partition(b" - ")
        if fields.split(b" ")[4] == os.fsencode(path):
            found = rest.split(b" ")[0].decode()
    return found


def serving(path: Path) -> bool:
    """Whether a live snapmgr mount is at `path` (a stale one answers ENOTCONN)."""
    try:
        os.listdir(path)
    except OSError as e:
        assert e.errno == errno.ENOTCONN, e
        return False
    return mounted_type(path) == FSTYPE


@contextmanager
def mount(ws, mountpoint: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`snapmgr mount` in the foreground, ready when this yields; stopped, and the
    mount gone, afterwards whatever the test did. Its stderr is then `proc.log`."""
    with served(ws.start("mount", str(mountpoint), *args), mountpoint) as proc:
        yield proc


@contextmanager
def counting_mount(ws, mountpoint: Path, log: Path) -> Iterator[subprocess.Popen]:
    """As mount(), with --allow-other, its volumes entered lazily and each entry counted
    in `log` (tests.integration.counting_mount)."""
    argv = [sys.executable, "-m", "tests.integration.counting_mount", str(ws.config), str(mountpoint), str(log)]
    with served(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ws.env),
                mountpoint) as proc:
        yield proc


@contextmanager
def served(proc: subprocess.Popen, mountpoint: Path) -> Iterator[subprocess.Popen]:
    try:
        wait_for(lambda: serving(mountpoint) or proc.poll() is not None, what="the mount")
        assert proc.poll() is None, proc.communicate()[1]
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if mounted_type(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint])
        proc.log = proc.communicate()[1]
    assert mounted_type(mountpoint) is None


def reachable_dir() -> Path:
    """A directory other users can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="snapmgr-mnt-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def mnt() -> Iterator[Path]:
    path = reachable_dir()
    yield path
    path.rmdir()


@contextmanager
def reachable(directory: Path) -> Iterator[Path]:
    """`directory` bind-mounted where other users can reach it: its own modes decide."""
    path = reachable_dir()
    subprocess.run(["mount", "--bind", directory, path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        path.rmdir()


def snapshot(ws, *args: str) -> str:
    return ws.ok("--json", "snapshot", *args).json()["results"][0]["created"]["id"]


def label(snapshot_id: str) -> str:
    return snapshot_id.partition("@")[2]


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapmgr: error: "), stderr
    return lines[0]


# The tree ---------------------------------------------------------------------------------

def test_layout_labels_latest_and_tags(ws, mnt):
    make_tree(ws.source, files=20)
    first = snapshot(ws, "--tag", "daily")
    second = snapshot(ws, "--tag", "daily", "--tag", "weekly")
    with mount(ws, mnt):
        assert sorted(os.listdir(mnt)) == ["data"]
        assert sorted(os.listdir(mnt / "data")) == sorted([".by-tag", "latest", label(first), label(second)])
        assert os.readlink(mnt / "data" / "latest") == label(second)
        assert sorted(os.listdir(mnt / "data" / ".by-tag")) == ["daily", "weekly"]
        assert sorted(os.listdir(mnt / "data" / ".by-tag" / "daily")) == sorted([label(first), label(second)])
        assert os.readlink(mnt / "data" / ".by-tag" / "weekly" / label(second)) == f"../../{label(second)}"
        for sid in (first, second):
            assert tree(mnt / "data" / label(sid)) == tree(ws.repo / sid)
        assert tree(mnt / "data" / "latest") == tree(ws.repo / second)
        assert tree(mnt / "data" / ".by-tag" / "weekly" / label(second)) == tree(ws.repo / second)


def test_new_snapshots_appear_and_deleted_ones_vanish_while_mounted(ws, mnt):
    make_tree(ws.source, files=5)
    first = snapshot(ws)
    with mount(ws, mnt):
        assert (mnt / "data" / label(first) / "d0").is_dir()
        (ws.source / "d0" / "new").write_text("new")
        second = snapshot(ws, "--tag", "hourly")
        wait_for(lambda: os.path.exists(mnt / "data" / label(second) / "d0" / "new"), what="the new snapshot")
        wait_for(lambda: os.readlink(mnt / "data" / "latest") == label(second), what="latest to move")
        assert os.listdir(mnt / "data" / ".by-tag" / "hourly") == [label(second)]
        ws.ok("delete", second)
        wait_for(lambda: not os.path.exists(mnt / "data" / label(second)), what="the deleted snapshot to vanish")
        assert label(second) not in os.listdir(mnt / "data")
        assert os.readlink(mnt / "data" / "latest") == label(first)
        # The kernel may keep the tag's directory entry for its TOP_TIMEOUT (1s).
        wait_for(lambda: not (mnt / "data" / ".by-tag" / "hourly").exists(), what="the empty tag to vanish")


def test_a_volume_without_snapshots_has_no_latest(ws, mnt):
    with mount(ws, mnt):
        assert os.listdir(mnt / "data") == [".by-tag"]


# Read-only ---------------------------------------------------------------------------------

def _write_attempts(d: Path) -> dict:
    f, sub = d / "d0" / "f0000", d / "d0"
    return {
        "open for writing": lambda: open(f, "r+b"),
        "open with O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        "create": lambda: open(d / "new", "xb"),
        "mkdir": lambda: os.mkdir(d / "newdir"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(sub),
        "rename": lambda: os.rename(f, sub / "moved"),
        "symlink": lambda: os.symlink("x", d / "link"),
        "link": lambda: os.link(f, d / "hard"),
        "mknod": lambda: os.mkfifo(d / "fifo"),
        "chmod": lambda: os.chmod(f, 0o777),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, (0, 0)),
        "truncate": lambda: os.truncate(f, 0),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.kept"),
    }


def test_every_change_is_refused_with_erofs(ws, mnt):
    make_tree(ws.source, files=5)
    os.setxattr(ws.source / "d0" / "f0000", "user.kept", b"1")
    sid = snapshot(ws)
    before = tree(ws.repo / sid)
    with mount(ws, mnt):
        for where in (mnt / "data" / label(sid), mnt / "data" / "latest"):
            for what, attempt in _write_attempts(where).items():
                with pytest.raises(OSError) as e:
                    attempt()
                assert e.value.errno == errno.EROFS, f"{what}: {e.value}"
        for what, attempt in {"mkdir at the top": lambda: os.mkdir(mnt / "new"),
                              "rename a label": lambda: os.rename(mnt / "data" / label(sid), mnt / "data" / "x"),
                              "remove latest": lambda: os.unlink(mnt / "data" / "latest")}.items():
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS, f"{what}: {e.value}"
    assert tree(ws.repo / sid) == before
    assert os.getxattr(ws.repo / sid / "d0" / "f0000", "user.kept") == b"1"


# Permissions --------------------------------------------------------------------------------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def set_acl(path: Path, owner: int, named_user: tuple[int, int], group: int, mask: int, other: int) -> None:
    """Give `path` an access ACL (what setfacl writes): owner, one named user (uid, perm),
    owning group, mask, other; perms as rwx bits."""
    entries = [(ACL_USER_OBJ, owner, NO_ID), (ACL_USER, named_user[1], named_user[0]),
               (ACL_GROUP_OBJ, group, NO_ID), (ACL_MASK, mask, NO_ID), (ACL_OTHER, other, NO_ID)]
    os.setxattr(path, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))


def as_nobody(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *map(str, argv)], capture_output=True, text=True)


@pytest.fixture
def guarded(ws):
    """A snapshot whose files each say who may read them."""
    nobody = 65534
    s = ws.source
    s.chmod(0o755)
    (s / "public").write_text("public")
    (s / "public").chmod(0o644)
    os.setxattr(s / "public", "user.note", b"for everyone")
    os.setxattr(s / "public", "trusted.hidden", b"for root")
    (s / "root-only").write_text("secret")
    (s / "root-only").chmod(0o600)
    (s / "nobodys").write_text("nobody's own")
    (s / "nobodys").chmod(0o600)
    os.chown(s / "nobodys", nobody, nobody)
    (s / "granted").write_text("granted by an ACL")
    (s / "granted").chmod(0o600)
    set_acl(s / "granted", owner=6, named_user=(nobody, 4), group=0, mask=4, other=0)
    (s / "denied").write_text("denied by an ACL")
    set_acl(s / "denied", owner=6, named_user=(nobody, 0), group=4, mask=4, other=4)
    (s / "closed").mkdir(mode=0o700)
    (s / "closed" / "inside").write_text("readable, behind a closed directory")
    (s / "closed" / "inside").chmod(0o644)
    return label(snapshot(ws))


def test_only_root_sees_the_mount_by_default(ws, mnt, guarded):
    with mount(ws, mnt):
        assert (mnt / "data" / guarded / "root-only").read_text() == "secret"
        r = as_nobody("cat", mnt / "data" / guarded / "public")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        assert as_nobody("ls", mnt).returncode != 0


def test_allow_other_enforces_the_snapshots_own_modes_owners_and_acls(ws, mnt, guarded):
    with reachable(ws.repo / f"data@{guarded}") as snap, mount(ws, mnt, "--allow-other"):
        via = mnt / "data" / guarded
        expected = {"public": True, "root-only": False, "nobodys": True, "granted": True, "denied": False,
                    "closed/inside": False}
        for name, readable in expected.items():
            # The same user, the same file: through the mount exactly as in the snapshot.
            assert (as_nobody("cat", snap / name).returncode == 0) == readable, f"{name} in the snapshot"
            r = as_nobody("cat", via / name)
            assert (r.returncode == 0) == readable, f"{name} through the mount: {r.stderr}"
            if readable:
                assert r.stdout == (snap / name).read_text()
        assert as_nobody("ls", via / "closed").returncode != 0
        assert as_nobody("ls", mnt / "data").returncode == 0
        # Extended attribute names too: trusted.* are listed to root only, as in the snapshot.
        listed = "import os, sys; print(sorted(os.listxattr(sys.argv[1])))"
        in_snapshot = as_nobody("/usr/bin/python3", "-c", listed, snap / "public")
        assert in_snapshot.stdout == "['user.note']\n", in_snapshot.stderr
        assert as_nobody("/usr/bin/python3", "-c", listed, via / "public").stdout == in_snapshot.stdout
        assert sorted(os.listxattr(via / "public")) == ["trusted.hidden", "user.note"]
        for name in expected:
            assert (as_nobody("cat", mnt / "data" / "latest" / name).returncode == 0) == expected[name]


# Lazy snapshots ---------------------------------------------------------------------------------

def test_listing_a_volume_enters_no_lazy_snapshot_whoever_lists_it(ws, mnt, guarded):
    newer = label(snapshot(ws))
    entered = ws.root / "entered"
    entered.touch()
    with counting_mount(ws, mnt, entered):
        volume = mnt / "data"
        listing = as_nobody("ls", "-A", volume)
        assert sorted(listing.stdout.split()) == sorted([".by-tag", "latest", guarded, newer]), listing.stderr
        placeholders = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(volume)}   # root's `ls -l`
        assert stat.S_IMODE(placeholders[guarded].st_mode) == 0o700
        assert subprocess.run(["ls", "-l", volume], capture_output=True).returncode == 0
        assert entered.read_text() == ""
        # Walking in enters that snapshot and no other, for root as for anyone else: the
        # placeholder the listing showed them does not keep them out.
        assert (volume / newer / "public").read_text() == "public"
        assert entered.read_text().split() == [f"data@{newer}"]
        assert as_nobody("cat", volume / guarded / "public").stdout == "public"
        assert entered.read_text().split() == [f"data@{newer}", f"data@{guarded}"]


# Files as stored -------------------------------------------------------------------------------

def test_xattrs_acls_symlinks_hardlinks_sparse_files_devices_and_fifos_as_stored(ws, mnt):
    s = ws.source
    (s / "plain").write_bytes(b"x" * 5000)
    os.setxattr(s / "plain", "user.colour", b"blue")
    os.setxattr(s / "plain", "user.empty", b"")
    set_acl(s / "plain", owner=6, named_user=(65534, 4), group=4, mask=4, other=0)
    os.symlink("plain", s / "link")
    os.symlink("/nowhere/at/all", s / "dangling")
    os.link(s / "plain", s / "hardlink")
    with open(s / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    os.mknod(s / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(s / "block", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mkfifo(s / "fifo", 0o620)
    os.chown(s / "fifo", 12345, 54321)
    (s / "dir").mkdir(mode=0o750)
    sid = snapshot(ws)
    stored = ws.repo / sid
    fields = ("st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_rdev", "st_blocks", "st_mtime_ns")
    with mount(ws, mnt):
        via = mnt / "data" / label(sid)
        assert sorted(os.listdir(via)) == sorted(os.listdir(stored))
        for name in os.listdir(stored):
            a, b = os.lstat(stored / name), os.lstat(via / name)
            assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}, name
            assert sorted(os.listxattr(via / name, follow_symlinks=False)) == \
                sorted(os.listxattr(stored / name, follow_symlinks=False)), name
            for key in os.listxattr(stored / name, follow_symlinks=False):
                assert os.getxattr(via / name, key, follow_symlinks=False) == \
                    os.getxattr(stored / name, key, follow_symlinks=False), (name, key)
        assert os.readlink(via / "link") == "plain" and os.readlink(via / "dangling") == "/nowhere/at/all"
        assert (via / "link").read_bytes() == b"x" * 5000
        assert os.stat(via / "plain").st_ino == os.stat(via / "hardlink").st_ino
        assert os.stat(via / "plain").st_nlink == 2
        assert os.stat(via / "sparse").st_blocks * 512 < 1 << 20
        with open(via / "sparse", "rb") as f:
            f.seek(32 << 20)
            assert f.read(6) == b"middle"
        with pytest.raises(OSError) as e:
            os.getxattr(via / "plain", "user.missing")
        assert e.value.errno == errno.ENODATA


def test_inode_numbers_are_stable_and_distinct_per_snapshot(ws, mnt):
    make_tree(ws.source, files=10)
    first, second = snapshot(ws), snapshot(ws)
    with mount(ws, mnt):
        paths = [mnt / "data" / label(sid) / "d1" / "f0001" for sid in (first, second)]
        before = [os.stat(p).st_ino for p in paths]
        assert before[0] != before[1]  # one stored file, two snapshots: two files here
        Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets dentries and inodes
        assert [os.stat(p).st_ino for p in paths] == before
        assert os.stat(mnt / "data" / "latest" / "d1" / "f0001").st_ino == before[1]


def test_btrfs_snapshots_are_browsed(ws, mnt, tmp_path):
    image, fs = tmp_path / "btrfs.img", tmp_path / "btrfs"
    fs.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, fs], check=True)
    try:
        subprocess.run(["btrfs", "subvolume", "create", fs / "data"], check=True, capture_output=True)
        make_tree(fs / "data", files=30)
        ws.write_config({"data": {"backend": "btrfs", "subvolume": fs / "data", "snapshot_dir": fs / ".snapshots"}})
        sid = snapshot(ws)
        with mount(ws, mnt):
            assert tree(mnt / "data" / label(sid)) == tree(fs / ".snapshots" / sid)
            assert tree(mnt / "data" / "latest") == tree(fs / "data")
            with pytest.raises(OSError) as e:
                (mnt / "data" / label(sid) / "new").write_text("x")
            assert e.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", fs], check=True)  # the loop device detaches with it


# The mount's life ------------------------------------------------------------------------------

def test_umount_ends_the_mount_process(ws, mnt):
    make_tree(ws.source, files=3)
    snapshot(ws)
    with mount(ws, mnt) as proc:
        assert ws.ok("--json", "umount", str(mnt)).json() == {"unmounted": str(mnt)}
        assert proc.wait(30) == 0
        assert mounted_type(mnt) is None


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3"])
def test_signals_and_fusermount_unmount_cleanly(ws, mnt, how):
    make_tree(ws.source, files=3)
    snapshot(ws)
    with mount(ws, mnt) as proc:
        os.listdir(mnt / "data" / "latest")
        if how == "fusermount3":
            subprocess.run(["fusermount3", "-u", mnt], check=True)
        else:
            proc.send_signal(getattr(signal, how))
        assert proc.wait(30) == 0, proc.stderr.read()
        assert mounted_type(mnt) is None


def test_a_killed_mount_is_cleared_by_the_next(ws, mnt):
    make_tree(ws.source, files=3)
    sid = snapshot(ws)
    killed = ws.start("mount", str(mnt))
    wait_for(lambda: mounted_type(mnt) == FSTYPE, what="the mount")
    killed.kill()
    killed.communicate()
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno == errno.ENOTCONN
    with mount(ws, mnt):
        assert os.listdir(mnt / "data" / label(sid)) == os.listdir(ws.repo / sid)
        mounts = Path("/proc/self/mountinfo").read_text().count(f" {mnt} ")
        assert mounts == 1  # the stale one was cleared, not buried under the new one


def test_a_mount_point_named_in_any_bytes_elsewhere_breaks_nothing(ws, mnt, tmp_path):
    make_tree(ws.source, files=3)
    snapshot(ws)
    odd = os.fsencode(tmp_path) + b"/caf\xe9 \xff"   # not UTF-8, and a space mountinfo escapes
    os.mkdir(odd)
    subprocess.run([b"mount", b"-t", b"tmpfs", b"odd", odd], check=True)
    try:
        with mount(ws, mnt) as proc:
            ws.ok("umount", str(mnt))
            assert proc.wait(30) == 0, proc.stderr.read()
        with mount(ws, mnt) as proc:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, proc.stderr.read()
            assert mounted_type(mnt) is None   # not left stale
    finally:
        subprocess.run([b"umount", odd], check=True)


def test_a_stopped_mount_process_is_cleared_without_hanging(ws, mnt):
    make_tree(ws.source, files=3)
    snapshot(ws)
    with mount(ws, mnt) as proc:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            r = ws.run("mount", str(mnt), timeout=60)
            assert r.returncode == 1 and "does not answer" in one_error_line(r.stderr)
            ws.ok("umount", str(mnt))
            assert mounted_type(mnt) is None
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Its connection aborted, the process ends once it runs again.
        assert proc.wait(30) == 0, proc.stderr.read()


def test_a_dead_mount_of_another_program_is_refused_not_cleared(ws, mnt, tmp_path):
    (tmp_path / "shown").mkdir()
    bindfs = subprocess.Popen(["bindfs", "-f", tmp_path / "shown", mnt])
    try:
        wait_for(lambda: mounted_type(mnt) is not None, what="bindfs")
        bindfs.kill()
        bindfs.wait()
        r = ws.run("mount", str(mnt))
        assert r.returncode == 1 and "already a mount point (fuse" in one_error_line(r.stderr)
        assert mounted_type(mnt) is not None
    finally:
        if bindfs.poll() is None:
            bindfs.kill()
            bindfs.wait()
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=True)


def test_daemon_returns_once_mounted_and_umount_ends_it(ws, mnt):
    make_tree(ws.source, files=3)
    sid = snapshot(ws)
    r = ws.run("mount", "--daemon", str(mnt))
    try:
        assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
        assert mounted_type(mnt) == FSTYPE
        assert sorted(os.listdir(mnt / "data" / "latest")) == sorted(os.listdir(ws.repo / sid))
        daemons = pids_of(Path(sys.executable).name, str(mnt))
        assert len(daemons) == 1
        ws.ok("umount", str(mnt))
        wait_for(lambda: not pids_of(Path(sys.executable).name, str(mnt)), what="the daemon to exit")
    finally:
        if mounted_type(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])


def test_bad_mount_points_and_volumes_get_one_line_errors(ws, mnt, tmp_path):
    cases = [
        (("mount", str(tmp_path / "missing")), 2, "does not exist"),
        (("mount", str(ws.config)), 2, "is not a directory"),
        (("mount", str(ws.root)), 2, "is not empty"),
        (("mount", str(mnt), "nosuch"), 2, "unknown volume 'nosuch'"),
        (("mount", str(mnt), "--idle", "soon"), 2, "--idle"),
        (("umount", str(mnt)), 1, "is not mounted"),
    ]
    for args, code, needle in cases:
        r = ws.run(*args)
        assert r.returncode == code, (args, r.stderr)
        assert needle in one_error_line(r.stderr), args
    subprocess.run(["mount", "-t", "tmpfs", "busy", mnt], check=True)
    try:
        for args, needle in ((("mount", str(mnt)), "already a mount point (tmpfs of 'busy')"),
                             (("umount", str(mnt)), "not snapmgr's")):
            r = ws.run(*args)
            assert r.returncode == 1 and needle in one_error_line(r.stderr), r.stderr
    finally:
        subprocess.run(["umount", mnt], check=True)
    with mount(ws, mnt):
        r = ws.run("mount", str(mnt))
        assert r.returncode == 1 and "already a snapmgr mount" in one_error_line(r.stderr)
