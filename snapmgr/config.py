"""/etc/snapmgr/snapmgr.toml -> a typed Config. Every error names the file, the dotted key
and the reason, and nothing is half-loaded: a Config exists only if all of it is valid."""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta, tzinfo
from pathlib import Path
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from snapmgr import quiesce, schema, trust
from snapmgr.backends import BACKENDS
from snapmgr.errors import ConfigError, UsageError, as_error, quote
from snapmgr.manifest.hashing import ALGORITHMS
from snapmgr.model import MinFree, Policy
from snapmgr.schema import Field, check_table, dotted

DEFAULT_PATH = Path("/etc/snapmgr/snapmgr.toml")
ENV_VAR = "SNAPMGR_CONFIG"


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path("/var/lib/snapmgr")
    run_dir: Path = Path("/run/snapmgr")
    lock_wait: timedelta = timedelta(seconds=60)
    timezone: tzinfo | None = None  # None: the system's local time, as borg uses
    manifest: str = "blake3"        # the hash of snapshot manifests, or "off"
    metrics_textfile: Path | None = None  # rewritten after every run, for node_exporter


@dataclass(frozen=True)
class Volume:
    name: str
    backend: str
    options: Mapping[str, Any]
    retention: Policy | None
    tags: frozenset[str]
    quiesce: tuple[str, ...]
    manifest: str = Settings.manifest   # the [settings] value unless the volume sets its own
    min_free: MinFree | None = None     # refuse a snapshot when less is free where it draws from
    # How old the newest snapshot may grow before `snapmgr check` warns / goes critical;
    # None: derived from the schedules that cover the volume.
    warn_age: timedelta | None = None
    crit_age: timedelta | None = None


@dataclass(frozen=True)
class Group:
    name: str
    volumes: tuple[str, ...]
    quiesce: tuple[str, ...]
    max_window: timedelta


@dataclass(frozen=True)
class Schedule:
    name: str
    on_calendar: str
    volumes: tuple[str, ...]
    groups: tuple[str, ...]
    tag: str
    prune: bool
    randomized_delay: timedelta
    persistent: bool
    accuracy: timedelta
    timeout: timedelta | None = None    # how long a run may take; None: no limit


@dataclass(frozen=True)
class Config:
    path: Path
    settings: Settings
    volumes: dict[str, Volume]
    policies: dict[str, Policy]
    quiescers: dict[str, quiesce.Spec] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    schedules: dict[str, Schedule] = field(default_factory=dict)

    def volumes_of(self, schedule: Schedule, grouped: bool = True) -> tuple[str, ...]:
        """The volumes a run of the schedule snapshots, each once: its groups' (unless not
        `grouped`), then those it names that none of its groups takes."""
        in_groups = [v for g in schedule.groups for v in self.groups[g].volumes]
        alone = [v for v in schedule.volumes if v not in in_groups]
        return tuple(dict.fromkeys([*in_groups, *alone] if grouped else alone))


def _timezone(value: Any) -> tzinfo | None:
    text = schema.string(value)
    if text == "local":
        return None
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {quote(text)} (use 'local', 'UTC' or a name like 'Europe/Paris')") from None


# "off" is for volumes too big to hash at every snapshot: they are then never verifiable.
MANIFEST_CHOICES = (*ALGORITHMS, "off")
SETTINGS = {
    "state_dir": Field(schema.path(), default=Settings.state_dir),
    "run_dir": Field(schema.path(), default=Settings.run_dir),
    "lock_wait": Field(schema.duration, default=Settings.lock_wait),
    "timezone": Field(_timezone, default=None),
    "manifest": Field(schema.choice(*MANIFEST_CHOICES), default=Settings.manifest),
    "metrics_textfile": Field(schema.path()),
}
POLICY = {
    "keep_within": Field(schema.duration),
    "keep_last": Field(schema.count, default=0),
    **{period: Field(schema.count, default=0) for period in ("hourly", "daily", "weekly", "monthly", "yearly")},
}
VOLUME = {
    "backend": Field(schema.string, required=True),  # checked first, by _discriminator
    "retention": Field(schema.name),
    "tags": Field(schema.names, default=()),
    "quiesce": Field(schema.names, default=()),
    "manifest": Field(schema.choice(*MANIFEST_CHOICES)),
    "min_free": Field(schema.min_free),
    "warn_age": Field(schema.duration),
    "crit_age": Field(schema.duration),
}
DEFAULT_MAX_WINDOW = timedelta(seconds=60)
# The keys of every [quiesce.NAME] table; each kind adds its own (quiesce.KINDS).
QUIESCE_COMMON = {"kind": Field(schema.string, required=True),
                  "timeout": Field(schema.duration, default=timedelta(seconds=60)),
                  "required": Field(schema.boolean, default=True),
                  "max_window": Field(schema.duration, default=DEFAULT_MAX_WINDOW)}
GROUP = {"volumes": Field(schema.list_of(schema.name, non_empty=True), required=True),
         "quiesce": Field(schema.names, default=()),
         "max_window": Field(schema.duration, default=DEFAULT_MAX_WINDOW)}
SCHEDULE = {
    "on_calendar": Field(schema.string, required=True),
    "volumes": Field(schema.names, default=()),
    "groups": Field(schema.names, default=()),
    "tag": Field(schema.name),
    "prune": Field(schema.boolean, default=True),
    "randomized_delay": Field(schema.duration, default=timedelta(0)),
    "persistent": Field(schema.boolean, default=True),
    # systemd's own default; a timer that may fire up to a minute late lets it batch wakeups.
    "accuracy": Field(schema.duration, default=timedelta(minutes=1)),
    # None by default: a first rsync of a big volume may rightly take hours.
    "timeout": Field(schema.duration),
}
TOP = ("settings", "volumes", "retention", "quiesce", "groups", "schedules")


def locate(option: str | None) -> Path:
    """--config wins over $SNAPMGR_CONFIG (unless empty), which wins over the default path."""
    if option is None:
        return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)
    if not option or "\0" in option:
        raise UsageError(f"--config {quote(option)} is not a path")
    return Path(option)


def load(path: Path) -> Config:
    return parse(path, _read(path))


def _read(path: Path) -> dict:
    try:
        trust.check(path)
        # O_NONBLOCK: opening a FIFO must not hang; it is refused below as not a file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(path, None, "is not a regular file")
            return tomllib.loads(f.read().decode())
    except trust.Untrusted as e:
        raise ConfigError(path, None, str(e)) from None
    except FileNotFoundError:
        raise ConfigError(path, None, "does not exist (write an example with 'snapmgr init')") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot be read: {as_error(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"TOML syntax error: {e}") from None
    except ValueError as e:  # tomllib's own limits, such as an integer of over 4300 digits
        raise ConfigError(path, None, f"cannot be read as TOML: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise ConfigError(path, None, "arrays or tables are nested too deeply") from None


def parse(path: Path, doc: dict) -> Config:
    for key in doc:
        if key not in TOP:
            raise ConfigError(path, dotted(key), "unknown table" + schema.did_you_mean(key, TOP))
    settings = Settings(**check_table(path, ("settings",), doc.get("settings", {}), SETTINGS))
    policies = {n: Policy(n, **_policy(path, n, t)) for n, t in _named_tables(path, doc, "retention")}
    quiescers = {n: _quiescer(path, n, t) for n, t in _named_tables(path, doc, "quiesce")}
    volumes = {n: _volume(path, n, t, policies, quiescers, settings) for n, t in _named_tables(path, doc, "volumes")}
    groups = {n: _group(path, n, t, volumes, quiescers) for n, t in _named_tables(path, doc, "groups")}
    schedules = {n: _schedule(path, n, t, volumes, groups) for n, t in _named_tables(path, doc, "schedules")}
    return Config(path, settings, volumes, policies, quiescers, groups, schedules)


def _named_tables(path: Path, doc: dict, section: str):
    tables = doc.get(section, {})
    if not isinstance(tables, dict):
        raise ConfigError(path, dotted(section), f"expected a table of [{section}.NAME] tables")
    for name, table in tables.items():
        try:
            schema.name(name)
        except ValueError as e:
            raise ConfigError(path, dotted(section, name), str(e)) from None
        yield name, table


def _policy(path: Path, name: str, table: Any) -> dict:
    values = check_table(path, ("retention", name), table, POLICY)
    if not any(values.values()):
        raise ConfigError(path, dotted("retention", name),
                          f"keeps nothing: set at least one of {', '.join(POLICY)}")
    return values


def _quiescer(path: Path, name: str, table: Any) -> quiesce.Spec:
    where = ("quiesce", name)
    kind = _discriminator(path, where, table, "kind", quiesce.KINDS)
    values = check_table(path, where, table, QUIESCE_COMMON | quiesce.KINDS[kind].options)
    common = {k: values.pop(k) for k in QUIESCE_COMMON}
    return quiesce.Spec(name, kind, common["timeout"], common["required"], common["max_window"], values)


def _volume(path: Path, name: str, table: Any, policies: dict, quiescers: dict, settings: Settings) -> Volume:
    where = ("volumes", name)
    backend = _discriminator(path, where, table, "backend", BACKENDS)
    values = check_table(path, where, table, VOLUME | BACKENDS[backend].options)
    try:
        BACKENDS[backend].check_options(values)
    except schema.InvalidKey as e:
        raise ConfigError(path, dotted(*where, e.key), e.reason) from None
    _check_refs(path, where + ("retention",), [values["retention"]] if values["retention"] else [], policies, "retention")
    _check_refs(path, where + ("quiesce",), values["quiesce"], quiescers, "quiesce")
    common = {k: values.pop(k) for k in VOLUME}
    warn, crit = common["warn_age"], common["crit_age"]
    if warn is not None and crit is not None and warn >= crit:
        raise ConfigError(path, dotted(*where, "warn_age"), "must be shorter than crit_age")
    return Volume(name, backend, values, policies.get(common["retention"]),
                  frozenset(common["tags"]), common["quiesce"], common["manifest"] or settings.manifest,
                  common["min_free"], warn, crit)


def _group(path: Path, name: str, table: Any, volumes: dict, quiescers: dict) -> Group:
    values = check_table(path, ("groups", name), table, GROUP)
    _check_refs(path, ("groups", name, "volumes"), values["volumes"], volumes, "volumes")
    _check_refs(path, ("groups", name, "quiesce"), values["quiesce"], quiescers, "quiesce")
    return Group(name, **values)


def _schedule(path: Path, name: str, table: Any, volumes: dict, groups: dict) -> Schedule:
    values = check_table(path, ("schedules", name), table, SCHEDULE)
    _check_refs(path, ("schedules", name, "volumes"), values["volumes"], volumes, "volumes")
    _check_refs(path, ("schedules", name, "groups"), values["groups"], groups, "groups")
    if not values["volumes"] and not values["groups"]:
        raise ConfigError(path, dotted("schedules", name), "names no volumes and no groups")
    if values["timeout"] is not None and values["timeout"] <= timedelta(0):
        raise ConfigError(path, dotted("schedules", name, "timeout"), "must be longer than 0 (leave it out for no limit)")
    taken_by: dict[str, str] = {}
    for g in dict.fromkeys(values["groups"]):
        for v in groups[g].volumes:
            if v in taken_by:
                raise ConfigError(path, dotted("schedules", name, "groups"),
                                  f"groups {quote(taken_by[v])} and {quote(g)} both take volume {quote(v)}: a run "
                                  f"would snapshot and prune it twice; list groups that share no volume")
            taken_by[v] = g
    return Schedule(name, **(values | {"tag": values["tag"] or name}))


def _discriminator(path: Path, where: tuple[str, ...], table: Any, key: str, known: Mapping) -> str:
    """The key that decides which other keys a table may have, checked before them."""
    if not isinstance(table, dict):
        raise ConfigError(path, dotted(*where), "expected a table")
    if key not in table:
        raise ConfigError(path, dotted(*where, key), "missing required key")
    try:
        value = schema.string(table[key])
    except ValueError as e:
        raise ConfigError(path, dotted(*where, key), str(e)) from None
    if value not in known:
        raise ConfigError(path, dotted(*where, key), f"unknown {key} {quote(value)} (known: {', '.join(known)})"
                          + schema.did_you_mean(value, known))
    return value


def _check_refs(path: Path, where: tuple[str, ...], refs, defined: Mapping, section: str) -> None:
    for ref in refs:
        if ref not in defined:
            raise ConfigError(path, dotted(*where), f"no [{section}.{ref}] table is defined"
                              + schema.did_you_mean(ref, defined))
