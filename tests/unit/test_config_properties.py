"""The config loader's boundary, property-tested: whatever document it is given, it
returns a valid Config or raises a ConfigError whose message is one printable line that
names the file. Never another exception, never a half-loaded config.

Documents are generated two ways: as TOML values under the keys the schema knows (so
the generated values reach every converter), and as arbitrary bytes around a valid
document (so they reach the decoder and the parser)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmgr import config, quiesce
from snapmgr.backends import BACKENDS
from snapmgr.config import Config
from snapmgr.errors import ConfigError
from snapmgr.model import MAX_DURATION

# Strings a hostile or careless config would hold, beside arbitrary text.
TRICKY = ["3000y", "99999999999999999999d", "100y", "0s", "15min", "3m", "1" + "0" * 5000 + "s",
          "/srv/r\x00x", "/" + "a" * 300, "/abc" * 1100, "relative/path", "/", "/tmp", "/nonexistent",
          "-rf", "a..b", "home\n", "rsync\n", "Europe/Paris\n", "UTC", "local", "../../etc/passwd",
          "vg0/data", "vg0/-x", "20%ORIGIN", "9" * 400 + "M", "tank/data", "tank//x", "\x1b[31m", "\u2028",
          "manual", "pre-rollback", "hourly", "*:0/15"]
NAMES = ["home", "data", "default", "app", "all", "hourly", "-bad", "a b", "x\ny", "é", "a" * 65]

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # TOML has no lone surrogates
strings = st.one_of(text, st.sampled_from(TRICKY), st.sampled_from(NAMES))
scalars = st.one_of(strings, st.integers(), st.integers(-2, 200), st.floats(), st.booleans(),
                    st.datetimes(), st.dates(), st.times())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=3),
                      max_leaves=12)

KEYS = sorted({*config.SETTINGS, *config.POLICY, *config.VOLUME, *config.QUIESCE_COMMON, *config.GROUP,
               *config.SCHEDULE, *(k for kind in quiesce.KINDS.values() for k in kind.options),
               *(k for b in BACKENDS.values() for k in b.options)})


def _table(keys=KEYS):
    chosen = {"backend": st.sampled_from([*BACKENDS, "rsnc", "rsync\n"]),
              "kind": st.sampled_from([*quiesce.KINDS, "sqlit"])}
    return st.dictionaries(st.sampled_from(keys) | text, values, max_size=8).flatmap(
        lambda t: st.fixed_dictionaries({k: chosen[k] for k in t if k in chosen}).map(lambda c: t | c))


named_tables = st.dictionaries(st.sampled_from(NAMES) | text, _table(), max_size=3)
documents = st.fixed_dictionaries({}, optional={
    "settings": _table(list(config.SETTINGS)),
    "retention": named_tables, "volumes": named_tables, "quiesce": named_tables,
    "groups": named_tables, "schedules": named_tables,
    "volume": values,  # a misspelt table
})


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-properties")
    for name in ("src", "tmp"):
        (root / name).mkdir()
    return root


def check(place, payload: bytes):
    path = place / "snapmgr.toml"
    path.write_bytes(payload)
    path.chmod(0o644)
    try:
        loaded = config.load(path)
    except ConfigError as e:
        message = str(e)
        assert message.startswith(f"{path}: "), message
        assert message.isprintable(), message  # one line, and nothing a terminal would obey
        return None
    assert isinstance(loaded, Config)
    for volume in loaded.volumes.values():
        policy = volume.retention
        assert policy is None or policy.keep_within is None or policy.keep_within <= MAX_DURATION
    return loaded


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents)
def test_any_document_loads_or_is_one_config_error(place, doc):
    check(place, tomli_w.dumps(doc).encode())


GOOD = """
[retention.default]
keep_within = "36h"
daily = 7

[volumes.home]
backend = "rsync"
source = "{src}"
repository = "{src}-snapshots"
retention = "default"
"""


# Fragments that reach the limits of the parser itself, beside arbitrary bytes.
FRAGMENTS = [b"\nx = " + b"1" * 5000 + b"\n", b"\nx = " + b"[" * 3000, b"\xff\xfe", b"\x00", b"\n[[volumes]]\n",
             b'\n"\\uD800" = 1\n', b"\nx = 1979-05-27T07:32:00Z\n"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.integers(0, len(GOOD)), cut=st.booleans(),
       junk=st.binary(max_size=12) | st.text(max_size=12).map(str.encode) | st.sampled_from(FRAGMENTS))
def test_any_bytes_load_or_are_one_config_error(place, at, junk, cut):
    good = GOOD.format(src=place / "src").encode()
    check(place, good[:at] + junk + (b"" if cut else good[at:]))


def test_the_base_document_is_valid(place):
    loaded = check(place, GOOD.format(src=place / "src").encode())
    assert loaded.volumes["home"].retention.keep_within == timedelta(hours=36)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values)
def test_any_value_of_any_settings_key(place, value):
    for key in config.SETTINGS:
        check(place, tomli_w.dumps({"settings": {key: value}}).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(backend=st.sampled_from(list(BACKENDS)), key=st.sampled_from(KEYS), value=values)
def test_any_value_of_any_volume_key(place, backend, key, value):
    """A volume valid but for one key, so that the value gets past the earlier checks."""
    base = {"rsync": {"source": str(place / "src"), "repository": str(place / "repo")},
            "btrfs": {"subvolume": str(place / "src"), "snapshot_dir": str(place / "snaps")},
            "lvm": {"lv": "vg0/data", "snapshot_size": "1G"},
            "zfs": {"datasets": ["tank/data"]}}[backend]
    check(place, tomli_w.dumps({"volumes": {"v": {"backend": backend, **base, key: value}}}).encode())

