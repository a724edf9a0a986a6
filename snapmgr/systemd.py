"""systemd units rendered from the config: per schedule a oneshot service and its timer,
the boot-time recovery service and the template of an always-on FUSE mount.

The templates are package data (snapmgr/units); this module fills them in. Every unit
starts with a header naming the config it came from: that is how `systemd install`
knows which units are its own to rewrite or remove."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Iterable, Iterator

import snapmgr
from snapmgr import sh
from snapmgr.backends import BACKENDS
from snapmgr.config import Config, Schedule
from snapmgr.errors import ConfigError, SnapmgrError, UsageError, as_error, quote

HEADER = "# Written by snapmgr from "
PREFIX = "snapmgr-"
RECOVER = "snapmgr-recover.service"
MOUNT = "snapmgr-mount@.service"
# What ProtectHome= and PrivateTmp= would hide or make read-only.
HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
TMPS = (Path("/tmp"), Path("/var/tmp"))
# Backends whose tools may load a kernel module themselves (lvm2 runs modprobe for a
# missing dm-snapshot or dm-thin-pool target, zfs for a missing /dev/zfs).
MODPROBING = ("lvm", "zfs")
_SIMPLE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


def timer(schedule: str) -> str:
    return f"{PREFIX}{schedule}.timer"


def service(schedule: str) -> str:
    return f"{PREFIX}{schedule}.service"


def header(config: Path) -> str:
    return (f"{HEADER}{config}\n# by 'snapmgr systemd install', which rewrites this file, and removes it once the "
            f"config no longer makes it:\n# change the config, not this file ('systemctl edit' adds overrides that stay).")


def written_from(text: str) -> str | None:
    """The config a unit file says it was written from; None when snapmgr did not write it."""
    first = text.split("\n", 1)[0]
    return first[len(HEADER):] if first.startswith(HEADER) else None


def render(config: Config) -> list[Unit]:
    """Every unit of the config, in a stable order."""
    if not str(config.path).isprintable():
        raise UsageError(f"config path {quote(config.path)} cannot be written into a unit file")
    if RECOVER in {service(name) for name in config.schedules}:
        raise ConfigError(config.path, "schedules.recover", f"the name is taken: {RECOVER} is snapmgr's recovery "
                                                           f"at boot; give the schedule another name")
    fill = _Filler(config)
    units = []
    for s in config.schedules.values():
        units.append(Unit(service(s.name), fill("schedule.service", schedule=s.name, what=_what(s),
                                                after_others=_after_others(config, s), timeout=_timeout(s))))
        units.append(Unit(timer(s.name), fill(
            "schedule.timer", schedule=s.name, on_calendar=s.on_calendar.replace("%", "%%"),
            persistent="yes" if s.persistent else "no", randomized_delay=_seconds(s.randomized_delay),
            accuracy=_seconds(s.accuracy))))
    touched = sorted({u for q in config.quiescers.values() if q.kind == "systemd" for u in q.options["units"]})
    before = f"Before={' '.join(touched)}\n" if touched else "# (no [quiesce.*] table of kind systemd: no unit to precede)\n"
    units.append(Unit(RECOVER, fill("recover.service", before=before)))
    units.append(Unit(MOUNT, fill("mount@.service")))
    return units


class _Filler:
    """The values every template shares: the header, how to run snapmgr, the hardening."""

    def __init__(self, config: Config):
        path = absolute(config.path)
        self.common = {"header": header(path),
                       "snapmgr": " ".join(map(exec_arg, (sys.executable, "-m", "snapmgr", "--config", path))),
                       "environment": _environment(), "hardening": hardening(config)}

    def __call__(self, template: str, **values: str) -> str:
        text = resources.files("snapmgr").joinpath("units", template).read_text()
        return Template(text).substitute(self.common | values)


def absolute(path: Path) -> Path:
    """The config's path as the units name it: absolute, as the user spelt it (a symlink
    kept, so that it can be pointed elsewhere)."""
    return Path(os.path.abspath(path))


def exec_arg(value: Any) -> str:
    """One argument of an Exec*= line: specifiers (%) and variables ($) taken literally,
    quoted when it holds anything else than plain path characters."""
    text = str(value).replace("%", "%%").replace("$", "$$")
    if _SIMPLE_ARG.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment() -> str:
    """PYTHONPATH, when the Python that runs snapmgr now would not find this snapmgr
    by itself (it runs from a source tree): the service runs the same code as install."""
    package = Path(snapmgr.__file__).resolve().parent
    probe = "import snapmgr, sys; sys.stdout.write(snapmgr.__file__)"
    try:
        found = sh.run([sys.executable, "-I", "-c", probe], timeout=30, check=False).stdout
    except SnapmgrError:
        found = ""
    if found and Path(found).resolve().parent == package:
        return ""
    return f"Environment={exec_arg('PYTHONPATH=' + str(package.parent))}\n"


def _seconds(value: timedelta) -> str:
    return f"{int(value.total_seconds())}s"


def _after_others(config: Config, schedule: Schedule) -> str:
    """After= the services of the schedules before this one by name that share a volume
    with it: two of them fired together then run one after the other instead of the
    second failing on the busy volume's lock. One order by name, so no cycle."""
    mine = set(config.volumes_of(schedule))
    earlier = [service(s.name) for s in sorted(config.schedules.values(), key=lambda s: s.name)
               if s.name < schedule.name and mine & set(config.volumes_of(s))]
    if not earlier:
        return ""
    return ("# Shares volumes with these schedules: runs after theirs when fired together.\n"
            f"After={' '.join(earlier)}\n")


def _timeout(schedule: Schedule) -> str:
    if schedule.timeout is None:
        return ("# No start timeout (the schedule sets none): a first snapshot of a big volume may rightly take\n"
                "# hours.\nTimeoutStartSec=infinity\n")
    return f"TimeoutStartSec={math.ceil(schedule.timeout.total_seconds())}s\n"


def _what(schedule: Schedule) -> str:
    parts = ([f"groups {', '.join(schedule.groups)}"] if schedule.groups else []) + \
            ([f"volumes {', '.join(schedule.volumes)}"] if schedule.volumes else [])
    return "; ".join(parts)


# Hardening -----------------------------------------------------------------------------

def hardening(config: Config) -> str:
    """The sandboxing that snapshots allow, each choice that depends on the config with
    its reason. Left out on purpose, for every config: ProtectSystem= (repositories and
    snapshot directories may be anywhere), PrivateDevices= and DeviceAllow= (LVM needs
    /dev/mapper and /run/lvm, ZFS /dev/zfs), RestrictSUIDSGID= (an rsync snapshot keeps
    setuid bits), MemoryDenyWriteExecute= (ctypes callbacks)."""
    paths = list(_paths(config))
    lines = [*_unless_under(paths, TMPS, "PrivateTmp=yes", "which PrivateTmp= would hide"),
             *_unless_under([p for p in paths if p[2]], HOMES, "ProtectHome=read-only",
                            "which ProtectHome= would make read-only")]
    lines += ["NoNewPrivileges=yes", "ProtectKernelTunables=yes"]
    modprobing = sorted(v.name for v in config.volumes.values() if v.backend in MODPROBING)
    if modprobing:
        lines.append(f"# ProtectKernelModules= is off: the tools of volume {', '.join(modprobing)} may load their "
                     f"kernel module themselves.")
    else:
        lines.append("ProtectKernelModules=yes")
    lines += ["ProtectControlGroups=yes", "ProtectHostname=yes", "RestrictRealtime=yes", "LockPersonality=yes"]
    return "\n".join(lines)


def _unless_under(paths: list[tuple[str, Path | None, bool]], roots: tuple[Path, ...], setting: str,
                  effect: str) -> list[str]:
    name = setting.split("=")[0]
    unknown = [what for what, p, _ in paths if p is None]
    if unknown:
        return [f"# {name}= is off: where {unknown[0]} is cannot be told now."]
    for what, p, _ in paths:
        # Resolved too: a symlink to a directory under a root is hidden with that root.
        for seen in dict.fromkeys([p, Path(os.path.realpath(p))]):
            for root in roots:
                if seen.is_relative_to(root) or seen.is_relative_to(os.path.realpath(root)):
                    shown = p if seen == p else f"{p} (which is {seen})"
                    return [f"# {name}= is off: {shown} ({what}) is under {root}, {effect}."]
    return [setting]


def _paths(config: Config) -> Iterator[tuple[str, Path | None, bool]]:
    """Every path the services may touch, by what names it, and whether they may write
    there (every path of a volume or a quiescer counts as written); None where a
    volume's files are cannot be told."""
    settings = config.settings
    yield "the config", absolute(config.path), False
    yield "settings.state_dir", settings.state_dir, True
    yield "settings.run_dir", settings.run_dir, True
    if settings.metrics_textfile:
        yield "settings.metrics_textfile", settings.metrics_textfile, True
    yield "snapmgr's Python", Path(sys.prefix), False
    yield "snapmgr itself", Path(snapmgr.__file__).parent, False
    for v in config.volumes.values():
        yield from _absolute(f"volumes.{v.name}", v.options)
        try:
            root = BACKENDS[v.backend](v.name, v.options, settings.run_dir).live_root()
        except (SnapmgrError, OSError) as e:
            yield f"volumes.{v.name} ({as_error(e)})", None, True
            continue
        if root is not None:
            yield f"where volume {v.name} is mounted", root, True
    for q in config.quiescers.values():
        yield from _absolute(f"quiesce.{q.name}", q.options)


def _absolute(where: str, options: dict) -> Iterable[tuple[str, Path, bool]]:
    for key, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and str(item).startswith("/"):
                yield f"{where}.{key}", Path(item), True
