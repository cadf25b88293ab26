"""Stages 5-6 of `equivalence`: sympy in long-lived worker processes under a wall-clock limit.

Trees go to the worker as pickles; the worker converts them directly into sympy objects (`_to_sympy`: no
`parse_expr`, no `eval`) and answers. The pool (`_Pool`) starts workers lazily, kills and replaces one that
passes its deadline, and caches verdicts per pair. See `mathctl.grading.equivalence` for the guarantees.
"""

from __future__ import annotations

import atexit
import os
import pickle
import random
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Any

from mathctl.grading.numeric import _meta
from mathctl.grading.parse import _STARTUP_S, WORKER_MAX_BITS, _TooLarge, _Unparsable

# ------------------------------------------------------------------------------------ worker process
_FRAME = struct.Struct(">I")


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_frame(fd: int, buf: bytearray) -> Any:
    """Blocking read of one frame (worker side); None on EOF."""
    while True:
        if len(buf) >= 4:
            (n,) = _FRAME.unpack_from(buf)
            if len(buf) >= 4 + n:
                obj = pickle.loads(bytes(buf[4:4 + n]))
                del buf[:4 + n]
                return obj
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buf += chunk


def _has_dec(node: tuple) -> bool:
    return _meta(node)[2]


def _to_sympy(node: tuple, sp: Any) -> Any:
    tag = node[0]
    if tag == "n":
        q = node[1]
        return sp.Rational(q.numerator, q.denominator)
    if tag == "v":
        return sp.Symbol(node[1])
    if tag == "c":
        return {"pi": sp.pi, "e": sp.E, "i": sp.I, "inf": sp.oo}[node[1]]
    if tag == "neg":
        return -_to_sympy(node[1], sp)
    if tag == "+":
        return sp.Add(*[_to_sympy(t, sp) for t in node[1]])
    if tag == "*":
        return sp.Mul(*[_to_sympy(t, sp) for t in node[1]])
    if tag == "/":
        return _to_sympy(node[1], sp) / _to_sympy(node[2], sp)
    if tag == "^":
        b, e = _to_sympy(node[1], sp), _to_sympy(node[2], sp)
        if e.is_Rational and _expanded_bits(b, sp) * abs(e) > WORKER_MAX_BITS:
            raise _TooLarge("power")  # sympy would expand it: 9^(9^9), sqrt(2)^(10^9) = 2^(5*10^8)
        return sp.Pow(b, e)
    if tag == "root":
        x, n = _to_sympy(node[1], sp), _to_sympy(node[2], sp)
        if n.is_Integer and n > 0 and n % 2 == 1 and not x.free_symbols:
            return sp.real_root(x, n)
        return sp.root(x, n)
    if tag == "f":
        x = _to_sympy(node[2], sp)
        fn = {"abs": sp.Abs, "floor": sp.floor, "ceil": sp.ceiling, "sqrt": sp.sqrt, "sin": sp.sin,
              "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc, "asin": sp.asin,
              "acos": sp.acos, "atan": sp.atan, "acot": sp.acot, "asec": sp.asec, "acsc": sp.acsc,
              "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "coth": sp.coth, "exp": sp.exp}[node[1]]
        return fn(x)
    if tag == "log":
        x = _to_sympy(node[2], sp)
        return sp.log(x) if node[1] is None else sp.log(x, _to_sympy(node[1], sp))
    if tag in ("!", "binom"):
        args = [_to_sympy(t, sp) for t in node[1:]]
        if any(a.is_Number and abs(a) > 10 ** 4 for a in args):
            raise _TooLarge(tag)
        return sp.factorial(args[0]) if tag == "!" else sp.binomial(args[0], args[1])
    raise _Unparsable(tag)


def _expanded_bits(b: Any, sp: Any) -> int:
    """Bits of the rational numbers that sympy multiplies out when `b` is raised to a rational power:
    the rational factors of `b` and the bases of its rational powers (`2*sqrt(3)`), weighted."""
    bits = 0
    for f in sp.Mul.make_args(b):
        if f.is_Rational and f not in (0, 1, -1):
            bits += max(int(f.p).bit_length(), int(f.q).bit_length())
        elif f.is_Pow and f.base.is_Rational and f.exp.is_Rational and f.base not in (0, 1, -1):
            size = max(int(f.base.p).bit_length(), int(f.base.q).bit_length())
            bits += int(size * abs(f.exp)) + 1
    return bits


@lru_cache(maxsize=1024)
def _w_point(name: str, k: int) -> tuple[int, int]:
    rng = random.Random(f"w|{name}|{k}")
    num = rng.randint(200, 3000) * (1 if k % 2 == 0 else -1) * (1 if rng.random() < 0.7 else -1)
    return num, rng.randint(900, 1100)


def _w_values(exprs: list, syms: list, k: int, sp: Any) -> list | None:
    subs = {s: sp.Rational(*_w_point(s.name, k)) for s in syms}
    out = []
    for ex in exprs:
        v = ex.evalf(30, subs=subs)
        if not v.is_number or v.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            return None
        out.append(v)
    return out


def _w_equal(a: Any, b: Any, dec: bool, rel_tol: float, sp: Any) -> bool:
    if a == b:
        return True
    free = a.free_symbols | b.free_symbols
    if not free:
        if a.is_Rational and b.is_Rational:
            if not dec or a.is_Integer or b.is_Integer:
                return False
            return bool(abs(a - b) <= sp.Rational(repr(rel_tol)) * sp.Max(abs(a), abs(b)))
        if any(x.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for x in (a, b)):
            return bool(sp.simplify(a - b) == 0) if not (a.has(sp.nan) or b.has(sp.nan)) else False
        va, vb, d = a.evalf(30), b.evalf(30), (a - b).evalf(30)
        if not (va.is_number and vb.is_number and d.is_number):
            return bool(sp.simplify(a - b) == 0)
        mag = sp.Max(abs(va), abs(vb))
        if dec:
            return bool(abs(d) <= rel_tol * mag or abs(d) <= sp.Float("1e-12"))
        if abs(d) <= sp.Float("1e-20", 30) * mag or d == 0:
            return True
        if abs(d) > sp.Float("1e-12", 30) * mag:
            return False
        return bool(sp.simplify(a - b) == 0)
    syms = sorted(free, key=lambda s: s.name)
    agree = 0
    for k in range(6):
        vals = _w_values([a, b], syms, k, sp)
        if vals is None:
            continue
        va, vb = vals
        d = abs(va - vb)
        if d <= sp.Float("1e-18", 30) * sp.Max(abs(va), abs(vb)) + sp.Float("1e-25", 30):
            agree += 1
            if agree >= 3:
                break
        else:
            return False
    if agree >= 2:
        return True
    return bool(sp.simplify(a - b) == 0)


def _w_prop(d1: Any, d2: Any, positive: bool, sp: Any) -> bool:
    syms = sorted(d1.free_symbols | d2.free_symbols, key=lambda s: s.name)
    ratios = []
    for k in range(6):
        vals = _w_values([d1, d2], syms, k, sp)
        if vals is None:
            continue
        v1, v2 = vals
        tiny = sp.Float("1e-25", 30)
        if abs(v1) <= tiny and abs(v2) <= tiny:
            continue
        if abs(v1) <= tiny or abs(v2) <= tiny:
            return False
        ratios.append(v1 / v2)
    if len(ratios) >= 2:
        r0 = ratios[0]
        if any(abs(r - r0) > sp.Float("1e-18", 30) * abs(r0) for r in ratios[1:]):
            return False
        if positive:
            return bool(abs(sp.im(r0)) <= sp.Float("1e-20", 30) * abs(r0) and sp.re(r0) > 0)
        return True
    q = sp.simplify(d1 / d2)
    if q.free_symbols or q == 0 or not q.is_number:
        return False
    return bool(q > 0) if positive else True


def _w_task(task: tuple, rel_tol: float, sp: Any) -> tuple[bool | None, str]:
    try:
        if task[0] == "_sleep":  # test hook for the time limit
            time.sleep(task[1])
            return True, "symbolic"
        a, b = _to_sympy(task[1], sp), _to_sympy(task[2], sp)
        if task[0] == "eq":
            ok = _w_equal(a, b, _has_dec(task[1]) or _has_dec(task[2]), rel_tol, sp)
        else:
            ok = _w_prop(a, b, task[3], sp)
        return bool(ok), "symbolic"
    except (_TooLarge, RecursionError, _Unparsable):
        return None, "unparsable"
    except Exception:  # noqa: BLE001 - any sympy failure is an answer ("error"), never a dead worker
        return None, "error"


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(0)


def _worker_main() -> None:
    """Entry point of a worker process: frames in on stdin, frames out on the original stdout."""
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    try:
        import resource

        limit = int(os.environ.get("MATHCTL_GRADER_WORKER_MEM_MB", "2048")) << 20
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    warnings.simplefilter("ignore")
    import sympy

    _write_frame(out_fd, ("ready", os.getpid()))
    buf = bytearray()
    while True:
        msg = _read_frame(0, buf)
        if msg is None:
            return
        job_id, rel_tol, tasks = msg
        answers = [_w_task(t, rel_tol, sympy) for t in tasks]
        _write_frame(out_fd, (job_id, answers))


# -------------------------------------------------------------------------------------- worker pool
_BOOT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
         "from mathctl.grading.workers import _worker_main; _worker_main()")


def _default_workers() -> int:
    env = os.environ.get("MATHCTL_GRADER_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class _Worker:
    __slots__ = ("proc", "rfd", "wfd", "buf", "ready")

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the `mathctl` package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, bufsize=0, close_fds=True)
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        self.buf = bytearray()
        self.ready = False

    def send(self, obj: Any) -> bool:
        try:
            _write_frame(self.wfd, obj)
            return True
        except (OSError, ValueError):
            return False

    def frames(self) -> list | None:
        """Frames now readable (call after select says so); None when the worker is gone."""
        try:
            chunk = os.read(self.rfd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        self.buf += chunk
        out = []
        while len(self.buf) >= 4:
            (n,) = _FRAME.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        self.close_pipes()

    def close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """Worker processes shared by all threads of this process, plus a small verdict cache."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition(threading.Lock())
        self.idle: list[_Worker] = []
        self.all: set[_Worker] = set()
        self.count = 0  # workers alive or being started
        self.max_workers = _default_workers()
        self.cache: dict[tuple, tuple[bool, str]] = {}

    # -- verdict cache (symbolic verdicts only; timeouts are not cached)
    def cache_get(self, key: tuple) -> tuple[bool, str] | None:
        return self.cache.get(key)

    def cache_put(self, key: tuple, res: tuple[bool, str]) -> None:
        if res[1] in ("timeout", "error"):
            return
        with self.cond:
            if len(self.cache) >= 1 << 15:
                self.cache.clear()
            self.cache[key] = res

    # -- worker bookkeeping
    def _spawn(self) -> _Worker | None:
        try:
            w = _Worker()
        except OSError:
            with self.cond:
                self.count -= 1
                self.cond.notify_all()
            return None
        with self.cond:
            self.all.add(w)
        return w

    def acquire(self, n: int) -> list[_Worker]:
        spawn = 0
        got: list[_Worker] = []
        with self.cond:
            cap = max(self.max_workers, n)
            while True:
                while self.idle and len(got) < n:
                    got.append(self.idle.pop())
                while len(got) + spawn < n and self.count < cap:
                    self.count += 1
                    spawn += 1
                if got or spawn:
                    break
                self.cond.wait()
        for _ in range(spawn):
            w = self._spawn()
            if w is not None:
                got.append(w)
        return got

    def replace(self, w: _Worker) -> _Worker | None:
        """Kill `w` and start its successor (whose start-up runs while the caller goes on)."""
        w.kill()
        with self.cond:
            self.all.discard(w)
        return self._spawn()

    def release(self, workers: list[_Worker]) -> None:
        with self.cond:
            for w in workers:
                if w.alive():
                    self.idle.append(w)
                else:
                    self.count -= 1
                    self.all.discard(w)
                    w.close_pipes()
            self.cond.notify_all()

    def drop(self, w: _Worker) -> None:
        w.kill()
        with self.cond:
            self.count -= 1
            self.all.discard(w)
            self.cond.notify_all()

    def run(self, jobs: list[list[tuple]], timeout_s: float, parallel: int, rel_tol: float) -> list:
        """Answers per job (a list of (bool|None, reason) per task), or "timeout"/"error" per job."""
        results: list = [None] * len(jobs)
        workers = self.acquire(max(1, min(parallel, len(jobs))))
        if not workers:
            return ["error"] * len(jobs)
        idle = list(workers)
        queue = deque(range(len(jobs)))
        active: dict[int, list] = {}  # fd -> [worker, job index, deadline or None, start-up deadline]
        tries = [0] * len(jobs)
        try:
            while queue or active:
                while queue and idle:
                    w = idle.pop()
                    i = queue.popleft()
                    if not w.send((i, rel_tol, jobs[i])):
                        tries[i] += 1
                        if tries[i] >= 2:
                            results[i] = "error"
                        else:
                            queue.appendleft(i)
                        nw = self.replace(w)
                        if nw is not None:
                            idle.append(nw)
                        else:
                            self._forget()
                        continue
                    now = time.monotonic()
                    active[w.rfd] = [w, i, now + timeout_s if w.ready else None, now + _STARTUP_S]
                if not active:
                    for i in queue:
                        results[i] = "error"
                    break
                now = time.monotonic()
                wake = min(e[2] if e[2] is not None else e[3] for e in active.values())
                readable, _, _ = select.select(list(active), [], [], max(0.0, wake - now))
                for fd in readable:
                    entry = active[fd]
                    w, i = entry[0], entry[1]
                    frames = w.frames()
                    if frames is None:  # the worker died (crash, memory limit)
                        del active[fd]
                        results[i] = "error"
                        nw = self.replace(w)
                        if nw is not None:
                            idle.append(nw)
                        else:
                            self._forget()
                        continue
                    for fr in frames:
                        if fr[0] == "ready":
                            w.ready = True
                            entry[2] = time.monotonic() + timeout_s  # the clock starts now
                        elif fr[0] == i:
                            results[i] = fr[1]
                            del active[fd]
                            idle.append(w)
                now = time.monotonic()
                for fd, (w, i, deadline, startup) in list(active.items()):
                    if (deadline is not None and now >= deadline) or (deadline is None and now >= startup):
                        del active[fd]
                        results[i] = "timeout" if deadline is not None else "error"
                        nw = self.replace(w)
                        if nw is not None:
                            idle.append(nw)
                        else:
                            self._forget()
        except BaseException:
            for entry in active.values():
                self.drop(entry[0])
            active.clear()
            raise
        finally:
            self.release(idle)
        return results

    def _forget(self) -> None:
        with self.cond:
            self.count -= 1
            self.cond.notify_all()

    def shutdown(self) -> None:
        with self.cond:
            workers = list(self.all)
            self.all.clear()
            self.idle.clear()
            self.count = 0
            self.cond.notify_all()
        for w in workers:
            try:
                w.proc.stdin.close()  # EOF: the worker exits on its own
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
            w.close_pipes()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_ABANDONED: list[_Worker] = []  # workers inherited over fork: kept referenced, never touched


def _get_pool() -> _Pool:
    global _POOL
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        return pool
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool()
        return _POOL


def _after_fork_in_child() -> None:
    """A forked child must not talk to (or keep open the pipes of) its parent's workers."""
    global _POOL, _POOL_LOCK
    old = _POOL
    _POOL = None
    _POOL_LOCK = threading.Lock()
    if old is not None:
        for w in list(old.all):
            w.close_pipes()
            _ABANDONED.append(w)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start_workers(n: int | None = None) -> int:
    """Start (and wait for) `n` workers now (default: the CPU count), e.g. before timing-sensitive work.
    Returns the number of ready workers."""
    pool = _get_pool()
    n = n or pool.max_workers
    got = pool.acquire(n)
    deadline = time.monotonic() + _STARTUP_S
    ready = []
    try:
        for w in got:
            while not w.ready and time.monotonic() < deadline:
                r, _, _ = select.select([w.rfd], [], [], max(0.0, deadline - time.monotonic()))
                frames = w.frames() if r else []
                if frames is None:
                    break
                if any(f[0] == "ready" for f in frames):
                    w.ready = True
            if w.ready:
                ready.append(w)
    finally:
        pool.release(got)
    return len(ready)


def shutdown_workers() -> None:
    """Stop this process's workers (they are restarted on demand). Also runs at interpreter exit."""
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown_workers)
