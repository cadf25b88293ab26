"""Run model-written Python (rStar-Math style code-augmented chain of thought) in a sandbox.

    with Sandbox(SandboxLimits(wall_s=5)) as box:
        box.run("x = 6 * 7\\nx").output                      # '42'
        [r.observation() for r in box.run_many(codes)]      # parallel, order kept

A Sandbox keeps worker processes (this file run by `python -I -S -B` in its own session with an empty
environment, one per concurrent run). A worker imports `Sandbox.preload` (sympy) once, never runs submitted code,
and forks a fresh child per execution, which before running the code:
  * starts a new session (the worker kills the whole process group past the wall-clock limit) and dies with its
    worker (PR_SET_PDEATHSIG);
  * enters a new network namespace (`unshare(CLONE_NEWNET)` as root, else CLONE_NEWUSER | CLONE_NEWNET): no
    interface but a downed loopback;
  * as root, becomes uid/gid nobody keeping only CAP_DAC_READ_SEARCH (reads anything, writes only where nobody
    may), or, where that would leave it unable to read Python, stays uid 0 without any capability;
  * sets no_new_privs, RLIMIT_AS, RLIMIT_CPU (SIGXCPU, then SIGKILL a second later), RLIMIT_FSIZE,
    RLIMIT_NOFILE, RLIMIT_CORE=0 and a SIGALRM timer at the wall limit (so a run that times out still reports
    its output);
  * works in a fresh scratch folder (cwd, HOME, TMPDIR; deleted afterwards) with only PATH, LANG, HOME and
    TMPDIR set: the caller's environment (API keys, tokens) never reaches a worker;
  * confines itself with the kernel (mathctl/confine.py): Landlock (writes only beneath scratch, no execve, no
    TCP, signals and abstract sockets scoped, no ptrace-style access to our processes such as their
    /proc/<pid>/environ) and a seccomp filter (no new processes, no signals or pidfds to other processes, no
    sockets, no mounts or namespaces, no metadata changes). These hold whatever the code does inside its own
    interpreter, for root and for ordinary users alike;
  * installs an audit hook (sys.addaudithook), the first line that turns the common cases into a readable
    `Refused` error (a PermissionError): process creation, signals to other processes, sockets, every ctypes
    call, links, writing/removing/renaming/chmod... outside the scratch folder, chdir out of it, reading
    /proc/*/environ, /proc/*/mem and credential files, gc introspection, syslog. Code that defeats the hook
    (rebinding what it calls, as PEP 578 warns) meets the kernel's walls instead: a PermissionError;
  * runs the code in a fresh `__main__` namespace, stdout/stderr going to a buffer that keeps only the first and
    last `max_output_chars` characters.
The child reports one JSON line on a pipe of its own (fd 3), read by the worker with a byte bound; a child that
dies without reporting is classified from its exit status and CPU time. Each report says which isolation the
child got (`Sandbox.isolation`): "landlock" (Landlock applied; seccomp too on x86_64 and aarch64), "uid" (no
Landlock, but uid nobody in a network namespace), or "weak" (neither: only rlimits and the hook). Weak children
run nothing unless the Sandbox was made with `allow_weak=True`.

Not isolated: reading files (any file as root, through CAP_DAC_READ_SEARCH; the hook refuses known secret
paths, the kernel does not); the total size of scratch files (RLIMIT_FSIZE bounds each one); file metadata
changes are refused everywhere, scratch included (Landlock cannot scope them, so seccomp refuses chmod, chown,
utime and xattrs: `shutil.copy`'s mode copy fails). Code can forge its own report by writing to fd 3 (it gains
nothing it could not print). `import ctypes` and `import subprocess` work (sympy imports both); using them is
refused.
"""

from __future__ import annotations

import _posixsubprocess  # loaded before any hook; its fork_exec (unaudited) is replaced in the child
import ast
import builtins
import ctypes
import dataclasses
import io
import json
import math
import os
import posix
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_NOBODY, _RESULT_FD = 65534, 3
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 1, 8, 38
_CAP_DAC_READ_SEARCH, _CAP_VERSION_3 = 2, 0x20080522
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
_FALLBACK = b'{"output": "", "error": "MemoryError", "error_message": "MemoryError", "timed_out": false}\n'


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0          # wall-clock limit per execution (the process group is killed)
    cpu_s: float = 5.0            # RLIMIT_CPU, rounded up to whole seconds
    memory_mb: int = 512          # RLIMIT_AS (address space)
    max_output_chars: int = 1024  # longer output is middle-truncated
    max_file_mb: int = 16         # RLIMIT_FSIZE (each file written in scratch)
    network: bool = False         # False = new network namespace, sockets refused

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "max_output_chars", "max_file_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")


@dataclass
class ExecResult:
    output: str            # what the code printed (truncated), else the repr of a last expression, else ""
    error: str | None      # exception class name, "Timeout", "CPUTimeLimit", "Refused", "Killed"...; None if fine
    error_message: str     # one line, e.g. "NameError: name 'x' is not defined"; "" without error
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def observation(self) -> str:
        """The text to show the model: the output, then the error line if there was one."""
        if self.ok or not self.output.strip():
            return self.output if self.ok else self.error_message
        return f"{self.output.rstrip(chr(10))}\n{self.error_message}"


class Refused(PermissionError):
    """An operation the sandbox does not allow (raised by the audit hook inside the executed code)."""


class Timeout(BaseException):
    """Raised in the code by the SIGALRM timer at the wall-clock limit."""


class CPUTimeLimit(BaseException):
    """Raised in the code on SIGXCPU (RLIMIT_CPU soft limit)."""


class Sandbox:
    """Runs code strings in isolated, resource-limited child processes (see the module docstring). Thread-safe."""

    preload: tuple[str, ...] = ("sympy",)  # imported once per worker when installed: code using them starts fast

    def __init__(self, limits: SandboxLimits = SandboxLimits(), scratch_root: str | Path | None = None, *,
                 allow_weak: bool = False, audit_hook: bool = True):
        """`allow_weak`: run code even where the kernel offers neither Landlock nor a separate uid in a network
        namespace (else every run reports SandboxError). `audit_hook=False` leaves the kernel's walls alone
        (the tests use it to show they hold without the hook); keep it on otherwise, its errors are readable."""
        if not isinstance(limits, SandboxLimits):
            raise ValueError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
        self.limits = limits
        self.options = {"allow_weak": bool(allow_weak), "audit_hook": bool(audit_hook)}
        self._isolation: dict | None = None
        if scratch_root is None:
            root = created = tempfile.mkdtemp(prefix="mathctl-sandbox-")
        else:
            root = os.path.abspath(os.fspath(scratch_root))
            created = None if os.path.isdir(root) else root
            os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, created)

    def run(self, code: str) -> ExecResult:
        """Execute `code` in a fresh child process; report what it printed or why it failed."""
        if not isinstance(code, str):
            raise ValueError(f"code must be a str, got {type(code).__name__}")
        start = time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("the Sandbox is closed")
            worker = self._idle.pop() if self._idle else _Worker(self.root, self.preload)
            if worker not in self._workers:
                self._workers.append(worker)
        reply = worker.ask({"code": code, "limits": dataclasses.asdict(self.limits), **self.options},
                           self.limits.wall_s + 30)
        with self._lock:
            if reply is not None and not self._closed:
                self._idle.append(worker)
            elif worker in self._workers:
                self._workers.remove(worker)
        if reply is None:  # the worker died or hung (not the code's doing): it is replaced
            worker.kill()
            return ExecResult("", "Killed", "Killed: the sandbox worker failed", False, time.monotonic() - start)
        if isinstance(reply.get("isolation"), dict):
            self._isolation = reply["isolation"]
        return ExecResult(**{key: reply[key] for key in ("output", "error", "error_message", "timed_out", "seconds")})

    @property
    def isolation(self) -> dict:
        """What the kernel enforced in the latest child: {"level": "landlock" | "uid" | "weak", "landlock":
        ABI (0 = none), "seccomp": bool, "uid": "nobody" | "root" (no capabilities) | "unchanged", "netns":
        bool, "network": bool, "audit_hook": bool}. Runs an empty program first if nothing ran yet."""
        if self._isolation is None:
            result = self.run("pass")
            if self._isolation is None:
                raise RuntimeError(f"the sandbox could not start a child: {result.error_message}")
        return dict(self._isolation)

    def run_many(self, codes: Sequence[str], workers: int | None = None) -> list[ExecResult]:
        """`run` each code, `workers` at a time (default os.cpu_count()); results in the order of `codes`."""
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        codes = list(codes)
        if not all(isinstance(code, str) for code in codes):
            raise ValueError("codes must be strings")
        if workers == 1 or len(codes) <= 1:
            return [self.run(code) for code in codes]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(codes))) as pool:
            return list(pool.map(self.run, codes))

    def close(self) -> None:
        """Stop the worker processes and remove the scratch folder if this Sandbox created it."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Worker:
    """A worker process (this file as a script): one JSON request line in, one JSON reply line out."""

    def __init__(self, root: str, preload: Sequence[str]):
        config = {"site": [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))],
                  "preload": list(preload)}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), root, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**_ENV, "HOME": root}, cwd=root,
            start_new_session=True)

    def ask(self, request: dict, timeout: float) -> dict | None:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            line = self.proc.stdout.readline()
            return json.loads(line) if line else None
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        _kill(os.killpg, self.proc.pid)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _shutdown(workers: list[_Worker], created: str | None) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()
    if created:
        shutil.rmtree(created, ignore_errors=True)


def _kill(kill, pid: int) -> None:
    try:
        kill(pid, signal.SIGKILL)
    except OSError:  # already gone
        pass


def _middle(head: str, tail: str, total: int, limit: int) -> str:
    """`limit` characters of a text of `total` characters from its start (head) and end (tail)."""
    if total <= limit:
        return head
    return f"{head[:limit // 2]}...[{total - limit} chars truncated]...{tail[len(tail) - (limit - limit // 2):]}"


class _Capped(io.TextIOBase):
    """stdout/stderr of the code: keeps the first and last `limit` characters written, counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.head, self.tail, self.total = limit, "", "", 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.total += len(text)
        if len(self.head) < self.limit:
            self.head += text[: self.limit - len(self.head)]
        self.tail = (self.tail + text[-self.limit:])[-self.limit:]
        return len(text)


# --- in the worker process --------------------------------------------------------------------------------
def _serve() -> None:
    root, config = sys.argv[1], json.loads(sys.argv[2])
    sys.path.extend(config["site"])
    confine = _load_confine()  # before the preloads: nothing they run can replace it
    for name in config["preload"]:
        try:
            __import__(name)
        except Exception:  # not installed or broken: code importing it will say so
            pass
    builtins.exit = builtins.quit = sys.exit  # as without -S
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    prepared = {network: confine.Confinement(network, libc=libc) for network in (False, True)}
    kernel = {"confine": confine, "libc": libc, "prepared": prepared, "landlock": prepared[False].landlock,
              "seccomp": prepared[False].seccomp}
    for line in sys.stdin.buffer:
        sys.stdout.buffer.write(json.dumps(_execute(json.loads(line), root, kernel)).encode() + b"\n")
        sys.stdout.buffer.flush()


def _load_confine() -> types.ModuleType:
    """mathctl/confine.py, loaded by path (the worker runs with -I -S: the package may not be importable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mathctl_confine",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "confine.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _execute(request: dict, root: str, kernel: dict) -> dict:
    """Fork a child for one execution, enforce the wall-clock limit, return its report (or a verdict)."""
    limits = SandboxLimits(**request["limits"])
    scratch = tempfile.mkdtemp(prefix="run-", dir=root)
    read_end, write_end = os.pipe()
    start, pid = time.monotonic(), os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _child(request, limits, scratch, write_end, kernel)
        finally:
            os._exit(70)
    os.close(write_end)
    deadline, data = start + limits.wall_s + 0.5, b""  # the child's own timer fires at wall_s
    while len(data) < 16 * limits.max_output_chars + 65536 and data.count(b"\n") < 2:  # isolation, report
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_end], [], [], left)[0] or not (chunk := os.read(read_end, 65536)):
            break
        data += chunk
    os.close(read_end)
    killed = False
    while not (reaped := os.wait4(pid, os.WNOHANG))[0]:
        if time.monotonic() >= deadline and not killed:
            killed = True
            _kill(os.killpg, pid)
            _kill(os.kill, pid)
        time.sleep(0.0005)
    _kill(os.killpg, pid)  # whatever the code left behind in its session
    shutil.rmtree(scratch, ignore_errors=True)
    head, _, data = data.partition(b"\n")
    try:
        isolation = json.loads(head)
    except ValueError:
        isolation = None
    try:
        report = json.loads(data)
        valid = (isinstance(report, dict) and isinstance(report.get("output"), str)
                 and isinstance(report.get("error_message"), str) and isinstance(report.get("timed_out"), bool)
                 and isinstance(report.get("error"), (str, type(None))))
    except ValueError:
        valid = False
    reply = report if valid else _verdict(killed, *reaped[1:], limits)
    return {**reply, "isolation": isolation if isinstance(isolation, dict) else None,
            "seconds": time.monotonic() - start}


def _verdict(killed: bool, status: int, usage: resource.struct_rusage, limits: SandboxLimits) -> dict:
    """Classify a child that died without reporting."""
    cpu = max(1, math.ceil(limits.cpu_s))
    if killed:
        error, message = "Timeout", f"the code ran past the {limits.wall_s:g} s wall-clock limit"
    elif not os.WIFSIGNALED(status):
        error, message = "SystemExit", f"the process exited ({os.WEXITSTATUS(status)}) without a result"
    elif os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL) and usage.ru_utime + usage.ru_stime >= cpu - 0.1:
        error, message = "CPUTimeLimit", f"the code used more than {cpu} s of CPU time"
    else:
        error, message = "Killed", f"the process died of signal {signal.strsignal(os.WTERMSIG(status))}"
    return {"output": "", "error": error, "error_message": f"{error}: {message}", "timed_out": killed}


# --- in the child: isolate, run, report -------------------------------------------------------------------
def _child(request: dict, limits: SandboxLimits, scratch: str, write_end: int, kernel: dict) -> None:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.dup2(write_end, _RESULT_FD)
    os.closerange(_RESULT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    isolation: dict = {}
    failure = None
    try:
        isolation = _isolate(limits, scratch, kernel, request.get("audit_hook", True))
    except Exception as exc:  # the isolation failed: run nothing
        failure = f"SandboxError: {exc}"
    _report(json.dumps(isolation).encode() + b"\n")  # line 1, written before the code runs: it cannot forge it
    if failure is None and isolation["level"] == "weak" and not request.get("allow_weak", False):
        missing, _ = kernel["confine"].weak_reason(isolation)
        failure = f"SandboxError: weak isolation, nothing was run: {missing} (Sandbox(allow_weak=True) runs it anyway)"
    if failure is None:
        report = _run(request["code"], limits, scratch, request.get("audit_hook", True))
    else:
        report = {"output": "", "error": "SandboxError", "error_message": failure, "timed_out": False}
    try:
        data = json.dumps(report).encode() + b"\n"
    except BaseException:  # noqa: B036 - out of memory (or worse): still report
        data = _FALLBACK
    _report(data)
    os._exit(0)


def _report(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(_RESULT_FD, data):]
    except OSError:  # the code closed fd 3: the worker classifies from the exit status
        pass


def _cap_permitted(bit: int) -> bool:
    """Whether this process may hold capability `bit` (its permitted set, /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapPrm:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def _python_dirs() -> list[str]:
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"]}
    return sorted(paths | {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))})


def _world_readable(paths: Sequence[str]) -> bool:
    """Every path and each folder above it can be read and entered by any user."""
    for path in paths:
        current = os.path.realpath(path)
        while True:
            try:
                mode = os.stat(current).st_mode
            except OSError:
                return False
            if mode & 0o005 != 0o005:
                return False
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return True


def _isolate(limits: SandboxLimits, scratch: str, kernel: dict, audit_hook: bool) -> dict:
    """Confine this (forked, single-threaded) child; returns what it got (see Sandbox.isolation)."""
    confine, libc = kernel["confine"], kernel["libc"]
    os.chdir(scratch)
    root = os.geteuid() == 0
    netns = False
    if not limits.network:
        if root and libc.unshare(_CLONE_NEWNET) == 0:
            netns = True
        elif libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
            netns, root = True, False  # in a new user namespace the uid cannot change (and has no rights outside it)
    uid = "unchanged"
    if root:
        keep = _cap_permitted(_CAP_DAC_READ_SEARCH)
        if _setgroups_ok() and (keep or _world_readable(_python_dirs())):
            # uid/gid nobody; keeping CAP_DAC_READ_SEARCH where we have it, so imports read root-only trees
            # (a Python under /root); without it (Docker's default capabilities) only when Python is readable
            # by everyone
            os.chown(scratch, _NOBODY, _NOBODY)
            if keep:
                libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            caps, uid = (1 << _CAP_DAC_READ_SEARCH) if keep else 0, "nobody"
        else:  # uid 0 stays (it can read the Python tree) but holds no capability at all
            caps, uid = 0, "root"
        if (keep or uid == "root") and libc.capset((ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0),
                                                   (ctypes.c_uint32 * 6)(caps, caps, 0, 0, 0, 0)):
            raise OSError(ctypes.get_errno(), "capset failed")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    memory, cpu, fsize = limits.memory_mb << 20, max(1, math.ceil(limits.cpu_s)), int(limits.max_file_mb * 2**20)
    for which, soft, hard in ((resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_CPU, cpu, cpu + 1),
                              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0),
                              (resource.RLIMIT_NOFILE, 256, 256)):
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(which, (soft, hard))
    os.environ.clear()
    os.environ.update(_ENV, HOME=scratch, TMPDIR=scratch)
    # the kernel's walls last: each is refused as a whole (SandboxError) rather than half applied
    kernel["prepared"][limits.network].apply(scratch)
    return {"level": confine.level(kernel["landlock"], kernel["seccomp"], uid, netns),
            "landlock": kernel["landlock"], "seccomp": kernel["seccomp"], "uid": uid, "netns": netns,
            "network": limits.network, "audit_hook": audit_hook}


def _setgroups_ok() -> bool:
    try:
        os.setgroups([])
        return True
    except PermissionError:  # root without CAP_SETGID (odd container): keep the uid
        return False


def _run(code: str, limits: SandboxLimits, scratch: str, audit_hook: bool = True) -> dict:
    out, armed = _Capped(limits.max_output_chars), [True]

    def stop(kind: type[BaseException], message: str):
        def handler(signum: int, frame: object) -> None:
            if armed[0]:
                raise kind(message)
        return handler

    def refuser(what: str):
        def refuse(*args: object, **kwargs: object) -> None:
            raise Refused(f"{what} is not allowed in the sandbox")
        return refuse

    if audit_hook:  # raise no audit event: fork_exec (subprocess, multiprocessing), mkfifo/mknod (files anywhere)
        _posixsubprocess.fork_exec = subprocess._fork_exec = refuser("process creation")
        os.mkfifo = os.mknod = posix.mkfifo = posix.mknod = refuser("os.mkfifo/os.mknod")
    main = types.ModuleType("__main__")
    sys.modules["__main__"], worker_main = main, sys.modules["__main__"]  # noqa: F841 - keeps it alive
    sys.argv, sys.stdin, sys.stdout, sys.stderr = [""], io.StringIO(), out, out
    cpu = max(1, math.ceil(limits.cpu_s))
    signal.signal(signal.SIGXCPU, stop(CPUTimeLimit, f"the code used more than {cpu} s of CPU time"))
    signal.signal(signal.SIGALRM, stop(Timeout, f"the code ran past the {limits.wall_s:g} s wall-clock limit"))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too large file is an OSError, not a death
    if audit_hook:
        sys.addaudithook(_make_hook(scratch, limits.network))
    signal.setitimer(signal.ITIMER_REAL, limits.wall_s)
    error, message = None, ""
    try:
        tree = ast.parse(code, "<code>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<code>", "exec"), main.__dict__)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<code>", "eval"), main.__dict__)
            if value is not None and not out.total:
                out.write(repr(value))
    except BaseException as exc:  # noqa: B036 - SystemExit, Timeout... are results too
        armed[0] = False
        try:
            text = " ".join(str(exc).splitlines())
        except BaseException:  # noqa: B036 - a broken __str__
            text = ""
        error = type(exc).__name__
        message = f"{error}: {text}" if text else error
        message = _middle(message, message, len(message), limits.max_output_chars)
        main.__dict__.clear()  # frees what a MemoryError filled
    armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    output = _middle(out.head, out.tail, out.total, out.limit)
    return {"output": output, "error": error, "error_message": message, "timed_out": error == "Timeout"}


_SECRETS = re.compile(r"^/proc/[^/]+/(task/[^/]+/)?(environ|mem)$|/\.(ssh|aws|gnupg)/|/\.netrc$|/\.git-credentials$"
                      r"|/huggingface/(stored_)?tokens?$")
_REFUSED = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                      "subprocess.Popen", "os.startfile", "signal.pthread_kill", "os.symlink", "os.link",
                      "gc.get_objects", "gc.get_referrers", "gc.get_referents", "resource.prlimit",
                      "syslog.openlog", "syslog.syslog"})
_PATH_ARGS = {  # audit event -> (index of a path argument, index of its dir_fd argument or None), ...
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)), "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.chdir": ((0, None),), "shutil.rmtree": ((0, 1),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "sqlite3.connect": ((0, None),)}


def _make_hook(scratch: str, network: bool):
    """The audit hook; everything it uses is bound here, out of reach of the code's namespace."""
    me, realpath, readlink, isdir, fsdecode = os.getpid(), os.path.realpath, os.readlink, os.path.isdir, os.fsdecode
    refused, secrets, path_args = _REFUSED, _SECRETS, _PATH_ARGS
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # a second copy of these would be unpatched; readline and dbm write files with no audit event
    fresh_refused = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "readline", "_dbm", "_gdbm"})

    def resolve(path: object, dir_fd: object = None) -> str:
        try:
            if isinstance(path, int):
                return readlink(f"/proc/self/fd/{path}")
            path = fsdecode(path)
            if isinstance(dir_fd, int) and dir_fd >= 0 and not path.startswith("/"):
                path = readlink(f"/proc/self/fd/{dir_fd}") + "/" + path
            return realpath(path)
        except (OSError, TypeError, ValueError):
            return "?"  # outside

    def hook(event: str, args: tuple) -> None:
        if event in refused or event.startswith("ctypes.") or (not network and event.startswith("socket.")):
            raise Refused(f"{event} is not allowed in the sandbox")
        if event in ("os.kill", "os.killpg") and args[0] != me:
            raise Refused(f"{event} of another process is not allowed in the sandbox")
        if event == "import" and args[0] in fresh_refused:
            raise Refused(f"importing a fresh {args[0]} is not allowed in the sandbox")
        paths = [(args[0], None)] if event == "open" else [
            (args[i], None if d is None else args[d]) for i, d in path_args.get(event, ())]
        for path, dir_fd in paths:
            path = resolve(path, dir_fd)
            if path == scratch or path.startswith(scratch + "/"):
                continue
            if event != "open":
                raise Refused(f"{event} on {path} (outside the scratch folder) is not allowed in the sandbox")
            mode = args[1] if isinstance(args[1], str) else ""
            if (args[2] & write_flags or any(c in mode for c in "wax+")) and path != "/dev/null":
                raise Refused(f"writing {path} (outside the scratch folder) is not allowed in the sandbox")
            if secrets.search(path) or (args[1] is None and isdir(path)):  # a directory fd would serve as dir_fd
                raise Refused(f"opening {path} is not allowed in the sandbox")

    return hook


if __name__ == "__main__":
    _serve()
