"""`snapmgr check` as a Nagios/Icinga plugin: a status line, performance data in the
plugins' format ('label'=value[UOM];warn;crit;min;max), one line per volume and per
finding below it, and the state as the exit code.

Numbers are formatted by Python's own rules, never the locale's: a decimal comma would
break every graph. Text is never allowed a '|': the plugins' readers take what follows
the first one as performance data (a program's stderr quoted in an error has them)."""

from __future__ import annotations

import os
from datetime import timedelta

from snapmgr.errors import one_line
from snapmgr.monitor.state import NAMES, OK, RANK, UNKNOWN, Health, VolumeHealth, span, stamp
from snapmgr.render import status_json, when

PREFIX = "SNAPMGR"


def text(health: Health) -> str:
    return _output(f"{PREFIX} {NAMES[health.state]} - {summary(health)}", perfdata(health),
                   [*_origin(health), *(line for v in health.volumes for line in _volume_lines(v))])


def failure_text(message: str) -> str:
    """The plugin's answer when it cannot judge at all."""
    return _output(f"{PREFIX} UNKNOWN - {message}", "", [])


def _output(head: str, perf: str, details: list[str]) -> str:
    """The plugin's output: every text on a line of its own and free of '|', so that the
    only '|' is the one before the performance data."""
    head, *details = (one_line(line).replace("|", "/") for line in (head, *details))
    return "\n".join([head + (f" | {perf}" if perf else ""), *details])


def failure_json(message: str) -> dict:
    return {"state": "UNKNOWN", "exit_code": UNKNOWN, "summary": message, "perfdata": "", "volumes": []}


def summary(health: Health) -> str:
    if not health.volumes:
        return "no volumes configured"
    bad = [v for v in health.volumes if v.state != OK]
    if not bad:
        return f"{len(health.volumes)} of {len(health.volumes)} volumes OK"
    return "; ".join(f"{v.status.volume}: {_worst_finding(v)}" for v in sorted(bad, key=lambda v: -RANK[v.state]))


def _worst_finding(v: VolumeHealth) -> str:
    return next(f.text for f in v.findings if f.state == v.state)


def _origin(health: Health) -> list[str]:
    if health.live:
        return []
    return [f"snapshots as the last runs recorded them: listing them needs root, and this check runs as uid "
            f"{os.geteuid()}"]


def _volume_lines(v: VolumeHealth) -> list[str]:
    s = v.status
    facts = []
    if s.snapshots is not None:
        facts.append(f"{s.snapshots} snapshot{'' if s.snapshots == 1 else 's'}")
    if s.newest_good is not None and v.age is not None:
        facts.append(f"newest good {s.newest_good.id} ({s.newest_good.grade}) {span(v.age)} old")
    if v.ages is not None:
        limits = [f"{word} after {span(limit)}" for word, limit in (("warning", v.ages.warn), ("critical", v.ages.crit))
                  if limit is not None]
        facts.append(f"{', '.join(limits) or 'no age alarm'} ({v.ages.source})")
    if s.observed_at is not None:
        facts.append(f"as listed at {stamp(s.observed_at)}")
    return [f"{s.volume}: {NAMES[v.state]} - {'; '.join(facts) or 'nothing known'}",
            *(f"  {NAMES[f.state]}: {f.text}" for f in v.findings)]


def perfdata(health: Health) -> str:
    return " ".join(item for v in health.volumes for item in _volume_perfdata(v))


def _volume_perfdata(v: VolumeHealth) -> list[str]:
    s, name = v.status, v.status.volume
    ages = v.ages
    items = [_perf(f"{name} age", _seconds(v.age), "s", _seconds(ages and ages.warn), _seconds(ages and ages.crit), 0)]
    if s.snapshots is not None:
        items += [_perf(f"{name} snapshots", s.snapshots, "", None, None, 0),
                  _perf(f"{name} invalid", len(s.invalid), "", None, 0, 0),
                  _perf(f"{name} damaged", len(s.damaged), "", None, 0, 0)]
    window = (s.newest.record or {}).get("quiesce_window_s") if s.newest else None
    if window is not None:
        items.append(_perf(f"{name} quiesce window", window, "s", None, None, 0))
    if s.space is not None:
        items.append(_perf(f"{name} free", s.space.free, "B", None, None, 0, s.space.size))
    return items


def _perf(label: str, value, uom: str, warn=None, crit=None, low=None, high=None) -> str:
    """One item; the value U when unknown, as the plugin guidelines allow. Labels never
    need a quote escaped: volume names hold no quote and no '='."""
    thresholds = ";".join("" if x is None else _number(x) for x in (warn, crit, low, high)).rstrip(";")
    return f"'{label}'={'U' if value is None else _number(value) + uom}" + (f";{thresholds}" if thresholds else "")


def _seconds(delta: timedelta | None) -> int | None:
    return None if delta is None else int(delta.total_seconds())


def _number(x: float | int) -> str:
    if isinstance(x, int):
        return str(x)
    return f"{x:.3f}".rstrip("0").rstrip(".")


def as_json(health: Health) -> dict:
    return {
        "state": NAMES[health.state],
        "exit_code": health.state,
        "summary": summary(health),
        "perfdata": perfdata(health),
        "live": health.live,
        "volumes": [{
            "volume": v.status.volume,
            "state": NAMES[v.state],
            "findings": [{"state": NAMES[f.state], "text": f.text} for f in v.findings],
            "age_seconds": _seconds(v.age),
            "warn_age_seconds": _seconds(v.ages and v.ages.warn),
            "crit_age_seconds": _seconds(v.ages and v.ages.crit),
            "ages_from": v.ages and v.ages.source,
            "listed_at": when(v.status.observed_at),
            "status": status_json(v.status, health.at),
        } for v in health.volumes],
    }
