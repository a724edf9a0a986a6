"""How results look: aligned tables for people, stable JSON for scripts.

The JSON shapes are an interface: add keys, never rename or remove them."""

from __future__ import annotations

import base64
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Sequence

import click

from snapmgr.diff import Diff, flags
from snapmgr.engine import Outcome, Verification, VolumeStatus
from snapmgr.journal import Verify
from snapmgr.manifest import path_text
from snapmgr.manifest.entry import KINDS
from snapmgr.restore import Restored
from snapmgr.rollback import Plan, RolledBack
from snapmgr.systemd_install import Changes as UnitChanges, TimerState
from snapmgr.versions import History, State
from snapmgr.errors import one_line
from snapmgr.model import ForeignSnapshot, Snapshot, human_size


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns, one line per row whatever a cell holds (an error quoting a path)."""
    rows = [[one_line(str(c)) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([click.style(line(headers), bold=True)] + [line(row) for row in rows])


def when(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


def age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = int((now - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def escaped(path: bytes) -> str:
    """A path of any bytes as one printable line: a backslash doubled, then each byte that
    is not UTF-8 as \\xNN and each control character as \\n, \\t, \\xNN (so an escape can
    never be mistaken for a name that spells it)."""
    text = (path or b".").replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# JSON forms ------------------------------------------------------------------------

def snapshot_json(s: Snapshot) -> dict:
    return {"id": str(s.id), "volume": s.volume, "created": when(s.created),
            "tags": sorted(s.tags), "path": str(s.path), "invalid": s.invalid,
            "grade": s.grade, "consistency": s.record, "manifest": manifest_state(s)}


def manifest_state(s: Snapshot) -> str:
    """blake3 / sha256 (the manifest's hash), unverified (none could be written: the
    record says why), or none (taken before manifests, or its run was cut short)."""
    recorded = (s.record or {}).get("manifest") or {}
    return recorded.get("algorithm") or ("unverified" if "unverified" in recorded else "none")


def verify_json(v: Verification) -> dict:
    stats = v.stats
    return {"snapshot": str(v.snapshot.id), "volume": v.snapshot.volume, "result": v.result, "reason": v.reason,
            "entries": stats and stats.entries, "hashed": stats and stats.hashed,
            "hashed_bytes": stats and stats.hashed_bytes, "seconds": stats and round(stats.seconds, 3),
            "problems": [{"status": p.status, "path": "/" + path_text(p.path),
                          "path_base64": base64.b64encode(p.path).decode(), "what": sorted(p.what),
                          "reason": p.reason} for p in v.problems]}


def last_verify_json(v: Verify | None) -> dict | None:
    if v is None:
        return None
    return {"snapshot": v.snapshot, "source": v.source, "finished": when(v.finished), "result": v.result,
            "entries": v.entries, "problems": v.problems, "detail": v.detail}


def foreign_json(f: ForeignSnapshot) -> dict:
    return {"name": f.name, "volume": f.volume, "created": when(f.created)}


def outcome_json(o: Outcome) -> dict:
    return {
        "volume": o.volume,
        "ok": o.error is None,
        "error": str(o.error) if o.error else None,
        "created": snapshot_json(o.created) if o.created else None,
        "planned": o.planned,
        "policy": o.policy,
        "decisions": [{"id": str(d.snapshot.id), "keep": d.keep, "reason": d.reason} for d in o.decisions],
        "deleted": o.deleted,
    }


def restored_json(r: Restored) -> dict:
    return {"snapshot": r.snapshot, "dest": str(r.dest), "paths": [escaped(p) for p in r.paths],
            "dry_run": r.dry_run, "pre_rollback": r.pre_rollback, "changes": list(r.changes)}


def rolled_back_json(r: RolledBack) -> dict:
    p = r.plan
    return {"volume": p.volume, "snapshot": p.target, "dry_run": r.dry_run, "method": p.method,
            "takes_effect": p.takes_effect,
            "losses": None if p.losses is None else asdict(p.losses) | {"shown": list(p.losses.shown)},
            "newer": [{"snapshot": s, "fate": fate} for s, fate in p.newer], "services": list(p.services),
            "pre_rollback": r.pre_rollback, "seconds": r.seconds, "check": r.check, "matches": r.matches,
            "pending": r.pending, "before_resume": r.before_resume,
            "affected": [{"snapshot": s, "fate": fate} for s, fate in p.others], "resumes": p.resumes}


def rollback_plan_text(p: Plan) -> str:
    loss = p.losses
    told = [f"it loses what changed since: {loss.added} entries made since are deleted, {loss.removed} deleted "
            f"since come back, {loss.changed} changed since are put back as they were",
            *(f"  {line}" for line in loss.shown)] if loss else \
        ["what it loses cannot be listed: the volume is not mounted now"]
    lines = [f"roll {p.volume} back to {p.target}, {p.takes_effect}: {p.method}",
             *([p.resumes] if p.resumes else []),
             *told,
             "first, a protected pre-rollback snapshot of the volume as it is " + (
                 "(what was written since the cut is kept there)" if p.resumes else
                 "(snapmgr rollback to it undoes this)"),
             "services: " + ("; ".join(p.services) if p.services else "no quiescer stops any (whatever still writes "
                                                                     "to the volume is refused, by name)")]
    if p.newer:
        lines.append("newer snapshots: " + ", ".join(f"{s} ({fate})" for s, fate in p.newer))
    if p.others:
        lines.append("also: " + ", ".join(f"{s} ({fate})" for s, fate in p.others))
    return "\n".join(lines)


def rolled_back_text(r: RolledBack) -> str:
    if r.dry_run:
        return "dry run, nothing changed:\n" + rollback_plan_text(r.plan)
    how = "finished the rollback of" if r.plan.resumes else "rolled"
    after = f"; {r.check}" if r.check else f"; not in effect yet: {r.pending}" if r.pending else ""
    cut = f", {r.before_resume} as the cut left it" if r.before_resume else ""
    return (f"{how} {r.plan.volume} back to {r.plan.target} in {r.seconds:g}s; {r.pre_rollback} holds it as it was "
            f"(snapmgr rollback {r.pre_rollback} undoes it){cut}{after}")


def diff_json(d: Diff) -> dict:
    return {"from": d.old, "to": d.new, "path": escaped(d.path), "method": d.method, "hashed": d.hashed,
            "changes": [{"path": escaped(c.path), "status": c.status, "what": sorted(c.what), "flags": flags(c)}
                        for c in d.changes]}


def history_json(h: History) -> dict:
    return {"volume": h.volume, "path": escaped(h.path), "live": _state_json(h.live) if h.live else None,
            "versions": [_state_json(v.state) | {"snapshots": list(v.snapshots), "current": v.current}
                         for v in h.versions]}


def _state_json(s: State) -> dict:
    content = escaped(s.content) if isinstance(s.content, bytes) else s.content
    return {"kind": s.kind, "size": s.size, "mtime": when(_when_ns(s.mtime_ns)),
            "digest" if s.kind == "f" else "target": content}


def status_json(s: VolumeStatus, now: datetime) -> dict:
    h = s.history
    return {
        "volume": s.volume,
        "backend": s.backend,
        "state": state(s),
        "snapshots": s.snapshots,
        "newest": str(s.newest.id) if s.newest else None,
        "last_success": when(h.last_success),
        "last_success_age_seconds": int((now - h.last_success).total_seconds()) if h.last_success else None,
        "last_failure": when(h.last_failure),
        "last_error": s.problem or h.last_error,
        "invalid": list(s.invalid),
        "newest_grade": s.newest.grade if s.newest else None,
        "quiesce_window_s": (s.newest.record or {}).get("quiesce_window_s") if s.newest else None,
        "freeze_window_s": (s.newest.record or {}).get("freeze_window_s") if s.newest else None,
        "newest_manifest": manifest_state(s.newest) if s.newest else None,
        "last_verify": last_verify_json(s.last_verify),
        "damaged": list(s.damaged),
        "space": space_json(s),
        "space_error": s.space_problem,
        "rollback": None if s.rollback is None else {
            "target": s.rollback.target, "state": s.rollback.state, "started": when(s.rollback.started),
            "pre_rollback": s.rollback.pre_rollback, "detail": s.rollback.detail, "pending": s.rollback_pending},
    }


def space_json(s: VolumeStatus) -> dict | None:
    """Where the volume's snapshots draw space from (see Backend.space), in bytes."""
    sp = s.space
    if sp is None:
        return None
    return {"where": sp.where, "size_bytes": sp.size, "free_bytes": sp.free, "held_bytes": sp.held,
            "needs_bytes": sp.needs, "note": sp.note,
            "min_free": s.min_free.text if s.min_free else None,
            "min_free_bytes": s.min_free.bytes_of(sp.size) if s.min_free else None,
            "below_min_free": bool(s.min_free and sp.shortfall(s.min_free))}


def state(s: VolumeStatus) -> str:
    """failing: the snapshots cannot be listed, or the last run failed; never: no snapshot
    run has succeeded yet; ok otherwise."""
    h = s.history
    if s.problem:
        return "failing"
    if h.last_failure and (h.last_success is None or h.last_failure > h.last_success):
        return "failing"
    return "ok" if h.last_success else "never"


# Human forms -----------------------------------------------------------------------

def snapshots_table(snapshots: Sequence[Snapshot], foreign: Sequence[ForeignSnapshot]) -> str:
    rows = [(str(s.id), when(s.created), ",".join(sorted(s.tags)) or "-", s.grade, manifest_state(s),
             f"INVALID: {s.invalid}" if s.invalid else "ok") for s in snapshots]
    rows += [(f.name, when(f.created), "-", "-", "-", f"foreign to {f.volume}: not snapmgr's, never pruned")
             for f in foreign]
    return table(("SNAPSHOT", "CREATED", "TAGS", "GRADE", "MANIFEST", "STATE"), rows)


def restored_text(r: Restored) -> str:
    paths = ", ".join(escaped(p) for p in r.paths)
    if r.dry_run:
        head = f"dry run: restoring {paths} from {r.snapshot} into {r.dest} would change {len(r.changes)} item(s)"
        return "\n".join([head, *r.changes])
    taken = f"took {r.pre_rollback} first; " if r.pre_rollback else ""
    return f"{taken}restored {paths} from {r.snapshot} into {r.dest} ({len(r.changes)} item(s) copied)"


def diff_text(d: Diff) -> str:
    if not d.changes:
        return f"no changes from {d.old} to {d.new}" + (f" in {escaped(d.path)}" if d.path else "")
    return "\n".join(f"{flags(c)} /{escaped(c.path) if c.path else ''}" for c in d.changes)


def history_text(h: History) -> str:
    where = f"/{escaped(h.path)} in volume {h.volume}"
    if not h.versions:
        return f"no versions of {where}: no snapshot holds it" + ("" if h.live else " (nor does the live volume)")
    live = "" if h.live else "; deleted from the live volume"
    rows = [(str(i), when(_when_ns(v.state.mtime_ns)), _size(v.state), _held(v.snapshots) + (
             " (= live)" if v.current else "")) for i, v in enumerate(h.versions, 1)]
    return (f"{len(h.versions)} version(s) of {where}{live}\n"
            + table(("VERSION", "MODIFIED", "SIZE", "SNAPSHOTS (NEWEST FIRST)"), rows))


def _when_ns(mtime_ns: int) -> datetime:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc)


def _size(state: State) -> str:
    if state.kind == "l":
        return f"symlink to {escaped(state.content)}"
    return str(state.size) if state.kind == "f" else KINDS.get(state.kind, state.kind)


def _held(snapshots: Sequence[str], shown: int = 3) -> str:
    more = len(snapshots) - shown
    return ", ".join(snapshots[:shown]) + (f" and {more} more" if more > 0 else "")


def decisions_table(outcome: Outcome) -> str:
    return table(("SNAPSHOT", "ACTION", "REASON"),
                 [(str(d.snapshot.id), _action(d, outcome), d.reason) for d in outcome.decisions])


def _action(decision, outcome: Outcome) -> str:
    if decision.keep:
        return "keep"
    return "deleted" if str(decision.snapshot.id) in outcome.deleted else "prune"


def status_table(statuses: Sequence[VolumeStatus], now: datetime) -> str:
    rows = []
    for s in statuses:
        h = s.history
        now_state = state(s)
        if s.rollback is not None:
            now_state += f", rollback to {s.rollback.target} {s.rollback.state.replace('-', ' ')}"
        rows.append((s.volume, s.backend, now_state, "?" if s.snapshots is None else str(s.snapshots),
                     age(h.last_success, now), _window(s.newest), _verified(s, now), _space(s),
                     (s.problem or h.last_error) if now_state == "failing" else "-"))
    return table(("VOLUME", "BACKEND", "STATE", "SNAPSHOTS", "LAST SUCCESS", "NEWEST (GRADE, WINDOWS)", "LAST VERIFY",
                  "SPACE (HELD; FREE)", "LAST ERROR"), rows)


def _space(s: VolumeStatus) -> str:
    """What the snapshots hold, and what is free where they draw from."""
    sp = s.space
    if sp is None:
        return f"? ({s.space_problem})" if s.space_problem else "-"
    held = "?" if sp.held is None else human_size(sp.held)
    low = " BELOW min_free " + s.min_free.text if s.min_free and sp.shortfall(s.min_free) else ""
    return f"{held}; {human_size(sp.free)} of {human_size(sp.size)} free in {sp.where}{low}"


def _verified(s: VolumeStatus, now: datetime) -> str:
    v = s.last_verify
    if s.damaged:
        return f"DAMAGED: {', '.join(s.damaged)}"
    if v is None:
        return "never"
    return f"{v.result if v.result == 'intact' else v.result.upper()} {age(v.finished, now)} ({v.snapshot})"


def verification_lines(v: Verification) -> list[str]:
    """One line for the snapshot, then one per problem."""
    if v.result == "intact":
        st = v.stats
        return [f"{v.snapshot.id}: intact ({st.entries:,} entries, {st.hashed:,} files, "
                f"{st.hashed_bytes / 2**20:,.1f} MiB hashed in {st.seconds:.1f}s)"]
    if v.result == "damaged":
        return [f"{v.snapshot.id}: DAMAGED, {len(v.problems)} problem{'s' if len(v.problems) != 1 else ''}:"] + \
            [f"  {p.describe()}" for p in v.problems]
    return [f"{v.snapshot.id}: {v.result.upper()}: {v.reason}"]


def _window(newest: Snapshot | None) -> str:
    """The newest snapshot's grade, and how long services were paused for it."""
    if newest is None:
        return "-"
    record = newest.record or {}
    if record.get("quiesce_window_s") is None:
        return newest.grade
    freeze = record.get("freeze_window_s")
    return (f"{newest.grade}, quiesced {record['quiesce_window_s']:.3f}s"
            + (f", frozen {freeze:.3f}s" if freeze is not None else ""))


# systemd timers ------------------------------------------------------------------------

def unit_changes_json(c: UnitChanges) -> dict:
    return {"unit_dir": str(c.unit_dir), "dry_run": c.dry_run, "written": c.written, "unchanged": c.unchanged,
            "removed": c.removed, "enabled": c.enabled}


def unit_changes_text(c: UnitChanges) -> str:
    would = "would " if c.dry_run else ""
    lines = [f"{would}write {c.unit_dir / n}" for n in c.written]
    lines += [f"unchanged {c.unit_dir / n}" for n in c.unchanged]
    lines += [f"{would}remove {c.unit_dir / n}" for n in c.removed]
    lines += [f"{would}enable {n}" for n in c.enabled]
    return "\n".join(lines) or f"no snapmgr units in {c.unit_dir}"


def timer_json(t: TimerState) -> dict:
    return {"schedule": t.schedule, "timer": t.timer, "service": t.service, "enabled": t.enabled,
            "active": t.active, "last_trigger": when(t.last_trigger), "next_elapse": when(t.next_elapse),
            "running": t.running, "last_result": t.last_result, "exit_status": t.exit_status,
            "last_error": t.last_error, "signal": t.signal}


def _no_result(t: TimerState) -> str:
    """systemd forgets a service's runs at reboot; the timer remembers its last trigger
    (Persistent=)."""
    return "none since boot" if t.last_trigger else "never ran"


def timers_table(timers: Sequence[TimerState], now: datetime) -> str:
    rows = []
    for t in timers:
        result = "running" if t.running else (t.last_result or _no_result(t))
        if not t.running and t.signal:
            result += f" (killed by {t.signal})"
        elif not t.running and t.last_result not in (None, "success") and t.exit_status is not None:
            result += f" (exit {t.exit_status})"
        nxt = when(t.next_elapse) or ("after this run" if t.running else "-")
        rows.append((t.timer, t.enabled if t.active == "active" else f"{t.enabled}, {t.active}",
                     age(t.last_trigger, now), nxt, result, t.last_error or "-"))
    return table(("TIMER", "STATE", "LAST RUN", "NEXT RUN", "RESULT", "LAST ERROR"), rows)
