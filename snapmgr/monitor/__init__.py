"""Monitoring: the Nagios/Icinga check and the Prometheus metrics, both rendered from one
judgement of each volume (state.py), and what every run that changes something leaves
for them (publish)."""

from __future__ import annotations

from typing import Iterable

from snapmgr import files
from snapmgr.engine import Engine
from snapmgr.errors import SnapmgrError, as_error
from snapmgr.journal import JournalError
from snapmgr.monitor import metrics, state


def publish(engine: Engine, changed: Iterable[str]) -> SnapmgrError | None:
    """After a run that changed something: record in the journal what the snapshots of
    the `changed` volumes look like now, for a check that cannot list them, and rewrite
    the metrics textfile if one is configured, with the other volumes as the journal
    recorded them (listing and measuring every volume after every run would cost each
    run what the others are). What failed, if anything: the run's own work stands either way."""
    path = engine.config.settings.metrics_textfile
    try:
        health = state.gather(engine, live=set(changed), record=True)
        if path is not None:
            files.replace(path, metrics.exposition(health))
    except (SnapmgrError, OSError) as e:
        if isinstance(e, JournalError) and engine.journal_failure is not None:
            return None   # the run reports the journal's failure itself, once
        what = f"the metrics textfile {path} was not rewritten" if path else "the monitoring state was not recorded"
        return SnapmgrError(f"{what}: {as_error(e)}")
    return None
