"""The Prometheus text exposition format (version 0.0.4) of the volumes' health, for
`snapmgr metrics` and for node_exporter's textfile collector.

Moments are exported as timestamps, never as ages: a textfile that stopped being
rewritten then still shows its true, ever older times, and `time() - ...` in an alert
sees it. A moment that never came is 0."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from snapmgr.monitor.state import Health, VolumeHealth

GRADES = ("application", "frozen", "crash", "degraded", "unknown")


@dataclass
class Family:
    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float | int]] = field(default_factory=list)


def families(health: Health) -> list[Family]:
    found: dict[str, Family] = {}

    def put(name: str, kind: str, text: str, labels: dict[str, str], value) -> None:
        if value is not None:
            found.setdefault(name, Family(name, kind, text)).samples.append((labels, value))

    for v in health.volumes:
        _volume(v, health, lambda name, kind, text, value, **labels: put(name, kind, text, {"volume": v.status.volume,
                                                                                   **labels}, value))
    shown = {v.status.volume for v in health.volumes}
    for (volume, action, status), count in sorted(health.run_counts.items()):
        if status != "running" and volume in shown:
            put("snapmgr_runs_total", "counter", "Runs the journal holds, by action and how they ended.",
                {"volume": volume, "action": action, "status": status}, count)
    return list(found.values())


def _volume(v: VolumeHealth, health: Health, put) -> None:
    s = v.status
    put("snapmgr_check_status", "gauge", "The state snapmgr check gives the volume: 0 OK, 1 WARNING, 2 CRITICAL, "
        "3 UNKNOWN.", v.state)
    put("snapmgr_snapshots", "gauge", "Snapshots of the volume.", s.snapshots)
    if s.snapshots is not None:
        put("snapmgr_invalid_snapshots", "gauge", "Snapshots whose data cannot be trusted (an overflowed LVM "
            "snapshot).", len(s.invalid))
        put("snapmgr_damaged_snapshots", "gauge", "Existing snapshots whose latest verify found damage.",
            len(s.damaged))
    listed = s.observed_at or (health.at if health.live else None)
    put("snapmgr_listed_timestamp_seconds", "gauge", "When the snapshots were listed: now, or, for a reader who "
        "cannot list them, by the last run.", listed and listed.timestamp())
    put("snapmgr_newest_snapshot_timestamp_seconds", "gauge", "When the newest snapshot was taken; 0: none.",
        _ts(s.newest.created if s.newest else None) if s.snapshots is not None else None)
    put("snapmgr_newest_good_snapshot_timestamp_seconds", "gauge", "When the newest snapshot neither invalid "
        "nor damaged was taken; 0: none.", _ts(s.newest_good.created if s.newest_good else None)
        if s.snapshots is not None else None)
    h = s.history
    put("snapmgr_last_success_timestamp_seconds", "gauge", "When the last successful snapshot run ended; 0: "
        "never.", _ts(h.last_success))
    put("snapmgr_last_failure_timestamp_seconds", "gauge", "When the last failed run of any action ended; 0: "
        "never.", _ts(h.last_failure))
    finished = {r.action: r for r in s.runs if r.status != "running"}   # runs are oldest first
    for run in finished.values():
        put("snapmgr_last_run_duration_seconds", "gauge", "How long the latest finished run of each action took.",
            run.seconds, action=run.action)
        put("snapmgr_last_run_success", "gauge", "Whether the latest finished run of each action succeeded.",
            int(run.status == "ok"), action=run.action)
    record = (s.newest.record or {}) if s.newest else {}
    put("snapmgr_quiesce_window_seconds", "gauge", "How long the services were paused for the newest "
        "snapshot.", record.get("quiesce_window_s"))
    put("snapmgr_freeze_window_seconds", "gauge", "How long filesystems were frozen for the newest snapshot.",
        record.get("freeze_window_s"))
    if s.newest is not None:
        for grade in GRADES:
            put("snapmgr_snapshot_grade", "gauge", "The consistency grade of the newest snapshot: 1 for its "
                "grade, 0 for the others.", int(s.newest.grade == grade), grade=grade)
    put("snapmgr_last_verify_timestamp_seconds", "gauge", "When the latest verify of a snapshot the volume still "
        "has ended; 0: never.", _ts(s.last_verify.finished if s.last_verify else None))
    if s.space is not None:
        put("snapmgr_space_size_bytes", "gauge", "Size of the filesystem or pool the snapshots draw from.",
            s.space.size)
        put("snapmgr_space_free_bytes", "gauge", "Free space a new snapshot can still consume.", s.space.free)
        put("snapmgr_snapshots_held_bytes", "gauge", "Space the volume's snapshots hold, where the backend can "
            "tell.", s.space.held)
    if v.ages is not None:
        put("snapmgr_age_warning_seconds", "gauge", "How old the newest good snapshot may grow before the check "
            "warns.", _seconds(v.ages.warn))
        put("snapmgr_age_critical_seconds", "gauge", "How old the newest good snapshot may grow before the check "
            "is critical.", _seconds(v.ages.crit))


def _ts(moment: datetime | None) -> float:
    return moment.timestamp() if moment else 0


def _seconds(delta: timedelta | None) -> float | None:
    return None if delta is None else delta.total_seconds()


def exposition(health: Health) -> str:
    lines = []
    for f in families(health):
        lines += [f"# HELP {f.name} {_escape_help(f.help)}", f"# TYPE {f.name} {f.type}"]
        lines += [f"{f.name}{{{','.join(f'{k}={_label(v)}' for k, v in labels.items())}}} {_value(value)}"
                  for labels, value in f.samples]
    return "".join(line + "\n" for line in lines)


def as_json(health: Health) -> dict:
    return {"metrics": [{"name": f.name, "type": f.type, "help": f.help,
                         "samples": [{"labels": labels, "value": value} for labels, value in f.samples]}
                        for f in families(health)]}


def _label(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value: float | int) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
