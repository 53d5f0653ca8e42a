"""Every command answers --help instantly, and the README's commands are the ones CI runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["download_models.py", "benchmark.py", "demo_chat.py", "finetune_demo.py", "speculative_demo.py",
           "docs/generate.py", "benchmarks/gpu_check.py", "benchmarks/speculative_vs_assisted.py",
           "benchmarks/speculative_replay.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_documented(script):
    # --help must not import torch/transformers: heavy imports live inside main().
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and len(result.stdout) > 200


def readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```(?:bash)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    ci_lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", " "))]
    assert commands[1] in ci_lines, "CI must run the README's test command verbatim"
    assert "benchmark.py" in commands[0] and "pytest" in commands[1]
