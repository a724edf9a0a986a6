"""Config errors: each bad config gives one ConfigError naming the file, the dotted key
and the reason."""

import os
import textwrap
from importlib import resources
from datetime import timedelta
from pathlib import Path

import pytest

from snapmgr import config
from snapmgr.errors import ConfigError

GOOD = """
[settings]
lock_wait = "5s"
timezone = "UTC"

[retention.default]
keep_within = "36h"
daily = 7
weekly = 4

[volumes.home]
backend = "rsync"
source = "{src}"
repository = "{repo}"
exclude = ["*.tmp"]
retention = "default"
tags = ["home"]

[volumes.data]
backend = "btrfs"
subvolume = "{src}"
snapshot_dir = "{repo}/data"

[quiesce.app]
kind = "command"
pre = ["true"]

[groups.all]
volumes = ["home", "data"]
quiesce = ["app"]

[schedules.hourly]
on_calendar = "hourly"
groups = ["all"]
"""


@pytest.fixture
def write(tmp_path):
    src = tmp_path / "src"
    src.mkdir()

    def write(text: str) -> Path:
        path = tmp_path / "snapmgr.toml"
        path.write_text(textwrap.dedent(text).format(src=src, repo=tmp_path / "repo"))
        path.chmod(0o644)
        return path
    return write


def test_good_config_loads_typed(write):
    cfg = config.load(write(GOOD))
    home = cfg.volumes["home"]
    assert home.backend == "rsync" and home.options["exclude"] == ("*.tmp",)
    assert home.options["one_file_system"] is False
    assert home.retention.daily == 7 and home.retention.keep_within == timedelta(hours=36)
    assert home.tags == {"home"}
    assert cfg.volumes["data"].retention is None
    assert cfg.settings.lock_wait == timedelta(seconds=5)
    assert cfg.groups["all"].volumes == ("home", "data")
    assert cfg.schedules["hourly"].tag == "hourly" and cfg.schedules["hourly"].prune is True
    assert cfg.quiescers["app"].options == {"pre": ("true",), "post": None}


def test_example_config_is_valid(tmp_path):
    path = tmp_path / "snapmgr.toml"
    path.write_text(resources.files("snapmgr").joinpath("example.toml").read_text())
    path.chmod(0o644)  # a copy, as `snapmgr init` makes: the checkout may not be root's
    assert "etc" in config.load(path).volumes


LVM = '\n[volumes.lv]\nbackend = "lvm"\nlv = {lv}\n'
ZFS = '\n[volumes.z]\nbackend = "zfs"\ndatasets = ["tank/a", {ds}]\n'


def test_lvm_and_zfs_options_load_typed(write):
    cfg = config.load(write(GOOD + LVM.format(lv='"vg0/data"') + 'snapshot_size = "20%ORIGIN"\n'
                            + ZFS.format(ds='"tank/b"') + "recursive = true\n"))
    lv = cfg.volumes["lv"].options
    assert lv["lv"] == ("vg0", "data") and lv["thin_pool_threshold"] == 80
    assert lv["snapshot_size"].bytes_for(10 << 30) == 2 << 30
    assert cfg.volumes["z"].options == {"datasets": ("tank/a", "tank/b"), "recursive": True}


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


# (description, config text, dotted key in the message, reason in the message)
BAD = [
    ("unknown top table", GOOD + "\n[volume.x]\n", "volume", "unknown table (did you mean 'volumes'?)"),
    ("unknown key with suggestion", replace('source = "{src}"', 'sorce = "{src}"'),
     "volumes.home.sorce", "unknown key (did you mean 'source'?)"),
    ("missing field", replace('source = "{src}"\n', ""), "volumes.home.source", "missing required key"),
    ("wrong type", replace("daily = 7", 'daily = "7"'), "retention.default.daily",
     "wrong type: expected an integer, got a string"),
    ("negative count", replace("daily = 7", "daily = -1"), "retention.default.daily", "must be 0 or more"),
    ("bad duration", replace('keep_within = "36h"', 'keep_within = "36 hours"'),
     "retention.default.keep_within", "is not a duration"),
    ("ambiguous duration", replace('keep_within = "36h"', 'keep_within = "3m"'),
     "retention.default.keep_within", "ambiguous"),
    ("empty policy", GOOD + '\n[retention.none]\n', "retention.none", "keeps nothing"),
    ("bad volume name", replace("[volumes.home]", '[volumes."-rf"]'), "volumes.-rf", "bad name '-rf'"),
    ("name with slash", replace("[volumes.home]", '[volumes."a/b"]'), 'volumes."a/b"', "bad name"),
    ("name with dots", replace("[volumes.home]", '[volumes."a..b"]'), 'volumes."a..b"', "bad name"),
    ("name with at", replace("[volumes.home]", '[volumes."a@b"]'), 'volumes."a@b"', "bad name"),
    ("name with space", replace("[volumes.home]", '[volumes."a b"]'), 'volumes."a b"', "bad name"),
    ("path does not exist", replace('source = "{src}"', 'source = "/nonexistent/x"'), "volumes.home.source",
     "path /nonexistent/x does not exist"),
    ("relative path", replace('repository = "{repo}"', 'repository = "snaps"'), "volumes.home.repository",
     "'snaps' is not an absolute path"),
    ("unknown backend", replace('backend = "rsync"', 'backend = "rsnc"'), "volumes.home.backend",
     "unknown backend 'rsnc' (known: rsync, btrfs, lvm, zfs) (did you mean 'rsync'?)"),
    ("missing backend", replace('backend = "rsync"\n', ""), "volumes.home.backend", "missing required key"),
    ("backend key of another backend", replace('exclude = ["*.tmp"]', 'subvolume = "{src}"'),
     "volumes.home.subvolume", "unknown key"),
    ("unknown policy", replace('retention = "default"', 'retention = "defualt"'), "volumes.home.retention",
     "no [retention.defualt] table is defined (did you mean 'default'?)"),
    ("bad tag", replace('tags = ["home"]', 'tags = ["ok", "-bad"]'), "volumes.home.tags", "item 2: bad name"),
    ("volume not a table", GOOD + '\n[volumes]\nx = 1\n', "volumes.x", "expected a table"),
    ("bad timezone", replace('timezone = "UTC"', 'timezone = "Mars/Olympus"'), "settings.timezone",
     "unknown time zone 'Mars/Olympus'"),
    ("unknown settings key", replace('lock_wait = "5s"', 'lockwait = "5s"'), "settings.lockwait",
     "did you mean 'lock_wait'?"),
    ("unknown quiesce kind", replace('kind = "command"', 'kind = "sqlit"'), "quiesce.app.kind",
     "unknown kind 'sqlit'"),
    ("quiesce key of another kind", replace('pre = ["true"]', 'units = ["a.service"]'), "quiesce.app.units",
     "unknown key"),
    ("empty argv", replace('pre = ["true"]', "pre = []"), "quiesce.app.pre", "must not be empty"),
    ("group names unknown volume", replace('volumes = ["home", "data"]', 'volumes = ["home", "dta"]'),
     "groups.all.volumes", "no [volumes.dta] table is defined (did you mean 'data'?)"),
    ("group names unknown quiescer", replace('quiesce = ["app"]', 'quiesce = ["ap"]'), "groups.all.quiesce",
     "no [quiesce.ap] table"),
    ("schedule with no target", replace('groups = ["all"]', ""), "schedules.hourly", "names no volumes and no groups"),
    ("schedule names unknown group", replace('groups = ["all"]', 'groups = ["al"]'), "schedules.hourly.groups",
     "no [groups.al] table"),
    ("schedule bool", GOOD + "prune = 1\n", "schedules.hourly.prune", "expected a boolean, got an integer"),
    ("lvm without vg", GOOD + LVM.format(lv='"data"'), "volumes.lv.lv", "'data' is not VG/LV"),
    ("lvm option name", GOOD + LVM.format(lv='"vg0/-x"'), "volumes.lv.lv", "is not VG/LV"),
    ("lvm size unit", GOOD + LVM.format(lv='"vg0/data"') + 'snapshot_size = "1X"\n', "volumes.lv.snapshot_size",
     "'1X' is not a snapshot size (e.g. 512M, 1G, or 20%ORIGIN)"),
    ("lvm percent of what", GOOD + LVM.format(lv='"vg0/data"') + 'snapshot_size = "20%VG"\n',
     "volumes.lv.snapshot_size", "is not a snapshot size"),
    ("thin threshold", GOOD + LVM.format(lv='"vg0/data"') + "thin_pool_threshold = 100\n",
     "volumes.lv.thin_pool_threshold", "between 1 and 99"),
    ("zfs dataset", GOOD + ZFS.format(ds='"tank//x"'), "volumes.z.datasets", "item 2: 'tank//x' is not a ZFS dataset"),
    ("zfs no datasets", GOOD + ZFS.format(ds="").replace('"tank/a", ', ""), "volumes.z.datasets", "must not be empty"),
]


@pytest.mark.parametrize("text,key,reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config(write, text, key, reason):
    path = write(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message
    assert "\n" not in message


def test_toml_syntax_error_names_the_line(write):
    path = write(GOOD + "\n[volumes.x\n")
    with pytest.raises(ConfigError, match=rf"^{path}: TOML syntax error: .*line \d+"):
        config.load(path)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist .*snapmgr init"):
        config.load(tmp_path / "nope.toml")


def test_locate_prefers_option_then_env(monkeypatch):
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.locate(None) == Path("/etc/snapmgr/snapmgr.toml")
    monkeypatch.setenv(config.ENV_VAR, "/env.toml")
    assert config.locate(None) == Path("/env.toml")
    assert config.locate("/opt.toml") == Path("/opt.toml")


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership rule applies only when running as root")
@pytest.mark.parametrize("owner,mode,reason", [
    (65534, 0o644, "is owned by uid 65534, not root"),
    (0, 0o664, "is writable by group or others (mode 0664)"),
    (0, 0o646, "is writable by group or others (mode 0646)"),
])
def test_root_refuses_config_others_can_change(write, owner, mode, reason):
    path = write(GOOD)
    os.chown(path, owner, 0)
    path.chmod(mode)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: {reason}")
