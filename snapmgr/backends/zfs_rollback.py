"""Rolling a ZFS volume's datasets back to a snapshot, every snapshot kept.

`zfs rollback` destroys every snapshot newer than its target, and snapmgr's pre-rollback
snapshot is always newer. So each dataset is swapped instead, as zfs-promote(8) shows
(example 1): the target snapshot is cloned as <dataset>.rollback-tmp, the clone promoted
(it takes the target and every older snapshot), the live dataset renamed to
<dataset>.pre-rollback-<label> (with the pre-rollback snapshot and whatever else is newer
than the target) and the clone renamed into its place. The old dataset stays, unmounted
and canmount=noauto, until someone destroys it; its snapmgr snapshots stay the volume's.

Every step is one ZFS transaction, and which of the three names exist tells how far a
rollback went, so one cut short (killed, or failed) is finished by running it again. Only
between the two renames has no dataset the live name. The renames are `zfs rename -u`,
which neither unmounts nor mounts anything: the mounts are taken down first and made
again last."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from snapmgr import sh
from snapmgr.backends import mounts
from snapmgr.backends.zfs import KEPT, TMP, _lzc, _mounted, _zfs_error, beside
from snapmgr.errors import RollbackRefused, SnapmgrError, quote
from snapmgr.signals import signals_held
from snapmgr.writers import users

TIMEOUT = 120
# On a clone: the canmount it is to have once in its place (it is noauto until then, so
# that nothing mounts it at its copied mountpoint meanwhile), and the snapshot it was made
# from (a clone left by a rollback cut short is finished only by a rollback to the same one).
CANMOUNT = "snapmgr:canmount"
ROLLBACK_TO = "snapmgr:rollback-to"
# Local properties a clone cannot be given: it has its origin's (set when a dataset is
# created, or by its encryption root), or gets them otherwise.
NOT_COPIED = frozenset({"canmount", "volsize", "volblocksize", "normalization", "utf8only", "casesensitivity",
                        "encryption", "keyformat", "keylocation", "pbkdf2iters", CANMOUNT, ROLLBACK_TO})


@dataclass(frozen=True)
class Swap:
    """One of the volume's datasets (and, recursive, those below it), rolled back."""

    live: str                 # the dataset, under the name the volume has it
    home: str                 # where the target's snapshot of it is: live, or a dataset a rollback left
    snapshot: str             # the target's snapshot name (after the '@')
    below: tuple[str, ...]    # "" and, for a recursive volume, "/child" of each dataset below home it holds
    label: str                # of the pre-rollback snapshot: names the dataset the live one becomes
    recursive: bool

    @classmethod
    def of(cls, live: str, held: list[str], snapshot: str, label: str, recursive: bool) -> Swap:
        """The swap of dataset `live` for the target, whose snapshots are `held`."""
        datasets = [n.split("@")[0] for n in held]
        home = next(d for d in datasets if beside(live, d))
        below = sorted(d[len(home):] for d in datasets if d == home or d.startswith(home + "/")) if recursive else [""]
        return cls(live, home, snapshot, tuple(below), label, recursive)

    @property
    def tmp(self) -> str:
        return self.live + TMP

    @property
    def kept(self) -> str:
        return kept_name(self.live, self.label)


def kept_name(dataset: str, label: str) -> str:
    return f"{dataset}{KEPT}{label}"


def roll_back(swaps: list[Swap]) -> None:
    """Swap each dataset for a clone of its target snapshot; finish what an earlier call
    began. A step that fails before a dataset's swap is complete puts that dataset back
    (renamed back, mounted again) and raises."""
    lives = [s.live for s in swaps]
    unmounted = _unmount(lives)
    try:
        for s in swaps:
            if not _exists(s.kept):
                _build(s)
        # Ctrl-C or SIGTERM must not come between a dataset's two renames.
        with signals_held():
            for s in swaps:
                if not _exists(s.kept):
                    _rename(s.live, s.kept)
                if _exists(s.tmp):
                    _rename(s.tmp, s.live)
    except SnapmgrError:
        for s in swaps:
            if not _exists(s.live) and _exists(s.kept):
                _rename(s.kept, s.live)
        _mount(lives, unmounted)
        raise
    for s in swaps:
        _settle(s)
    _mount(lives, unmounted)


def _build(s: Swap) -> None:
    """The clone of the target's snapshot of each dataset, promoted."""
    left = _local(s.tmp, ROLLBACK_TO)
    if left is not None and left != s.snapshot:
        raise SnapmgrError(f"{s.tmp} is left from a rollback to {left} that was cut short: finish that one "
                           f"first (snapmgr rollback --resume); nothing was changed")
    for below in s.below:
        clone = s.tmp + below
        if not _exists(clone):
            source = s.live + below if _exists(s.live + below) else s.home + below
            props = {key: value for key, value in _props(source).items() if key not in NOT_COPIED}
            props |= {"canmount": "noauto", CANMOUNT: _value(source, "canmount")}
            if not below:
                props[ROLLBACK_TO] = s.snapshot
            _zfs("clone", *(f"-o{key}={value}" for key, value in props.items()), f"{s.home}{below}@{s.snapshot}",
                 clone)
        _promote(s.live, below, clone)


def _promote(live: str, below: str, clone: str) -> None:
    """Promote the clone until it holds every snapshot of the dataset's own line: the
    target's dataset may itself be a clone a rollback left (of the live one, whose older
    snapshots the new dataset must hold too); an origin outside the volume's datasets (the
    live dataset made as a clone of someone else's) stays where it is."""
    lzc = _lzc()
    while (origin := _value(clone, "origin")) != "-":
        source = origin.split("@")[0]
        if not (source.endswith(below) and beside(live, source[:len(source) - len(below)])):
            return
        try:
            lzc.lzc_promote(clone.encode())
        except lzc.exceptions.ZFSError as e:
            raise _zfs_error(f"zfs promote of {clone} failed", e) from None


def _settle(s: Swap) -> None:
    """After the swap: the new datasets' canmount as the old ones had it, the old one kept
    out of the way (canmount=noauto: its mountpoint may be the live one's), and, for a
    volume that is not recursive, the datasets below the old one (not the volume's) moved
    back below the new one."""
    for below in s.below:
        canmount = _local(s.live + below, CANMOUNT)
        if canmount is not None:
            _zfs("set", f"canmount={canmount}", s.live + below)
    for prop in (CANMOUNT, ROLLBACK_TO):
        _zfs("inherit", "-r", prop, s.live)
    if not s.recursive:
        for child in _tree(s.kept, depth=1)[1:]:
            _rename(child, s.live + child[len(s.kept):])
    for name in _tree(s.kept, kind="filesystem"):
        _zfs("set", "canmount=noauto", name)


# Mounts --------------------------------------------------------------------------------

def _unmount(lives: list[str]) -> list[tuple[str, Path]]:
    """Unmount the datasets below (and at) `lives`, and their snapshots mounted inside them,
    deepest first: (dataset, where) of each unmounted. One that will not go (busy) is an
    error naming who holds it, with the others mounted again."""
    tree = [m for m in mounts.whole_mounts() if m.fstype == "zfs" and _in(m.source.split("@")[0], lives)]
    places = [m.mountpoint for m in tree if "@" not in m.source]
    doomed = [m for m in tree if "@" not in m.source or any(p in m.mountpoint.parents for p in places)]
    done: list[tuple[str, Path]] = []
    for m in sorted(doomed, key=lambda m: len(m.mountpoint.parts), reverse=True):
        result = sh.run(["umount", m.mountpoint], check=False, timeout=TIMEOUT)
        if result.returncode != 0:
            found = users([m.mountpoint])
            holders = found.writers | found.holders
            why = ("it is used by " + ", ".join(f"{quote(name)} (pid {pid})" for pid, name in sorted(holders.items()))
                   if holders else result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "busy")
            _mount(lives, done)
            raise RollbackRefused(f"{m.source} cannot be unmounted from {quote(m.mountpoint)}: {why}; stop it and "
                                  f"roll back again; nothing was changed")
        done.append((m.source, m.mountpoint))
    return done


def _mount(lives: list[str], unmounted: list[tuple[str, Path]]) -> None:
    """Mount the datasets at and below `lives` (parents first) that were mounted before or
    mount by themselves, where their mountpoint says (or, mountpoint=legacy, where they
    were)."""
    mounted, before = _mounted(), dict(unmounted)
    out = _zfs("list", "-H", "-o", "name,canmount,mountpoint", "-t", "filesystem", "-r", *lives)
    for line in out.splitlines():
        name, canmount, mountpoint = line.split("\t")
        if name in mounted or mountpoint == "none" or not (name in before or canmount == "on"):
            continue
        if mountpoint != "legacy":
            _zfs("mount", name)
        elif name in before:
            sh.run(["mount", "-t", "zfs", name, before[name]], timeout=TIMEOUT)


# ZFS -----------------------------------------------------------------------------------

def _zfs(*argv: str) -> str:
    return sh.run(["zfs", *argv], timeout=TIMEOUT).stdout


def _exists(name: str) -> bool:
    return sh.run(["zfs", "list", "-H", "-o", "name", name], check=False, timeout=TIMEOUT).returncode == 0


def _rename(old: str, new: str) -> None:
    _zfs("rename", "-u", old, new)


def _value(name: str, prop: str) -> str:
    return _zfs("get", "-H", "-o", "value", prop, name).rstrip("\n")


def _local(name: str, prop: str) -> str | None:
    """The property's value set on the dataset itself, if it exists and has one."""
    result = sh.run(["zfs", "get", "-H", "-s", "local", "-o", "value", prop, name], check=False, timeout=TIMEOUT)
    if result.returncode != 0:
        return None
    return result.stdout.rstrip("\n") or None


def _props(name: str) -> dict[str, str]:
    """The properties set on the dataset itself, or received."""
    out = _zfs("get", "-H", "-s", "local,received", "-o", "property,value", "all", name)
    return dict(line.split("\t", 1) for line in out.splitlines())


def _tree(name: str, depth: int | None = None, kind: str = "filesystem,volume") -> list[str]:
    """The dataset and those below it (to `depth`), parents first; none when it does not exist."""
    limit = [] if depth is None else ["-d", str(depth)]
    result = sh.run(["zfs", "list", "-H", "-o", "name", "-t", kind, "-r", *limit, name], check=False,
                    timeout=TIMEOUT)
    return result.stdout.split() if result.returncode == 0 else []


def _in(name: str, lives: list[str]) -> bool:
    return any(name == live or name.startswith(live + "/") for live in lives)
