"""Trees with everything a restore must keep (modes, owners, xattrs, ACLs, hardlinks,
symlinks, sparse files, fifos, hostile names), and a fingerprint of a whole tree to
compare copies and to prove that a command changed nothing."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import Workspace, loop_mount

HOSTILE = [b"new\nline", b"caf\xe9-latin1", b"-rf", b"--delete", b"back\\slash", b" lead space", b"x" * 255]
SPARSE_SIZE = 8 << 20


def acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    """The kernel's binary form of a POSIX ACL (system.posix_acl_access): version 2,
    then (tag, permissions, id) per entry; setfacl writes the same bytes."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


# USER_OBJ rw-, USER 4321 r--, GROUP_OBJ r--, MASK r--, OTHER ---
ACL = acl_xattr([(0x01, 6, 0xFFFFFFFF), (0x02, 4, 4321), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                 (0x20, 0, 0xFFFFFFFF)])


def rich_tree(root: Path) -> None:
    """Every kind of entry and attribute, below `root` (which exists)."""
    (root / "docs").mkdir()
    (root / "docs" / "report.txt").write_bytes(b"quarterly figures\n")
    os.chown(root / "docs" / "report.txt", 1234, 5678)
    os.chmod(root / "docs" / "report.txt", 0o640)
    os.setxattr(root / "docs" / "report.txt", "user.origin", b"scanner-3")
    (root / "docs" / "acl.txt").write_bytes(b"shared with 4321\n")
    os.setxattr(root / "docs" / "acl.txt", "system.posix_acl_access", ACL)
    (root / "docs" / "private").mkdir(mode=0o700)
    os.chmod(root / "docs" / "private", 0o2750)
    os.chown(root / "docs" / "private", 0, 5678)
    (root / "docs" / "private" / "key").write_bytes(b"secret")
    os.chmod(root / "docs" / "private" / "key", 0o600)
    (root / "links").mkdir()
    (root / "links" / "one").write_bytes(b"the same inode\n")
    os.link(root / "links" / "one", root / "links" / "two")
    os.symlink("one", root / "links" / "relative")
    os.symlink("/nonexistent/target", root / "links" / "dangling")
    os.mkfifo(root / "links" / "fifo")
    with open(root / "sparse.img", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE // 2)
        f.write(b"middle")
    os.utime(root / "docs" / "report.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    hostile = os.fsencode(root / "hostile")
    os.mkdir(hostile)
    for name in HOSTILE:
        with open(hostile + b"/" + name, "wb") as f:
            f.write(name)


def fingerprint(root: Path) -> dict[bytes, tuple]:
    """Relative path -> every property a restore keeps, hardlinks as the first path of
    their inode. Symlinks are not followed."""
    base = os.fsencode(root)
    found: dict[bytes, tuple] = {}
    inodes: dict[int, bytes] = {}
    for directory, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(dirs + files):
            path = directory + b"/" + name
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(os.fsdecode(path)).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in os.listxattr(path, follow_symlinks=False)))
            link = inodes.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
            # A directory's size depends on the filesystem, its mtime on what was done inside.
            size, mtime = (None, None) if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns)
            found[rel] = (st.st_mode, st.st_uid, st.st_gid, size, mtime, content, xattrs, link)
    return found


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(params=["rsync", "btrfs"])
def volume(request, tmp_path) -> tuple[Workspace, Path]:
    """A workspace with one volume `data` of each backend, and where its live files are.
    Its snapshots get no manifests (a test that wants them records them): what is read
    from the snapshots themselves is what most tests check."""
    ws = Workspace(tmp_path)
    if request.param == "rsync":
        ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo,
                                  "exclude": ["/cache/"], "retention": "default", "manifest": "off",
                                  # so that a rewrite keeping size and mtime is in the snapshot too
                                  "checksum": True}})
        yield ws, ws.source
        return
    with loop_mount(tmp_path, "btrfs") as mnt:
        subprocess.run(["btrfs", "subvolume", "create", mnt / "data"], check=True, capture_output=True)
        ws.write_config({"data": {"backend": "btrfs", "subvolume": mnt / "data", "snapshot_dir": mnt / "snaps",
                                  "retention": "default", "manifest": "off"}})
        yield ws, mnt / "data"


def snapshot(ws: Workspace, *tags: str) -> str:
    args = [arg for tag in tags for arg in ("--tag", tag)]
    return ws.ok("--json", "snapshot", *args, "data").json()["results"][0]["created"]["id"]
