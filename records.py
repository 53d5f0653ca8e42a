"""What a results record holds: one schema per kind, its version, the adapter that reads older versions, and the
one rule for paths in a record.

A record is data that a reader trusts without re-checking. Every block the schema names is there with its type, and
numbers are finite or null. common.write_result validates through validate() before it writes, so a writer's bug
raises before any file exists. docs/generate.py reads through load(): an older record is upgraded by upgrade(), in
this one place, and a foreign or broken one is named, never half-read. Records hold numbers and identifiers; the
sentences about a run are printed by the script, or templated by the page, from those identifiers.

The schema is plain data (standard library only):
  {"key": spec}        an object that holds key; "key?" may be null or absent (load() fills it in as null). Keys the
                       schema does not name are allowed and kept (a writer may add a reading before the schema
                       names it), but nothing may rely on them.
  {"*": spec}          an object whose every value is spec (subject names, method names)
  [spec]               a list whose every item is spec
  str, int, bool, dict, list     that JSON type; NUMBER: an int or a float, finite, never a bool
  Maybe(spec)          spec or null (a list item that may be missing, such as alpha on a prompt with no drafts)
  frozenset({...})     one of these identifiers

    python -c "import common; common.migrate_results('results')"    # rewrite older records in the current shape
"""
from __future__ import annotations

import json
import math
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
NUMBER = (int, float)


class Maybe:
    def __init__(self, spec):
        self.spec = spec


# ---------------------------------------------------------------------------------------------- paths
# Keys whose string values are (or may be) paths: a config's "model", "draft" and "target" may name a local folder.
# result_record stores the config's portably, upgrade() makes older records' portable, and record_error refuses an
# absolute one anywhere in a record.
PATH_KEYS = frozenset({"source", "results_dir", "models_dir", "train_file", "heldout_file", "output_dir",
                       "adapter_dir", "eval_adapter", "interpreter", "folder", "out", "scratch", "model", "models",
                       "draft", "target"})


def portable_path(path) -> str | None:
    """A path as a record stores it: relative to the repository when inside it, else the last part only (a model
    folder's name, a data file's name), so a shared record never shows the layout of someone's disk. A relative
    path or a hub id ("Qwen/Qwen2.5-Coder-0.5B-Instruct") is kept as it is."""
    if path is None:
        return None
    text = str(path)
    if not Path(text).is_absolute():
        return text
    resolved = Path(text).resolve()
    if resolved == REPO_DIR or REPO_DIR in resolved.parents:
        return resolved.relative_to(REPO_DIR).as_posix() or "."
    return Path(text).name or "/"


def portable_source(source) -> str | None:
    """A model's source as a record stores it: a hub id as it is, a local folder or file by its name alone, wherever
    it sits (inside the repo or not), so two copies of one model read the same."""
    if source is None:
        return None
    text = str(source)
    return Path(text).name if Path(text).is_absolute() or Path(text).exists() else text


def finite(value):
    """JSON has no NaN or infinity: they become null. Paths become strings (portable ones are the writer's job)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- schema
STATUS = frozenset({"complete", "partial", "failed"})
ISOLATION = frozenset({"namespaces+uid", "namespaces", "uid", "none"})  # sandbox.py's levels
_ENVIRONMENT = {"python": str, "platform": str, "cpu?": str, "n_cpu?": int, "cpu_capability?": str,
                "torch_threads?": int, "ram_total_bytes?": int, "device": str,
                "gpu?": {"name": str, "total_memory_bytes?": int, "capability?": str, "cuda?": str},
                "versions": {"*": str}, "git_commit?": str}
_ENVELOPE = {"schema_version": int, "kind": str, "created_at": str, "status": STATUS, "config": dict,
             "environment": _ENVIRONMENT}
_MODEL = {"name": str, "hub_id?": str, "source?": str, "revision?": str, "dtype": str, "quantization": str,
          "device?": str, "n_params?": int, "weight_bytes?": int}
_COUNT = {"n": int, "n_correct": int, "accuracy?": NUMBER, "stderr?": NUMBER, "ci95_low?": NUMBER,
          "ci95_high?": NUMBER}
_MMLU = {"n_shots": int, "fewshot_source": frozenset({"dev_first_n", "test_first_n"}), "data_source": dict,
         "seed": int, "limit_per_subject?": int, "categories": {"*": _COUNT}, "groups": {"*": _COUNT},
         "micro": _COUNT, "macro": {"n_subjects": int, "accuracy?": NUMBER, "stderr?": NUMBER, "ci95_low?": NUMBER,
                                    "ci95_high?": NUMBER},
         "chance_accuracy": NUMBER, "prefix_cache": bool, "questions_per_sec?": NUMBER,
         "manifest?": {"subjects": {"*": {"group?": str, "n_test": int, "n_scored": int, "fewshot_ids": [str],
                                          "question_ids": [str], "questions_sha256": str}},
                       "prompt_format": frozenset({"lm_eval_mmlu"}), "add_special_tokens": bool}}
_HUMANEVAL = {"n_problems": int, "n_samples_per_problem": int, "pass_at_1?": NUMBER, "stderr?": NUMBER,
              "ci95_low?": NUMBER, "ci95_high?": NUMBER, "n_passed": int, "max_new_tokens": int,
              "batch_size?": int,  # rows generated together (null: before batching)
              "kernels?": frozenset({"stock", "onednn_packed"}),  # CPU Linear kernels while decoding (null: stock)
              "problem_ids?": [str], "timeout_sec?": NUMBER, "prompt_format?": frozenset({"plain_completion"}),
              "isolation?": ISOLATION,  # null: a record from before the level was written down
              "sandbox?": {"isolation?": ISOLATION, "layers?": {"*": bool}, "interpreter?": str,
                           "rlimits?": {"*": int}}}
_RATE = {"n_tokens": int, "tok_per_sec_mean?": NUMBER, "tok_per_sec_stddev?": NUMBER, "tok_per_sec_median?": NUMBER,
         "tok_per_sec_samples": [NUMBER]}
_SPEED = {"prefill": _RATE, "decode": _RATE, "ttft_sec_mean?": NUMBER, "ttft_sec_stddev?": NUMBER,
          "n_repetitions": int, "n_warmup": int}
_MEMORY = {"peak_rss_bytes?": int, "peak_vram_allocated_bytes?": int, "peak_vram_reserved_bytes?": int,
           "peak_vram_nvml_bytes?": int, "weight_bytes?": int, "rss_before_load_bytes?": int,
           "consistency": {"*": bool}}
_HELDOUT = {"metric_name": str, "metric?": NUMBER, "n_exact?": int, "n": int, "field_f1?": NUMBER,
            "json_valid_rate?": NUMBER, "heldout_loss?": NUMBER}
_RATIOS = {"*": {"vs_target?": NUMBER, "vs_target_by_prompt?": [Maybe(NUMBER)], "vs_assisted?": NUMBER,
                 "vs_assisted_by_prompt?": [Maybe(NUMBER)]}}
_METHOD = {"tok_per_sec_mean?": NUMBER, "tok_per_sec_samples": [NUMBER], "n_runs": int, "speedup?": NUMBER,
           "speedup_by_prompt": [Maybe(NUMBER)], "alpha_by_prompt": [Maybe(NUMBER)], "alpha?": NUMBER,
           "acceptance_rate?": NUMBER}
_AGREEMENT = {"n_runs": int, "n_identical": int, "divergences": [dict]}
# Unchecked (sampling) records hold only checked, reason and null; checked ones hold the rest.
_LOSSLESS = {"checked": bool, "reason?": frozenset({"sampling"}), "dtype?": str, "strict?": bool, "n_prompts?": int,
             "near_tie_logit?": NUMBER, "by_method?": {"*": _AGREEMENT}, "n_runs?": int, "n_identical?": int,
             "all_explained?": bool}
_PAIR = {"draft": _MODEL, "target": _MODEL, "dtype": str, "temperature": NUMBER, "k": int, "repeats": int,
         "prompts": [{"kind": str, "text": str}], "ours_method?": str, "lossless": _LOSSLESS}

# (current schema_version, what a record of that version holds beyond the envelope), per kind.
SCHEMAS = {
    "benchmark": (3, {"model": {**_MODEL, "weights_on_disk_bytes?": int}, "load_sec?": NUMBER, "mmlu?": _MMLU,
                      "humaneval?": _HUMANEVAL, "speed?": _SPEED, "memory?": _MEMORY, "samples_file?": str,
                      "run_sec?": NUMBER, "errors": [{"phase": str, "error": str}]}),
    "finetune": (2, {"model": _MODEL,
                     "task": {"name": str, "metric": str, "n_train": int, "n_heldout": int, "train_file": str,
                              "heldout_file": str, "train_sha256": str, "heldout_sha256": str},
                     "config": {"batch_size": int, "lora_rank": int},
                     "train": {"n_steps": int, "n_examples": int, "n_epochs": NUMBER, "n_tokens?": int,
                               "train_sec?": NUMBER, "loss_curve": [Maybe(NUMBER)], "peak_rss_bytes?": int,
                               "peak_vram_allocated_bytes?": int, "interrupted": bool},
                     "before": _HELDOUT, "after": _HELDOUT, "samples": [dict], "checks": dict, "adapter_dir?": str,
                     "run_sec?": NUMBER,
                     # benchmarks/finetune_vs_trl.py adds TRL's numbers beside ours, measured in the same run
                     "baseline?": {"arm?": frozenset({"trl", "trl-fp32"}), "train_sec?": NUMBER, "cpu_sec?": NUMBER,
                                   "peak_rss_bytes?": NUMBER,
                                   "after_metric?": NUMBER, "ratio_time?": NUMBER, "n_rounds": int}}),
    # ratios: each method's paired ratios from interleaved rounds; null in records from before they were measured
    # (their speedup_by_prompt is then a one-pass speed-up). ours_method: the variant the headline reports.
    "speculative": (2, {**_PAIR, "max_new_tokens": int, "methods": {"*": _METHOD}, "ratios?": _RATIOS,
                        "k_sweep": [dict], "adaptive?": dict,
                        "cost": {"cost_ratio?": NUMBER, "verify_tokens": int, "verify_cost_ratio?": NUMBER},
                        "universal": bool, "break_even": [{"k": int, "break_even_alpha?": NUMBER}],
                        "n_generations": int}),
    # The retired benchmarks/speculative_vs_assisted.py: its committed records stay readable.
    "speculative_benchmark": (2, {**_PAIR, "ratios": _RATIOS, "median_tok_per_sec": {"*": [Maybe(NUMBER)]}}),
    "download": (2, {"config": {"models": [str], "models_dir": str, "results_dir": str},
                     "models": [{"name": str, "status": str, "folder?": str, "n_files": int, "fetched_bytes": int}],
                     "n_failed": int, "fetched_bytes": int, "run_sec": NUMBER}),
    "chat": (2, {"model": _MODEL, "models": [_MODEL], "transcript": [{"role": str}], "n_replies": int}),
    "mmlu_prefix_cache": (2, {"model": _MODEL, "n_questions": int, "speedup?": NUMBER,
                              "questions_per_sec": {"*": NUMBER}, "identical_predictions": bool, "subjects": list}),
}
VERSIONS = {kind: version for kind, (version, _) in SCHEMAS.items()}


def _type_name(spec) -> str:
    if isinstance(spec, frozenset):
        return "one of " + ", ".join(sorted(spec))
    return "a number" if spec is NUMBER else spec.__name__


def schema_error(value, spec, path: str) -> str | None:
    """The first place `value` breaks `spec`, as 'path: problem', or None."""
    if isinstance(spec, Maybe):
        return None if value is None else schema_error(value, spec.spec, path)
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{path}: expected an object, got {type(value).__name__}"
        if "*" in spec:
            return next((e for k in value if (e := schema_error(value[k], spec["*"], f"{path}.{k}"))), None)
        for key, sub in spec.items():
            name = key.rstrip("?")
            if name not in value or value[name] is None:
                if key.endswith("?"):
                    continue
                return f"{path}.{name}: missing" if name not in value else f"{path}.{name}: must not be null"
            if error := schema_error(value[name], sub, f"{path}.{name}"):
                return error
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{path}: expected a list, got {type(value).__name__}"
        return next((e for i, v in enumerate(value) if (e := schema_error(v, spec[0], f"{path}[{i}]"))), None)
    if isinstance(spec, frozenset):
        return None if isinstance(value, str) and value in spec else f"{path}: {value!r} is not {_type_name(spec)}"
    if isinstance(value, bool) and spec is not bool:  # Python counts True as 1
        return f"{path}: expected {_type_name(spec)}, got bool"
    if not isinstance(value, spec):
        return f"{path}: expected {_type_name(spec)}, got {type(value).__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path}: {value} is not a finite number"
    return None


def _counts_error(record: dict) -> str | None:
    """What types cannot say: counts within their totals, proportions within [0, 1]."""
    blocks = []
    if record["kind"] == "benchmark" and record.get("mmlu"):
        mmlu = record["mmlu"]
        blocks = [("$.mmlu.micro", mmlu["micro"])] + [(f"$.mmlu.{part}.{k}", v) for part in ("categories", "groups")
                                                      for k, v in mmlu[part].items()]
    for path, block in blocks:
        if not 0 <= block["n_correct"] <= block["n"]:
            return f"{path}: n_correct {block['n_correct']} is not between 0 and n = {block['n']}"
    human = record.get("humaneval") if record["kind"] == "benchmark" else None
    if human and (human["n_problems"] < 0 or not 0 <= (human.get("pass_at_1") or 0) <= 1
                  or not 0 <= human["n_passed"] <= human["n_problems"] * human["n_samples_per_problem"]):
        return "$.humaneval: pass_at_1 must lie in [0, 1] and n_passed between 0 and the number of samples"
    for part in ("before", "after") if record["kind"] == "finetune" else ():
        block = record[part]
        if not 0 <= (block.get("metric") or 0) <= 1 or not 0 <= (block.get("n_exact") or 0) <= block["n"]:
            return f"$.{part}: metric must lie in [0, 1] and n_exact between 0 and n = {block['n']}"
    return None


def _known(kind) -> bool:
    return isinstance(kind, str) and kind in SCHEMAS


def record_error(record) -> str | None:
    """The first way a record breaks its kind's current schema, as '$.path: problem', or None when it is sound."""
    if not isinstance(record, dict):
        return f"$: expected an object, got {type(record).__name__}"
    if not _known(record.get("kind")):
        return f"$.kind: unknown kind {record.get('kind')!r}"
    version, body = SCHEMAS[record["kind"]]
    if record.get("schema_version") != version or isinstance(record.get("schema_version"), bool):
        return f"$.schema_version: {record.get('schema_version')!r} is not {record['kind']}'s current {version}"
    return schema_error(record, {**_ENVELOPE, **body}, "$") or _counts_error(record) or _absolute_path(record, "$")


def _absolute_path(value, path: str, key: str = "") -> str | None:
    """A record shared with others must not show the layout of the writer's disk: store portable_path(...)."""
    if isinstance(value, dict):
        return next((e for k, v in value.items() if (e := _absolute_path(v, f"{path}.{k}", k))), None)
    if isinstance(value, list):
        return next((e for i, v in enumerate(value) if (e := _absolute_path(v, f"{path}[{i}]", key))), None)
    if key in PATH_KEYS and isinstance(value, str) and Path(value).is_absolute():
        return f"{path}: {value!r} is an absolute path (store records.portable_path of it)"
    return None


def validate(record: dict) -> dict:
    """The record as it will be written (non-finite numbers as null); ValueError, a bug in the writer rather than
    the user's mistake, when it breaks the schema."""
    record = finite(record)
    if error := record_error(record):
        raise ValueError(f"refusing to write a results record that breaks the schema: {error}")
    return record


def _filled(value, spec):
    """Every optional key the schema names present (null when the writer left it out), so readers index directly."""
    if isinstance(spec, Maybe):
        return None if value is None else _filled(value, spec.spec)
    if isinstance(spec, dict) and isinstance(value, dict):
        if "*" in spec:
            return {k: _filled(v, spec["*"]) for k, v in value.items()}
        out = dict(value)
        for key, sub in spec.items():
            name = key.rstrip("?")
            out[name] = None if out.get(name) is None else _filled(out[name], sub)
        return out
    if isinstance(spec, list) and isinstance(value, list):
        return [_filled(v, spec[0]) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- older versions
def _portable(value, key: str = ""):
    if isinstance(value, dict):
        return {k: _portable(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, key) for v in value]
    if key == "source" and isinstance(value, str):
        return portable_source(value)
    return portable_path(value) if key in PATH_KEYS and isinstance(value, str) else value


def _benchmark_v1(record: dict) -> None:
    """Version 1 stored sentences: the few-shot source, why these subjects, the prompt formats, the sandbox's
    verdict and notes, what the speed phases meant. Identifiers replace them; the page words them."""
    if mmlu := record.get("mmlu"):
        mmlu["fewshot_source"] = "dev_first_n" if mmlu["fewshot_source"].startswith("dev") else "test_first_n"
        mmlu.pop("subjects_reason", None)
        if isinstance(mmlu.get("manifest"), dict):
            mmlu["manifest"]["prompt_format"] = "lm_eval_mmlu"
    if human := record.get("humaneval"):
        human["prompt_format"] = "plain_completion"
        sandbox = human.get("sandbox") or {}
        # Before the namespace sandbox, a record named only "a throwaway unprivileged uid per sample".
        level = human.get("isolation") or sandbox.get("isolation") or ("uid" if sandbox.get("user") else None)
        human["isolation"] = sandbox["isolation"] = level
        for key in ("user", "verdict", "notes", "not_isolated"):
            sandbox.pop(key, None)
        if isinstance(sandbox.get("layers"), dict):  # {"seccomp": "active" | "missing: <why>"}: which hold
            sandbox["layers"] = {name: state == "active" for name, state in sandbox["layers"].items()}
    if speed := record.get("speed"):
        speed["decode"].pop("context", None)
        speed.pop("ttft_definition", None)


def _ours_method(record: dict) -> str | None:
    pool = record.get("ratios") or record.get("methods") or {}
    return next((m for m in ("ours_adaptive", "ours") if m in pool), None)


def _speculative_v1(record: dict) -> None:
    """Version 1 came in two shapes under one number: before interleaved rounds (one-pass speed-ups, a list of
    notes) and after (paired `ratios`, `ours_method`). Both become version 2; `ratios` stays null for the first."""
    record.pop("notes", None)
    record.setdefault("ratios", None)
    record["ours_method"] = record.get("ours_method") or _ours_method(record)
    if not record["lossless"].get("checked"):
        record["lossless"]["reason"] = "sampling"


def _speculative_benchmark_v1(record: dict) -> None:
    """The retired script ran greedy only, and kept k and the rounds in its config."""
    config = record["config"]
    record.setdefault("temperature", 0.0)
    record.setdefault("k", config.get("k"))
    record.setdefault("repeats", config.get("repeats"))
    record["ours_method"] = record.get("ours_method") or _ours_method(record)
    record.pop("notes", None)


def _finetune_v1(record: dict) -> None:
    if isinstance(record.get("baseline"), dict):
        record["baseline"].pop("description", None)  # the arms are named by benchmarks/finetune_vs_trl.py


_FROM_V1 = {"benchmark": _benchmark_v1, "speculative": _speculative_v1,
            "speculative_benchmark": _speculative_benchmark_v1, "finetune": _finetune_v1}


def upgrade(record: dict) -> dict:
    """An older record in its kind's current shape (a copy); the current version comes back unchanged. Version 1
    held absolute paths and sentences; every kind's version 2 holds portable paths and identifiers; benchmark's
    version 3 adds humaneval.batch_size."""
    kind, version = record.get("kind"), record.get("schema_version")
    if not _known(kind) or version == VERSIONS[kind] or version not in (1, 2):
        return record
    record = json.loads(json.dumps(record))
    if version == 1:
        record = _portable(record)
        if kind in _FROM_V1:
            _FROM_V1[kind](record)
    # benchmark version 3 only adds humaneval.batch_size (rows generated together), null for older records
    record["schema_version"] = VERSIONS[kind]
    return record


def load(data) -> tuple[dict | None, str | None]:
    """(record in its current shape, None), or (None, why it cannot be read) for a foreign or broken one."""
    if not isinstance(data, dict) or "schema_version" not in data or "kind" not in data:
        return None, "not a billion-llm results record (no schema_version/kind)"
    kind, version = data["kind"], data["schema_version"]
    if _known(kind) and (type(version) is not int or not 1 <= version <= VERSIONS[kind]):
        return None, f"schema_version {version!r} is not one this code reads (1 to {VERSIONS[kind]} for {kind})"
    try:
        record = upgrade(data)
    except (KeyError, TypeError, AttributeError) as error:  # an older record too broken to upgrade
        return None, f"schema: version 1 record that cannot be upgraded ({type(error).__name__}: {error})"
    if error := record_error(record):
        return None, f"schema: {error}"
    return _filled(record, {**_ENVELOPE, **SCHEMAS[kind][1]}), None
