"""Hostile programs against mathctl.sandbox, run by tests/unit/test_sandbox_kernel.py in a process of its own
(as root, or as an unprivileged uid), standing in for the `mathctl` process: it holds a secret in its
environment, listens on TCP and UDP, and checks after every attack that nothing outside scratch changed, no
connection or datagram arrived, and that it, the sandbox workers and a victim process of the children's uid
are neither dead nor stopped. Standard library and mathctl.sandbox only (an unprivileged uid runs it with
whatever Python it can read).

    python sandbox_attacks.py CONFIG_JSON     # prints one JSON object: isolation, results, violations

CONFIG: {"audit_hook": bool, "allow_weak": bool, "hide": [syscall names refused to this process first, as
Docker's seccomp profile or an old kernel would], "drop_dac_read_search": bool (as Docker's default
capabilities: a root child that cannot read Python as nobody stays uid 0), "victim": pid, "dirs": {"sentinel", "home", "site"},
"cases": [names] or null for all, "probe_only": bool}
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
import uuid

# Placeholders: SENTINEL, HOMEDIR, SITEDIR (folders the children's uid may write, outside scratch), TMPFILE,
# SHMFILE (files in /tmp and /dev/shm that must not appear), PORT / UDPPORT (our sockets), DRIVER (this
# process, the "mathctl process"), VICTIM (another process of the children's uid), NR_<name> (syscall numbers).
BYPASS = ("import os, posixpath\nhere = os.getcwd()\nos.fspath = lambda p, _h=here: _h + '/harmless'\n"
          "posixpath.abspath = lambda p, _h=here: _h + '/harmless'\n")  # the hook now sees every path in scratch
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
FAIL = "if r < 0:\n    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))\n"
KERNEL = {"PermissionError"}          # a refusal by Landlock or seccomp (EACCES / EPERM)
EITHER = {"Refused", "PermissionError"}

CASES: dict[str, tuple[str, set, set]] = {}  # name -> (code, errors with the audit hook, errors without)


def case(name: str, code: str, hooked: set = EITHER, kernel: set = KERNEL) -> None:
    CASES[name] = (code, hooked, kernel)


# --- files outside scratch, plainly and after defeating the hook ----------------------------------------------
for target in ("SENTINEL/new.txt", "TMPFILE", "SHMFILE", "HOMEDIR/.bashrc", "SITEDIR/evil.pth"):
    label = target.split("/")[0].lower().replace("file", "").rstrip(".") or "x"
    case(f"write_{label}", f"open('{target}', 'w').write('pwned')")
    case(f"write_{label}_hook_defeated", BYPASS + f"open('{target}', 'w').write('pwned')", KERNEL)
case("append_keep_hook_defeated", BYPASS + "open('SENTINEL/keep.txt', 'a').write('pwned')", KERNEL)
case("remove_hook_defeated", BYPASS + "os.remove('SENTINEL/keep.txt')", KERNEL)
case("truncate_hook_defeated", BYPASS + "os.truncate('SENTINEL/keep.txt', 0)", KERNEL)
case("mkdir_hook_defeated", BYPASS + "os.mkdir('SENTINEL/newdir')", KERNEL)
case("symlink_outside", "import os\nos.symlink('/etc/passwd', 'SENTINEL/link')")
case("rename_out_of_sentinel", BYPASS + "os.rename('SENTINEL/keep.txt', 'stolen.txt')",
     KERNEL | {"OSError"}, KERNEL | {"OSError"})                            # EXDEV: Landlock's REFER
case("hardlink_into_scratch", "import os\nos.link('SENTINEL/keep.txt', 'alias')\nopen('alias', 'a').write('x')",
     EITHER | {"OSError"}, KERNEL | {"OSError"})
case("chmod_hook_defeated", BYPASS + "os.chmod('SENTINEL/keep.txt', 0o777)", KERNEL)
case("utime_hook_defeated", BYPASS + "os.utime('SENTINEL/keep.txt', (0, 0))", KERNEL)
case("mkfifo_outside", "import os, posix\nposix.mkfifo('SENTINEL/fifo')")
case("ctypes_open_write", LIBC + "r = libc.open(b'SENTINEL/raw.txt', os.O_WRONLY | os.O_CREAT, 0o644)\n" + FAIL)
case("ctypes_unlink", LIBC + "r = libc.unlink(b'SENTINEL/keep.txt')\n" + FAIL)

# --- processes ---------------------------------------------------------------------------------------------
case("os_fork", "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)")
case("posix_spawn", "import os\nos.posix_spawn('/usr/bin/touch', ['touch', 'SENTINEL/spawn.txt'], {})")
case("subprocess_run", "import subprocess\nsubprocess.run(['touch', 'SENTINEL/subprocess.txt'])")
case("os_system", "import os\nr = os.system('touch SENTINEL/system.txt')\nif r != 0:\n    raise PermissionError(r)")
case("multiprocessing", "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()")
case("ctypes_fork", LIBC + "r = libc.fork()\nif r == 0:\n    os._exit(0)\n" + FAIL)
case("raw_clone", LIBC + "r = libc.syscall(NR_clone, 17, 0, 0, 0, 0)\nif r == 0:\n    os._exit(0)\n" + FAIL)
case("raw_clone_thread_in_new_netns", LIBC + "r = libc.syscall(NR_clone, 0x40000000 | 0x00010000 | 0x800 | 0x100,"
     " 0, 0, 0, 0)\n" + FAIL)  # a thread (CLONE_THREAD | SIGHAND | VM) in a new network namespace
case("ctypes_execv", LIBC + "argv = (ctypes.c_char_p * 3)(b'touch', b'SENTINEL/exec.txt', None)\n"
     "r = libc.execv(b'/usr/bin/touch', argv)\n" + FAIL)
case("raw_unshare_user", LIBC + "r = libc.unshare(0x10000000)\n" + FAIL)
case("raw_mount", LIBC + "r = libc.mount(b'none', b'SENTINEL', b'tmpfs', 0, None)\n" + FAIL)
case("raw_ptrace_parent", LIBC + "r = libc.ptrace(16, os.getppid(), 0, 0)\n" + FAIL)
case("raw_ptrace_driver", LIBC + "r = libc.ptrace(16, DRIVER, 0, 0)\n" + FAIL)
case("raw_io_uring", LIBC + "params = ctypes.create_string_buffer(120)\nr = libc.syscall(NR_io_uring_setup, 4, params)\n"
     + FAIL)

# --- signals -----------------------------------------------------------------------------------------------
case("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)")
case("kill_driver", "import os, signal\nos.kill(DRIVER, signal.SIGSTOP)")
case("kill_victim_same_uid", "import os, signal\nos.kill(VICTIM, signal.SIGSTOP)")
case("killpg_driver", "import os, signal\nos.killpg(os.getpgid(DRIVER), signal.SIGSTOP)")
case("kill_everyone", "import os, signal\nos.kill(-1, signal.SIGSTOP)")
case("pidfd_parent", "import os, signal\nfd = os.pidfd_open(os.getppid())\nsignal.pidfd_send_signal(fd, signal.SIGSTOP)",
     KERNEL)                                                                 # pidfd_open raises no audit event
case("pidfd_driver", "import os, signal\nfd = os.pidfd_open(DRIVER)\nsignal.pidfd_send_signal(fd, signal.SIGSTOP)",
     KERNEL)
case("pidfd_victim", "import os, signal\nfd = os.pidfd_open(VICTIM)\nsignal.pidfd_send_signal(fd, signal.SIGSTOP)",
     KERNEL)
case("pidfd_from_proc_dir", BYPASS + "import signal\nfd = os.open('/proc/%d' % os.getppid(), os.O_RDONLY)\n"
     "signal.pidfd_send_signal(fd, signal.SIGSTOP)", KERNEL)
case("raw_kill_driver", LIBC + "r = libc.syscall(NR_kill, DRIVER, 19)\n" + FAIL)
case("raw_tgkill_parent", LIBC + "r = libc.syscall(NR_tgkill, os.getppid(), os.getppid(), 19)\n" + FAIL)
case("raw_sigqueue_victim", LIBC + "import struct\ninfo = ctypes.create_string_buffer(struct.pack('iii', 19, 0, -1), 128)\n"
     "r = libc.syscall(NR_rt_sigqueueinfo, VICTIM, 19, info)\n" + FAIL)

# --- secrets -----------------------------------------------------------------------------------------------
case("environ_driver", "print(open('/proc/DRIVER/environ').read())")
case("environ_driver_hook_defeated", BYPASS + "print(open('/proc/DRIVER/environ').read())", KERNEL)
case("environ_parent_hook_defeated", BYPASS + "print(open('/proc/%d/environ' % os.getppid()).read())", KERNEL)
case("mem_driver_hook_defeated", BYPASS + "print(open('/proc/DRIVER/mem', 'rb').read(16))", KERNEL)
case("files_of_driver", "import os\nprint([os.readlink(f'/proc/DRIVER/fd/{fd}') for fd in os.listdir('/proc/DRIVER/fd')])",
     KERNEL)                                                                 # numbers may list; targets may not
case("forge_worker_reply", BYPASS + "open('/proc/%d/fd/1' % os.getppid(), 'w').write('{}\\n')", KERNEL)
case("process_vm_readv_driver", LIBC + "buf = ctypes.create_string_buffer(8)\n"
     "local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)\nremote = (ctypes.c_void_p * 2)(0x10000, 8)\n"
     "r = libc.process_vm_readv(DRIVER, local, 1, remote, 1, 0)\n" + FAIL)  # EPERM, not EFAULT
case("own_environment", "import os\nprint(sorted(os.environ))", {None}, {None})  # runs; holds no secret

# --- network -----------------------------------------------------------------------------------------------
case("tcp_connect", "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1).sendall(b'x')")
case("udp_send", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', UDPPORT))")
case("ctypes_socket", LIBC + "r = libc.socket(2, 1, 0)\n" + FAIL)
case("abstract_unix_socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0mathctl-test')")


def substitute(code: str, values: dict[str, object]) -> str:
    from mathctl.confine import SYSCALLS, machine

    for name, number in sorted(SYSCALLS.get(machine(), {}).items(), key=lambda item: -len(item[0])):
        code = code.replace(f"NR_{name}", str(number))
    for key, value in values.items():
        code = code.replace(key, str(value))
    return code


def snapshot(folders: list[str]) -> dict:
    state = {}
    for folder in folders:
        for base, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(base, name)
                st = os.lstat(path)
                content = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else b""
                state[path] = (st.st_mode, st.st_mtime_ns, content.hex())
    return state


def state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def main() -> int:
    config = json.loads(sys.argv[1])
    from mathctl import confine
    from mathctl.sandbox import Sandbox, SandboxLimits

    if config.get("hide"):  # as Docker's default seccomp profile or an old kernel: refuse these to us and children
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        codes = {"landlock_create_ruleset": errno.ENOSYS, "unshare": errno.EPERM}
        confine.apply_seccomp(confine.filter_program(0, network=True, only={n: codes[n] for n in config["hide"]}))
    if config.get("drop_dac_read_search"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(24, 2, 0, 0, 0) == 0  # PR_CAPBSET_DROP: root regains no dropped capability on exec
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        assert libc.capget(header, data) == 0
        data[0] &= ~(1 << 2)  # effective
        data[1] &= ~(1 << 2)  # permitted
        assert libc.capset(header, data) == 0, ctypes.get_errno()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    dirs = config["dirs"]
    token = uuid.uuid4().hex[:8]
    values = {"SENTINEL": dirs["sentinel"], "HOMEDIR": dirs["home"], "SITEDIR": dirs["site"],
              "TMPFILE": f"/tmp/mathctl-attack-{token}", "SHMFILE": f"/dev/shm/mathctl-attack-{token}",
              "UDPPORT": udp.getsockname()[1], "PORT": tcp.getsockname()[1], "DRIVER": os.getpid(),
              "VICTIM": config["victim"]}
    secret = os.environ["MATHCTL_TEST_SECRET"]
    limits = SandboxLimits(wall_s=3.0, cpu_s=2.0, memory_mb=256, max_output_chars=400)
    out: dict = {"uid": os.getuid(), "results": {}, "violations": []}
    with Sandbox(limits, audit_hook=config["audit_hook"], allow_weak=config["allow_weak"]) as box:
        out["isolation"] = box.isolation
        if config.get("probe_only"):
            result = box.run("print(6 * 7)")
            out["probe"] = {"output": result.output, "error": result.error, "message": result.error_message}
            print(json.dumps(out))
            return 0
        watched = [dirs["sentinel"], dirs["home"], dirs["site"]]
        names = config.get("cases") or list(CASES)
        for name in names:
            code, hooked, kernel = CASES[name]
            before = snapshot(watched)
            result = box.run(substitute(code, values))
            expected = hooked if config["audit_hook"] else kernel
            problems = []
            if result.error not in expected:
                problems.append(f"error {result.error!r} not in {sorted(map(str, expected))}: {result.error_message}"
                                f" / {result.output[:200]!r}")
            if snapshot(watched) != before:
                problems.append("a watched folder changed")
            for key in ("TMPFILE", "SHMFILE"):
                if os.path.lexists(values[key]):
                    problems.append(f"{values[key]} was written")
                    os.remove(values[key])
            try:
                tcp.accept()[0].close()
                problems.append("a TCP connection arrived")
            except BlockingIOError:
                pass
            try:
                udp.recv(64)
                problems.append("a UDP datagram arrived")
            except BlockingIOError:
                pass
            for pid, who in [(w.proc.pid, "worker") for w in box._workers] + [(config["victim"], "victim")]:
                if state_of(pid) in ("T", "t", "gone", "Z"):
                    problems.append(f"the {who} {pid} is {state_of(pid)}")
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        pass
            if secret in result.output + result.error_message:
                problems.append("the secret leaked")
            if result.seconds > limits.wall_s + 1.0:
                problems.append(f"took {result.seconds:.1f} s")
            if box.run("print('still fine')").output != "still fine\n":
                problems.append("the sandbox stopped working")
            out["results"][name] = {"error": result.error, "message": result.error_message[:300]}
            out["violations"] += [f"{name}: {p}" for p in problems]
    time.sleep(0.05)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
