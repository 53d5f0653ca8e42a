"""benchmark.py: statistics with known values, and real end-to-end runs on a tiny model (record, samples log, resume,
Ctrl-C, failures). HumanEval's own tests are in test_humaneval.py, MMLU's in test_mmlu.py."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark
import common
import models
import mmlu
import records

REPO = Path(__file__).resolve().parents[1]
# A tiny but complete run: two short subjects (the tiny tokenizer's prompts must fit its 1024 positions).
TINY_RUN = ["--mmlu-subjects", "world_religions,management", "--mmlu-limit", "3", "--mmlu-shots", "2",
            "--humaneval-limit", "2", "--humaneval-max-new-tokens", "8", "--humaneval-timeout", "5",
            "--prefill-tokens", "32", "--decode-tokens", "4", "--repetitions", "2", "--dtype", "float32"]


# ------------------------------------------------------------------------------------------ statistics
def test_wilson_and_stderr_known_values():
    low, high = common.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)  # textbook example, z = 1.96
    low, high = common.wilson_interval(0, 20)
    assert low == 0.0 and round(high, 4) == 0.1611
    block = common.accuracy_block(5, 10)
    assert block["accuracy"] == 0.5 and math.isclose(block["stderr"], math.sqrt(0.25 / 9))  # lm-eval: n-1
    assert math.isclose(block["stderr"], common.mean_stderr([1] * 5 + [0] * 5))
    macro = common.macro_block([common.accuracy_block(5, 10), common.accuracy_block(9, 10)])
    assert math.isclose(macro["accuracy"], 0.7)
    assert math.isclose(macro["stderr"], math.sqrt(0.25 / 9 + 0.09 / 9) / 2)
    assert math.isclose(macro["ci95_high"] - macro["accuracy"], common.Z_95 * macro["stderr"])


# ---------------------------------------------------------------------------------------- end to end
def test_rss_before_load_is_read_before_the_load(tiny_models, results_dir, capsys, monkeypatch):
    """A load that briefly holds 256 MiB (as converting weights does) raises the peak above the reading taken
    before it; read after the load, "before load" would equal the load's own peak."""
    import models
    real_load = models.load_model

    def heavy_load(*args, **kwargs):
        scratch = bytearray(256 << 20)
        scratch[::4096] = b"\x01" * len(scratch[::4096])  # touch every page: resident, not just reserved
        return real_load(*args, **kwargs)
    monkeypatch.setattr(models, "load_model", heavy_load)
    assert benchmark.main(["--models", str(tiny_models["llama"]), "--phases", "mmlu", *TINY_RUN,
                           "--results-dir", str(results_dir)]) == 0, capsys.readouterr()
    memory = load_record(results_dir)[1]["memory"]
    assert memory["peak_rss_bytes"] - memory["rss_before_load_bytes"] >= 200 << 20, memory


def load_record(results_dir: Path) -> tuple[Path, dict]:
    paths = sorted(results_dir.glob("benchmark-*.json"))
    assert len(paths) == 1, paths
    return paths[0], json.loads(paths[0].read_text())


def test_end_to_end_tiny_run_writes_a_valid_record(tiny_models, results_dir, capsys):
    code = benchmark.main(["--models", str(tiny_models["llama"]), *TINY_RUN, "--results-dir", str(results_dir)])
    assert code == 0, capsys.readouterr()
    path, record = load_record(results_dir)
    assert record["kind"] == "benchmark" and record["status"] == "complete"
    assert record["schema_version"] == records.VERSIONS["benchmark"] and records.record_error(record) is None
    assert record["model"]["source"] == "llama"  # the folder's name: the test's temp path stays on this machine
    assert record["model"]["name"] == "llama" and record["model"]["weights_on_disk_bytes"] > 0
    mmlu = record["mmlu"]
    assert set(mmlu["categories"]) == {"world_religions", "management"} and mmlu["micro"]["n"] == 6
    assert mmlu["micro"]["n_correct"] == sum(c["n_correct"] for c in mmlu["categories"].values())
    assert mmlu["micro"]["ci95_low"] <= mmlu["micro"]["accuracy"] <= mmlu["micro"]["ci95_high"]
    assert mmlu["chance_accuracy"] == 0.25 and mmlu["n_shots"] == 2 and mmlu["questions_per_sec"] > 0
    assert len(mmlu["manifest"]["subjects"]["world_religions"]["question_ids"]) == 3
    human = record["humaneval"]
    assert human["n_problems"] == 2 and len(human["problem_ids"]) == 2 and 0 <= human["pass_at_1"] <= 1
    speed = record["speed"]
    assert len(speed["prefill"]["tok_per_sec_samples"]) == 2 and speed["decode"]["tok_per_sec_mean"] > 0
    assert len(speed["ttft_sec_samples"]) == 2 and speed["n_warmup"] == 1
    memory = record["memory"]
    assert memory["peak_rss_bytes"] >= memory["weight_bytes"] > 0 and memory["consistency"]["rss_covers_weights"]

    samples = [json.loads(line) for line in (path.parent / record["samples_file"]).read_text().splitlines()]
    assert sum(s["phase"] == "mmlu" for s in samples) == 6
    assert {s["task_id"] for s in samples if s["phase"] == "humaneval"} == set(human["problem_ids"])
    assert all("completion" in s and "result" in s for s in samples if s["phase"] == "humaneval")
    assert record["environment"]["versions"]["torch"] and record["config"]["seed"] == 1234
    assert record["config"]["humaneval_batch_size"] == 0 and human["batch_size"] == 2  # automatic: both problems
    # --resume on a complete record does nothing and writes no second record
    assert benchmark.main(["--models", str(tiny_models["llama"]), *TINY_RUN, "--results-dir", str(results_dir),
                           "--resume"]) == 0
    assert load_record(results_dir)[0] == path


def test_ctrl_c_keeps_finished_phases_and_resume_finishes(tiny_models, results_dir, monkeypatch):
    args = ["--models", str(tiny_models["gpt_neox"]), *TINY_RUN, "--phases", "mmlu,speed",
            "--results-dir", str(results_dir)]

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(benchmark, "run_speed", interrupted)
    assert benchmark.main(args) == 130
    path, record = load_record(results_dir)
    assert record["status"] == "partial" and record["mmlu"]["micro"]["n"] == 6 and record["speed"] is None
    mmlu_before = record["mmlu"]["micro"]
    monkeypatch.undo()
    assert benchmark.main([*args, "--resume"]) == 0
    path_after, record = load_record(results_dir)
    assert path_after == path and record["status"] == "complete" and record["speed"] is not None
    assert record["mmlu"]["micro"] == mmlu_before  # not scored again
    samples = (path.parent / record["samples_file"]).read_text().splitlines()
    assert len(samples) == 6


def test_resume_mid_phase_skips_scored_questions(tiny_models, results_dir, monkeypatch):
    args = ["--models", str(tiny_models["llama"]), *TINY_RUN, "--phases", "mmlu", "--mmlu-chunk", "1",
            "--results-dir", str(results_dir)]
    real = mmlu.score_rows
    calls = []

    def crash_on_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(mmlu, "score_rows", crash_on_fourth)
    assert benchmark.main(args) == 130
    path, record = load_record(results_dir)
    assert record["mmlu"] is None and record["status"] == "partial"
    assert len((path.parent / "samples" / f"{path.stem}.jsonl").read_text().splitlines()) == 3
    calls.clear()
    monkeypatch.setattr(mmlu, "score_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert benchmark.main([*args, "--resume"]) == 0
    assert len(calls) == 3  # only the three questions not yet scored
    _, record = load_record(results_dir)
    assert record["mmlu"]["micro"]["n"] == 6 and record["mmlu"]["n_scored_this_run"] == 3


def test_a_model_that_fails_to_load_is_reported_and_the_others_go_on(tiny_models, results_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--models",
                             f"{broken},{tiny_models['stablelm']}", *TINY_RUN, "--phases", "speed"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "broken-model" in result.stdout and "could not be loaded" in result.stdout
    _, record = load_record(results_dir)
    assert record["model"]["name"] == "stablelm" and record["status"] == "complete"


def test_bad_model_name_is_one_sentence_and_nonzero(results_dir):
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--models", "no-such-model"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("error: Unknown model 'no-such-model'") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_quick_sets_small_limits_that_flags_still_override():
    quick = benchmark.parse_args(["--quick"])
    assert quick.models == models.DEFAULT_MODEL and quick.mmlu_limit == benchmark.QUICK_DEFAULTS["mmlu_limit"]
    assert benchmark.parse_args(["--quick", "--mmlu-limit", "3"]).mmlu_limit == 3
    full = benchmark.parse_args([])
    assert full.models.split(",") == models.SEED_MODELS and full.mmlu_limit == 0 and full.mmlu_shots == 5


def test_every_flag_is_a_setting_or_named_as_not_one():
    """The record's config is built from Settings: a new measuring flag that is not a field would go unrecorded."""
    args = benchmark.parse_args([])
    fields = {f.name for f in dataclasses.fields(benchmark.Settings)}
    assert set(vars(args)) == fields | set(benchmark.NOT_CONFIG) and not fields & set(benchmark.NOT_CONFIG)
    settings = benchmark.Settings.from_args(benchmark.parse_args(["--humaneval-batch-size", "3", "--seed", "9"]))
    config = benchmark.record_config("smollm2-135m", "4bit", settings)
    assert config["humaneval_batch_size"] == 3 and config["seed"] == 9 and config["quantize"] == "4bit"
    assert set(benchmark.RESUME_KEYS) <= set(config)


def test_quick_regenerates_docs_with_our_results_dir(tmp_path, monkeypatch):
    from types import SimpleNamespace
    calls = []
    monkeypatch.setattr(benchmark.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    benchmark.regenerate_docs(tmp_path, tmp_path / "page", console=SimpleNamespace(print=print))
    assert calls and calls[0][1].endswith("docs/generate.py")
    assert calls[0][2:] == ["--results-dir", str(tmp_path.resolve()), "--docs-dir", str((tmp_path / "page").resolve())]


def test_all_models_failing_is_a_failed_run_with_one_total(tmp_path, results_dir):
    broken = []
    for name in ("broken-a", "broken-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
        broken.append(str(tmp_path / name))
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--models", ",".join(broken), *TINY_RUN,
                             "--phases", "speed"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.count("total run time") == 1 and "run failed" in result.stdout
    failures = [line for line in result.stdout.splitlines() if "could not be loaded" in line]
    assert len(failures) == 2 and "Traceback" not in result.stderr, result.stdout
    assert not list(results_dir.glob("benchmark-*.json"))


def test_resume_without_a_match_names_the_setting_that_differs(tiny_models, results_dir, capsys):
    args = ["--models", str(tiny_models["llama"]), *TINY_RUN, "--phases", "speed", "--results-dir", str(results_dir)]
    assert benchmark.main(args) == 0
    capsys.readouterr()
    assert benchmark.main([*args, "--decode-tokens", "5", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to resume" in out and "decode-tokens 4 there vs 5 now" in out
    assert len(list(results_dir.glob("benchmark-*.json"))) == 2


def test_unwritable_results_folder_is_refused_before_loading(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--models", "smollm2-135m",
                             "--results-dir", str(blocker / "results")], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot be written" in result.stderr and str(blocker) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
