"""The sandbox's kernel walls (mathctl/confine.py): every attack in tests/unit/sandbox_attacks.py, run from a
process of its own as root and as an unprivileged uid (CI runs as root: the tests make the unprivileged case
themselves), with the audit hook and without it (the kernel alone), with network namespaces and where the
kernel refuses them (as Docker's default seccomp profile does); and what happens where Landlock is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from mathctl import confine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

REPO = Path(__file__).resolve().parents[2]
ATTACKS = Path(__file__).with_name("sandbox_attacks.py")
NOBODY = 65534
ROOT = os.geteuid() == 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _runs_as(python: str, uid: int | None) -> bool:
    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        return subprocess.run([python, "-c", "import ctypes, json, sysconfig"], capture_output=True, timeout=60,
                              cwd="/", **ids).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def stage():
    """A folder every uid can read: a copy of the modules under test and the attack script; the Python each
    uid runs them with."""
    base = Path(tempfile.mkdtemp(prefix="mathctl-sandbox-test-", dir="/tmp"))
    package = base / "pkg" / "mathctl"
    package.mkdir(parents=True)
    for name in ("__init__.py", "sandbox.py", "confine.py"):
        shutil.copy(REPO / "mathctl" / name, package / name)
    shutil.copy(ATTACKS, base / "pkg" / ATTACKS.name)
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    pythons = {"root": sys.executable}
    if ROOT:  # an unprivileged uid needs a Python it can read (a pyenv under /root is not one)
        candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
        usable = [p for p in dict.fromkeys(candidates) if os.path.exists(p) and _runs_as(p, NOBODY)]
        if not usable:
            pytest.fail(f"no Python that uid {NOBODY} can run (tried {', '.join(candidates)}): install python3")
        pythons["unprivileged"] = usable[0]
    else:
        pythons["unprivileged"] = sys.executable
    yield base, pythons
    shutil.rmtree(base, ignore_errors=True)


def run_attacks(stage, who: str, *, audit_hook: bool = True, hide: tuple[str, ...] = (), allow_weak: bool = False,
                probe_only: bool = False, drop_dac_read_search: bool = False) -> dict:
    """Run sandbox_attacks.py as `who` (root | unprivileged); returns its report, after checking that it
    finished (a stopped driver would hang) and that the victim process was left alone."""
    base, pythons = stage
    if who == "root" and not ROOT:
        pytest.skip("the root case needs root (CI runs as root)")
    uid = NOBODY if ROOT else os.getuid()  # the children's uid: nobody as root (dropped), ours otherwise
    ids = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if who == "unprivileged" and ROOT else {}
    run = base / uuid.uuid4().hex[:8]
    dirs = {"sentinel": run / "sentinel", "home": run / "home", "site": run / "lib" / "site-packages"}
    for path in dirs.values():
        path.mkdir(parents=True)
    (dirs["sentinel"] / "keep.txt").write_text("keep")
    (dirs["home"] / ".profile").write_text("# keep")
    for path in [run, *run.rglob("*")]:
        if ROOT:
            os.chown(path, uid, uid)
        path.chmod(0o777 if path.is_dir() else 0o666)  # writable by the children's uid: only the kernel stops them
    victim_ids = {"user": uid, "group": uid, "extra_groups": []} if ROOT else {}
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True, **victim_ids)
    secret = f"s3cret-{uuid.uuid4().hex}"
    config = {"audit_hook": audit_hook, "allow_weak": allow_weak, "hide": list(hide), "victim": victim.pid,
              "drop_dac_read_search": drop_dac_read_search,
              "dirs": {key: str(value) for key, value in dirs.items()}, "probe_only": probe_only}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(dirs["home"]), "MATHCTL_TEST_SECRET": secret, "HF_TOKEN": secret,
           "PYTHONPATH": f"{base / 'pkg'}:{dirs['site']}"}
    driver = subprocess.Popen([pythons[who], "-B", str(base / "pkg" / ATTACKS.name), json.dumps(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(run),
                              start_new_session=True, **ids)
    try:
        stdout, stderr = driver.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        state = _state(driver.pid)
        driver.kill()
        driver.communicate()
        pytest.fail(f"the attack driver did not finish (process state {state}: stopped by an attack?)")
    finally:
        victim_state = _state(victim.pid)
        victim.kill()
        victim.wait()
    assert driver.returncode == 0, stderr[-3000:]
    assert victim_state in ("S", "R"), f"the victim process is {victim_state}"
    report = json.loads(stdout.strip().splitlines()[-1])
    assert secret not in stdout
    return report


MODES = {  # name -> (who, audit hook, refused to the process first, CAP_DAC_READ_SEARCH dropped first)
    "root": ("root", True, (), False),
    "root-kernel-only": ("root", False, (), False),
    "root-kernel-only-no-namespaces": ("root", False, ("unshare",), False),
    "root-without-dac-read-search-kernel-only": ("root", False, (), True),
    "unprivileged": ("unprivileged", True, (), False),
    "unprivileged-kernel-only": ("unprivileged", False, (), False),
    "unprivileged-kernel-only-no-namespaces": ("unprivileged", False, ("unshare",), False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_attack_is_stopped(stage, mode):
    from mathctl.sandbox import _python_dirs, _world_readable

    who, audit_hook, hide, drop = MODES[mode]
    if confine.landlock_abi() < 6 or not confine.seccomp_supported():
        pytest.fail("this test machine lacks Landlock ABI >= 6 or seccomp (CI has ABI 7 on x86_64)")
    report = run_attacks(stage, who, audit_hook=audit_hook, hide=hide, drop_dac_read_search=drop)
    isolation = report["isolation"]
    assert isolation["level"] == "landlock" and isolation["seccomp"] and isolation["landlock"] >= 6, isolation
    assert isolation["netns"] == ("unshare" not in hide), isolation
    if who == "unprivileged" or not ROOT:
        assert isolation["uid"] == "unchanged", isolation
    elif drop:  # nobody only where nobody can read this Python (a pyenv under /root cannot be): else uid 0
        assert isolation["uid"] == ("nobody" if _world_readable(_python_dirs()) else "root"), isolation
    else:
        assert isolation["uid"] == "nobody", isolation
    assert isolation["audit_hook"] == audit_hook
    assert report["uid"] == (0 if who == "root" else NOBODY if ROOT else os.getuid())
    assert len(report["results"]) >= 55
    print(json.dumps(report["results"], indent=1))
    assert report["violations"] == [], "\n".join(report["violations"])


def test_unprivileged_without_landlock_or_namespaces_is_weak_and_refused(stage):
    report = run_attacks(stage, "unprivileged", hide=("landlock_create_ruleset", "unshare"), probe_only=True)
    isolation = report["isolation"]
    assert isolation["level"] == "weak" and isolation["landlock"] == 0 and not isolation["netns"], isolation
    assert isolation["seccomp"]  # still applied: it does not depend on Landlock
    assert report["probe"]["error"] == "SandboxError" and "weak isolation" in report["probe"]["message"]
    assert "no Landlock" in report["probe"]["message"]
    allowed = run_attacks(stage, "unprivileged", hide=("landlock_create_ruleset", "unshare"), probe_only=True,
                          allow_weak=True)
    assert allowed["isolation"]["level"] == "weak" and allowed["probe"]["output"] == "42\n"


def test_root_without_landlock(stage):
    """A separate uid in a network namespace is the 'uid' level; without the namespace it is weak."""
    report = run_attacks(stage, "root", hide=("landlock_create_ruleset",), probe_only=True)
    assert report["isolation"]["level"] == "uid" and report["isolation"]["uid"] == "nobody", report["isolation"]
    assert report["probe"]["output"] == "42\n"
    weak = run_attacks(stage, "root", hide=("landlock_create_ruleset", "unshare"), probe_only=True)
    assert weak["isolation"]["level"] == "weak" and weak["probe"]["error"] == "SandboxError"


# --- the pieces ----------------------------------------------------------------------------------------------
def test_landlock_rights_follow_the_abi():
    fs1, net1, scopes1 = confine.landlock_rights(1, network=False)
    fs7, net7, scopes7 = confine.landlock_rights(7, network=False)
    assert not fs1 & (confine.FS_READ_FILE | confine.FS_READ_DIR) and fs1 & confine.FS_EXECUTE
    assert not fs1 & confine.FS_TRUNCATE and fs7 & confine.FS_TRUNCATE and fs7 & confine.FS_IOCTL_DEV
    assert (net1, scopes1) == (0, 0)
    assert net7 == confine.NET_BIND_TCP | confine.NET_CONNECT_TCP
    assert scopes7 == confine.SCOPE_SIGNAL | confine.SCOPE_ABSTRACT_UNIX_SOCKET
    assert confine.landlock_rights(7, network=True)[1] == 0


def _run_bpf(program: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """A classic-BPF interpreter over struct seccomp_data (the instructions filter_program emits)."""
    import struct

    ops = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0 & 0xFFFFFFFFFFFFFFFF, 0, 0, 0, 0, 0)
    acc, pc = 0, 0
    for _ in range(len(ops)):
        code, jt, jf, k = ops[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x06:
            return k
        elif code == 0x05:
            pc += k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1
    raise AssertionError("the program ran off its end")


@pytest.mark.parametrize("arch", list(confine.SYSCALLS))
def test_filter_program_decides_every_syscall(arch):
    """Every syscall number of the architecture through the program: the named ones refused, clone only for
    threads, signals and scheduling only towards our own pid, socket() only with the network on."""
    import errno

    table, audit = confine.SYSCALLS[arch], confine.AUDIT_ARCH[arch]
    eperm, allow = 0x00050000 | errno.EPERM, 0x7FFF0000
    for network in (False, True):
        program = confine.filter_program(4242, network=network, arch=arch)
        assert len(program) % 8 == 0 and len(program) // 8 < 4096
        denied = {table[n] for n in confine.DENIED if n in table} | (set() if network else {table["socket"]})
        special = {table[n] for n in ("clone", "clone3", *confine.OWN_PROCESS, *confine.OWN_PROCESS_OR_ZERO)}
        for nr in range(0, 520):
            want = eperm if nr in denied else None if nr in special else allow
            if want is not None:
                assert _run_bpf(program, nr, audit) == want, (arch, network, nr)
        assert _run_bpf(program, table["clone3"], audit) == 0x00050000 | errno.ENOSYS
        thread = 0x00010000 | 0x800 | 0x100
        assert _run_bpf(program, table["clone"], audit, thread) == allow
        assert _run_bpf(program, table["clone"], audit, 17) == eperm                    # fork-like
        assert _run_bpf(program, table["clone"], audit, thread | 0x40000000) == eperm   # thread in a new netns
        for name in confine.OWN_PROCESS + confine.OWN_PROCESS_OR_ZERO:
            assert _run_bpf(program, table[name], audit, 4242) == allow
            assert _run_bpf(program, table[name], audit, 4243) == eperm
            assert _run_bpf(program, table[name], audit, -1) == eperm
            assert _run_bpf(program, table[name], audit, 0) == (allow if name in confine.OWN_PROCESS_OR_ZERO else eperm)
        other = next(a for a in confine.AUDIT_ARCH.values() if a != audit)
        assert _run_bpf(program, 0, other) == 0x80000000  # another syscall ABI: killed
        assert _run_bpf(program, 0x40000000 | 1, audit) == (eperm if arch == "x86_64" else allow)
    only = confine.filter_program(0, network=True, arch=arch, only={"unshare": errno.EPERM,
                                                                      "landlock_create_ruleset": errno.ENOSYS})
    assert _run_bpf(only, table["unshare"], audit) == eperm
    assert _run_bpf(only, table["landlock_create_ruleset"], audit) == 0x00050000 | errno.ENOSYS
    assert _run_bpf(only, table["execve"], audit) == allow


def test_prepared_confinement_patches_only_the_pid():
    prepared = confine.Confinement(network=False, landlock=7, seccomp=confine.seccomp_supported())
    if not prepared.seccomp:
        pytest.skip("no seccomp filter on this architecture")
    patched = prepared._template.replace(prepared._placeholder, (4242).to_bytes(4, "little"))
    assert patched == confine.filter_program(4242, network=False)


def test_weak_reason_names_what_is_missing():
    missing, fix = confine.weak_reason({"level": "weak", "landlock": 0, "uid": "unchanged", "netns": True})
    assert "no Landlock" in missing and "separate uid" in missing
    assert "sandbox.allow_weak" in fix
