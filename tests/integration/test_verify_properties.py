"""verify and manifest at the CLI boundary, property-tested as every other command is:
whatever the arguments, a documented exit code, messages of one line, and an error line
exactly when the exit code is not 0 (a damaged snapshot included)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapmgr import manifest
from snapmgr.errors import SnapmgrError
from tests.integration.helpers import Workspace, make_tree
from tests.integration.test_cli_properties import DOCUMENTED, GLOBAL, invoke, keep_sigterm, words  # noqa: F401

OPTIONS = ["--format", "b3sum", "sha256sum", "json", "--format=json", "--", "--help", "-x", "data"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two snapshots: the first damaged behind snapmgr's back, the second intact."""
    ws = Workspace(tmp_path_factory.mktemp("verify-properties"))
    make_tree(ws.source, files=3)
    first = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    (ws.source / "d0" / "f0000").write_bytes(b"new")   # not a hard link into the first, then
    ws.ok("snapshot")
    (ws.repo / first / "d0" / "f0000").write_bytes(b"rot")
    return ws


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(global_options=st.lists(st.sampled_from(GLOBAL), max_size=2), command=st.sampled_from(["verify", "manifest"]),
       rest=st.lists(st.sampled_from(OPTIONS) | words, max_size=4))
def test_any_arguments_give_a_documented_exit_and_an_error_line_with_every_failure(ws, global_options, command, rest):
    argv = ["--config", str(ws.config), *global_options, command, *rest]
    code, stderr, raised = invoke(argv)
    if raised is not None:
        assert "--debug" in global_options and isinstance(raised, (SnapmgrError, OSError)), f"{argv!r}: {raised!r}"
        return
    assert code in DOCUMENTED, (argv, code, stderr)
    lines = stderr.splitlines()
    assert all(line.startswith("snapmgr: ") for line in lines), (argv, stderr)
    assert bool([line for line in lines if line.startswith("snapmgr: error: ")]) == (code != 0), (argv, code, stderr)


def test_the_damaged_snapshot_fails_verify_with_one_error_line(ws):
    first, second = ws.snapshots()
    code, stderr, _ = invoke(["--config", str(ws.config), "verify"])
    assert code == 1
    assert stderr == f"snapmgr: error: 1 of 2 snapshots are not intact: {first} (damaged)\n"
    assert invoke(["--config", str(ws.config), "verify", second])[:2] == (0, "")
    assert manifest.load(ws.repo, first) is not None
