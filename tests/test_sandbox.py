"""The sandbox runs programs, kills runaways and refuses writes, sockets and processes outside it."""

from __future__ import annotations

import os
import re
import socket
import sys
import time

import pytest

from tasks.sandbox import STATUSES, run_sandboxed

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox targets Linux")

BOTH = pytest.mark.parametrize("kernel_layers", [True, False], ids=["all-layers", "hook-only"])


def test_a_correct_program_passes_and_reports_its_layers():
    result = run_sandboxed("x = sum(range(10))\nassert x == 45\nprint(x)")
    assert result.passed and result.status == "passed"
    assert {"rlimits", "audit-hook"} <= set(result.layers)


def test_a_failing_assertion_fails_with_the_traceback():
    result = run_sandboxed("def f():\n    return 1\nassert f() == 2, 'wrong value'\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError: wrong value" in result.detail
    assert result.status in STATUSES


def test_syntax_error_fails():
    result = run_sandboxed("def broken(:\n    pass\n")
    assert result.status == "failed" and "SyntaxError" in result.detail


@pytest.mark.parametrize("exit_line", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_leaving_before_the_last_line_is_not_a_pass(exit_line):
    result = run_sandboxed(f"{exit_line}\nassert False, 'never reached'\n")
    assert not result.passed and result.status == "failed"


def test_infinite_loop_is_killed_on_time():
    start = time.monotonic()
    result = run_sandboxed("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    assert elapsed < 1.0 + 2.0


def test_sleeping_past_the_limit_is_killed():
    result = run_sandboxed("import time\ntime.sleep(60)\n", timeout_s=0.5)
    assert result.status == "timeout"


@BOTH
def test_write_outside_the_temp_dir_is_blocked(tmp_path, kernel_layers):
    target = tmp_path / "escaped.txt"
    result = run_sandboxed(f"open({str(target)!r}, 'w').write('x')\n", kernel_layers=kernel_layers)
    assert result.status == "blocked" and not result.passed
    assert not target.exists()


def test_a_caught_refusal_is_still_reported_as_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    program = f"try:\n    open({str(target)!r}, 'a')\nexcept OSError:\n    pass\n"
    assert run_sandboxed(program).status == "blocked"
    assert not target.exists()


@BOTH
def test_removing_or_renaming_outside_is_blocked(tmp_path, kernel_layers):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for line in (f"import os; os.remove({str(keep)!r})",
                 f"import os; os.rename({str(keep)!r}, 'stolen.txt')",
                 f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 f"import os; os.chmod({str(keep)!r}, 0o777)"):
        result = run_sandboxed(line, kernel_layers=kernel_layers)
        assert result.status == "blocked", (line, result)
    assert keep.read_text() == "precious"


def test_relative_escape_from_the_temp_dir_is_blocked():
    result = run_sandboxed("open('../escaped-by-dotdot.txt', 'w').write('x')\n")
    assert result.status == "blocked"


def test_writing_inside_the_temp_dir_works_and_the_dir_is_deleted_after():
    program = (
        "import os, tempfile\n"
        "open('data.txt', 'w').write('hello')\n"
        "os.mkdir('sub')\n"
        "os.rename('data.txt', 'sub/data.txt')\n"
        "assert open('sub/data.txt').read() == 'hello'\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'scratch')\n"
        "raise AssertionError('ran in ' + os.getcwd())\n"  # report where it ran
    )
    result = run_sandboxed(program)
    assert result.status == "failed", result
    workdir = re.search(r"AssertionError: ran in (\S+)", result.detail).group(1)
    assert os.path.isabs(workdir)
    assert not os.path.exists(workdir)


@BOTH
def test_socket_connect_is_blocked(kernel_layers):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        result = run_sandboxed(program, kernel_layers=kernel_layers)
        assert result.status == "blocked"
        with pytest.raises(TimeoutError):
            server.accept()  # nobody came through
    finally:
        server.close()


@BOTH
def test_starting_processes_is_blocked(tmp_path, kernel_layers):
    marker = tmp_path / "ran.txt"
    for line in (f"import subprocess; subprocess.run(['touch', {str(marker)!r}])",
                 f"import os; os.system('touch {marker}')",
                 "import os; os.fork()",
                 "import os; os.execv('/bin/true', ['true'])"):
        result = run_sandboxed(line, kernel_layers=kernel_layers)
        assert result.status == "blocked", (line, result)
    assert not marker.exists()


def test_memory_bomb_fails_without_hurting_the_caller():
    result = run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n",
                           timeout_s=10.0, memory_mb=256)
    assert result.status in ("failed", "error") and not result.passed
    assert "MemoryError" in result.detail or result.status == "error"
    assert run_sandboxed("assert 2 + 2 == 4").passed  # the caller and the sandbox still work


def test_the_child_gets_no_inherited_environment(monkeypatch):
    monkeypatch.setenv("FEDBIOT_TEST_SECRET", "hunter2")
    program = "import os\nassert 'FEDBIOT_TEST_SECRET' not in os.environ, 'secret leaked'\n"
    assert run_sandboxed(program).passed


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(ValueError):
        run_sandboxed("pass", memory_mb=8)
