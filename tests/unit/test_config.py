"""Config errors: each bad config gives one ConfigError naming the file, the dotted key
and the reason."""

import os
import textwrap
import threading
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
    assert cfg.quiescers["app"].required is True and cfg.quiescers["app"].max_window == timedelta(seconds=60)
    assert cfg.groups["all"].max_window == timedelta(seconds=60)


def test_monitoring_and_space_keys(write):
    cfg = config.load(write(GOOD.replace('tags = ["home"]', 'tags = ["home"]\nmin_free = "1.5G"\nwarn_age = "2h"')
                            .replace('[volumes.data]', '[volumes.data]\nmin_free = "5%"')
                            .replace('timezone = "UTC"', 'timezone = "UTC"\nmetrics_textfile = "/var/lib/m.prom"')))
    home, data = cfg.volumes["home"], cfg.volumes["data"]
    assert home.min_free.bytes_of(10 << 30) == 3 << 29 and home.warn_age == timedelta(hours=2)
    assert home.crit_age is None and data.min_free.bytes_of(1000) == 50
    assert cfg.settings.metrics_textfile == Path("/var/lib/m.prom")
    assert cfg.schedules["hourly"].accuracy == timedelta(minutes=1)


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
    ("negative count", replace("daily = 7", "daily = -1"), "retention.default.daily",
     "must be between 0 and 1,000,000, got -1"),
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
     "path '/nonexistent/x' does not exist"),
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
    ("required not a boolean", replace('pre = ["true"]', 'pre = ["true"]\nrequired = "no"'), "quiesce.app.required",
     "expected a boolean, got a string"),
    ("max_window not a duration", replace('pre = ["true"]', 'pre = ["true"]\nmax_window = "soon"'),
     "quiesce.app.max_window", "'soon'"),
    ("group max_window not a duration", replace('quiesce = ["app"]', 'quiesce = ["app"]\nmax_window = 5'),
     "groups.all.max_window", "expected"),
    ("quiesce kind missing", replace('kind = "command"\n', ""), "quiesce.app.kind", "required"),
    ("systemd mode", GOOD + '[quiesce.units]\nkind = "systemd"\nunits = ["a.service"]\nmode = "pause"\n',
     "quiesce.units.mode", "'pause'"),
    ("systemd unit name", GOOD + '[quiesce.units]\nkind = "systemd"\nunits = ["a service"]\n',
     "quiesce.units.units", "is not a systemd unit name"),
    ("group names unknown volume", replace('volumes = ["home", "data"]', 'volumes = ["home", "dta"]'),
     "groups.all.volumes", "no [volumes.dta] table is defined (did you mean 'data'?)"),
    ("group names unknown quiescer", replace('quiesce = ["app"]', 'quiesce = ["ap"]'), "groups.all.quiesce",
     "no [quiesce.ap] table"),
    ("schedule with no target", replace('groups = ["all"]', ""), "schedules.hourly", "names no volumes and no groups"),
    ("schedule names unknown group", replace('groups = ["all"]', 'groups = ["al"]'), "schedules.hourly.groups",
     "no [groups.al] table"),
    ("schedule bool", GOOD + "prune = 1\n", "schedules.hourly.prune", "expected a boolean, got an integer"),
    ("min_free unit", replace('tags = ["home"]', 'tags = ["home"]\nmin_free = "10X"'), "volumes.home.min_free",
     "'10X' is not a size or a share (e.g. 10G, 512M, 5%)"),
    ("min_free share", replace('tags = ["home"]', 'tags = ["home"]\nmin_free = "100%"'), "volumes.home.min_free",
     "between 0% and 100%"),
    ("ages in the wrong order", replace('tags = ["home"]', 'tags = ["home"]\nwarn_age = "2d"\ncrit_age = "1d"'),
     "volumes.home.warn_age", "must be shorter than crit_age"),
    ("accuracy", GOOD + 'accuracy = "soon"\n', "schedules.hourly.accuracy", "'soon' is not a duration"),
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
    # Numbers are bounded where they enter, before anything is computed from them.
    *[(f"duration {d}", replace('keep_within = "36h"', f'keep_within = "{d}"'), "retention.default.keep_within",
       f"'{d}' is too long: at most 100y") for d in ("99999999999999999999d", "1000000000d", "86400000000000s",
                                                    "3000y", "101y", "36501d")],
    ("lock_wait too long", replace('lock_wait = "5s"', 'lock_wait = "1' + "0" * 5000 + 's"'), "settings.lock_wait",
     "is too long: at most 100y"),
    ("count too large", replace("daily = 7", "daily = 99999999999999999999"), "retention.default.daily",
     "must be between 0 and 1,000,000, got 99999999999999999999"),
    ("lvm size too large", GOOD + LVM.format(lv='"vg0/data"') + f'snapshot_size = "{"9" * 400}M"\n',
     "volumes.lv.snapshot_size", "is larger than"),
    # Nothing the system is handed may hold a NUL, or exceed its path limits.
    ("NUL in a path", replace('repository = "{repo}"', 'repository = "/srv/r\\u0000x"'), "volumes.home.repository",
     "'/srv/r\\x00x' contains a NUL character"),
    ("NUL in state_dir", replace('lock_wait = "5s"', 'state_dir = "/var/\\u0000"'), "settings.state_dir",
     "contains a NUL character"),
    ("NUL in an argument", replace('pre = ["true"]', 'pre = ["true", "a\\u0000b"]'), "quiesce.app.pre",
     "item 2: 'a\\x00b' contains a NUL character"),
    ("name too long", replace('repository = "{repo}"', f'repository = "/srv/{"n" * 256}"'), "volumes.home.repository",
     "has a name of 256 bytes; the system's limit is 255"),
    ("path too long", replace('repository = "{repo}"', f'repository = "{"/abcdefgh" * 430}"'),
     "volumes.home.repository", "is 3870 bytes long; at most 3839 leave room for what snapmgr creates in it"),
    ("path too long, multibyte", replace('source = "{src}"', f'source = "{"/é" * 1300}"'), "volumes.home.source",
     "is 3900 bytes long"),
    # Control characters in values and keys are shown escaped, never raw.
    ("newline in timezone", replace('timezone = "UTC"', 'timezone = "Europe/Paris\\n"'), "settings.timezone",
     "unknown time zone 'Europe/Paris\\n'"),
    ("newline in backend", replace('backend = "rsync"', 'backend = "rsync\\n"'), "volumes.home.backend",
     "unknown backend 'rsync\\n'"),
    ("newline in a key", replace("[volumes.home]", '[volumes."home\\n"]'), 'volumes."home\\n"',
     "bad name 'home\\n'"),
    ("escape sequence in a key", replace("lock_wait =", '"\\u001b[31m" = 1\nlock_wait ='), 'settings."\\x1b[31m"',
     "unknown key"),
    # An rsync repository inside its source would copy every snapshot into the next.
    ("repository inside the source", replace('repository = "{repo}"', 'repository = "{src}/.snaps"'),
     "volumes.home.repository", "is inside the source '{src}', so every snapshot would copy all earlier ones into "
                                'itself; exclude it (exclude = ["/.snaps/"]) or move it out of the source'),
    ("repository is the source", replace('repository = "{repo}"', 'repository = "{src}/"'),
     "volumes.home.repository", "is the source itself"),
    ("repository excluded by a wildcard only", replace('repository = "{repo}"', 'repository = "{src}/.snaps"')
     .replace('exclude = ["*.tmp"]', 'exclude = ["/.snap*"]'), "volumes.home.repository", 'exclude = ["/.snaps/"]'),
    *[(f"repository exclude undone by {how}", replace('repository = "{repo}"', 'repository = "{src}/.snaps"')
       .replace('exclude = ["*.tmp"]', f"exclude = {rules}"), "volumes.home.repository", 'exclude = ["/.snaps/"]')
      for how, rules in (("a clear", '["/.snaps/", "!"]'), ("an include", '["+ /.snaps/", "/.snaps/"]'))],
    ("repository with a wildcard in its name", replace('repository = "{repo}"', 'repository = "{src}/snap[1]"'),
     "volumes.home.repository", 'exclude = ["/snap\\\\[1]/"]'),
]


@pytest.mark.parametrize("text,key,reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config(write, tmp_path, text, key, reason):
    path = write(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason.format(src=tmp_path / "src") in message
    assert message.isprintable(), message
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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
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


def test_a_file_that_is_not_utf8_names_the_byte(write):
    path = write(GOOD)
    path.write_bytes(b'[settings]\nstate_dir = "/var/\xff"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: is not UTF-8 text \(byte 0xff at offset 29\)$"):
        config.load(path)


@pytest.mark.parametrize("nested", ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000])
def test_deep_nesting_is_a_config_error(write, nested):
    path = write(GOOD)
    path.write_text(f"[volumes.x]\nbackend = {nested}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: arrays or tables are nested too deeply$"):
        config.load(path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "snapmgr.toml"
    os.mkfifo(fifo, 0o644)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ConfigError, config.load, fifo)),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert outcome, "config.load blocked on a FIFO"
    assert str(outcome[0].value) == f"{fifo}: is not a regular file"


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
NOBODY = 65534


@root_only
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_root_refuses_a_config_in_a_directory_others_can_write(write, tmp_path, mode):
    path = write(GOOD)
    moved = tmp_path / "etc" / "snapmgr.toml"
    moved.parent.mkdir()
    path.rename(moved)
    moved.parent.chmod(mode)
    with pytest.raises(ConfigError) as e:
        config.load(moved)
    assert str(e.value) == (f"{moved}: directory {moved.parent} on the way to it is writable by group or others "
                            f"(mode {mode:04o}); refusing to use it (chmod go-w {moved.parent})")


@root_only
def test_root_refuses_a_config_in_a_directory_owned_by_another_user(write, tmp_path):
    path = write(GOOD)
    (tmp_path / "home").mkdir()
    moved = tmp_path / "home" / "snapmgr.toml"
    path.rename(moved)
    os.chown(moved.parent, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"^{moved}: directory {moved.parent} on the way to it is owned by uid "
                                          rf"{NOBODY}, not root; refusing to use it \(chown root {moved.parent}\)$"):
        config.load(moved)


@root_only
def test_root_refuses_a_config_reached_through_a_symlink_another_user_owns(write, tmp_path):
    path = write(GOOD)
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    config.load(link)  # root's symlink to root's file: fine
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"^{link}: symlink {link} on the way to it is owned by uid {NOBODY}"):
        config.load(link)


@root_only
def test_symlinks_are_followed_and_their_targets_checked(write, tmp_path):
    path = write(GOOD)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    path.rename(shared / "snapmgr.toml")
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "snapmgr.toml"
    link.symlink_to("../shared/snapmgr.toml")
    with pytest.raises(ConfigError, match=rf"^{link}: directory {shared} on the way to it is writable"):
        config.load(link)
    with pytest.raises(ConfigError, match="is writable"):  # and through '..' after a symlink
        config.load(tmp_path / "etc" / ".." / "shared" / "snapmgr.toml")


@root_only
def test_a_sticky_directory_is_fine_only_for_roots_file(write, tmp_path):
    path = write(GOOD)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    moved = tmp / "snapmgr.toml"
    path.rename(moved)
    assert "home" in config.load(moved).volumes
    os.chown(moved, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"^{moved}: is owned by uid {NOBODY}, not root"):
        config.load(moved)


@root_only
def test_relative_config_paths_are_checked_from_the_working_directory(write, tmp_path, monkeypatch):
    write(GOOD)
    monkeypatch.chdir(tmp_path)
    assert "home" in config.load(Path("snapmgr.toml")).volumes
    tmp_path.chmod(0o777)
    try:
        with pytest.raises(ConfigError, match=f"directory {tmp_path} on the way to it is writable"):
            config.load(Path("snapmgr.toml"))
    finally:
        tmp_path.chmod(0o700)
