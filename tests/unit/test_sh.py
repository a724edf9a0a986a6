import os
import subprocess
import sys
import time

import pytest

from snapmgr import sh
from snapmgr.errors import SnapmgrError


def test_captures_output_and_status():
    result = sh.run(["sh", "-c", "echo out; echo err >&2"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert result.argv == ("sh", "-c", "echo out; echo err >&2")


def test_arguments_are_never_interpreted_by_a_shell():
    hostile = "$(touch /tmp/snapmgr-pwned); `id`; * | &&"
    assert sh.run(["printf", "%s", hostile]).stdout == hostile
    assert not os.path.exists("/tmp/snapmgr-pwned")


def test_failure_carries_status_and_stderr_excerpt():
    with pytest.raises(sh.CommandError) as e:
        sh.run(["sh", "-c", "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3"])
    assert e.value.returncode == 3
    assert "line7" in e.value.stderr
    assert str(e.value) == "sh exited with status 3: line3 | line4 | line5 | line6 | line7"


def test_check_false_returns_the_failure():
    assert sh.run(["false"], check=False).returncode == 1


def test_killed_by_signal_is_named():
    with pytest.raises(sh.CommandError, match="killed by SIGKILL"):
        sh.run(["sh", "-c", "kill -9 $$"])


def test_timeout_kills_the_whole_process_group():
    started = time.monotonic()
    with pytest.raises(sh.CommandTimeout, match=r"timed out after 0\.5s") as e:
        # The grandchild would keep the pipe open for 30s if only sh were killed.
        sh.run(["sh", "-c", "echo partial >&2; sleep 30 & wait"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert "partial" in e.value.stderr


def test_missing_program_is_a_clear_error():
    with pytest.raises(sh.CommandNotFound, match="program 'no-such-program-xyz' is not installed"):
        sh.run(["no-such-program-xyz"])


def test_large_output_on_both_pipes_does_not_deadlock():
    result = sh.run(["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a; head -c 1000000 /dev/zero >&2"],
                    timeout=30)
    assert len(result.stdout) == 1_000_000 and len(result.stderr) == 1_000_000


def test_on_stdout_gets_lines_split_on_cr_and_lf():
    seen = []
    sh.run(["printf", "a\\rb\\nc\\n"], on_stdout=seen.append)
    assert seen == ["a", "b", "c"]


def test_children_die_with_their_parent(tmp_path):
    # A python parent that starts a long child through sh.run and is then SIGKILLed:
    # PDEATHSIG must take the child down with it.
    pidfile = tmp_path / "child.pid"
    script = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from snapmgr import sh; "
              f"sh.run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 60'])")
    parent = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the child outlived its parent")


def test_programs_inherit_the_held_descriptors_unless_told_not_to(tmp_path):
    fd = os.open(tmp_path / "held", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        def inherited(**kwargs) -> set[str]:
            listing = sh.run(["ls", "-l", "/proc/self/fd"], **kwargs).stdout
            return {line.rsplit(" ", 1)[-1] for line in listing.splitlines()}
        held = str(tmp_path / "held")
        assert held not in inherited()
        with sh.holding(fd):
            assert held in inherited()
            assert held not in inherited(holds_locks=False)
        assert held not in inherited()
    finally:
        os.close(fd)


def test_stop_when_kills_the_program_and_raises_its_error():
    asked = []

    def stop():
        asked.append(1)
        return SnapmgrError("enough") if len(asked) == 3 else None

    with pytest.raises(SnapmgrError, match="^enough$"):
        sh.run(["sleep", "600"], stop_when=stop)
    assert len(asked) == 3


def test_stop_when_that_never_stops_lets_the_program_finish():
    result = sh.run(["sh", "-c", "sleep 0.3; echo done"], stop_when=lambda: None)
    assert (result.returncode, result.stdout) == (0, "done\n")
