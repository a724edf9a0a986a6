"""Verify: re-read a snapshot and hold it against its manifest. Every difference is a
problem: an entry missing from the snapshot, one the manifest does not know (unexpected),
one whose content or metadata changed, or one that can no longer be read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from snapmgr.manifest.entry import compare, display
from snapmgr.manifest.walk import ScanStats, stream
from snapmgr.manifest.store import Manifest

STATUS = {"removed": "missing", "added": "unexpected", "changed": "changed"}


@dataclass(frozen=True)
class Problem:
    path: bytes
    status: str                       # missing, unexpected, changed, unreadable
    what: frozenset[str] = frozenset()
    reason: str | None = None         # why it could not be read

    def describe(self) -> str:
        """One line, whatever bytes the path holds."""
        detail = ", ".join(sorted(self.what)) if self.what else self.reason
        return f"{self.status:<10} {display(self.path)}" + (f" ({detail})" if detail else "")


def check(root: str | os.PathLike, stored: Manifest, progress: Callable[[str], None] | None = None
          ) -> tuple[list[Problem], ScanStats]:
    """The problems found re-hashing `root` against `stored`, and what re-hashing took."""
    stats = ScanStats()
    changes = list(compare(stored.entries(), stream(root, stored.algorithm, stats=stats, strict=False,
                                                    progress=progress)))
    unreadable = dict(stats.unreadable)   # complete once the stream is
    problems = [Problem(path, "unreadable", reason=reason) for path, reason in stats.unreadable]
    for change in changes:
        if change.path in unreadable and change.what <= {"content"}:
            continue  # already told, with the reason
        problems.append(Problem(change.path, STATUS[change.status], change.what))
    problems.sort(key=lambda p: p.path.split(b"/"))
    return problems, stats
