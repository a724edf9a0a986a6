"""restore, diff and versions at their boundary, property-tested: any PATH arguments give
a documented exit code and one-line messages, never a traceback; and whatever PATH and
whatever DEST holds (a symlink leading out of it), a restore writes nothing outside DEST.

The CLI runs in-process (main(argv)) on a real rsync volume with a real snapshot."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.helpers import Workspace, needs_root
from tests.integration.test_cli_properties import DOCUMENTED, invoke
from tests.integration.trees import fingerprint, rich_tree

pytestmark = needs_root

# A real argv holds no NUL; undecodable bytes arrive as surrogate escapes.
TRICKY = ["..", "../..", "../source", ".", "./", "/", "//", "/etc", "/etc/passwd", "-rf", "--to", "--delete",
          "docs/..", "docs/../..", "docs//private/./key", "links/relative", "links/relative/x", "links/dangling",
          "links/dangling/x", "links/fifo", "sparse.img", "docs/report.txt/x", "hostile/new\nline", "hostile/caf\udce9",
          "hostile/-rf", "~", "*", "docs/*", "a:b", "host:/etc", "\udcff", "docs\n", " docs", "x" * 300]
text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("restore-properties")
    ws = Workspace(root)
    ws.write_config({"data": {"backend": "rsync", "source": ws.source, "repository": ws.repo}})
    rich_tree(ws.source)
    sid = ws.ok("--json", "snapshot").json()["results"][0]["created"]["id"]
    outside = root / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"must never change")
    return ws, sid, root / "dest", outside


@pytest.fixture(scope="module", autouse=True)
def keep_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def paths(ws: Workspace):
    live = str(ws.source)
    absolute = st.sampled_from([live, f"{live}/docs", f"{live}/../source/docs", f"{live}x/docs", f"{live}/links/relative"])
    return st.lists(st.sampled_from(TRICKY) | absolute | text, min_size=1, max_size=3)


def everything_but(root, dest) -> dict:
    """The world's fingerprint outside DEST and snapmgr's state."""
    skip = (os.fsencode(dest.name), b"state", b"run")
    return {p: v for p, v in fingerprint(root).items() if not p.split(b"/")[0] in skip}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), overwrite=st.booleans(), trap=st.sampled_from([None, "docs", "links", "hostile"]),
       command=st.sampled_from(["restore", "diff", "versions"]))
def test_any_path_never_escapes_and_never_tracebacks(world, data, overwrite, trap, command):
    ws, sid, dest, outside = world
    chosen = data.draw(paths(ws))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    if trap:   # a symlink in DEST where the restore puts a directory, leading out of DEST
        os.symlink(outside, dest / trap)
    before = everything_but(ws.root, dest)
    if command == "restore":
        argv = ["restore", sid, "--to", str(dest), *(["--overwrite"] if overwrite else []), "--", *chosen]
    elif command == "diff":
        argv = ["diff", "--", sid, "live", chosen[0]]
    else:
        argv = ["versions", "--", chosen[0]]
    code, stderr, raised = invoke(["--config", str(ws.config), *argv])
    assert raised is None, (argv, raised)
    assert code in DOCUMENTED, (argv, code, stderr)
    assert all(line.startswith("snapmgr: ") for line in stderr.splitlines()), (argv, stderr)
    assert (code == 0) != any(line.startswith("snapmgr: error: ") for line in stderr.splitlines()), (argv, stderr)
    assert everything_but(ws.root, dest) == before, argv
    assert (outside / "precious").read_bytes() == b"must never change" and os.listdir(outside) == ["precious"]
