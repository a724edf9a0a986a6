"""The exclude matcher that keeps an rsync volume's left-out files out of `diff ... live`,
against the real rsync: for any rules, it leaves out exactly what rsync leaves out."""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmgr.backends.rsync_filters import matcher

TREE = ["cache/blob", "cache/sub/deep.tmp", "var/log/old/a.log", "var/log/new.log", "a.tmp", "keep.tmp",
        "src/cache", "src/build/out.o", "abc", "a[1]/x", "logs/x/y/old"]
PATTERNS = ["/cache/", "cache", "cache/", "*.tmp", "/*.tmp", "var/log/", "log/*.log", "**/old", "var/**", "/var/***",
            "build/***", "a?c", "[ab]bc", "a\\[1\\]", "a[1]", "*", "/src/cache", "logs/**/old", "deep.tmp", "sub/"]
rules = st.lists(st.sampled_from(PATTERNS).flatmap(lambda p: st.sampled_from([p, f"+ {p}", f"- {p}"]))
                 | st.just("!"), max_size=4)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("exclusions") / "src"
    for path in TREE:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    return root


def rsync_keeps(source, rules) -> set[str]:
    listing = subprocess.run(["rsync", "-r", "--list-only", *(f"--exclude={r}" for r in rules), f"{source}/"],
                             capture_output=True, text=True, check=True).stdout
    return {line.split(None, 4)[-1] for line in listing.splitlines()} - {"."}


def matcher_keeps(source, rules) -> set[str]:
    excluded = matcher(rules)
    kept = set()
    for directory, dirs, files in os.walk(source):
        rel = os.path.relpath(directory, source)
        for name in list(dirs):
            path = name if rel == "." else f"{rel}/{name}"
            if excluded(path.encode(), True):
                dirs.remove(name)   # as rsync, never descend into an excluded directory
            else:
                kept.add(path)
        kept |= {p for name in files if not excluded((p := name if rel == "." else f"{rel}/{name}").encode(), False)}
    return kept


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=rules)
def test_it_leaves_out_what_rsync_leaves_out(source, rules):
    assert matcher_keeps(source, rules) == rsync_keeps(source, rules), rules
