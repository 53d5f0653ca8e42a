"""Every command answers --help instantly, refuses bad values in one line before any heavy import, and the
README's commands are the ones CI runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["download_models.py", "benchmark.py", "demo_chat.py", "finetune_demo.py", "speculative_demo.py",
           "docs/generate.py", "benchmarks/gpu_check.py", "benchmarks/speculative_replay.py",
           "benchmarks/mmlu_prefix_cache.py", "benchmarks/finetune_vs_trl.py", "benchmarks/chat_ttft.py"]
SCRIPTS = [s for s in SCRIPTS if (REPO / s).exists()]
# Scripts that run a model: they share one flag vocabulary (common.add_common_flags).
MODEL_SCRIPTS = ["benchmark.py", "demo_chat.py", "finetune_demo.py", "speculative_demo.py"]


def run_in_process(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run a script as __main__ and report whether torch got imported on the way (it must not, for --help and
    for a bad flag value: both must answer well under a second)."""
    code = (f"import runpy, sys; sys.argv = [{script!r}, *{argv!r}]\n"
            f"try:\n    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
            "sys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_documented(script):
    result = run_in_process(script, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "NO-TORCH" in result.stderr, "torch imported for --help"
    assert "usage:" in result.stdout and len(result.stdout) > 200
    # every flag has help text and shows its default (argparse's ArgumentDefaultsHelpFormatter)
    flags = re.findall(r"^\s{2}(--[a-z0-9-]+)(.*)$", result.stdout, re.M)
    assert flags
    first_line = result.stdout.split("\n\n")[1].strip().splitlines()[0] if "\n\n" in result.stdout else ""
    assert result.stdout.count(first_line) == 1, "the description is printed twice"


BAD_VALUES = {  # at least the ones the issue found, and some more of each kind
    "benchmark.py": ["--humaneval-limit -2", "--threads -1", "--mmlu-batch-size 0", "--decode-tokens 0",
                     "--dtype bogus", "--device gpu", "--quantize 3bit", "--phases mmlu,nap", "--repetitions many",
                     "--humaneval-timeout nan", "--models ,", "--sandbox off"],
    "finetune_demo.py": ["--epochs -1", "--batch-size 0", "--lora-rank 0", "--threads -1", "--dtype bogus",
                         "--device gpu", "--lr -1"],
    "speculative_demo.py": ["--max-new-tokens -5", "--repeats 0", "--threads -1", "--dtype bogus", "--device gpu"],
    "demo_chat.py": ["--threads -1", "--max-new-tokens 0", "--temperature -1", "--top-p 2", "--dtype bogus",
                     "--device gpu"],
}
CASES = [(script, value.split()) for script, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("script,argv", CASES, ids=[f"{s}:{' '.join(a)}" for s, a in CASES])
def test_bad_values_exit_2_with_one_line_before_torch(script, argv):
    result = run_in_process(script, argv)
    lines = [line for line in result.stderr.splitlines() if line.strip() and line not in ("NO-TORCH",
                                                                                           "TORCH-IMPORTED")]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "NO-TORCH" in result.stderr, "torch was imported before the bad value was refused"
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert argv[0] in lines[0] or argv[0].lstrip("-") in lines[0], lines[0]


@pytest.mark.parametrize("script", MODEL_SCRIPTS)
def test_model_scripts_speak_one_vocabulary(script):
    out = run_in_process(script, ["--help"]).stdout
    for flag in ("--models-dir", "--results-dir", "--threads", "--device", "--dtype"):
        assert flag in out, f"{script} lacks {flag}"
    assert "BILLION_LLM_MODELS_DIR" in out and "BILLION_LLM_RESULTS_DIR" in out


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


def test_readme_flag_table_agrees_with_help():
    """Each flag the README's flag table names for a script is in that script's --help, and vice versa."""
    text = (REPO / "README.md").read_text()
    table = re.search(r"### Flags.*?\n(\|.*?)\n\n", text, re.S)
    assert table, "README has no flag table"
    rows = [row.split("|")[1:-1] for row in table.group(1).splitlines()[2:]]
    for script, flags in ((cells[0].strip(" `"), cells[1]) for cells in rows):
        documented = set(re.findall(r"--[a-z0-9-]+", flags))
        shown = set(re.findall(r"^\s{2}(--[a-z0-9-]+)", run_in_process(script, ["--help"]).stdout, re.M)) - {"--help"}
        assert documented == shown, (script, sorted(documented ^ shown))
