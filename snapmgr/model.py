"""Plain data shared by every layer: names, snapshot ids, snapshots. No I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

from snapmgr.errors import quote

# A name may become a file name, an LVM tag or a ZFS snapshot name, and must never be
# read as an option or a path: no leading '-' or '.', no '/', '@', whitespace or control
# characters (so no '..' either). LVM tags allow exactly [A-Za-z0-9_+.-].
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+.-]{0,63}")
NAME_RULE = "letters, digits and _+.- only, not starting with '-' or '.', at most 64 characters"

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
ID_RE = re.compile(r"(?P<volume>[^@]+)@(?P<stamp>[0-9]{8}T[0-9]{6}Z)(?:-(?P<seq>[1-9][0-9]{0,5}))?")

PRE_ROLLBACK_TAG = "pre-rollback"   # of the snapshot a rollback takes first, which undoes it
PROTECTED_TAGS = frozenset({"manual", PRE_ROLLBACK_TAG})


def is_valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None and ".." not in name


@dataclass(frozen=True, order=True)
class SnapshotId:
    """`VOLUME@YYYYmmddTHHMMSSZ`, with `-N` appended for the N+1th snapshot in one second.

    Ordering is by (volume, time, seq), so `max()` of one volume's ids is the newest."""

    volume: str
    stamp: str
    seq: int = 0

    def __str__(self) -> str:
        return f"{self.volume}@{self.label}"

    @property
    def label(self) -> str:
        """The id without its volume, e.g. `20261121T140501Z-1`: what backends put into
        names whose alphabet has no '@' (LV names and tags, ZFS snapshot names)."""
        return self.stamp + (f"-{self.seq}" if self.seq else "")

    @property
    def created(self) -> datetime:
        return datetime.strptime(self.stamp, STAMP_FORMAT).replace(tzinfo=timezone.utc)

    @classmethod
    def parse(cls, text: str) -> SnapshotId:
        m = ID_RE.fullmatch(text)
        if not m or not is_valid_name(m["volume"]):
            raise ValueError(f"{quote(text)} is not a snapshot id (expected VOLUME@YYYYmmddTHHMMSSZ)")
        try:
            datetime.strptime(m["stamp"], STAMP_FORMAT)
        except ValueError:
            raise ValueError(f"{quote(text)} has an impossible timestamp") from None
        return cls(m["volume"], m["stamp"], int(m["seq"] or 0))

    @classmethod
    def try_parse(cls, text: str) -> SnapshotId | None:
        try:
            return cls.parse(text)
        except ValueError:
            return None

    @classmethod
    def next_free(cls, volume: str, now: datetime, taken: Iterable[SnapshotId]) -> SnapshotId:
        """The id for a snapshot taken at `now`: deterministic, never one already taken."""
        stamp = now.astimezone(timezone.utc).strftime(STAMP_FORMAT)
        used = {t.seq for t in taken if t.volume == volume and t.stamp == stamp}
        seq = 0
        while seq in used:
            seq += 1
        return cls(volume, stamp, seq)


@dataclass(frozen=True)
class Snapshot:
    id: SnapshotId
    path: Path    # where it lives: a directory, a device, or a ZFS snapshot name
    tags: frozenset[str] = frozenset()
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    # False when the snapshot's metadata could not be read: its tags are unknown, so it
    # might be a protected one.
    meta_readable: bool = True
    # Why its data cannot be trusted, if it cannot (an overflowed LVM snapshot).
    invalid: str | None = None
    # How it was taken (snapmgr.records): grade, windows, group; None when unknown.
    record: dict | None = field(default=None, compare=False, hash=False)

    @property
    def grade(self) -> str:
        return (self.record or {}).get("grade") or "unknown"

    @property
    def volume(self) -> str:
        return self.id.volume

    @property
    def created(self) -> datetime:
        return self.id.created

    @property
    def protection(self) -> str | None:
        """Why automatic pruning must leave this snapshot alone, if it must."""
        if not self.meta_readable:
            return "metadata unreadable"
        tag = min(self.tags & PROTECTED_TAGS, default=None)
        return f"tag {tag}" if tag else None


@dataclass(frozen=True)
class ForeignSnapshot:
    """A snapshot of a volume's storage that snapmgr did not make: shown, never touched."""

    volume: str
    name: str
    created: datetime


_DURATION_RE = re.compile(r"([0-9]+)(s|min|h|d|w|y)")
_DURATION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# Longer than any retention anyone needs, and short enough that `now - duration` stays a
# valid date for every use of it (datetime ends at year 9999).
MAX_DURATION_YEARS = 100
MAX_DURATION = timedelta(days=365 * MAX_DURATION_YEARS)


def parse_duration(text: str) -> timedelta:
    """'90s', '15min', '36h', '14d', '2w', '1y' (a year is 365 days), at most 100y. A plain
    'm' is refused: borg reads it as months and most people read it as minutes."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        if re.fullmatch(r"[0-9]+m", text.strip()):
            raise ValueError(f"{quote(text)} is ambiguous: write 'min' for minutes or use days")
        raise ValueError(f"{quote(text)} is not a duration (e.g. 90s, 15min, 36h, 14d, 2w, 1y)")
    digits = m[1].lstrip("0") or "0"
    # The length first: int() refuses numbers of thousands of digits with a ValueError of its own.
    seconds = int(digits) * _DURATION_UNITS[m[2]] if len(digits) <= 15 else None
    if seconds is None or seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{quote(text)} is too long: at most {MAX_DURATION_YEARS}y")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class MinFree:
    """A free-space floor: bytes ("10G") or a share of the filesystem or pool ("5%")."""

    text: str
    size: int | None = None
    percent: float | None = None

    def bytes_of(self, total: int) -> int:
        return self.size if self.size is not None else int(total * self.percent / 100)


_SIZE_RE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)([KMGTP]?)i?B?", re.I)
_PERCENT_RE = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3})?)%")
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}  # binary, as df -h and LVM count


def human_size(size: int) -> str:
    """Bytes in binary units, as LVM and df -h count them: '12.0MiB'."""
    for unit, power in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << power:
            return f"{size / (1 << power):.1f}{unit}iB"
    return f"{size}B"


def stamp(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "an unknown time"


def span(delta: timedelta) -> str:
    """A duration in its two largest units: 3d4h, 1h30min, 2h, 45s."""
    seconds = max(int(delta.total_seconds()), 0)
    i = next((i for i, (_, size) in enumerate(_UNITS) if seconds >= size), len(_UNITS) - 1)
    unit, size = _UNITS[i]
    text = f"{seconds // size}{unit}"
    if i + 1 < len(_UNITS) and (rest := seconds % size // _UNITS[i + 1][1]):
        text += f"{rest}{_UNITS[i + 1][0]}"
    return text


_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def parse_min_free(text: str) -> MinFree:
    """'10G', '512M', '1.5T' (binary units; a bare number is bytes) or '5%'."""
    stripped = text.strip()
    if m := _PERCENT_RE.fullmatch(stripped):
        if not 0 < float(m[1]) < 100:
            raise ValueError(f"{quote(text)}: a share must be between 0% and 100%")
        return MinFree(stripped, percent=float(m[1]))
    if m := _SIZE_RE.fullmatch(stripped):
        return MinFree(stripped, size=int(float(m[1]) * 1024 ** _SIZE_POWERS[m[2].lower()]))
    raise ValueError(f"{quote(text)} is not a size or a share (e.g. 10G, 512M, 5%)")


@dataclass(frozen=True)
class Policy:
    """Keep rules of one `[retention.NAME]` table; a count of 0 switches a rule off."""

    name: str
    keep_within: timedelta | None = None
    keep_last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
