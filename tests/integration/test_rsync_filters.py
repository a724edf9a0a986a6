"""rsync_filters against the real rsync: whatever rules it says surely exclude a
directory, rsync leaves that directory out (property-tested); and the plain cases it is
there for are recognised."""

import subprocess
from pathlib import PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmgr.backends.rsync_filters import anchored, surely_excluded

INSIDE = PurePosixPath("var/.snap[1]")
PATTERNS = ["/var/.snap[1]/", "/var/.snap\\[1\\]/", "/var/.snap\\[1]/", "/var/", "var", ".snap[1]", ".snap\\[1\\]",
            "var/.snap\\[1\\]", "ar/.snap\\[1\\]", "/var/.snap*", "/v*", "*", "**", "/var/.snap?1?/", "/va",
            "/var/x", "x", "*.tmp", "/var/.snap[1]/x", "var/", "/var", "/var/**"]
rules = st.lists(st.sampled_from(PATTERNS).flatmap(lambda p: st.sampled_from([p, f"+ {p}", f"- {p}"]))
                 | st.just("!"), max_size=4)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters") / "src"
    (root / INSIDE / "kept").mkdir(parents=True)
    (root / "var" / "x").write_text("x")
    return root


def rsync_keeps(source, rules) -> bool:
    listing = subprocess.run(["rsync", "-r", "--list-only", *(f"--exclude={r}" for r in rules), f"{source}/"],
                             capture_output=True, text=True, check=True).stdout
    return any(line.split(None, 4)[-1] in (str(INSIDE), f"{INSIDE}/kept") for line in listing.splitlines())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=rules)
def test_what_it_calls_excluded_rsync_leaves_out(source, rules):
    if surely_excluded(rules, INSIDE):
        assert not rsync_keeps(source, rules), rules


@pytest.mark.parametrize("rules,excluded", [
    ([anchored(INSIDE)], True),
    (["/var/"], True),
    (["+ /var/", "/var/.snap\\[1\\]/"], True),
    (["/var/.snap\\[1\\]/", "!"], False),
    (["!", "/var/.snap\\[1\\]/"], True),
    (["+ /var/.snap\\[1\\]/", "/var/.snap\\[1\\]/"], False),
    (["/var/.snap[1]/"], False),  # a wildcard pattern ([1] is a class): not a literal name
    (["*.tmp"], False),
])
def test_plain_cases_agree_with_rsync(source, rules, excluded):
    assert surely_excluded(rules, INSIDE) is excluded
    assert rsync_keeps(source, rules) is not excluded
