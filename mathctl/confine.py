"""Kernel-enforced confinement for the sandbox's children (mathctl/sandbox.py): Landlock and seccomp-bpf.

Both are applied by a forked child to itself, after its uid drop and rlimits and before it runs model-written
code; neither can be undone by that code, and neither depends on anything inside the Python process:
  * Landlock (Linux >= 5.13; ABI read from the kernel): writes, removals, links, renames, new files and devices
    only beneath the scratch folder (and writes to /dev/null); no execve anywhere; ioctls on devices opened
    later refused (ABI >= 5); TCP bind/connect refused unless the network is allowed (ABI >= 4); signals and
    abstract UNIX sockets scoped to the child (ABI >= 6). Landlock also stops ptrace-style access to processes
    outside the child's domain: /proc/<pid>/environ, /proc/<pid>/mem, process_vm_readv of the parent.
    Reading is not confined (the code imports the Python it runs under).
  * seccomp-bpf (x86_64 and aarch64): a deny list answering EPERM: process creation (fork, vfork, clone
    without CLONE_THREAD or with namespace flags, execve, execveat; clone3 answers ENOSYS so that glibc falls
    back to clone, whose flags a filter can read), ptrace and process_vm_*, signals and pidfds to any process
    but the child itself, scheduling and rlimits of other processes, socket() unless the network is allowed,
    mount and namespace calls, bpf, perf_event_open, keyrings, modules, io_uring, SysV IPC and POSIX message
    queues, open_by_handle_at, and file metadata changes (chmod, chown, utime, xattrs), which Landlock does
    not cover. Another syscall ABI on the same machine (i386 on x86_64) kills the process; x32 numbers are
    refused.

Why raw syscalls through ctypes instead of a library: the two kernel interfaces are three Landlock syscalls
and one prctl with a BPF program of a few hundred instructions; pyseccomp needs libseccomp.so.2 on the host
(absent from slim container images), the Landlock bindings on the package index lag the kernel's ABI
(scopes arrived in ABI 6), and the worker runs as `python -I -S`, where this file is loaded by path and may
use the standard library only.

Not covered: reading files; the amount of CPU, memory and disk (rlimits in sandbox.py do that); kernels
without Landlock (the sandbox records what it got and refuses weak isolation unless allowed); architectures
other than x86_64 and aarch64 (no seccomp filter: Landlock, uid and namespaces still apply).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# --- Landlock ---------------------------------------------------------------------------------------------
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # the same on every arch
_CREATE_RULESET_VERSION, _RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_ABI1 = (1 << 13) - 1  # EXECUTE ... MAKE_SYM
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi(libc: ctypes.CDLL | None = None) -> int:
    """The Landlock ABI version this kernel offers; 0 without Landlock (older kernel, not in `lsm=`, or a
    seccomp profile hiding it)."""
    libc = libc or _libc()
    version = libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_long(0),
                           ctypes.c_long(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def landlock_rights(abi: int, network: bool) -> tuple[int, int, int]:
    """(handled filesystem rights, handled network rights, scopes) for this ABI: everything but reading."""
    fs = _FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    fs &= ~(FS_READ_FILE | FS_READ_DIR)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 and not network else 0
    scopes = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    return fs, net, scopes


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


# --- seccomp-bpf ------------------------------------------------------------------------------------------
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/unistd.h for aarch64),
# from 424 on they are shared by every architecture
_COMMON = {"pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
           "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
           "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
           "quotactl_fd": 443, "landlock_create_ruleset": 444, "process_mrelease": 448, "fchmodat2": 452,
           "setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467, "file_setattr": 469}
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {**_COMMON,
               "fork": 57, "vfork": 58, "clone": 56, "execve": 59, "execveat": 322, "ptrace": 101,
               "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "kill": 62, "tkill": 200,
               "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "socket": 41, "mount": 165,
               "umount2": 166, "unshare": 272, "setns": 308, "pivot_root": 155, "chroot": 161, "bpf": 321,
               "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175,
               "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
               "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "syslog": 103, "quotactl": 179,
               "nfsservctl": 180, "ioperm": 173, "iopl": 172, "uselib": 134, "userfaultfd": 323,
               "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304, "personality": 135,
               "vhangup": 153, "migrate_pages": 256, "move_pages": 279, "lookup_dcookie": 212,
               "setpriority": 141, "ioprio_set": 251, "prlimit64": 302, "sched_setaffinity": 203,
               "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314,
               "chmod": 90, "fchmod": 91, "fchmodat": 268, "chown": 92, "fchown": 93, "lchown": 94,
               "fchownat": 260, "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280,
               "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198,
               "fremovexattr": 199, "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64,
               "semop": 65, "semctl": 66, "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
               "msgctl": 71, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243,
               "mq_notify": 244, "mq_getsetattr": 245},
    "aarch64": {**_COMMON,
                "clone": 220, "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "kcmp": 272, "kill": 129, "tkill": 130, "tgkill": 131,
                "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "socket": 198, "mount": 40, "umount2": 39,
                "unshare": 97, "setns": 268, "pivot_root": 41, "chroot": 51, "bpf": 280, "perf_event_open": 241,
                "keyctl": 219, "add_key": 217, "request_key": 218, "init_module": 105, "finit_module": 273,
                "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "reboot": 142, "swapon": 224,
                "swapoff": 225, "acct": 89, "syslog": 116, "quotactl": 60, "nfsservctl": 42, "userfaultfd": 282,
                "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265, "personality": 92,
                "vhangup": 58, "migrate_pages": 238, "move_pages": 239, "lookup_dcookie": 18,
                "setpriority": 140, "ioprio_set": 30, "prlimit64": 261, "sched_setaffinity": 122,
                "sched_setscheduler": 119, "sched_setparam": 118, "sched_setattr": 274,
                "fchmod": 52, "fchmodat": 53, "fchown": 55, "fchownat": 54, "utimensat": 88, "setxattr": 5,
                "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16,
                "shmget": 194, "shmat": 196, "shmctl": 195, "shmdt": 197, "semget": 190, "semop": 193,
                "semctl": 191, "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187,
                "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184,
                "mq_getsetattr": 185},
}

DENIED = (  # EPERM, whatever the arguments
    "fork", "vfork", "execve", "execveat",                                                       # new programs
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",  # other processes
    "process_mrelease", "tkill", "pidfd_send_signal", "setpriority", "ioprio_set", "migrate_pages", "move_pages",
    "mount", "umount2", "unshare", "setns", "pivot_root", "chroot", "move_mount", "open_tree", "open_tree_attr",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",                                  # namespaces, mounts
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "init_module", "finit_module",  # the kernel
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl",
    "quotactl_fd", "nfsservctl", "ioperm", "iopl", "uselib", "userfaultfd", "fanotify_init", "personality",
    "lookup_dcookie", "vhangup", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "name_to_handle_at", "open_by_handle_at",                                                    # handles
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop", "msgget",    # SysV IPC
    "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime",  # metadata
    "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "setxattrat", "removexattrat", "file_setattr",
)
OWN_PROCESS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open")  # first argument: our pid
OWN_PROCESS_OR_ZERO = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")
CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = 0x7E020080  # NEWNS, NEWTIME, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_X32_BIT = 0x40000000

_LD_W_ABS, _JA, _JEQ, _JGE, _JSET, _RET = 0x20, 0x05, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low 32 bits, little-endian)
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def machine() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine, os.uname().machine)


def seccomp_supported() -> bool:
    return machine() in AUDIT_ARCH and struct.pack("=H", 1) == b"\x01\x00"


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def filter_program(pid: int, *, network: bool, arch: str | None = None,
                   only: dict[str, int] | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) for a child whose pid is `pid`: a binary search over the syscall
    numbers the policy names (a few comparisons per syscall, and a short program for the kernel to check),
    allowing every other. `only` replaces the policy by a plain {syscall name: errno} deny list (the tests use
    it to hide namespaces or Landlock from a process, as Docker's default seccomp profile or an old kernel)."""
    arch = arch or machine()
    table = SYSCALLS[arch]
    ret_eperm = _op(_RET, _RET_ERRNO | errno.EPERM)
    allow = _op(_RET, _RET_ALLOW)
    blocks: dict[int, list[bytes]] = {}  # syscall number -> what happens once it matched (ends in a return)
    if only is not None:
        blocks = {table[name]: [_op(_RET, _RET_ERRNO | code)] for name, code in only.items() if name in table}
    else:
        for name in DENIED + (() if network else ("socket",)):
            if name in table:
                blocks[table[name]] = [ret_eperm]
        blocks[table["clone3"]] = [_op(_RET, _RET_ERRNO | errno.ENOSYS)]  # flags in memory; glibc falls back to clone
        # clone: threads only (CLONE_THREAD set, no namespace flag)
        blocks[table["clone"]] = [_op(_LD_W_ABS, _ARG0), _op(_JSET, CLONE_THREAD, 0, 2),
                                  _op(_JSET, CLONE_NAMESPACES, 1, 0), allow, ret_eperm]
        for name in OWN_PROCESS + OWN_PROCESS_OR_ZERO:  # first argument our pid (or 0): allow, else EPERM
            zero = name in OWN_PROCESS_OR_ZERO
            blocks[table[name]] = [_op(_LD_W_ABS, _ARG0), _op(_JEQ, pid, 1 + zero, 0),
                                   *([_op(_JEQ, 0, 1, 0)] if zero else []), ret_eperm, allow]

    def tree(numbers: list[int]) -> list[bytes]:
        if len(numbers) <= 3:  # a few equality tests, then allow
            code: list[bytes] = []
            for number in numbers:
                code += [_op(_JEQ, number, 0, len(blocks[number])), *blocks[number]]
            return code + [allow]
        middle = len(numbers) // 2
        low, high = tree(numbers[:middle]), tree(numbers[middle:])
        # nr >= pivot: take the jump over the low half (JA has a 32-bit offset); else fall into it
        return [_op(_JGE, numbers[middle], 0, 1), _op(_JA, len(low)), *low, *high]

    prog = [_op(_LD_W_ABS, _ARCH), _op(_JEQ, AUDIT_ARCH[arch], 1, 0), _op(_RET, _RET_KILL_PROCESS),
            _op(_LD_W_ABS, _NR)]
    if arch == "x86_64":  # x32 syscall numbers reach the same kernel code: refuse them all
        prog += [_op(_JGE, _X32_BIT, 0, 1), ret_eperm]
    return b"".join(prog + tree(sorted(blocks)))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply_seccomp(program: bytes, libc: ctypes.CDLL | None = None) -> None:
    """Install `program` on this thread (needs no_new_privs or CAP_SYS_ADMIN); raises OSError if refused."""
    libc = libc or _libc()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise _errno_error("seccomp")


# --- prepared once per worker, applied by each child ---------------------------------------------------------
PID_PLACEHOLDER = 0x7FFFFFFF  # above any pid (pid_max <= 2**22): filter_program's own-pid checks, patched per child


class Confinement:
    """What a child applies to itself, prepared in the worker before it forks (buffers, the BPF program with
    a placeholder pid): the child then runs little Python, so it copies few pages and starts fast."""

    def __init__(self, network: bool, *, libc: ctypes.CDLL | None = None, landlock: int | None = None,
                 seccomp: bool | None = None):
        self.libc = libc or _libc()
        self.network = network
        self.landlock = landlock_abi(self.libc) if landlock is None else landlock
        self.seccomp = seccomp_supported() if seccomp is None else seccomp
        fs, net, scopes = landlock_rights(self.landlock, network)
        size = 8 if self.landlock < 4 else 16 if self.landlock < 6 else 24
        self._attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, net, scopes)[:size], size)
        self._size = ctypes.c_long(size)
        self._rights = (fs & ~(FS_EXECUTE | FS_IOCTL_DEV), fs & (FS_WRITE_FILE | FS_TRUNCATE))
        self._rule = ctypes.create_string_buffer(12)
        self._args = [ctypes.c_long(n) for n in (_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE,
                                                 _LANDLOCK_RESTRICT_SELF, _RULE_PATH_BENEATH, 0)]
        self._template = filter_program(PID_PLACEHOLDER, network=network) if self.seccomp else b""
        self._placeholder = struct.pack("=I", PID_PLACEHOLDER)

    def apply(self, writable: str) -> None:
        """Landlock (writes beneath `writable`), then the seccomp filter for this process; OSError if refused."""
        if self.landlock:
            self._apply_landlock(writable)
        if self.seccomp:
            apply_seccomp(self._template.replace(self._placeholder, struct.pack("=I", os.getpid())), self.libc)

    def _apply_landlock(self, writable: str) -> None:
        syscall, (create, add, restrict, beneath, zero) = self.libc.syscall, self._args
        ruleset = syscall(create, self._attr, self._size, zero)
        if ruleset < 0:
            raise _errno_error("landlock_create_ruleset")
        try:
            for path, rights in ((writable, self._rights[0]), (os.devnull, self._rights[1])):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    struct.pack_into("=Qi", self._rule, 0, rights, fd)
                    if syscall(add, ctypes.c_long(ruleset), beneath, self._rule, zero) < 0:
                        raise _errno_error(f"landlock_add_rule({path})")
                finally:
                    os.close(fd)
            if syscall(restrict, ctypes.c_long(ruleset), zero) < 0:
                raise _errno_error("landlock_restrict_self")
        finally:
            os.close(ruleset)


# --- what a child got -------------------------------------------------------------------------------------
def level(landlock: int, seccomp: bool, uid: str, netns: bool) -> str:
    """'landlock': the kernel confines writes (and, with seccomp or ABI >= 6, signals); 'uid': no Landlock,
    but a separate uid in a network namespace; 'weak': neither (only rlimits and the audit hook)."""
    if landlock:
        return "landlock"
    return "uid" if uid == "nobody" and netns else "weak"


def weak_reason(isolation: dict) -> tuple[str, str]:
    """(what is missing, how to fix it) for a 'weak' isolation record."""
    missing = ["no Landlock (the kernel is older than 5.13, boots without `landlock` in lsm=, or a seccomp "
               "profile hides it)"]
    if isolation.get("uid") != "nobody":
        missing.append("no separate uid for the code (mathctl runs as an ordinary user, or as root without "
                       "CAP_SETUID/CAP_SETGID)")
    elif not isolation.get("netns"):
        missing.append("no network namespace (user namespaces are disabled, or a seccomp profile refuses unshare)")
    return ("; ".join(missing),
            "run on Linux >= 5.13 with Landlock enabled (`cat /sys/kernel/security/lsm` lists landlock), or as "
            "root with network namespaces; or set sandbox.allow_weak=true to run model-written code guarded only "
            "by rlimits and an in-process audit hook")
