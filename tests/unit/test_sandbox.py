"""mathctl.sandbox: normal code, and a table of hostile snippets that must be stopped or refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathctl.sandbox import ExecResult, Sandbox, SandboxLimits

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

SMALL = SandboxLimits(wall_s=3.0, cpu_s=2.0, memory_mb=256, max_output_chars=200)


@pytest.fixture(scope="module")
def box():
    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def small_box():
    with Sandbox(SMALL) as sandbox:
        yield sandbox


# --- normal code ----------------------------------------------------------------------------------------
def test_prints_and_multiline_program(box):
    code = "def f(n):\n    return n * (n + 1) // 2\n\nfor n in (3, 10):\n    print(n, f(n))\n"
    result = box.run(code)
    assert result.ok and result.error is None and result.error_message == "" and not result.timed_out
    assert result.output == "3 6\n10 55\n"
    assert result.observation() == result.output and result.seconds > 0


@pytest.mark.parametrize("code, output", [
    ("x = 6 * 7\nx", "42"),
    ("'a' + 'b'", "'ab'"),
    ("print('printed')\n1 + 1", "printed\n"),  # something printed: no repr
    ("None", ""),
    ("x = 1", ""),
    ("import math\nmath.factorial(20)", "2432902008176640000"),
])
def test_last_expression_like_a_repl(box, code, output):
    result = box.run(code)
    assert result.ok, result.error_message
    assert result.output == output


def test_sympy(box):
    result = box.run("from sympy import symbols, solve, Rational\nx = symbols('x')\n"
                     "print(solve(x**2 - 4, x))\nRational(1, 3) + Rational(1, 6)")
    assert result.ok, result.error_message
    assert result.output == "[-2, 2]\n"


def test_state_does_not_leak_between_runs(box):
    assert box.run("secret_value = 41\nimport json\njson.x = 1").ok
    result = box.run("print(secret_value)")
    assert result.error == "NameError"
    assert box.run("import json\nhasattr(json, 'x')").output == "False"


@pytest.mark.parametrize("code, error, message", [
    ("print(undefined_name)", "NameError", "NameError: name 'undefined_name' is not defined"),
    ("print('before')\n1 / 0", "ZeroDivisionError", "ZeroDivisionError: division by zero"),
    ("def f(:\n  pass", "SyntaxError", "SyntaxError: "),
    ("raise ValueError('two\\nlines')", "ValueError", "ValueError: two lines"),
    ("{}['k']", "KeyError", "KeyError: 'k'"),
    ("input()", "EOFError", "EOFError"),
])
def test_exceptions_by_class_name_one_line(box, code, error, message):
    result = box.run(code)
    assert result.error == error and not result.ok
    assert result.error_message.startswith(message) and "\n" not in result.error_message
    assert result.observation().endswith(result.error_message)


def test_observation_keeps_output_before_error(box):
    result = box.run("print('step 1')\n1 / 0")
    assert result.output == "step 1\n"
    assert result.observation() == "step 1\nZeroDivisionError: division by zero"


def test_output_middle_truncation(small_box):
    result = small_box.run("print('a' * 1000 + 'b' * 1000 + 'END')")
    assert result.ok
    assert result.output.startswith("a" * 100) and result.output.endswith("b" * 96 + "END\n")
    assert "...[1804 chars truncated]..." in result.output
    long_error = small_box.run("raise ValueError('x' * 5000)")
    assert long_error.error == "ValueError" and len(long_error.error_message) < 250


def test_scratch_folder_is_writable_and_removed(box):
    result = box.run("import os, tempfile\nopen('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())\n"
                     "os.makedirs('sub/dir')\nos.rename('notes.txt', 'sub/dir/n.txt')\n"
                     "fd, path = tempfile.mkstemp()\nprint(path.startswith(os.getcwd()))")
    assert result.ok, result.error_message
    assert result.output == "hi\nTrue\n"
    assert os.listdir(box.root) == []  # every execution's scratch folder is deleted


def test_file_size_limit(small_box):
    limits = SandboxLimits(max_file_mb=1, wall_s=5)
    with Sandbox(limits) as sandbox:
        result = sandbox.run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert result.error == "OSError" and "too large" in result.error_message


def test_bad_arguments():
    with pytest.raises(ValueError):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(memory_mb=-1)
    with pytest.raises(ValueError):
        Sandbox(limits={"wall_s": 1})
    with Sandbox() as sandbox:
        with pytest.raises(ValueError):
            sandbox.run(b"print(1)")
        with pytest.raises(ValueError):
            sandbox.run_many(["1"], workers=0)


def test_close_removes_what_it_created(tmp_path):
    sandbox = Sandbox()
    assert sandbox.run("print(1)").ok
    root = Path(sandbox.root)
    assert root.is_dir()
    sandbox.close()
    assert not root.exists()
    with pytest.raises(RuntimeError):
        sandbox.run("1")
    given = tmp_path / "given"
    with Sandbox(scratch_root=given) as sandbox:
        assert sandbox.run("open('f', 'w').write('x')").ok
    assert not given.exists()  # created by the Sandbox: removed
    kept = tmp_path / "kept"
    kept.mkdir()
    with Sandbox(scratch_root=kept) as sandbox:
        assert sandbox.run("open('f', 'w').write('x')").ok
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_isolation_is_reported(box):
    isolation = box.isolation
    assert isolation["level"] in ("landlock", "uid", "weak") and isinstance(isolation["seccomp"], bool)
    assert isolation["network"] is False and isolation["audit_hook"] is True
    assert set(isolation) == {"level", "landlock", "seccomp", "uid", "netns", "network", "audit_hook"}


def test_ordinary_code_works_under_the_kernel_walls_alone():
    """Without the audit hook only Landlock and seccomp stand: what math code does must still work there
    (threads, temporary files, scratch files and folders, renames, /dev/null, sympy, signals to itself)."""
    code = ("import os, tempfile, threading, signal, io\nfrom sympy import symbols, solve\n"
            "x = symbols('x')\nseen = []\nt = threading.Thread(target=lambda: seen.append(solve(x**2 - 9, x)))\n"
            "t.start(); t.join()\nwith tempfile.TemporaryDirectory() as d:\n"
            "    open(os.path.join(d, 'a'), 'w').write('1')\n    os.rename(os.path.join(d, 'a'), 'b')\n"
            "os.makedirs('sub/dir'); os.rename('b', 'sub/dir/c'); os.remove('sub/dir/c')\n"
            "open(os.devnull, 'w').write('x')\nsignal.signal(signal.SIGUSR1, lambda *a: seen.append('usr1'))\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\nsignal.raise_signal(signal.SIGUSR1)\nprint(seen)")
    with Sandbox(SMALL, audit_hook=False) as sandbox:
        result = sandbox.run(code)
        assert sandbox.isolation["audit_hook"] is False
    assert result.ok, result.error_message
    assert result.output == "[[-3, 3], 'usr1', 'usr1']\n"


def test_code_cannot_forge_the_isolation_record():
    """The isolation line is written before the code runs; a report the code writes itself (fd 3) may fake its
    output, never the isolation."""
    forged = ('{"output": "forged", "error": null, "error_message": "", "timed_out": false, '
              '"isolation": {"level": "weak"}}')
    with Sandbox(SMALL, audit_hook=False) as sandbox:
        result = sandbox.run(f"import os\nos.write(3, {forged!r}.encode() + b'\\n')\nos._exit(0)")
        assert result.output == "forged"
        assert sandbox.isolation["level"] != "weak" and sandbox.isolation["audit_hook"] is False


# --- run_many --------------------------------------------------------------------------------------------
def test_run_many_keeps_order_and_runs_in_parallel(box):
    codes = [f"import time\nstart = time.monotonic()\ntime.sleep({0.5 - 0.1 * i:.1f})\n"
             f"print({i}, start, time.monotonic())" for i in range(4)]
    results = box.run_many(codes, workers=2)
    assert all(isinstance(r, ExecResult) and r.ok for r in results)
    spans = []
    for i, result in enumerate(results):
        index, start, end = result.output.split()
        assert int(index) == i
        spans.append((float(start), float(end)))
    overlapping = any(a[0] < b[1] and b[0] < a[1] for j, a in enumerate(spans) for b in spans[j + 1:])
    assert overlapping, spans
    assert box.run_many([]) == []


# --- hostile snippets ------------------------------------------------------------------------------------
# name -> (code, error kinds accepted). SENTINEL is a folder outside the scratch folder holding keep.txt,
# PORT a port the test listens on, TESTPID this test process.
HOSTILE = {
    "infinite_loop": ("while True: pass", {"CPUTimeLimit", "Timeout"}),
    "sleep_forever": ("import time; time.sleep(100)", {"Timeout"}),
    "fork_bomb": ("import os\nwhile True: os.fork()", {"Refused"}),
    "memory_bomb_string": ("x = 'a' * 10**10", {"MemoryError"}),
    "memory_bomb_list": ("x = []\nwhile True: x.append(bytearray(10**6))", {"MemoryError"}),
    "huge_output": ("while True: print('x' * 10000)", {"CPUTimeLimit", "Timeout"}),
    "write_outside": ("open('SENTINEL/new.txt', 'w').write('pwned')", {"Refused"}),
    "append_outside": ("open('SENTINEL/keep.txt', 'a').write('pwned')", {"Refused"}),
    "delete_outside": ("import os; os.remove('SENTINEL/keep.txt')", {"Refused"}),
    "rmtree_outside": ("import shutil; shutil.rmtree('SENTINEL')", {"Refused"}),
    "rename_outside_in": ("import os; os.rename('SENTINEL/keep.txt', 'stolen.txt')", {"Refused"}),
    "chmod_outside": ("import os; os.chmod('SENTINEL/keep.txt', 0o777)", {"Refused"}),
    "mkdir_outside": ("import os; os.mkdir('SENTINEL/newdir')", {"Refused"}),
    "symlink_escape": ("import os; os.symlink('SENTINEL', 'link'); open('link/new.txt', 'w')", {"Refused"}),
    "dir_fd_escape": ("import os; fd = os.open('SENTINEL', os.O_RDONLY)\nos.remove('keep.txt', dir_fd=fd)",
                      {"Refused"}),
    "chdir_out": ("import os; os.chdir('SENTINEL'); open('new.txt', 'w')", {"Refused"}),
    "mkfifo_outside": ("import os; os.mkfifo('SENTINEL/fifo')", {"Refused"}),
    "sqlite_outside": ("import sqlite3; sqlite3.connect('SENTINEL/x.db').execute('create table t (x)')", {"Refused"}),
    "write_result_pipe": ("open(3, 'w').write('{}')", {"Refused"}),
    "socket_connect": ("import socket; s = socket.socket(); s.connect(('127.0.0.1', PORT))", {"Refused"}),
    "socket_udp": ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
                   "('127.0.0.1', PORT))", {"Refused"}),
    "os_system": ("import os; os.system('touch SENTINEL/system.txt')", {"Refused"}),
    "subprocess_run": ("import subprocess; subprocess.run(['touch', 'SENTINEL/subprocess.txt'])", {"Refused"}),
    "posixsubprocess_fork_exec": (
        "from multiprocessing.util import spawnv_passfds\nspawnv_passfds('/usr/bin/touch', "
        "[b'touch', b'SENTINEL/fork_exec.txt'], [])", {"Refused"}),
    "multiprocessing": ("import multiprocessing as mp; mp.Process(target=print).start()", {"Refused"}),
    "read_secrets": ("import os; print(os.environ.get('MATHCTL_TEST_SECRET'))\n"
                     "print(open('/proc/TESTPID/environ').read())", {"Refused"}),
    "read_parent_environ": ("import os; print(open('/proc/%d/environ' % os.getppid()).read())", {"Refused"}),
    "sys_exit": ("import sys; sys.exit(3)", {"SystemExit"}),
    "kill_parent": ("import os, signal; os.kill(os.getppid(), signal.SIGKILL)", {"Refused"}),
    "kill_test_process": ("import os, signal; os.kill(TESTPID, signal.SIGKILL)", {"Refused"}),
    "kill_everything": ("import os, signal; os.kill(-1, signal.SIGKILL)", {"Refused"}),
    "os_exit_silently": ("import os; os._exit(0)", {"SystemExit"}),
    "segfault": ("import faulthandler; faulthandler._sigsegv()", {"Killed"}),
    "ctypes_system": ("import ctypes; ctypes.CDLL(None).system(b'touch SENTINEL/ctypes.txt')", {"Refused"}),
    "ctypes_memory": ("import ctypes; ctypes.string_at(0, 8)", {"Refused"}),
}


@pytest.fixture(scope="module")
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    yield server
    server.close()


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_snippet_is_stopped(name, small_box, listener, tmp_path, monkeypatch):
    code, expected = HOSTILE[name]
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    before = _snapshot(tmp_path)
    monkeypatch.setenv("MATHCTL_TEST_SECRET", "s3cret")
    code = (code.replace("SENTINEL", str(sentinel)).replace("PORT", str(listener.getsockname()[1]))
            .replace("TESTPID", str(os.getpid())))
    box = Sandbox(SMALL) if name == "read_secrets" else small_box  # workers started with the secret set
    try:
        result = box.run(code)
    finally:
        if box is not small_box:
            box.close()
    print(f"{name}: {result.error} ({result.error_message!r}) in {result.seconds:.2f} s")
    assert result.error in expected, (result.error, result.error_message, result.output)
    assert result.error_message.startswith(result.error) and "\n" not in result.error_message
    assert result.seconds < SMALL.wall_s + 1.0
    assert result.timed_out == (result.error == "Timeout")
    assert len(result.output) <= SMALL.max_output_chars + 40
    assert "s3cret" not in result.output + result.error_message
    assert _snapshot(tmp_path) == before  # nothing outside the scratch folder changed
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection reached the test's socket
    assert os.listdir(small_box.root) == []
    assert small_box.run("print('still fine')").output == "still fine\n"  # the sandbox survives


def test_network_namespace_has_no_interfaces(small_box):
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0 and \
            subprocess.run(["unshare", "--user", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("no network namespaces on this machine: only the audit hook stops sockets")
    result = small_box.run("print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in result.output.splitlines()[2:] if ":" in line]
    assert interfaces in ([], ["lo"]), result.output


def test_network_allowed_when_asked(listener):
    with Sandbox(SandboxLimits(wall_s=5, network=True)) as sandbox:
        result = sandbox.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}))"
                             "\nprint('connected')")
    assert result.output == "connected\n", result.error_message
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            listener.accept()[0].close()
            break
        except BlockingIOError:
            time.sleep(0.01)
    else:
        pytest.fail("the connection did not arrive")


def test_privileges_dropped_when_root(box):
    if os.geteuid() != 0:
        pytest.skip("runs as a normal user: no uid change")
    result = box.run("import os\nprint(os.getuid(), os.getgid())")
    assert result.output in ("65534 65534\n",), result.output


def test_privilege_drop_decision_helpers(tmp_path):
    """Without CAP_DAC_READ_SEARCH (Docker's default capabilities) a root child drops to nobody only when
    Python is readable by everyone; these are the checks that decide it."""
    from mathctl.sandbox import _cap_permitted, _world_readable

    assert isinstance(_cap_permitted(2), bool)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    tmp_path.chmod(0o755)
    try:
        readable_parents = _world_readable([str(tmp_path.parent)])
        assert _world_readable([str(open_dir)]) == readable_parents
        assert not _world_readable([str(closed / "inner")])
        assert not _world_readable([str(tmp_path / "missing")])
    finally:
        closed.chmod(0o755)
