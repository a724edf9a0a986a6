"""The command line's boundary, property-tested: any arguments give a documented exit
code, and everything on stderr is one-line messages (errors and logs, each starting
`snapmgr: `); only the real global `--debug` option may let a traceback through.

The CLI runs in-process (main(argv)) on a real workspace: a small rsync volume with real
snapshots, so that arguments reach real listing, snapshotting, deleting and pruning."""

from __future__ import annotations

import contextlib
import io
import signal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from snapmgr.cli import main
from snapmgr.errors import SnapmgrError
from tests.integration.helpers import Workspace, make_tree

DOCUMENTED = {0, 1, 2, 75, 78, 130}
GLOBAL = ["--json", "-v", "-vv", "-q", "--debug", "--version", "--help"]
COMMANDS = [["snapshot"], ["list"], ["delete"], ["prune"], ["status"], ["config", "check"], ["config"], ["init"],
            ["frobnicate"], []]
OPTIONS = ["--tag", "-t", "--prune", "--dry-run", "-n", "--", "--help", "--debug", "--json", "-x", "--tag=manual"]
# A real argv cannot hold a NUL; undecodable bytes arrive as surrogate escapes.
WORDS = ["data", "dta", "data@20261121T140501Z", "data@20261121T140501Z-1", "data@99991231T235959Z-999999",
         "manual", "hourly", "--debug", "-", "@", "", "data\n", "manual\n", "data\r\x1b[2K", "home\u2028x",
         "\udcff", "caf\udce9", "a" * 300, "-rf", "..", "/etc", "data@" + "1" * 5000, "data@20261121T140501Z-" + "9" * 50]
text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)
words = st.sampled_from(WORDS) | text


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("cli-properties"))
    make_tree(ws.source, files=3)
    for _ in range(2):
        ws.ok("snapshot", "--tag", "hourly")
    return ws


@pytest.fixture(scope="module", autouse=True)
def keep_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def invoke(argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    out, err = io.StringIO(), io.StringIO()
    code, raised = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # only the real --debug may let one through
            raised = e
    return code, err.getvalue(), raised


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(global_options=st.lists(st.sampled_from(GLOBAL), max_size=2), command=st.sampled_from(COMMANDS),
       rest=st.lists(st.sampled_from(OPTIONS) | words, max_size=5))
def test_any_arguments_give_a_documented_exit_and_one_line_messages(ws, global_options, command, rest):
    argv = ["--config", str(ws.config), *global_options, *command, *rest]
    assume("demo" not in argv and not any(a.startswith("--con") for a in rest))
    code, stderr, raised = invoke(argv)
    if raised is not None:  # only through the real option, and only an error snapmgr expects
        assert "--debug" in global_options and isinstance(raised, (SnapmgrError, OSError)), f"{argv!r}: {raised!r}"
        return
    assert code in DOCUMENTED, (argv, code, stderr)
    lines = stderr.splitlines()
    assert all(line.startswith("snapmgr: ") for line in lines), (argv, stderr)
    errors = [line for line in lines if line.startswith("snapmgr: error: ")]
    assert bool(errors) == (code != 0), (argv, code, stderr)


@pytest.mark.parametrize("argv,expected", [
    (["list", "--", "--debug"], "snapmgr: error: unknown volume '--debug'"),
    (["snapshot", "--", "--debug"], "snapmgr: error: unknown volume '--debug'"),
    (["list", "data\n"], "snapmgr: error: unknown volume 'data\\n'"),
    (["snapshot", "--tag", "manual\n"], "snapmgr: error: --tag 'manual\\n': letters, digits"),
    (["delete", "data@20261121T140501Z\n"], "snapmgr: error: 'data@20261121T140501Z\\n' is not a snapshot id"),
    (["list", "caf\udce9"], "snapmgr: error: unknown volume 'caf\\udce9'"),
    (["frobnicate\n"], "snapmgr: error: No such command 'frobnicate\\n'"),
    (["--config", "", "list"], "snapmgr: error: --config '' is not a path"),
    (["--config", "a\0b", "list"], "snapmgr: error: --config 'a\\x00b' is not a path"),
])
def test_arguments_are_quoted_escaped_and_never_switch_debug_on(ws, argv, expected):
    code, stderr, raised = invoke(["--config", str(ws.config), *argv])
    assert raised is None and code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith(expected), stderr
