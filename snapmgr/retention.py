"""Which snapshots a policy keeps, and why. Pure: (snapshots, policy, now, tz) -> decisions.

The rules are borg prune's (and so close to restic forget's): `within` keeps everything
newer than now - DURATION; then each counting rule, from the shortest period to the
longest, walks the snapshots newest first and keeps the newest one of each period it has
not seen yet. A snapshot that an earlier rule already kept uses up its period but is not
counted again. When a rule runs out of snapshots before reaching its count it keeps the
oldest one too (borg >= 1.2), so a new volume does not lose its first snapshot.

Two additions in the direction of keeping more, and one for invalid snapshots:
- protected snapshots (tags `manual`, `pre-rollback`, or metadata that cannot be read, so
  the tags are unknown) are set aside before the rules run: they are always kept and
  neither fill nor use up any rule's periods;
- the newest unprotected snapshot is always kept, even when no rule would keep it
  (borg with only --keep-within deletes everything once the newest is old enough);
- an invalid snapshot (an overflowed LVM snapshot) holds no usable data: unless protected,
  it is pruned and does not take a period from a good snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Iterable, Mapping

from snapmgr.model import Policy, Snapshot, SnapshotId

# Counting rules from the shortest period to the longest, as strftime patterns of the
# period a snapshot falls in (keep_last: every snapshot is its own period). ISO weeks run
# Monday to Sunday and are numbered within the ISO year (%G-%V), as borg and restic count.
PERIODS: tuple[tuple[str, str | None], ...] = (
    ("keep_last", None),
    ("hourly", "%Y-%m-%d %H"),
    ("daily", "%Y-%m-%d"),
    ("weekly", "%G-W%V"),
    ("monthly", "%Y-%m"),
    ("yearly", "%Y"),
)


@dataclass(frozen=True)
class Decision:
    snapshot: Snapshot
    keep: bool
    reason: str  # the rule that keeps it, or "no rule keeps it"


def decide(snapshots: Iterable[Snapshot], policy: Policy, now: datetime, tz: tzinfo | None,
           needed: Mapping[SnapshotId, str] | None = None) -> list[Decision]:
    """One decision per snapshot, newest first. Periods are counted in `tz`; None means the
    system's local time, with each snapshot's own daylight-saving offset. `needed`: the
    snapshots something still needs, and what (a rollback cut short, its target)."""
    ordered = sorted(snapshots, key=lambda s: s.id, reverse=True)
    needed = needed or {}
    reasons: dict = {s.id: f"protected ({needed.get(s.id) or s.protection})" for s in ordered
                     if s.protection or s.id in needed}
    doomed = {s.id: f"invalid ({s.invalid})" for s in ordered if s.invalid and s.id not in reasons}
    candidates = [s for s in ordered if s.id not in reasons and s.id not in doomed]

    if policy.keep_within is not None:
        for s in candidates:
            if s.created > now - policy.keep_within:
                reasons[s.id] = f"within {_format_within(policy)}"
    for rule, pattern in PERIODS:
        _keep_newest_per_period(candidates, rule, getattr(policy, rule), pattern, tz, reasons)
    if candidates and candidates[0].id not in reasons:
        reasons[candidates[0].id] = "newest (always kept)"

    return [Decision(s, s.id in reasons, reasons.get(s.id) or doomed.get(s.id, "no rule keeps it"))
            for s in ordered]


def _keep_newest_per_period(candidates: list[Snapshot], rule: str, count: int, pattern: str | None,
                            tz: tzinfo | None, reasons: dict) -> None:
    if count <= 0:
        return
    kept, last_period, s = 0, object(), None
    for s in candidates:
        period = s.id if pattern is None else s.created.astimezone(tz).strftime(pattern)
        if period == last_period:
            continue
        last_period = period
        if s.id not in reasons:
            kept += 1
            reasons[s.id] = f"{rule} #{kept}"
            if kept == count:
                return
    if s is not None and s.id not in reasons:
        reasons[s.id] = f"{rule} #{kept + 1} (oldest)"


def _format_within(policy: Policy) -> str:
    seconds = int(policy.keep_within.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
