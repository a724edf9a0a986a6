"""The command line: parse, call the engine (restore, diff and versions: their jobs, with
the engine), render. No snapshot logic lives here."""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import click

from snapmgr import config as configuration
from snapmgr import compare_jobs, monitor, render, restore_job, systemd_install
from snapmgr import rollback as rollback_job
from snapmgr.engine import Engine, Outcome
from snapmgr.journal import JournalError
from snapmgr.manifest import export
from snapmgr.monitor import check as plugin, metrics, state as health_state
from snapmgr.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_SOFTWARE, EXIT_USAGE, Interrupted, SnapmgrError,
                            UsageError, as_error, one_line, quote)
from snapmgr.model import NAME_RULE, PROTECTED_TAGS, SnapshotId, is_valid_name, parse_duration

log = logging.getLogger("snapmgr")


@dataclass
class Context:
    config_option: str | None
    json: bool
    quiet: bool
    _engine: Engine | None = None

    def engine(self, recover: bool = True) -> Engine:
        """The engine; first, whatever an interrupted quiesce window left paused is
        resumed (every command does it, so nothing waits for an explicit recover;
        but a dry run, which changes nothing)."""
        if self._engine is None:
            self._engine = Engine(self.config())
            if recover:
                try:
                    for line in self._engine.recover():
                        log.warning("%s", line)
                except JournalError as e:
                    log.debug("no recovery of interrupted windows: %s", e)
        return self._engine

    def config(self) -> configuration.Config:
        """The config alone, for commands that run nothing on the volumes."""
        return configuration.load(configuration.locate(self.config_option))

    def reader(self) -> Engine:
        """An engine that changes nothing, not even the journal: for check and metrics,
        which a monitoring user runs."""
        return Engine(self.config(), read_only=True)

    def emit(self, data: dict, human: str | None) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        elif human and not self.quiet:
            click.echo(human)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_option", metavar="PATH",
              help="Config file [default: $SNAPMGR_CONFIG or /etc/snapmgr/snapmgr.toml].")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON for scripts.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv shows every command run).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.version_option(package_name="snapmgr")
@click.pass_context
def cli(ctx: click.Context, config_option, as_json, verbose, quiet, debug):
    """Consistent filesystem snapshots: take, list, prune and check them."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + 2 * debug, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(debug))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    ctx.obj = Context(config_option, as_json, quiet)


@cli.command()
@click.argument("volumes", nargs=-1)
@click.option("--group", "-g", metavar="GROUP", help="Snapshot every volume of GROUP inside one quiesce window.")
@click.option("--schedule", metavar="SCHEDULE",
              help="Do what the timer of [schedules.SCHEDULE] does: its groups and volumes, with its tag, "
                   "then prune if it prunes.")
@click.option("--tag", "-t", "tags", multiple=True, metavar="TAG",
              help="Tag the snapshot (repeatable) [default: manual, which prune never removes].")
@click.option("--prune", is_flag=True, help="Apply the volume's retention policy afterwards.")
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be done; change nothing.")
@pass_ctx
def snapshot(c: Context, volumes, group, schedule, tags, prune, dry_run):
    """Take a snapshot of VOLUMES (all volumes when none are named), quiescing their
    services around it."""
    for tag in tags:
        _check_tag(tag)
    if group is not None and volumes:
        raise UsageError("name volumes or --group, not both")
    if schedule is not None:
        if volumes or group is not None or tags or prune:
            raise UsageError("--schedule takes its volumes, groups, tag and prune from the schedule: "
                             "give no VOLUMES, --group, --tag or --prune with it")
        outcomes = c.engine(recover=not dry_run).scheduled(schedule, dry_run, _progress(c))
    else:
        outcomes = c.engine(recover=not dry_run).snapshot(volumes, tags, prune, dry_run, _progress(c), group)
    _finish(c, outcomes, {}, "\n".join(filter(None, (_describe(o) for o in outcomes))), dry_run)


@cli.command("list")
@click.argument("volumes", nargs=-1)
@pass_ctx
def list_(c: Context, volumes):
    """List the snapshots of VOLUMES (all volumes when none are named)."""
    engine = c.engine()
    snapshots, foreign = engine.list(volumes), engine.foreign(volumes)
    c.emit({"snapshots": [render.snapshot_json(s) for s in snapshots],
            "foreign": [render.foreign_json(f) for f in foreign]},
           render.snapshots_table(snapshots, foreign) if snapshots or foreign else "no snapshots")


@cli.command()
@click.argument("snapshots", nargs=-1, required=True, metavar="VOLUME@ID...")
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be deleted; delete nothing.")
@pass_ctx
def delete(c: Context, snapshots, dry_run):
    """Delete the named snapshots (protected ones too: naming them is the decision)."""
    outcomes = c.engine(recover=not dry_run).delete(snapshots, dry_run)
    _finish(c, outcomes, {}, "\n".join(filter(None, (_describe(o) for o in outcomes))), dry_run)


@cli.command()
@click.argument("snapshot", metavar="VOLUME@ID")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--to", "dest", metavar="DEST", type=click.Path(file_okay=False, path_type=Path),
              help="Copy into DEST (each PATH lands at DEST/PATH).")
@click.option("--in-place", is_flag=True,
              help="Copy back into the live volume, after taking a protected pre-rollback snapshot of it.")
@click.option("--overwrite", is_flag=True, help="Replace what exists in DEST [default: refuse, copying nothing].")
@click.option("--delete", is_flag=True,
              help="With --in-place: also delete, inside the restored directories, what the snapshot does not "
                   "hold (files the snapshots leave out on purpose, and other mounts, are never touched).")
@click.option("--dry-run", "-n", is_flag=True, help="List what would change; change nothing.")
@pass_ctx
def restore(c: Context, snapshot, paths, dest, in_place, overwrite, delete, dry_run):
    """Copy PATHs out of a snapshot with every attribute kept (modes, owners, ACLs,
    xattrs, hardlinks, sparse files).

    A PATH is relative to the volume's root, or absolute as the live volume shows it
    (e.g. /srv/data/uploads/a.jpg). Give --to DEST, or --in-place."""
    if (dest is None) == (not in_place):
        raise UsageError("give either --to DEST or --in-place")
    done = restore_job.restore(c.engine(recover=not dry_run), snapshot, paths, dest, overwrite, in_place, delete, dry_run)
    unpublished = _shown(c, lambda: render.restored_json(done), render.restored_text(done),
                         [SnapshotId.parse(done.pre_rollback).volume] if done.pre_rollback else None)
    if unpublished:
        _error(str(unpublished))
        sys.exit(EXIT_FAILED)


@cli.command()
@click.argument("snapshot", metavar="VOLUME@ID | VOLUME")
@click.option("--resume", is_flag=True,
              help="Finish the rollback of VOLUME (give the volume alone) that was cut short.")
@click.option("--dry-run", "-n", is_flag=True, help="Show the plan; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Roll back without asking (off a terminal, required).")
@click.option("--destroy-newer", "choice", flag_value="destroy-newer",
              help="ZFS: destroy the snapshots newer than VOLUME@ID, which the plan lists, to roll back in place.")
@click.option("--keep-newer", "choice", flag_value="keep-newer",
              help="ZFS: keep the snapshots newer than VOLUME@ID on the dataset as it is now, renamed aside.")
@pass_ctx
def rollback(c: Context, snapshot, resume, dry_run, yes, choice):
    """Put a volume back as the snapshot VOLUME@ID holds it, after a protected pre-rollback
    snapshot of it as it is, with its services stopped meanwhile.

    The plan is shown first: what the volume loses, what becomes of newer snapshots,
    what is done to the services; then, on a terminal, a question. A rollback cut short
    is finished by `snapmgr rollback --resume VOLUME`."""
    def confirm(plan) -> bool:
        if not (yes or sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError("a rollback replaces the live volume: off a terminal, --yes says to go ahead "
                             "(--dry-run shows the plan)")
        if not (yes and (c.json or c.quiet)):   # the plan is told before anything changes; always when asked
            click.echo(render.rollback_plan_text(plan), err=True)
        return yes or click.confirm("roll back?", err=True)
    if resume:
        if "@" in snapshot or choice:
            raise UsageError("--resume takes the volume alone, and finishes the rollback as it was asked")
        done = rollback_job.resume(c.engine(recover=not dry_run), snapshot, dry_run, confirm)
    else:
        done = rollback_job.rollback(c.engine(recover=not dry_run), snapshot, dry_run, confirm, choice)
    unpublished = _shown(c, lambda: render.rolled_back_json(done), render.rolled_back_text(done),
                         None if dry_run else [done.plan.volume])
    if unpublished:
        _error(str(unpublished))
        sys.exit(EXIT_FAILED)
    if done.matches is False:   # rolled back all the same: the line above says where it differs
        sys.exit(EXIT_FAILED)


@cli.command("diff")
@click.argument("old", metavar="A")
@click.argument("new", metavar="B")
@click.argument("path", required=False)
@click.option("--quick", is_flag=True,
              help="Read no file: trust size and mtime, as rsync does (a rewrite that keeps both is missed).")
@pass_ctx
def diff_(c: Context, old, new, path, quick):
    """What changed from snapshot A to snapshot B of one volume, or to the volume as it
    is now (B = live), one line per path: FLAGS PATH. PATH limits it to a file or
    directory (relative to the volume's root, or absolute as the live volume shows it).

    \b
    FLAGS, as snapper status shows them: the first column
      +  added          -  removed
      t  type changed   c  content changed (data, symlink target, device number)
      .  only metadata changed
    then one column per property, '.' when it is the same:
      p  permissions    u  user (owner)   g  group
      x  xattrs or ACLs m  mtime
    e.g. 'c....m /etc/app.conf', '.p.... /srv/data/private'.
    Uses the snapshots' manifests when both have one; otherwise walks the trees and
    reads a file only where size and inode do not show it unchanged (--quick: never)."""
    changes = compare_jobs.diff(c.engine(), old, new, path, quick)
    c.emit(render.diff_json(changes), render.diff_text(changes))


@cli.command("versions")
@click.argument("path")
@pass_ctx
def versions_(c: Context, path):
    """Every distinct version of a file of a live volume across its snapshots, newest
    first, with the snapshots that hold each; also for a file deleted since.

    PATH is absolute or relative to the current directory; the volume is the one whose
    live files hold it. Versions are told apart by content hash (from the manifests, or
    read from the snapshot)."""
    history = compare_jobs.versions(c.engine(), path)
    c.emit(render.history_json(history), render.history_text(history))


@cli.command()
@click.argument("volumes", nargs=-1)
@click.option("--dry-run", "-n", is_flag=True, help="Show each snapshot with keep/prune and the reason.")
@pass_ctx
def prune(c: Context, volumes, dry_run):
    """Delete the snapshots that no retention rule keeps."""
    outcomes = c.engine(recover=not dry_run).prune(volumes, dry_run)
    _finish(c, outcomes, {"dry_run": dry_run}, "\n\n".join(_describe_prune(o, dry_run) for o in outcomes), dry_run)


@cli.command()
@click.argument("volumes", nargs=-1)
@pass_ctx
def status(c: Context, volumes):
    """Per volume: state, snapshot count, last success and its age, last error."""
    statuses = c.engine().status(volumes)
    now = datetime.now(timezone.utc)
    c.emit({"volumes": [render.status_json(s, now) for s in statuses]}, render.status_table(statuses, now))


# MOUNTPOINT is not a click.Path: click stats a path it converts, and a stat of a mount
# whose server is stopped never returns.
@cli.command()
@click.argument("mountpoint", type=Path)
@click.argument("volumes", nargs=-1)
@click.option("--allow-other", is_flag=True,
              help="Let other users in; the kernel still enforces each file's own modes, owners and ACLs.")
@click.option("--daemon", is_flag=True, help="Detach once the mount is ready (its log then goes to syslog).")
@click.option("--idle", default="5min", show_default=True, metavar="DURATION",
              help="Release a lazily mounted snapshot (LVM, ZFS) unused this long.")
@click.option("--verify", is_flag=True,
              help="Check each file against its snapshot's manifest when first opened; a mismatch fails "
                   "reads with EIO.")
@pass_ctx
def mount(c: Context, mountpoint, volumes, allow_other, daemon, idle, verify):
    """Serve the snapshots of VOLUMES (all when none are named) read-only at MOUNTPOINT,
    as MOUNTPOINT/VOLUME/LABEL, VOLUME/latest and VOLUME/.by-tag/TAG/LABEL, until Ctrl-C,
    SIGTERM or 'snapmgr umount MOUNTPOINT'."""
    lifecycle = _fuse_lifecycle()
    try:
        idle_s = parse_duration(idle).total_seconds()
    except ValueError as e:
        raise UsageError(f"--idle: {e}") from None
    engine = c.engine()
    backends = engine.browsable(volumes)
    verifier = lifecycle.Verifier(engine.stored_manifest, engine.journal.verify_failed) if verify else None
    path = lifecycle.prepare(mountpoint)
    lifecycle.release_abandoned(backends.values())
    ready = None
    if daemon:
        engine.journal.close()   # an SQLite connection must not cross a fork: the daemon opens its own
        ready = lifecycle.detach()
    lifecycle.serve(path, backends, lifecycle.MountOptions(allow_other, idle_s), ready, verifier)


@cli.command()
@click.argument("mountpoint", type=Path)
@pass_ctx
def umount(c: Context, mountpoint):
    """Unmount a snapmgr mount; its process then exits."""
    lifecycle = _fuse_lifecycle()
    path, answered = lifecycle.unmount(mountpoint)
    if not answered:
        # Its process may have died with snapshots entered; which volumes it served is not
        # known, so every volume's leftovers are looked for.
        lifecycle.release_abandoned(c.engine().browsable().values())
    c.emit({"unmounted": str(path)}, None)


@cli.command()
@click.option("--boot", is_flag=True,
              help="Run by snapmgr-recover.service, before the units it resumes: queue their starts instead of "
                   "waiting for them. Whether the machine restarted since a window (nothing is left frozen then) "
                   "is told by the boot id the window was opened under.")
@pass_ctx
def recover(c: Context, boot):
    """Resume whatever an interrupted quiesce window left paused (also done by every
    other command, and at boot); also try again what a recovery could not resume."""
    told = c.engine(recover=False).recover(boot, asked=not boot)
    # A window's end changes no volume's snapshots: they are published as recorded.
    unpublished = _shown(c, lambda: {"recovered": told}, "\n".join(told) or "nothing to recover", [] if told else None)
    if unpublished:
        _error(str(unpublished))
        sys.exit(EXIT_FAILED)


# Monitoring -----------------------------------------------------------------------------

@cli.command()
@click.argument("volumes", nargs=-1)
@pass_ctx
def check(c: Context, volumes):
    """A Nagios/Icinga plugin: one status line 'SNAPMGR OK|WARNING|CRITICAL|UNKNOWN - ...'
    with performance data, then a line per volume and per finding; the exit code is the
    state (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, also when the check itself fails).

    \b
    CRITICAL: the newest good snapshot is older than the volume's crit_age, the last
    snapshot or prune run failed (a space guard's refusal too) or was killed, a snapshot
    is invalid, a verify found damage, a quiesce window was cut by the watchdog.
    WARNING: older than warn_age, or the newest snapshot is degraded.
    Ages not set on the volume are 1.5x / 3x the longest gap between runs of the
    shortest schedule covering it; a volume no schedule covers raises no age alarm.
    Run as another user than root, it reads the snapshots as the last run recorded them
    in the journal (see the README: Monitoring)."""
    health = health_state.gather(c.reader(), volumes)
    click.echo(json.dumps(plugin.as_json(health), indent=2, sort_keys=True) if c.json else plugin.text(health))
    sys.exit(health.state)


@cli.command("metrics")
@click.argument("volumes", nargs=-1)
@pass_ctx
def metrics_(c: Context, volumes):
    """Print the Prometheus text exposition of VOLUMES (all when none are named): what
    settings.metrics_textfile receives after every run that changes something."""
    health = health_state.gather(c.reader(), volumes)
    click.echo(json.dumps(metrics.as_json(health), indent=2, sort_keys=True) if c.json
               else metrics.exposition(health), nl=c.json)


# Manifests: verify and export ----------------------------------------------------------

@cli.command()
@click.argument("targets", nargs=-1, metavar="[VOLUME | VOLUME@ID]...")
@pass_ctx
def verify(c: Context, targets):
    """Re-hash snapshots and compare them with the manifests recorded when they were
    taken: every snapshot of the named volumes, the named snapshots, or (none named) of
    every volume with manifests. Exit 1 when one is damaged or in error (its manifest
    lost, its files unreadable); a snapshot that never had a manifest is told of, and no
    failure."""
    engine = c.engine()
    results, passed_over = engine.verify(targets, _progress(c))
    if sys.stderr.isatty():
        click.echo("\r\033[K", nl=False, err=True)
    lines = [line for v in results for line in render.verification_lines(v)] + passed_over
    failed = [v for v in results if v.result not in ("intact", "unverifiable")]
    # "intact": no snapshot checked is damaged or in error, as the exit status says unless
    # the journal failed too; "checked": how many were compared with a manifest, so that a
    # script can tell "nothing damaged" from "nothing checked". A verify changes no
    # volume's snapshots: they are published as recorded.
    unpublished = _shown(c, lambda: {"results": [render.verify_json(v) for v in results], "passed_over": passed_over,
                                     "intact": not failed,
                                     "checked": sum(v.result in ("intact", "damaged") for v in results),
                                     "journal_error": _text(engine.journal_failure)},
                         "\n".join(lines) or "no snapshots to verify", [] if results else None)
    unrecorded = engine.journal_failure
    if failed:
        _error(f"{len(failed)} of {len(results)} snapshots are not intact: "
               + ", ".join(f"{v.snapshot.id} ({v.result})" for v in failed))
    if unpublished:
        _error(str(unpublished))
    if unrecorded:
        _error(f"this verify was not recorded: {unrecorded}")
    if failed or unrecorded or unpublished:
        sys.exit(EXIT_FAILED)


@cli.command("manifest")
@click.argument("snapshot", metavar="VOLUME@ID")
@click.option("--format", "fmt", type=click.Choice(list(export.FORMATS)),
              help="b3sum or sha256sum: lines that 'b3sum -c' / 'sha256sum -c' check inside a restored copy "
                   "[default: the one of the manifest's hash]; json: every entry, one object a line.")
@pass_ctx
def manifest_(c: Context, snapshot, fmt):
    """Print the manifest recorded when VOLUME@ID was taken."""
    stored = c.engine().manifest(snapshot)
    fmt = fmt or ("json" if c.json else export.default_format(stored.algorithm))
    export.check_format(fmt, stored.algorithm)
    if fmt == "json":
        sys.stdout.buffer.writelines(export.json_lines(stored.entries()))
        return
    # Checked whole before a byte is printed, in a first pass: a name that cannot be
    # written for the tool fails the command, instead of printing a list that would not check.
    for _ in export.checksum_lines(stored.entries(), fmt):
        pass
    sys.stdout.buffer.writelines(export.checksum_lines(stored.entries(), fmt))


@cli.group("config")
def config_group():
    """Check the configuration."""


@config_group.command("check")
@pass_ctx
def config_check(c: Context):
    """Validate the config file and print a summary; warn of volumes whose snapshots could
    not be browsed whole as things are mounted now."""
    cfg = configuration.load(configuration.locate(c.config_option))
    next_elapses = systemd_install.check_calendars(cfg)
    problems = Engine(cfg).browse_problems()
    for volume, problem in problems.items():
        log.warning("volume %s: its snapshots cannot be browsed whole: %s", volume, problem)
    for s in cfg.schedules.values():
        if s.tag in PROTECTED_TAGS:
            log.warning("%s: schedules.%s.tag: %s is a protected tag: retention never prunes the schedule's "
                        "snapshots", cfg.path, s.name, quote(s.tag))
    rows = [(v.name, v.backend, v.retention.name if v.retention else "-", ",".join(sorted(v.tags)) or "-")
            for v in cfg.volumes.values()]
    c.emit({"config": str(cfg.path), "valid": True,
            "volumes": {v.name: {"backend": v.backend, "retention": v.retention and v.retention.name,
                                 "tags": sorted(v.tags)} for v in cfg.volumes.values()},
            "policies": sorted(cfg.policies), "quiesce": sorted(cfg.quiescers),
            "groups": sorted(cfg.groups), "schedules": sorted(cfg.schedules), "browse_problems": problems,
            "next_elapses": {n: render.when(t) for n, t in next_elapses.items()}},
           f"{cfg.path}: valid\n" + (render.table(("VOLUME", "BACKEND", "RETENTION", "TAGS"), rows) if rows
                                      else "no volumes configured")
           + ("\n" + render.table(("SCHEDULE", "ON CALENDAR", "NEXT RUN"), [
               (s.name, s.on_calendar, render.when(next_elapses[s.name])) for s in cfg.schedules.values()])
              if cfg.schedules else ""))


@cli.group("systemd")
def systemd_group():
    """Run the schedules on systemd timers."""


@systemd_group.command("install")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the units into DIR and leave the running systemd alone (packaging, tests) "
                   "[default: /etc/systemd/system, then daemon-reload and enable the timers].")
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be written and removed; change nothing.")
@pass_ctx
def systemd_install_(c: Context, unit_dir, dry_run):
    """Write a service and a timer per schedule, snapmgr-recover.service and the
    snapmgr-mount@.service template; remove the units of schedules gone (only units
    snapmgr wrote from this config); enable and start the timers."""
    changes = systemd_install.install(c.config(), unit_dir, dry_run)
    c.emit(render.unit_changes_json(changes), render.unit_changes_text(changes))


@systemd_group.command("uninstall")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Remove the units from DIR, leaving the running systemd alone.")
@click.option("--dry-run", "-n", is_flag=True, help="Say what would be removed; change nothing.")
@pass_ctx
def systemd_uninstall_(c: Context, unit_dir, dry_run):
    """Stop, disable and remove every unit snapmgr wrote from this config."""
    changes = systemd_install.uninstall(c.config(), unit_dir, dry_run)
    c.emit(render.unit_changes_json(changes), render.unit_changes_text(changes))


@systemd_group.command("status")
@pass_ctx
def systemd_status_(c: Context):
    """Each schedule's timer: last and next run, and how the last run ended."""
    engine = c.engine()
    timers = systemd_install.status(engine.config, engine.journal.history)
    c.emit({"timers": [render.timer_json(t) for t in timers]},
           render.timers_table(timers, datetime.now(timezone.utc)) if timers else "no schedules configured")


@cli.command()
@pass_ctx
def init(c: Context):
    """Write a commented example config (never overwrites one)."""
    path = configuration.locate(c.config_option)
    if path.exists():
        raise UsageError(f"{path} already exists; not overwriting it")
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(path, "x") as f:
        f.write(resources.files("snapmgr").joinpath("example.toml").read_text())
    path.chmod(0o644)
    c.emit({"config": str(path), "written": True}, f"wrote {path}; check it with 'snapmgr config check'")


@cli.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to build the demo [default: a new temporary directory].")
def demo(workdir):
    """Run the main job on a generated sample directory, showing each command."""
    from snapmgr.demo import run_demo
    run_demo(workdir)


# Helpers -------------------------------------------------------------------------------

def _check_tag(tag: str) -> None:
    if not is_valid_name(tag):
        raise UsageError(f"--tag {quote(tag)}: {NAME_RULE}")


def _fuse_lifecycle():
    from snapmgr.fuse import require_pyfuse3
    require_pyfuse3()
    from snapmgr.fuse import lifecycle
    return lifecycle


def _progress(c: Context):
    """rsync's progress line, redrawn in place, only for a person at a terminal."""
    if c.json or c.quiet or not sys.stderr.isatty():
        return None
    return lambda line: click.echo(f"\r\033[K{line.strip()}", nl=False, err=True)


def _describe(o: Outcome) -> str | None:
    if o.error:
        return None  # reported on stderr by _finish
    lines = [o.planned] if o.planned else []
    if o.created:
        lines.append(f"created {o.created.id}")
    lines += [f"deleted {sid}" for sid in o.deleted]
    return "\n".join(lines)


def _describe_prune(o: Outcome, dry_run: bool) -> str:
    if o.error:
        return f"{o.volume}: failed"
    if o.policy is None:
        return f"{o.volume}: no retention policy; nothing is pruned"
    head = f"{o.volume} (policy {o.policy})" + (": dry run, nothing deleted" if dry_run else "")
    return f"{head}\n{render.decisions_table(o) if o.decisions else 'no snapshots'}"


def _finish(c: Context, outcomes: Sequence[Outcome], data: dict, human: str, dry_run: bool) -> None:
    """Show what a job did, then report its failures: each volume's, the monitoring's
    (after a job that changed something; a dry run, even a refused one, changes nothing),
    and the journal's when the run could not all be recorded."""
    changed = [o.volume for o in outcomes if o.created or o.deleted or o.error]
    unpublished = _shown(c, lambda: data | {"results": [render.outcome_json(o) for o in outcomes],
                                            "journal_error": _text(c.engine().journal_failure)},
                         human, changed if changed and not dry_run else None)
    unrecorded = c.engine().journal_failure
    if sys.stderr.isatty():
        click.echo("\r\033[K", nl=False, err=True)
    failures = [(f"volume {o.volume}: {o.error}", o.error) for o in outcomes if o.error]
    if unpublished:
        failures.append((str(unpublished), unpublished))
    if unrecorded:
        failures.append((f"this run was not recorded: {unrecorded}", unrecorded))
    for message, _ in failures:
        _error(message)
    if failures:
        sys.exit(failures[0][1].exit_code)


def _shown(c: Context, data: Callable[[], dict], human: str | None,
           changed: Sequence[str] | None) -> SnapmgrError | None:
    """Show what a command did, and leave it for monitoring when it changed something
    (`changed`: the volumes whose snapshots it changed; None: nothing at all;
    snapmgr.monitor.publish). The text comes first: nothing the monitoring does can keep
    it from the user. The JSON document tells how the monitoring (and the journal, which
    it writes to) went, so it is composed after."""
    if not c.json:
        c.emit({}, human)
    unpublished = None if changed is None else monitor.publish(c.engine(), changed)
    if c.json:
        c.emit(data() | {"monitoring_error": _text(unpublished)}, human)
    return unpublished


def _text(error: SnapmgrError | None) -> str | None:
    return str(error) if error else None


def _error(message: str) -> None:
    """Every error leaves through here: one line, whatever it quotes."""
    click.echo(f"snapmgr: error: {one_line(message)}", err=True)


class _LogFormatter(logging.Formatter):
    """One line per record; the traceback of an exception only with --debug."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        line = one_line(f"snapmgr: {record.levelname}: {record.getMessage()}")
        if self.debug and record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _terminate(signum, frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI: errors are one line on stderr and a documented exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    args = list(sys.argv[1:] if argv is None else argv)
    debug = False
    try:
        with cli.make_context("snapmgr", list(args)) as ctx:
            # As click parsed it: an argument spelt '--debug' (a volume after '--') is not the option.
            debug = ctx.params["debug"]
            cli.invoke(ctx)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        _fail(args, f"{e.format_message()} (see 'snapmgr --help')",
              EXIT_USAGE if isinstance(e, click.UsageError) else EXIT_FAILED)
    except (click.Abort, KeyboardInterrupt):
        _fail(args, "interrupted", EXIT_INTERRUPTED)
    except (SnapmgrError, OSError) as e:
        if debug and not _is_check(args):
            raise
        error = as_error(e)
        _fail(args, str(error), error.exit_code, debug)
    except Exception as e:  # a bug: still one line, and the exit code says so
        if debug and not _is_check(args):
            raise
        _fail(args, f"internal error: {type(e).__name__}: {e} (a bug in snapmgr; --debug shows where)", EXIT_SOFTWARE,
              debug)


def _fail(args: list[str], message: str, code: int, debug: bool = False) -> NoReturn:
    """Report a failure and exit; `check` answers as a monitoring plugin that cannot
    tell: its UNKNOWN line on stdout (all a monitoring system reads) and exit 3, never a
    code it would take for WARNING or CRITICAL."""
    _error(message)
    options = _check_options(args)
    if options is not None:
        if debug:
            traceback.print_exc()
        click.echo(json.dumps(plugin.failure_json(one_line(message)), indent=2, sort_keys=True)
                   if options.get("as_json") else plugin.failure_text(one_line(message)))
        sys.exit(health_state.UNKNOWN)
    sys.exit(code)


def _is_check(args: list[str]) -> bool:
    return _check_options(args) is not None


def _check_options(args: list[str]) -> dict | None:
    """The global options, as click reads them however wrong the rest, when the command
    line runs `check`; None when it runs another command."""
    try:
        with cli.make_context("snapmgr", list(args), resilient_parsing=True) as ctx:
            # Click 8 keeps the subcommand's name apart from its arguments; click 9 will not.
            rest = [*getattr(ctx, "_protected_args", ()), *ctx.args]
            return ctx.params if rest[:1] == ["check"] else None
    except (click.ClickException, click.exceptions.Exit):
        return None
