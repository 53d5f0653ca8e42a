"""Every command's command line: --help is instant and honest, bad values are refused in one line before torch is
imported, the shared flags accept exactly the same values everywhere, docs/FLAGS.md is what the parsers say, and
the README's test command is the one CI runs. The one place these are tested; other test files test behaviour."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))

import common  # noqa: E402
import flags  # noqa: E402  (docs/flags.py: reads each script's parser)

SCRIPTS = flags.SCRIPTS
# Scripts that load a model: --device (cuda:N included), --dtype and --models-dir, all from common.COMMON_FLAGS.
MODEL_SCRIPTS = ["benchmark.py", "demo_chat.py", "finetune_demo.py", "speculative_demo.py", "benchmarks/chat_ttft.py",
                 "benchmarks/mmlu_prefix_cache.py"]


def run_in_process(script: str, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script as __main__ and report whether torch (or transformers, matplotlib) got imported on the way: it
    must not be, for --help and for a bad flag value, which both must answer well under a second."""
    code = (f"import runpy, sys; sys.argv = [{script!r}, *{argv!r}]\n"
            f"try:\n    runpy.run_path({str(REPO / script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
            "print(f'TORCH-IMPORTED {heavy}' if heavy else 'NO-TORCH', file=sys.stderr)\n"
            "sys.exit(code)\n")
    env = {**os.environ, "COLUMNS": "100", **(env or {})}
    env.pop("BILLION_LLM_THREADS_WARNED", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


def test_every_script_with_a_command_line_is_listed():
    """A new script cannot miss the --help and bad-value tests below: each file with a main guard is listed."""
    found = {str(p.relative_to(REPO)) for pattern in ("*.py", "docs/*.py", "benchmarks/*.py", "data/*.py")
             for p in REPO.glob(pattern) if 'if __name__ == "__main__"' in p.read_text()}
    assert found - {"sandbox_launcher.py"} == set(SCRIPTS)  # the launcher takes no flags: benchmark.py starts it


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_instant_and_shows_each_default_once(script):
    result = run_in_process(script, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "NO-TORCH" in result.stderr, "torch imported for --help"
    text = result.stdout
    description = flags.script_parser(script).description
    assert text.startswith("usage:") and text.count(description.splitlines()[0]) == 1
    # each option's block of help: its first line starts with "  -", its help continues indented deeper
    blocks = re.split(r"\n(?=  -)", text.split("options:\n", 1)[1].split("\n\n")[0])
    by_flag = {re.match(r"\s*(-[-\w]+)", b).group(1): " ".join(b.split()) for b in blocks}
    for action in flags.options(flags.script_parser(script)):
        block = by_flag[action.option_strings[0]]
        assert action.help and len(block) > len(action.option_strings[0]) + 8, f"{action.option_strings} has no help"
        assert block.count("(default:") <= 1, f"{script} {action.option_strings[0]} shows its default twice: {block}"
        # a value flag says what it falls back to
        if action.default is not None and action.default is not False and action.nargs != 0:
            assert "(default:" in block, f"{script} {action.option_strings[0]} hides its default: {block}"
        else:
            assert "(default: None)" not in block and "(default: False)" not in block


# Bad values for every script: each must end in exit 2 and one line naming the flag, before torch is imported.
BAD_VALUES = {
    "benchmark.py": ["--humaneval-limit -2", "--threads -1", "--mmlu-batch-size 0", "--decode-tokens 0",
                     "--dtype bogus", "--device gpu", "--device cuda:x", "--quantize 3bit", "--quantize none,3bit",
                     "--phases mmlu,nap", "--repetitions many", "--humaneval-timeout nan", "--models ,",
                     "--humaneval-batch-size -1", "--sandbox off", "--seed -1", "--mmlu-subjects philosophy,astrology",
                     "--mmlu-subjects ,"],
    "demo_chat.py": ["--threads -1", "--max-new-tokens 0", "--max-tokens -5", "--temperature -1", "--temperature 9",
                     "--temperature nan", "--top-p 2", "--top-p 0", "--dtype bogus", "--device gpu",
                     "--quantize 2bit", "--context-tokens 8", "--seed x", "--prompt=", "--prompt=   "],
    "download_models.py": ["--revision=", "--bogus-flag"],
    "finetune_demo.py": ["--epochs -1", "--epochs nan", "--batch-size 0", "--lora-rank 0", "--threads -1",
                         "--dtype bogus", "--device gpu", "--max-new-tokens 0", "--eval-batch-size 0", "--lr 0",
                         "--lora-dropout 1.5", "--warmup-steps -1", "--grad-accum 0", "--max-length 0",
                         "--quantize 2bit", "--seed -3"],
    "speculative_demo.py": ["--max-new-tokens -5", "--repeats 0", "--threads -1", "--dtype bogus", "--device gpu",
                            "--k 0", "--k-max -1", "--k-sweep 2,0", "--n-prompts 9", "--methods ours",
                            "--methods target_only,bogus", "--temperature -1", "--target-quantize 2bit",
                            "--seed x"],
    "docs/generate.py": ["--bogus-flag", "--docs-dir"],
    "docs/flags.py": ["--bogus-flag"],
    "benchmarks/chat_ttft.py": ["--long-tokens 0", "--rounds -1", "--device gpu", "--attention flash"],
    "benchmarks/finetune_vs_trl.py": ["--repeats 0", "--epochs -1"],
    "benchmarks/gpu_check.py": ["--bogus-flag"],
    "benchmarks/humaneval_batching.py": ["--limit 0", "--batch-size -1", "--max-new-tokens 0", "--dtype fp8"],
    "benchmarks/mmlu_prefix_cache.py": ["--limit 0", "--subjects astrology", "--device gpu", "--seed -1"],
    "benchmarks/sandbox_canonical.py": ["--limit 0", "--timeout -1"],
    "benchmarks/speculative_replay.py": ["--n-prompts 5", "--k-max 0", "--threads -1"],
    "data/make_finetune_data.py": ["--n-train 0", "--seed x"],
}
CASES = [(script, value.split()) for script, values in BAD_VALUES.items() for value in values]


def test_every_script_has_bad_values():
    assert set(BAD_VALUES) == set(SCRIPTS)


@pytest.mark.parametrize("script,argv", CASES, ids=[f"{s}:{' '.join(a)}" for s, a in CASES])
def test_bad_values_exit_2_with_one_line_before_torch(script, argv):
    result = run_in_process(script, argv)
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and line != "NO-TORCH" and not line.startswith("TORCH-IMPORTED")]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "NO-TORCH" in result.stderr, "torch was imported before the bad value was refused"
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    flag = argv[0].split("=")[0]
    assert flag in lines[0] or flag.lstrip("-") in lines[0], lines[0]


# The shared flags, with values each must accept (True) or refuse (False) in every script that has it.
SHARED_VALUES = {
    "--device": {"auto": True, "cpu": True, "cuda": True, "cuda:0": True, "cuda:1": True, "mps": True,
                 "gpu": False, "cuda:": False, "cuda:x": False, "CPU": False, "": False},
    "--dtype": {"auto": True, "float32": True, "bfloat16": True, "float16": True, "fp16": False, "int8": False},
    "--quantize": {"auto": True, "none": True, "8bit": True, "4bit": True, "2bit": False, "": False},
    "--seed": {"0": True, "1234": True, "4294967295": True, "4294967296": False, "-1": False, "x": False,
               "1.5": False},
    "--threads": {"0": True, "1": True, "-1": False, "two": False},
    "--models-dir": {"/tmp/models": True},
    "--results-dir": {"/tmp/results": True},
    "--docs-dir": {"/tmp/docs": True},
}


def accepts(parser, flag: str, value: str):
    """(accepted, parsed value): the parser's own verdict on `flag value`, in this process (no subprocess)."""
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            parsed = vars(parser.parse_args([f"{flag}={value}"]))
        except SystemExit:
            return False, None
    return True, parsed[flag.lstrip("-").replace("-", "_")]


@pytest.mark.parametrize("flag", list(SHARED_VALUES))
def test_shared_flags_accept_the_same_values_everywhere(flag):
    """Not only the same names: the same type, the same accepted values and the same help text in every script."""
    having = {script: parser for script in SCRIPTS if flag in (parser := flags.script_parser(script))
              ._option_string_actions}
    assert len(having) >= 2
    for script, parser in having.items():
        action = parser._option_string_actions[flag]
        assert action.help == common.COMMON_FLAGS[flag]["help"] or \
            action.help.endswith(common.COMMON_FLAGS[flag]["help"]), (script, action.help)
        for value, good in SHARED_VALUES[flag].items():
            ok, parsed = accepts(parser, flag, value)
            assert ok == good, f"{script} {flag} {value!r}: {'accepted' if ok else 'refused'}"
            if ok and flag == "--seed":
                assert parsed == int(value)
            if ok and flag == "--quantize":  # benchmark's list form parses to the same text for one value
                assert parsed == value


def test_model_scripts_share_the_model_flags():
    for script in MODEL_SCRIPTS:
        parser = flags.script_parser(script)
        for flag in ("--device", "--dtype", "--models-dir", "--threads"):
            assert parser._option_string_actions[flag].type is common.COMMON_FLAGS[flag]["type"] or flag == "--threads"
        assert parser._option_string_actions["--threads"].type is common.thread_count, script


def test_threads_above_the_cores_warn_once_and_still_run():
    cores = common.usable_cores()
    result = run_in_process("demo_chat.py", ["--threads", str(cores + 7), "--temperature", "-1"])
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"--threads {cores + 7} is more than the {cores} CPU core" in warnings[0]
    assert result.returncode == 2  # the warning is no refusal: the bad --temperature after it is what stops it
    quiet = run_in_process("demo_chat.py", ["--threads", str(cores), "--temperature", "-1"])
    assert "warning:" not in quiet.stderr


DEVICE_RUNS = {  # each script's shortest way to the point where a model would go onto the device
    "benchmark.py": ["--models", "{model}", "--phases", "speed", "--results-dir", "{tmp}/results"],
    "demo_chat.py": ["--model", "{model}", "--prompt", "hi", "--results-dir", "{tmp}/results"],
    "speculative_demo.py": ["--draft", "{model}", "--target", "{model}", "--no-save"],
    "finetune_demo.py": ["--model", "{model}", "--results-dir", "{tmp}/results", "--output-dir", "{tmp}/out"],
}


@pytest.mark.parametrize("script", list(DEVICE_RUNS))
def test_device_cuda_1_is_accepted_and_named_in_the_no_gpu_sentence(script, tiny_models, tmp_path):
    """On a machine without CUDA every script that runs a model ends in the one sentence that names cuda:1."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the sentence is for machines without one")
    argv = [a.format(model=tiny_models["llama"], tmp=tmp_path) for a in DEVICE_RUNS[script]]
    result = subprocess.run([sys.executable, script, *argv, "--device", "cuda:1", "--threads", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --device cuda:1 was asked for, but torch sees no CUDA GPU; use --device cpu." in result.stderr
    assert "Traceback" not in result.stderr


def test_flags_page_is_what_the_parsers_say():
    assert flags.render() == (REPO / "docs" / "FLAGS.md").read_text(encoding="utf-8"), \
        "docs/FLAGS.md is out of date: run python docs/flags.py"


def readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```(?:bash)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", " "))]
    assert commands[1] in ci_lines, "CI must run the README's test command verbatim"
    assert "benchmark.py" in commands[0] and "pytest" in commands[1]
    assert "tests/test_cli.py" in (REPO / ".ci" / "run").read_text()  # its comment names this test


def test_bare_benchmark_without_models_fails_fast_and_says_so_once(tmp_path):
    """No seed model on disk, no hub: one sentence in seconds, naming the command to run next."""
    import time
    start = time.monotonic()
    result = subprocess.run([sys.executable, "benchmark.py", "--models-dir", str(tmp_path / "no-models"),
                             "--results-dir", str(tmp_path / "results")], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: tinyllama-1.1b, llama-3.2-1b, stablelm-2-1.6b, pythia-1b "
                                                   "are not downloaded"), lines
    assert "python download_models.py --models tinyllama-1.1b," in lines[0] and "benchmark.py --quick" in lines[0]
    assert elapsed < 20, f"took {elapsed:.0f} s"  # was 28 s of loading attempts on the 2-core machine


def test_quick_checks_the_docs_folder_it_will_write(tmp_path):
    """--quick refuses a --docs-dir it cannot write, before any model loads: the folder checked is --docs-dir."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_in_process("benchmark.py", ["--quick", "--results-dir", str(tmp_path / "results"),
                                             "--docs-dir", str(blocker / "docs"), "--phases", "speed"])
    assert result.returncode == 2 and "NO-TORCH" in result.stderr, result.stderr
    assert f"error: The docs folder (--docs-dir) {blocker / 'docs'} cannot be written" in result.stderr


def test_quick_writes_the_page_into_the_docs_folder_asked_for(tmp_path, monkeypatch):
    """With writable --results-dir and --docs-dir, --quick runs and the page lands in --docs-dir, not in the
    repository's docs/ (the measuring itself is replaced: the benchmark tests cover it)."""
    import benchmark
    monkeypatch.setattr(benchmark, "benchmark_one", lambda *a, **k: "complete")
    monkeypatch.setattr(benchmark.hub, "hub_reachable", lambda: False)
    page = REPO / "docs" / "COMPARISON.md"
    before = page.stat().st_mtime_ns
    docs = tmp_path / "my-page"
    assert benchmark.main(["--quick", "--phases", "speed", "--results-dir", str(tmp_path / "results"),
                           "--docs-dir", str(docs)]) == 0
    assert (docs / "COMPARISON.md").is_file() and page.stat().st_mtime_ns == before


def test_download_list_never_cuts_a_model_name_at_40_columns():
    result = subprocess.run([sys.executable, "download_models.py", "--list"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "40", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    import models
    rows = result.stdout.splitlines()
    assert all(len(row) <= 40 for row in rows), rows
    for name in models.REGISTRY:
        assert any(re.match(rf"\| {re.escape(name)} +\|", row) for row in rows), name
