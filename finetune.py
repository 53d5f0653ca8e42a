"""LoRA fine-tuning of a small model on a JSON-lines extraction task, measured before and after.

The library behind finetune_demo.py and benchmarks/finetune_vs_trl.py: the training recipe (Recipe, whose fields
are also the command-line flags), the task data and its encoding, the answer-only loss, the trainer, and the
held-out evaluation (teacher-forced loss, batched greedy generation, exact-match and field-level scoring).

    recipe = finetune.Recipe(epochs=1)
    outcome = finetune.run_finetune(model="smollm2-135m", recipe=recipe, ..., console=console)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import time
from pathlib import Path

import common
import models
import records
import transformers_internals as hf

RUNS_DIR = common.REPO_DIR / "runs"
TASK_NAME = "order-records"
# The instruction the model sees. It says "JSON" so that base models at least try; the house format itself
# (keys, name order, SKU codes, weekday codes) is what the adapter has to learn.
SYSTEM_PROMPT = "Write the order record for this request as JSON."
METRIC_NAME = "exact_match"  # share of held-out records whose parsed JSON equals the gold record
META_FILE = "finetune_meta.json"  # written next to the adapter: base model, data, "after" numbers
# What --eval-adapter takes from META_FILE (unless given again) to re-measure exactly as the training run did.
META_SETTINGS = ("model", "heldout_file", "max_new_tokens", "quantize", "dtype", "device", "eval_batch_size")
PARTS_FILE = "train_so_far.json"  # an interrupted run's training figures, which --resume adds its own to
TRAIN_FILE = common.REPO_DIR / "data" / "finetune_train.jsonl"
HELDOUT_FILE = common.REPO_DIR / "data" / "finetune_heldout.jsonl"
EVAL_BATCH_SIZE = 25  # held-out prompts generated together; the whole set is 2 batches
ANSWER_SLACK_TOKENS = 16  # default answer cap: the longest held-out answer plus this
N_SAMPLES_SHOWN = 4
STOP_FLAG = {"requested": False}  # set by the first Ctrl-C; the trainer callback then checkpoints and stops


def setting(default, kind, text: str):
    """A Recipe field with its command-line type and help, so its default is written once for both scripts."""
    return dataclasses.field(default=default, metadata={"type": kind, "help": text})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training run: the command line's defaults, and what benchmarks/finetune_vs_trl.py gives both arms."""
    # Rank 16 on every linear projection is the QLoRA paper's recipe; for a 1.1B model in 4 bits that is ~12M
    # trainable parameters and well under 8 GB at batch 4 x ~80 tokens.
    lora_rank: int = setting(16, common.positive_int, "LoRA rank r")
    lora_alpha: float = setting(32.0, common.positive_float, "LoRA scaling numerator (scale = alpha / rank)")
    # 0: with 100 examples x 2 epochs there is little to regularise, and the dropout mask on every adapted
    # layer costs ~10% of a CPU step.
    lora_dropout: float = setting(0.0, common.probability, "dropout on the LoRA input")
    target_modules: str = setting("all-linear", str, "all-linear or a comma list, e.g. q_proj,v_proj")
    # 2 epochs x batch 4 = 50 steps: Qwen2.5-0.5B reaches ~0 loss within one epoch, SmolLM2-135M gains little
    # from a third epoch, and on CPU every epoch costs a minute or more.
    epochs: float = setting(2.0, common.positive_float, "passes over the training set")
    batch_size: int = setting(4, common.positive_int, "examples per optimizer micro-step")
    grad_accum: int = setting(1, common.positive_int, "micro-steps per optimizer step")
    lr: float = setting(1e-3, common.positive_float, "peak learning rate (cosine decay); LoRA tolerates a high one")
    warmup_steps: float = setting(0.1, common.non_negative_float,
                                  "learning-rate warm-up steps (below 1: share of all steps)")
    max_length: int = setting(256, common.positive_int, "longest training sequence in tokens (ours are ~60-90)")
    padding_free: bool = setting(False, bool, "flatten each batch into one sequence instead of padding it "
                                              "(pays off with flash-attn, not on CPU: see sft_config)")
    # LoRA on the top share of the decoder layers: the frozen layers below then compute the same thing in every
    # epoch, so each training example runs through them once, without gradients, and their output is replayed;
    # backward stops at the lowest adapted layer. Not the default: on SmolLM2-135M, adapters on the top third
    # reached 42% held-out exact match against 78% on every layer (same steps and learning rate).
    lora_top_share: float = setting(1.0, common.probability,
                                    "share of the decoder layers, counted from the top, that get LoRA (1: all); "
                                    "the frozen ones below run once per example and are reused")
    # Our sequences are ~80 tokens: recomputing activations (trl's default) would only cost time.
    gradient_checkpointing: bool = setting(False, bool, "recompute activations in the backward pass (saves "
                                                        "memory, costs ~30%% time)")
    seed: int = setting(0, common.seed_int, "training seed")


DEFAULTS = Recipe()


def add_recipe_flags(parser, names=None) -> None:
    """Recipe's fields (all, or those named) as flags with Recipe's defaults, for this script and the benchmark."""
    import argparse
    for field in dataclasses.fields(Recipe):
        if field.name == "seed" and (names is None or "seed" in names):  # the shared flag, Recipe's default
            common.add_common_flags(parser, "--seed", defaults={"--seed": field.default})
        elif names is None or field.name in names:
            kind = field.metadata["type"]
            how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
            parser.add_argument(f"--{field.name.replace('_', '-')}", default=field.default,
                                help=field.metadata["help"], **how)


def recipe_from(values: dict) -> Recipe:
    """The Recipe that a command line's values (vars(args)) ask for; fields with no flag keep their defaults."""
    return dataclasses.replace(DEFAULTS, **{f.name: values[f.name] for f in dataclasses.fields(Recipe)
                                            if f.name in values})


# ------------------------------------------------------------------------------------------------- data
def load_jsonl(path: Path) -> list[dict]:
    """Read a task file; any bad line is reported as `file:line: what is wrong` (a UserError)."""
    path = Path(path)
    if not path.is_file():
        raise common.UserError(common.missing_path_sentence(path, "file", "Dataset file"))
    rows = []
    for line_number, raw in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise common.UserError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                   f"{error.start + 1}); save the file as UTF-8.") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise common.UserError(f"{where}: not valid JSON ({error.msg.removesuffix(' at')} at column "
                                   f"{error.colno}).") from None
        if not isinstance(row, dict):
            raise common.UserError(f"{where}: each line must be a JSON object with 'text' and 'record'.")
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise common.UserError(f"{where}: 'text' must be a non-empty string.")
        if not isinstance(row.get("record"), dict) or not row["record"]:
            raise common.UserError(f"{where}: 'record' must be a non-empty JSON object.")
        row.setdefault("id", f"{path.stem}-{line_number}")
        row["line"] = line_number
        rows.append(row)
    if not rows:
        raise common.UserError(f"Dataset file {path} has no examples.")
    return rows


def record_json(record: dict) -> str:
    """The answer string the model is trained to write: compact JSON, keys in the file's order."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def parse_record(text: str) -> dict | None:
    """The first JSON object in a model's answer, or None."""
    text = text.strip()
    for candidate in (text, text[text.find("{"): text.rfind("}") + 1] if "{" in text else ""):
        with contextlib.suppress(json.JSONDecodeError, ValueError):
            value = json.loads(candidate)
            if isinstance(value, dict):
                return value
    return None


def prompt_messages(example: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": example["text"]}]


def to_trl_example(example: dict, tokenizer, spec) -> dict:
    """trl's prompt/completion format, which makes SFTTrainer compute the loss on the completion only.

    Conversational when the model is prompted through its chat template (trl renders it); plain strings otherwise."""
    answer = record_json(example["record"])
    if models.uses_chat_template(tokenizer, spec):
        return {"prompt": prompt_messages(example), "completion": [{"role": "assistant", "content": answer}]}
    return {"prompt": models.chat_prompt(tokenizer, prompt_messages(example), spec), "completion": " " + answer}


def encode_example(example: dict, tokenizer, spec) -> tuple[list[int], int]:
    """(token ids of prompt + answer, number of prompt tokens), tokenized exactly as trl 1.x does it."""
    answer = record_json(example["record"])
    if models.uses_chat_template(tokenizer, spec):
        prompt_ids = tokenizer.apply_chat_template(prompt_messages(example), add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(
            prompt_messages(example) + [{"role": "assistant", "content": answer}], tokenize=True,
            return_dict=True)["input_ids"]
    else:
        prompt = models.chat_prompt(tokenizer, prompt_messages(example), spec)
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + " " + answer + tokenizer.eos_token)["input_ids"]
    n_prompt = 0
    while n_prompt < min(len(prompt_ids), len(full_ids)) and prompt_ids[n_prompt] == full_ids[n_prompt]:
        n_prompt += 1
    return list(full_ids), n_prompt


def answer_token_cap(tokenizer, examples: list[dict]) -> int:
    """The default --max-new-tokens: room for the longest held-out answer, plus slack for a wordier model."""
    return max(len(tokenizer(record_json(e["record"]))["input_ids"]) for e in examples) + ANSWER_SLACK_TOKENS


# ------------------------------------------------------------------------------------------- evaluation
def autocast_context(device: str, dtype: str):
    """bf16/fp16 autocast: on CPU it runs the matmuls in bf16 (~4x fp32 on AVX512-BF16) with fp32 LoRA weights."""
    import torch
    device_type = "cuda" if device.startswith("cuda") else device
    if dtype == "float32" or device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def answer_nll(model, labels, **inputs):
    """The answer-only loss, for training and the held-out loss alike: (summed NLL of the tokens whose label is
    not -100, their count, the backbone's outputs). The LM head runs on those positions only, in the autocast
    dtype: trl 1.16's fused LM head scores every position, in fp32, on devices without Triton (CPU, MPS), which
    for SmolLM2 on CPU was ~35% of a training step. Only for models whose logits are a plain lm_head(hidden)."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    outputs = base.base_model(**inputs, use_cache=False)
    targets = labels[:, 1:]
    mask = targets != -100  # position p predicts token p+1; prompt and padding are -100
    logits = base.get_output_embeddings()(outputs.last_hidden_state[:, :-1][mask])
    nll = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return nll, mask.sum(), outputs


def heldout_loss(model, tokenizer, examples: list[dict], *, spec, device: str, dtype: str, batch_size: int) -> float:
    """Mean negative log-likelihood per answer token, teacher-forced."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not models.plain_lm_head(base):
        raise common.UserError(f"{base.config.model_type} scales or soft-caps its logits, which this demo's "
                               "answer-only loss does not implement; pick a Llama/Qwen/StableLM/GPT-NeoX model.")
    encoded = [encode_example(e, tokenizer, spec) for e in examples]
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.inference_mode(), autocast_context(device, dtype):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            input_ids = torch.full((len(chunk), max(len(ids) for ids, _ in chunk)), tokenizer.pad_token_id)
            attention_mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
            for row, (ids, n_prompt) in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
                labels[row, max(n_prompt, 1):len(ids)] = input_ids[row, max(n_prompt, 1):len(ids)]
            nll, n_tokens, _ = answer_nll(model, labels.to(device), input_ids=input_ids.to(device),
                                          attention_mask=attention_mask.to(device))
            total_nll += nll.item()
            total_tokens += int(n_tokens)
    return total_nll / max(total_tokens, 1)


def generate_answers(model, tokenizer, examples: list[dict], *, spec, device: str, dtype: str, batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers for every example, batched with left padding (prompts sorted by length to pad less)."""
    import torch
    prompts = [models.chat_prompt(tokenizer, prompt_messages(e), spec) for e in examples]
    stop_ids = models.stop_token_ids(tokenizer, spec)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, dtype):
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
                for row, index in enumerate(batch):
                    answers[index] = tokenizer.decode(output[row, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return answers


def score(answers: list[str], examples: list[dict]) -> dict:
    """Exact match of the parsed record, field-level micro F1, and the share of answers that parse as a JSON object."""
    n_exact = n_valid = n_correct_fields = n_predicted_fields = n_gold_fields = 0
    for answer, example in zip(answers, examples):
        gold, parsed = example["record"], parse_record(answer)
        n_gold_fields += len(gold)
        if parsed is None:
            continue
        n_valid += 1
        n_exact += parsed == gold
        n_predicted_fields += len(parsed)
        n_correct_fields += sum(key in parsed and parsed[key] == value for key, value in gold.items())
    precision = n_correct_fields / n_predicted_fields if n_predicted_fields else 0.0
    recall = n_correct_fields / n_gold_fields if n_gold_fields else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(examples)
    return {"metric_name": METRIC_NAME, "metric": n_exact / n, "n_exact": n_exact, "field_f1": f1,
            "json_valid_rate": n_valid / n, "n": n}


def evaluate_heldout(model, tokenizer, examples: list[dict], *, spec, device: str, dtype: str, batch_size: int,
                     max_new_tokens: int, label: str, console, cpu_threads=None) -> tuple[dict, list[str]]:
    """Held-out metric and loss on the same examples; returns (summary, answers)."""
    start = time.perf_counter()
    console.print(f"[dim]Evaluating {label} on {len(examples)} held-out examples...[/dim]")
    setting = {"spec": spec, "device": device, "dtype": dtype, "batch_size": batch_size}
    if cpu_threads:
        cpu_threads.update(step=-1)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, **setting)
    summary = score(answers, examples)
    if cpu_threads:
        cpu_threads.update(step=-1)
    summary["heldout_loss"] = heldout_loss(model, tokenizer, examples, **setting)
    summary["eval_sec"] = time.perf_counter() - start
    return summary, answers


def pick_samples(examples, before_answers, after_answers) -> list[dict]:
    """A few held-out examples side by side, preferring ones whose answer changed."""
    order = sorted(range(len(examples)), key=lambda i: before_answers[i] == after_answers[i])
    return [{"id": examples[i]["id"], "input": examples[i]["text"], "expected": record_json(examples[i]["record"]),
             "before": before_answers[i], "after": after_answers[i]} for i in sorted(order[:N_SAMPLES_SHOWN])]


# --------------------------------------------------------------------------------------------- training
def lora_config(recipe: Recipe, model=None):
    """peft's LoraConfig for the recipe; with the model, adapters on its top lora_top_share of decoder layers."""
    from peft import LoraConfig
    targets = recipe.target_modules if recipe.target_modules == "all-linear" else recipe.target_modules.split(",")
    n_bottom = frozen_bottom_layers(recipe, model) if model is not None else 0
    where = {}
    if n_bottom:  # peft takes layers_to_transform with a list of names only: "all-linear" spelled out
        layers = hf.decoder_layers(model)
        where = {"layers_to_transform": list(range(n_bottom, len(layers))), "layers_pattern": "layers"}
        if targets == "all-linear":
            targets = linear_names(layers[0])
    return LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", **where)


def linear_names(layer) -> list[str]:
    """The names of a decoder layer's Linear layers (4-bit ones included), as peft's target_modules takes them."""
    import torch
    return sorted({name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})


def frozen_bottom_layers(recipe: Recipe, model) -> int:
    """How many decoder layers at the bottom get no adapter: all but the top lora_top_share (at least one layer
    adapted); 0 where the model's layers cannot be skipped (transformers_internals.decoder_layers) or its head is
    not plain (the trainer then uses trl's own loss)."""
    layers = hf.decoder_layers(model)
    if layers is None or recipe.lora_top_share >= 1 or not models.plain_lm_head(model):
        return 0
    return len(layers) - max(1, round(recipe.lora_top_share * len(layers)))


class FrozenBottom:
    """The hidden states leaving the frozen bottom layers, per training example (its token ids), computed once
    alone (no padding, no gradients) and reused in every epoch; a batch gets them back padded on the right."""

    def __init__(self, model, n_bottom: int):
        self.model, self.n_bottom, self.saved = model, n_bottom, {}
        self.n_computed = self.n_reused = 0

    def batch(self, input_ids, attention_mask):
        """[batch, seq, hidden] for a right-padded batch, or None when it is not right-padded (no reuse then)."""
        import torch
        lengths = attention_mask.sum(1)
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if not bool((attention_mask.bool() == (columns[None] < lengths[:, None])).all()):
            return None
        rows = []
        for ids, length in zip(input_ids, lengths.tolist()):
            key = tuple(ids[:length].tolist())
            if key not in self.saved:
                with torch.no_grad():
                    self.saved[key] = hf.bottom_hidden(self.model, self.n_bottom, input_ids=ids[None, :length])[0]
                self.n_computed += 1
            else:
                self.n_reused += 1
            rows.append(self.saved[key])
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)[:, :input_ids.shape[1]]


def sft_config(recipe: Recipe, *, output_dir: Path, device: str, dtype: str):
    from trl import SFTConfig
    return SFTConfig(
        output_dir=str(output_dir), num_train_epochs=recipe.epochs, per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=recipe.lr, lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_steps, weight_decay=0.0, seed=recipe.seed, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=device == "cpu", bf16=dtype == "bfloat16",
        fp16=dtype == "float16", gradient_checkpointing=recipe.gradient_checkpointing,
        # Padding-free flattens a batch into one sequence with a block-diagonal mask. Without a varlen attention
        # kernel (CPU, sdpa) attention then costs (batch x 80)^2 instead of batch x 80^2, which outweighs the ~8%
        # of pad tokens it saves (we measured 2.5 s vs 2.0 s per 8-example step), so it is off by default. trl
        # wants max_length=None with it; train_examples() drops over-long examples either way.
        padding_free=recipe.padding_free, max_length=None if recipe.padding_free else recipe.max_length,
        # Tokens/sec counts real tokens: the attention mask when padded, everything when padding-free.
        include_num_input_tokens_seen="all" if recipe.padding_free else "non_padding", dataloader_num_workers=0,
    )


def answer_only_trainer_class():
    """trl's SFTTrainer with answer_nll as its loss (normalised by trl's num_items_in_batch, so gradient
    accumulation behaves the same); models with scaled or soft-capped logits keep trl's own loss."""
    import torch
    from trl import SFTTrainer

    class AnswerOnlyLossTrainer(SFTTrainer):
        frozen_bottom: FrozenBottom | None = None  # set by train() when the bottom layers carry no adapter

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            if not models.plain_lm_head(unwrapped.get_base_model()):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            hidden = self.frozen_bottom.batch(inputs["input_ids"], inputs["attention_mask"]) \
                if self.frozen_bottom and set(inputs) == {"input_ids", "attention_mask"} else None
            if hidden is None:
                nll, n_answer_tokens, outputs = answer_nll(unwrapped, labels, **inputs)
            else:
                with hf.skip_bottom_layers(unwrapped, self.frozen_bottom.n_bottom, hidden):
                    nll, n_answer_tokens, outputs = answer_nll(unwrapped, labels, **inputs)
            n_tokens = num_items_in_batch if num_items_in_batch is not None else n_answer_tokens
            loss = nll / torch.as_tensor(n_tokens, device=nll.device).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return AnswerOnlyLossTrainer


def train_examples(examples: list[dict], tokenizer, spec, max_length: int, console) -> list[dict]:
    """Drop (with a warning naming the lines) training examples longer than --max-length tokens."""
    kept, dropped = [], []
    for example in examples:
        (kept if len(encode_example(example, tokenizer, spec)[0]) <= max_length else dropped).append(example)
    if dropped:
        console.print(f"[yellow]Skipped {len(dropped)} training examples longer than --max-length {max_length} "
                      f"tokens (lines {', '.join(str(e['line']) for e in dropped[:10])}).[/yellow]")
    if not kept:
        raise common.UserError(f"Every training example is longer than --max-length {max_length} tokens.")
    return kept


def verify_completion_only(trainer, tokenizer, spec, example: dict) -> dict:
    """Check that trl masked the prompt: the tokens that carry loss are exactly the answer (+ end of turn)."""
    prepared = trainer.train_dataset[0]
    ids, labels = prepared["input_ids"], prepared["labels"]
    expected_ids, n_prompt = encode_example(example, tokenizer, spec)
    trained = [token for token, label in zip(ids, labels) if label != -100]
    ok = (list(ids) == expected_ids and all(label == -100 for label in labels[:n_prompt])
          and list(labels[n_prompt:]) == expected_ids[n_prompt:]
          and tokenizer.decode(trained).lstrip().startswith(record_json(example["record"])))
    if not ok:
        raise RuntimeError("Completion-only loss check failed: trl's labels do not cover exactly the answer tokens.")
    return {"verified": True, "n_prompt_tokens_masked": n_prompt, "n_answer_tokens_trained": len(trained),
            "trained_text": tokenizer.decode(trained)}


def make_progress_callback(console, monitor, device: str, cpu_threads=None):
    """A TrainerCallback that shows loss, step time, tokens/sec and peak RSS/VRAM on common.Progress."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.loss_curve, self.step_sec, self.progress = [], [], None
            self.step_start = self.last_tokens_per_sec = 0.0
            self.tokens_at_start = self.tokens_at_step_start = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_at_start = state.num_input_tokens_seen
            self.progress = common.Progress(console, "training", total=state.max_steps,
                                            already_done=state.global_step).__enter__()

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.perf_counter()
            self.tokens_at_step_start = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            common.sync(device)
            seconds = time.perf_counter() - self.step_start
            self.step_sec.append(seconds)
            self.last_tokens_per_sec = (state.num_input_tokens_seen - self.tokens_at_step_start) / max(seconds, 1e-9)
            if cpu_threads is not None:
                cpu_threads.update(state.global_step)
            if STOP_FLAG["requested"]:  # Ctrl-C: save a resumable checkpoint (model, optimizer, RNG) and stop
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.loss_curve.append(float(logs["loss"]))
            monitor.sample()
            memory = f"RSS {common.human_bytes(monitor.peak_rss_bytes)}"
            if device.startswith("cuda"):
                import torch
                memory += f" VRAM {common.human_bytes(torch.cuda.max_memory_allocated())}"
            self.progress.advance(state.global_step - self.progress.done,
                                  note=f"loss {logs['loss']:.3f}  {self.step_sec[-1] if self.step_sec else 0:.2f} "
                                       f"s/step  {self.last_tokens_per_sec:,.0f} tok/s  peak {memory}")

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.__exit__(None, None, None)

    return ProgressCallback()


@contextlib.contextmanager
def checkpoint_on_interrupt(console):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: abort at once."""
    def handler(signum, frame):
        if STOP_FLAG["requested"]:
            raise KeyboardInterrupt
        STOP_FLAG["requested"] = True
        console.print("\n[yellow]Ctrl-C: saving a checkpoint after this step (press again to abort).[/yellow]")
    STOP_FLAG["requested"] = False
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def trainable_state(model) -> dict:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def weight_change(before: dict, model) -> dict:
    import torch
    after = trainable_state(model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    max_change = max(float((after[n] - before[n]).abs().max()) for n in before) if before else 0.0
    return {"adapter_weights_changed": bool(changed), "n_tensors_changed": len(changed),
            "n_tensors": len(before), "max_abs_change": max_change}


def adapter_roundtrip_identical(model, adapter_dir: Path) -> bool:
    """The saved adapter file holds exactly the trained LoRA weights (bitwise)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    return set(saved) == set(live) and all(torch.equal(saved[k].cpu(), live[k].detach().cpu()) for k in live)


def earlier_parts(output_dir: Path, resume_from: str, console) -> dict:
    """The figures an interrupted run saved for the steps up to this checkpoint, so that a resumed run's record
    holds totals over every part; {} (and a printed warning) when there are none."""
    step = int(Path(resume_from).name.split("-")[-1])
    saved = common.read_json(output_dir / PARTS_FILE) if (output_dir / PARTS_FILE).is_file() else {}
    if saved.get("step") == step:
        return saved["train"]
    console.print(f"[yellow]No training figures saved for steps 1-{step}: this run's training figures cover "
                  f"the resumed part only.[/yellow]")
    return {}


def train(loaded, examples: list[dict], *, recipe: Recipe, output_dir: Path, resume: bool, console,
          cpu_threads=None) -> dict:
    """LoRA/QLoRA with trl's SFTTrainer; returns the trainer, the peft model and the training record (totals over
    every part when resumed)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    spec = loaded.resolved.spec
    dataset = Dataset.from_list([to_trl_example(e, loaded.tokenizer, spec) for e in examples])
    config = sft_config(recipe, output_dir=output_dir, device=loaded.device, dtype=loaded.dtype)
    monitor = common.MemoryMonitor(loaded.device, interval_sec=0.05)
    callback = make_progress_callback(console, monitor, loaded.device, cpu_threads)
    n_bottom = frozen_bottom_layers(recipe, loaded.model)
    trainer = answer_only_trainer_class()(model=loaded.model, args=config, train_dataset=dataset,
                                          processing_class=loaded.tokenizer,
                                          peft_config=lora_config(recipe, loaded.model), callbacks=[callback])
    if n_bottom:
        trainer.frozen_bottom = FrozenBottom(trainer.model, n_bottom)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our callback shows the progress
    completion_check = verify_completion_only(trainer, loaded.tokenizer, spec, examples[0])
    resume_from, earlier = None, {}
    if resume:
        resume_from = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume_from is None:
            raise common.UserError(f"No checkpoint in {output_dir} to resume from; run without --resume.")
        console.print(f"Resuming from {resume_from}")
        earlier = earlier_parts(output_dir, resume_from, console)
    initial = trainable_state(trainer.model)
    start, cpu_start = time.perf_counter(), time.process_time()
    with monitor, checkpoint_on_interrupt(console):
        trainer.train(resume_from_checkpoint=resume_from)
    common.sync(loaded.device)
    # cpu_sec (all threads of this process) is the figure a busy shared machine disturbs least.
    part = {"train_sec": time.perf_counter() - start, "cpu_sec": time.process_time() - cpu_start,
            "n_tokens": trainer.state.num_input_tokens_seen - callback.tokens_at_start,
            "step_sec_samples": callback.step_sec, "loss_curve": callback.loss_curve,
            "cpu_thread_changes": cpu_threads.changes if cpu_threads else [], "n_parts": 1, **monitor.result()}
    for key, value in earlier.items():  # sums, concatenated lists, and the larger peak
        part[key] = max((v for v in (value, part[key]) if v is not None), default=None) if key.startswith("peak_") \
            else value + part[key]
    if STOP_FLAG["requested"]:
        common.write_json_atomic(output_dir / PARTS_FILE, {"step": trainer.state.global_step, "train": part})
    curve, steps = part["loss_curve"], part["step_sec_samples"]
    record = {**part, "n_steps": trainer.state.global_step, "n_examples": len(examples), "n_epochs": recipe.epochs,
              "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else None,
              "tokens_per_sec": part["n_tokens"] / part["train_sec"] if part["train_sec"] else None,
              "step_sec_mean": statistics.fmean(steps) if steps else None,
              "loss_first": curve[0] if curve else None, "loss_last": curve[-1] if curve else None,
              "completion_only_loss": completion_check, "interrupted": STOP_FLAG["requested"],
              "lora_layers": lora_layers(trainer, loaded.model)}
    return {"trainer": trainer, "model": trainer.model, "record": record, "initial_weights": initial}


def lora_layers(trainer, model) -> dict | None:
    """Which decoder layers carried adapters, and how often the frozen layers' output was computed and reused."""
    layers = hf.decoder_layers(model)
    bottom = trainer.frozen_bottom
    if layers is None:
        return None
    return {"n_layers": len(layers), "n_adapted": len(layers) - (bottom.n_bottom if bottom else 0),
            "frozen_outputs_computed": bottom.n_computed if bottom else 0,
            "frozen_outputs_reused": bottom.n_reused if bottom else 0}


# ------------------------------------------------------------------------------------------------- runs
def quiet_libraries() -> None:
    """Silence what a user cannot act on: library warnings and progress bars that would fight ours."""
    import logging
    import warnings
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import, on AVX512-BF16 CPUs, that an optional `kernels` package is missing; we do not
    # use its 4-bit CPU kernels unless --quantize 4bit, and then its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    datasets.disable_progress_bars()
    # transformers 5 renamed gradient_checkpointing, which trl still sets: one FutureWarning per run is noise.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def training_dtype(device: str, dtype: str) -> str:
    """--dtype auto for training: bf16 where the hardware computes in it, else float32. models.pick_dtype picks
    bf16 on every CPU (its bf16 weights halve a decode step's memory reads), but a CPU whose oneDNN has no bf16
    (AVX2 only: no AVX512-BF16/AMX) multiplies bf16 matrices through a slow generic path: on this project's AVX2
    machine a 320x576x1536 matmul took 63 ms in bf16 against 10.5 ms in float32 (1 thread), and a LoRA step is
    almost all such matmuls."""
    if dtype != "auto" or models.pick_device(device) != "cpu":
        return dtype
    import cpu_kernels
    return "bfloat16" if cpu_kernels.packing_problem("bfloat16") is None else "float32"


def load_for_finetune(model: str, *, device: str, dtype: str, quantize: str, max_length: int, models_dir,
                      threads: int, console):
    """(the loaded model, its common.CpuThreads); quantize "auto" is 4-bit (QLoRA) on CUDA and none elsewhere."""
    quiet_libraries()
    device = models.pick_device(device)
    quantize = quantize if quantize != "auto" else ("4bit" if device.startswith("cuda") else "none")
    loaded = models.load_model(model, device=device, dtype=training_dtype(device, dtype), quantize=quantize,
                               context_tokens=max_length, models_dir=models_dir, log=console.print)
    cpu_threads = common.CpuThreads(threads, enabled=loaded.device == "cpu")
    if loaded.device == "cpu":
        console.print(f"[dim]CPU threads: {cpu_threads.describe()}[/dim]")
    return loaded, cpu_threads


def check_target_modules(model, target_modules: str) -> None:
    """Refuse, right after loading and before the long baseline evaluation, --target-modules names that match no
    Linear layer of this model (peft itself would say so only when training starts)."""
    if target_modules == "all-linear":
        return
    import torch
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and name}
    unknown = [name for name in target_modules.split(",") if name not in linear_names]
    if unknown:
        raise common.UserError(f"--target-modules {','.join(unknown)}: this model has no Linear layer of that name; "
                               f"choose from {','.join(sorted(linear_names))} or all-linear.")


def match_saved_adapter_dtypes(model, adapter_dir: Path) -> None:
    """peft loads adapters in float32, but trl trains QLoRA adapters in bf16 (and saves them so): run them in the
    dtype they were trained and saved in, or the reloaded numbers drift from the training run's."""
    from safetensors import safe_open
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    if dtypes == {"BF16"}:
        import torch
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)


def read_meta(adapter_dir: Path) -> dict:
    """What the training run saved next to its adapter ({} when nothing); refuses a folder with no adapter."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise common.UserError(f"{adapter_dir} holds no adapter_config.json, so it is not a saved adapter.")
    return common.read_json(Path(adapter_dir) / META_FILE) if (Path(adapter_dir) / META_FILE).is_file() else {}


def reevaluate_adapter(adapter_dir: Path, *, model: str, heldout_file: Path, device: str, dtype: str,
                       quantize: str, models_dir, threads: int, eval_batch_size: int, max_new_tokens: int | None,
                       console) -> dict:
    """Reload a saved adapter on its base model and re-measure the held-out numbers: {"result", "saved" (the
    training run's "after", or None), "n_same" (answers identical to the training run's), "reproduced"}."""
    from peft import PeftModel
    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir)
    heldout = load_jsonl(heldout_file)
    loaded, cpu_threads = load_for_finetune(model, device=device, dtype=dtype, quantize=quantize,
                                            max_length=Recipe.max_length, models_dir=models_dir, threads=threads,
                                            console=console)
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    match_saved_adapter_dtypes(peft_model, adapter_dir)
    result, answers = evaluate_heldout(
        peft_model, loaded.tokenizer, heldout, spec=loaded.resolved.spec, device=loaded.device, dtype=loaded.dtype,
        batch_size=eval_batch_size, max_new_tokens=max_new_tokens or answer_token_cap(loaded.tokenizer, heldout),
        label="the reloaded adapter", console=console, cpu_threads=cpu_threads)
    saved = meta.get("after")
    n_same = sum(a == b for a, b in zip(answers, meta.get("after_answers", [])))
    reproduced = saved is None or (saved["n_exact"] == result["n_exact"] and n_same == len(answers) and
                                   math.isclose(saved["heldout_loss"], result["heldout_loss"], rel_tol=1e-3))
    return {"result": result, "saved": saved, "n_same": n_same, "n": len(answers), "reproduced": reproduced}


def cached_before(loaded, heldout, *, heldout_sha256: str, batch_size: int, max_new_tokens: int, output_dir: Path,
                  resume: bool, console, cpu_threads) -> tuple[dict, list[str]]:
    """The base model's held-out numbers; a resumed run reuses the ones saved when training started."""
    key = {"model": str(loaded.resolved.source), "heldout_sha256": heldout_sha256,
           "max_new_tokens": max_new_tokens, "dtype": loaded.dtype, "quantize": loaded.quantize}
    cache = output_dir / "before.json"
    if resume and cache.is_file():
        saved = common.read_json(cache)
        if saved.get("key") == key:
            console.print(f"[dim]Reusing the base model's held-out numbers from {cache}.[/dim]")
            return saved["summary"], saved["answers"]
    summary, answers = evaluate_heldout(
        loaded.model, loaded.tokenizer, heldout, spec=loaded.resolved.spec, device=loaded.device, dtype=loaded.dtype,
        batch_size=batch_size, max_new_tokens=max_new_tokens, label="the base model", console=console,
        cpu_threads=cpu_threads)
    common.write_json_atomic(cache, {"key": key, "summary": summary, "answers": answers})
    return summary, answers


def run_finetune(*, model: str, recipe: Recipe, train_file: Path, heldout_file: Path, output_dir: Path | None,
                 results_dir: Path, models_dir, device: str, dtype: str, quantize: str, threads: int,
                 eval_batch_size: int, max_new_tokens: int | None, resume: bool, console) -> dict | None:
    """The whole run: measure before, train, measure after, check, save the adapter and the record. Returns
    {"path", "record"}, or None when Ctrl-C stopped the training (a checkpoint is saved for --resume)."""
    run_start = time.perf_counter()
    train_rows, heldout = load_jsonl(train_file), load_jsonl(heldout_file)
    overlap = {r["text"] for r in train_rows} & {r["text"] for r in heldout}
    if overlap:
        raise common.UserError(f"{len(overlap)} held-out texts also appear in the training file, e.g. "
                               f"{next(iter(overlap))!r}; the two sets must be disjoint.")
    label = models.resolve_model(model, models_dir).label
    output_dir = Path(output_dir) if output_dir else RUNS_DIR / f"finetune-{common.safe_name(label)}"
    common.check_writable(results_dir, what="results folder")  # before the model loads: no lost work at the end
    common.check_writable(output_dir, what="adapter folder")
    if resume and not any(output_dir.glob("checkpoint-*")):
        raise common.UserError(f"No checkpoint in {output_dir} to resume from; run without --resume.")
    loaded, cpu_threads = load_for_finetune(model, device=device, dtype=dtype, quantize=quantize,
                                            max_length=recipe.max_length, models_dir=models_dir, threads=threads,
                                            console=console)
    check_target_modules(loaded.model, recipe.target_modules)
    tokenizer, spec = loaded.tokenizer, loaded.resolved.spec
    max_new_tokens = max_new_tokens or answer_token_cap(tokenizer, heldout)
    common.set_seed(recipe.seed)
    train_rows = train_examples(train_rows, tokenizer, spec, recipe.max_length, console)
    heldout_sha256 = common.sha256_file(heldout_file)
    before, before_answers = cached_before(loaded, heldout, heldout_sha256=heldout_sha256, resume=resume,
                                           batch_size=eval_batch_size, max_new_tokens=max_new_tokens,
                                           output_dir=output_dir, console=console, cpu_threads=cpu_threads)
    trained = train(loaded, train_rows, recipe=recipe, output_dir=output_dir, resume=resume, console=console,
                    cpu_threads=cpu_threads)
    if trained["record"]["interrupted"]:
        console.print(f"[yellow]Stopped after step {trained['record']['n_steps']}; checkpoint saved in "
                      f"{output_dir}. Continue with the same command plus --resume.[/yellow]")
        return None
    peft_model = trained["model"]
    adapter_dir = output_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    for checkpoint in output_dir.glob("checkpoint-*"):  # finished: a later --resume must not pick these up
        shutil.rmtree(checkpoint, ignore_errors=True)
    (output_dir / PARTS_FILE).unlink(missing_ok=True)
    after, after_answers = evaluate_heldout(
        peft_model, tokenizer, heldout, spec=spec, device=loaded.device, dtype=loaded.dtype,
        batch_size=eval_batch_size, max_new_tokens=max_new_tokens, label="the fine-tuned model", console=console,
        cpu_threads=cpu_threads)
    checks = weight_change(trained["initial_weights"], peft_model)
    checks["outputs_changed_fraction"] = sum(a != b for a, b in zip(before_answers, after_answers)) / len(heldout)
    checks["adapter_roundtrip_identical"] = adapter_roundtrip_identical(peft_model, adapter_dir)
    config = {"model": model, "device": device, "dtype": dtype, "quantize": quantize, "train_file": str(train_file),
              "heldout_file": str(heldout_file), "output_dir": str(output_dir), **dataclasses.asdict(recipe),
              "threads": threads, "eval_batch_size": eval_batch_size, "max_new_tokens": max_new_tokens,
              "resume": resume, "results_dir": str(results_dir), "models_dir": str(models_dir)}
    common.write_json_atomic(adapter_dir / META_FILE, {
        **{key: config[key] for key in META_SETTINGS}, "heldout_file": str(Path(heldout_file).resolve()),
        "before": before, "after": after, "after_answers": after_answers})
    record = common.result_record(
        "finetune", config=config, environment_block=common.environment(loaded.device), model=loaded.identity(),
        task={"name": TASK_NAME, "system_prompt": SYSTEM_PROMPT,
              "train_file": records.portable_path(train_file), "heldout_file": records.portable_path(heldout_file),
              "train_sha256": common.sha256_file(train_file),
              "heldout_sha256": heldout_sha256, "n_train": len(train_rows), "n_heldout": len(heldout),
              "metric": METRIC_NAME},
        train=trained["record"], before=before, after=after,
        samples=pick_samples(heldout, before_answers, after_answers), checks=checks,
        adapter_dir=records.portable_path(adapter_dir),
        run_sec=time.perf_counter() - run_start,
        process_cpu_sec=time.process_time())  # CPU time of this process since it started, imports included
    return {"path": common.write_result(record, results_dir), "record": record}
