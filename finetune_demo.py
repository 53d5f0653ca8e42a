"""Teach a small model a new skill in minutes with LoRA, and prove it with before/after numbers.

The task (data/README.md): turn a free-text shipping request into a fixed-key JSON "order record" in a house
format no base model can guess. A base model scores ~0 exact matches on the held-out set; a LoRA adapter
trained on 100 examples (QLoRA on a CUDA GPU, plain LoRA on CPU, trl's SFTTrainer, the model's own chat
template, loss on the answer tokens only) gets most of them right. The script measures the held-out exact
match and loss before and after on the same examples, shows sample outputs side by side, checks that the
adapter weights and the outputs changed, saves the adapter, and writes a results JSON (kind "finetune").

Ctrl-C during training saves a checkpoint; `--resume` continues from it. `--eval-adapter DIR` reloads a
saved adapter and re-measures the held-out numbers, which must reproduce the "after" figures.

    python finetune_demo.py                                  # SmolLM2-135M on CPU: 0% -> ~76% in ~1 min (2 cores)
    python finetune_demo.py --model qwen-coder-0.5b          # Qwen2.5-Coder-0.5B: 0% -> ~96% in ~2 min (2 cores)
    python finetune_demo.py --model tinyllama-1.1b --device cuda   # QLoRA (4-bit base) on an 8 GB GPU
    python finetune_demo.py --eval-adapter runs/finetune-smollm2-135m/adapter
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import common

DATA_DIR = common.REPO_DIR / "data"
RUNS_DIR = common.REPO_DIR / "runs"
TASK_NAME = "order-records"
# The instruction the model sees. It says "JSON" so that base models at least try; the house format itself
# (keys, name order, SKU codes, weekday codes) is what the adapter has to learn.
SYSTEM_PROMPT = "Write the order record for this request as JSON."
METRIC_NAME = "exact_match"  # share of held-out records whose parsed JSON equals the gold record
META_FILE = "finetune_meta.json"  # written next to the adapter: base model, data, "after" numbers
# What --eval-adapter takes from META_FILE (unless given again) to re-measure exactly as the training run did.
META_SETTINGS = ("model", "heldout_file", "max_new_tokens", "quantize", "dtype", "device", "eval_batch_size")
N_SAMPLES_SHOWN = 4
STOP_FLAG = {"requested": False}  # set by the first Ctrl-C; the trainer callback then checkpoints and stops


# ------------------------------------------------------------------------------------------------- data
def load_jsonl(path: Path) -> list[dict]:
    """Read a task file; any bad line is reported as `file:line: what is wrong` (a UserError)."""
    path = Path(path)
    if not path.is_file():
        raise common.UserError(f"Dataset file {path} does not exist.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as error:
                raise common.UserError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
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


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(example: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": example["text"]}]


def to_trl_example(example: dict, tokenizer) -> dict:
    """trl's prompt/completion format, which makes SFTTrainer compute the loss on the completion only.

    Conversational when the model has a chat template (trl renders it); plain strings otherwise."""
    answer = record_json(example["record"])
    if has_chat_template(tokenizer):
        return {"prompt": prompt_messages(example), "completion": [{"role": "assistant", "content": answer}]}
    return {"prompt": common.chat_prompt(tokenizer, prompt_messages(example)), "completion": " " + answer}


def encode_example(example: dict, tokenizer) -> tuple[list[int], int]:
    """(token ids of prompt + answer, number of prompt tokens), tokenized exactly as trl 1.x does it."""
    answer = record_json(example["record"])
    if has_chat_template(tokenizer):
        prompt_ids = tokenizer.apply_chat_template(prompt_messages(example), add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(
            prompt_messages(example) + [{"role": "assistant", "content": answer}], tokenize=True,
            return_dict=True)["input_ids"]
    else:
        prompt = common.chat_prompt(tokenizer, prompt_messages(example))
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + " " + answer + tokenizer.eos_token)["input_ids"]
    n_prompt = 0
    while n_prompt < min(len(prompt_ids), len(full_ids)) and prompt_ids[n_prompt] == full_ids[n_prompt]:
        n_prompt += 1
    return list(full_ids), n_prompt


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- evaluation
def autocast_context(device: str, dtype: str):
    """bf16/fp16 autocast: on CPU it runs the matmuls in bf16 (~4x fp32 on AVX512-BF16) with fp32 LoRA weights."""
    import torch
    device_type = "cuda" if device.startswith("cuda") else device
    if dtype == "float32" or device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def heldout_loss(model, tokenizer, examples: list[dict], device: str, dtype: str, batch_size: int) -> float:
    """Mean negative log-likelihood per answer token, teacher-forced; the LM head runs on answer positions only."""
    import torch
    encoded = [encode_example(e, tokenizer) for e in examples]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not plain_lm_head(base):
        raise common.UserError(f"{base.config.model_type} scales or soft-caps its logits, which this demo's "
                               "answer-only loss does not implement; pick a Llama/Qwen/StableLM/GPT-NeoX model.")
    backbone, head = base.base_model, base.get_output_embeddings()
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.inference_mode(), autocast_context(device, dtype):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _) in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            hidden = backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
            rows, positions, targets = [], [], []
            for row, (ids, n_prompt) in enumerate(chunk):
                for position in range(max(n_prompt, 1) - 1, len(ids) - 1):  # position p predicts token p+1
                    rows.append(row), positions.append(position), targets.append(ids[position + 1])
            logits = head(hidden[rows, positions]).float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=logits.device), reduction="sum")
            total_nll += nll.item()
            total_tokens += len(targets)
    return total_nll / max(total_tokens, 1)


def generate_answers(model, tokenizer, examples: list[dict], device: str, dtype: str, batch_size: int,
                     max_new_tokens: int, stop_ids: list[int]) -> list[str]:
    """Greedy answers for every example, batched with left padding (prompts sorted by length to pad less)."""
    import torch
    prompts = [common.chat_prompt(tokenizer, prompt_messages(e)) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, dtype):
            for start in range(0, len(order), batch_size):
                batch = [order[i] for i in range(start, min(start + batch_size, len(order)))]
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


def evaluate_heldout(model, tokenizer, examples, args, device, dtype, stop_ids, label, console) -> tuple[dict, list[str]]:
    """Held-out metric and loss on the same examples; returns (summary, answers)."""
    start = time.perf_counter()
    console.print(f"[dim]Evaluating {label} on {len(examples)} held-out examples...[/dim]")
    args.cpu_threads.update(step=-1)
    answers = generate_answers(model, tokenizer, examples, device, dtype, args.eval_batch_size,
                               args.max_new_tokens, stop_ids)
    summary = score(answers, examples)
    args.cpu_threads.update(step=-1)
    summary["heldout_loss"] = heldout_loss(model, tokenizer, examples, device, dtype, args.eval_batch_size)
    summary["eval_sec"] = time.perf_counter() - start
    return summary, answers


# --------------------------------------------------------------------------------------------- training
class CpuThreads:
    """Torch CPU threads = the cores other processes leave idle, re-decided after every training step.

    On a quiet machine torch's default (one thread per physical core) is fastest. When another process keeps a
    core busy, torch's OpenMP threads wait for each other at every op while one of them is descheduled: on this
    project's shared 2-core machine LoRA steps went from ~0.5 s to 2-70 s. A single thread has nobody to wait
    for (~0.75 s per such step), so we drop to the idle cores while the machine is busy and go back when it is
    quiet again. `--threads N` fixes the count instead."""

    def __init__(self, fixed: int, enabled: bool):
        import psutil
        import torch
        self.torch, self.psutil = torch, psutil
        self.enabled = enabled and not fixed
        self.physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        self.n_cpu = os.cpu_count() or 1
        self.process = psutil.Process()
        self.changes = []  # [training step (-1: evaluation), threads] whenever the count changes
        if fixed:
            torch.set_num_threads(fixed)
        elif self.enabled:
            psutil.cpu_percent(None), self.process.cpu_percent(None)
            time.sleep(0.3)  # a first sample of what the rest of the machine is doing
            self.update(step=0)

    def others_busy_cores(self) -> float:
        """Cores used by other processes since the last call (system use minus ours)."""
        system = self.psutil.cpu_percent(None) / 100 * self.n_cpu
        return max(0.0, system - self.process.cpu_percent(None) / 100)

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        others = self.others_busy_cores()
        threads = self.physical if others < 0.5 else max(1, min(self.physical, int(self.n_cpu - others + 0.3)))
        if threads != self.torch.get_num_threads():
            self.torch.set_num_threads(threads)
            self.changes.append([step, threads])

    def describe(self) -> str:
        mode = "adapts to the idle cores" if self.enabled else "fixed"
        return f"{self.torch.get_num_threads()} of {self.physical} physical cores ({mode})"


def lora_config(args):
    from peft import LoraConfig
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def sft_config(args, device: str, dtype: str, output_dir: Path):
    from trl import SFTConfig
    return SFTConfig(
        output_dir=str(output_dir), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.warmup, weight_decay=0.0, seed=args.seed, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=device == "cpu", bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        # Our sequences are ~80 tokens: recomputing activations (trl's default) would only cost time.
        gradient_checkpointing=args.gradient_checkpointing,
        # Padding-free flattens a batch into one sequence with a block-diagonal mask. Without a varlen attention
        # kernel (CPU, sdpa) attention then costs (batch x 80)^2 instead of batch x 80^2, which outweighs the ~8%
        # of pad tokens it saves (we measured 2.5 s vs 2.0 s per 8-example step), so it is off by default. trl
        # wants max_length=None with it; train_examples() drops over-long examples either way.
        padding_free=args.padding_free, max_length=None if args.padding_free else args.max_length,
        # Tokens/sec counts real tokens: the attention mask when padded, everything when padding-free.
        include_num_input_tokens_seen="all" if args.padding_free else "non_padding", dataloader_num_workers=0,
    )


def plain_lm_head(model) -> bool:
    """True when logits are just lm_head(hidden): no softcapping or logit scaling (Gemma 2, Cohere, Granite...),
    which our answer-only loss and held-out loss do not apply."""
    config = model.config.get_text_config()
    return not any(getattr(config, key, None) for key in (
        "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"))


def answer_only_trainer_class():
    """trl's SFTTrainer with a leaner completion-only loss.

    trl 1.16's fused LM head scores every position, in fp32, on devices without Triton (CPU, MPS): for SmolLM2 on
    CPU that was ~35% of a training step. Here the LM head runs only on the positions whose next token is part
    of the answer (~35% of our tokens), in the autocast dtype; the loss is the same token-mean NLL (normalised by
    trl's num_items_in_batch, so gradient accumulation behaves the same)."""
    import torch
    from trl import SFTTrainer

    class AnswerOnlyLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            base = self.accelerator.unwrap_model(model).get_base_model()
            if not plain_lm_head(base):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = base.base_model(**inputs, use_cache=False)
            targets = labels[:, 1:]
            mask = targets != -100  # position p predicts token p+1; prompt and padding are -100
            logits = base.get_output_embeddings()(outputs.last_hidden_state[:, :-1][mask])
            nll = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
            n_tokens = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            loss = nll / torch.as_tensor(n_tokens, device=nll.device).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return AnswerOnlyLossTrainer


def train_examples(examples: list[dict], tokenizer, max_length: int, console) -> list[dict]:
    """Drop (with a warning naming the lines) training examples longer than --max-length tokens."""
    kept, dropped = [], []
    for example in examples:
        (kept if len(encode_example(example, tokenizer)[0]) <= max_length else dropped).append(example)
    if dropped:
        console.print(f"[yellow]Skipped {len(dropped)} training examples longer than --max-length {max_length} "
                      f"tokens (lines {', '.join(str(e['line']) for e in dropped[:10])}).[/yellow]")
    if not kept:
        raise common.UserError(f"Every training example is longer than --max-length {max_length} tokens.")
    return kept


def verify_completion_only(trainer, tokenizer, example: dict) -> dict:
    """Check that trl masked the prompt: the tokens that carry loss are exactly the answer (+ end of turn)."""
    prepared = trainer.train_dataset[0]
    ids, labels = prepared["input_ids"], prepared["labels"]
    expected_ids, n_prompt = encode_example(example, tokenizer)
    trained = [token for token, label in zip(ids, labels) if label != -100]
    ok = (list(ids) == expected_ids and all(label == -100 for label in labels[:n_prompt])
          and list(labels[n_prompt:]) == expected_ids[n_prompt:]
          and tokenizer.decode(trained).lstrip().startswith(record_json(example["record"])))
    if not ok:
        raise RuntimeError("Completion-only loss check failed: trl's labels do not cover exactly the answer tokens.")
    return {"verified": True, "n_prompt_tokens_masked": n_prompt, "n_answer_tokens_trained": len(trained),
            "trained_text": tokenizer.decode(trained)}


def make_progress_callback(console, monitor, device: str, cpu_threads=None):
    """A TrainerCallback that shows loss, step time, tokens/sec and peak RSS/VRAM live (plain lines without a TTY)."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.loss_curve, self.step_sec, self.interactive = [], [], console.is_terminal
            self.progress = Progress(TextColumn("[bold]training"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
            self.stats = Text("")  # the second line: loss, speed, memory
            self.display = Live(Group(self.progress, self.stats), console=console, refresh_per_second=4)
            self.task = None
            self.step_start = self.train_start = 0.0
            self.tokens_at_start = self.tokens_at_step_start = 0
            self.last_tokens_per_sec = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_start = time.perf_counter()
            self.tokens_at_start = state.num_input_tokens_seen
            self.total_steps = state.max_steps
            if self.interactive:
                self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step)
                self.display.start()

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
            stats = (f"loss {logs['loss']:.3f}  {self.step_sec[-1] if self.step_sec else 0:.2f} s/step  "
                     f"{self.last_tokens_per_sec:,.0f} tok/s  peak {memory}")
            if self.interactive:
                self.progress.update(self.task, completed=state.global_step)
                self.stats.plain = stats
            else:
                print(f"step {state.global_step}/{self.total_steps}  {stats}", flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.interactive:
                self.display.stop()

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


def train(loaded, train_rows, args, output_dir: Path, console) -> dict:
    """LoRA/QLoRA with trl's SFTTrainer; returns the trainer, the peft model and the training record."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    dataset = Dataset.from_list([to_trl_example(e, loaded.tokenizer) for e in train_rows])
    config = sft_config(args, loaded.device, loaded.dtype, output_dir)
    monitor = common.MemoryMonitor(loaded.device, interval_sec=0.05)
    callback = make_progress_callback(console, monitor, loaded.device, args.cpu_threads)
    trainer = answer_only_trainer_class()(model=loaded.model, args=config, train_dataset=dataset,
                                          processing_class=loaded.tokenizer, peft_config=lora_config(args),
                                          callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our callback shows the progress
    completion_check = verify_completion_only(trainer, loaded.tokenizer, train_rows[0])
    resume_from = None
    if args.resume:
        resume_from = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume_from is None:
            raise common.UserError(f"No checkpoint in {output_dir} to resume from; run without --resume.")
        console.print(f"Resuming from {resume_from}")
    initial = trainable_state(trainer.model)
    start, cpu_start = time.perf_counter(), time.process_time()
    with monitor, checkpoint_on_interrupt(console):
        trainer.train(resume_from_checkpoint=resume_from)
    common.sync(loaded.device)
    train_sec, cpu_sec = time.perf_counter() - start, time.process_time() - cpu_start
    state = trainer.state
    n_tokens = state.num_input_tokens_seen - callback.tokens_at_start
    memory = monitor.result()
    record = {
        # cpu_sec (all threads of this process) is the figure a busy shared machine disturbs least.
        "train_sec": train_sec, "cpu_sec": cpu_sec, "n_steps": state.global_step, "n_examples": len(train_rows),
        "n_epochs": args.epochs, "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else None,
        "n_tokens": n_tokens, "tokens_per_sec": n_tokens / train_sec if train_sec else None,
        "step_sec_mean": statistics.fmean(callback.step_sec) if callback.step_sec else None,
        "step_sec_samples": callback.step_sec,
        "peak_rss_bytes": memory["peak_rss_bytes"], "peak_vram_allocated_bytes": memory["peak_vram_allocated_bytes"],
        "peak_vram_reserved_bytes": memory["peak_vram_reserved_bytes"],
        "loss_first": callback.loss_curve[0] if callback.loss_curve else None,
        "loss_last": callback.loss_curve[-1] if callback.loss_curve else None, "loss_curve": callback.loss_curve,
        "completion_only_loss": completion_check, "interrupted": STOP_FLAG["requested"],
        "cpu_thread_changes": args.cpu_threads.changes,
    }
    return {"trainer": trainer, "model": trainer.model, "record": record, "initial_weights": initial}


# ----------------------------------------------------------------------------------------------- output
def print_summary(console, before: dict, after: dict, train_record: dict, samples: list[dict]) -> None:
    from rich.table import Table
    table = Table(title="Held-out results (same examples before and after)")
    for column in ("", "exact match", "field F1", "valid JSON", "held-out loss"):
        table.add_column(column, justify="right" if column else "left")
    for label, row in (("before", before), ("after", after)):
        table.add_row(label, f"{row['metric']:.1%} ({row['n_exact']}/{row['n']})", f"{row['field_f1']:.1%}",
                      f"{row['json_valid_rate']:.0%}", f"{row['heldout_loss']:.3f}")
    console.print(table)
    if train_record:
        console.print(f"Training: {train_record['n_steps']} steps in {train_record['train_sec']:.1f} s, "
                      f"{train_record['tokens_per_sec'] or 0:,.0f} tok/s, loss {train_record['loss_first']:.3f} -> "
                      f"{train_record['loss_last']:.3f}, peak RSS {common.human_bytes(train_record['peak_rss_bytes'])}"
                      + (f", peak VRAM {common.human_bytes(train_record['peak_vram_allocated_bytes'])}"
                         if train_record.get("peak_vram_allocated_bytes") else ""))
    if samples:
        sample_table = Table(title="Sample held-out outputs", show_lines=True)
        for column in ("input", "expected", "before", "after"):
            sample_table.add_column(column, overflow="fold")
        for sample in samples:
            sample_table.add_row(sample["input"], sample["expected"], sample["before"], sample["after"])
        console.print(sample_table)


def pick_samples(examples, before_answers, after_answers) -> list[dict]:
    """A few held-out examples side by side, preferring ones whose answer changed."""
    order = sorted(range(len(examples)), key=lambda i: before_answers[i] == after_answers[i])
    return [{"id": examples[i]["id"], "input": examples[i]["text"], "expected": record_json(examples[i]["record"]),
             "before": before_answers[i], "after": after_answers[i]} for i in sorted(order[:N_SAMPLES_SHOWN])]


def resolve_run_paths(args, label: str) -> Path:
    return Path(args.output_dir) if args.output_dir else RUNS_DIR / f"finetune-{common.safe_name(label)}"


def load_for_finetune(args, model_name: str, console):
    device = common.pick_device(args.device)
    quantize = args.quantize if args.quantize != "auto" else ("4bit" if device.startswith("cuda") else "none")
    loaded = common.load_model(model_name, device=device, dtype=args.dtype, quantize=quantize,
                               context_tokens=args.max_length, log=console.print)
    args.cpu_threads = CpuThreads(args.threads, enabled=device == "cpu")
    if device == "cpu":
        console.print(f"[dim]CPU threads: {args.cpu_threads.describe()}[/dim]")
    return loaded


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


def eval_adapter(args, console) -> int:
    """Reload a saved adapter on its base model and re-measure the held-out numbers."""
    from peft import PeftModel
    adapter_dir = Path(args.eval_adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise common.UserError(f"{adapter_dir} holds no adapter_config.json, so it is not a saved adapter.")
    meta = common.read_json(adapter_dir / META_FILE) if (adapter_dir / META_FILE).is_file() else {}
    for key in META_SETTINGS:  # the training run's settings, unless this command line says otherwise
        if key in meta and key not in args.given:
            setattr(args, key, Path(meta[key]) if key.endswith("_file") else meta[key])
    heldout = load_jsonl(args.heldout_file)
    loaded = load_for_finetune(args, args.model, console)
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    match_saved_adapter_dtypes(model, adapter_dir)
    stop_ids = common.stop_token_ids(loaded.tokenizer, loaded.resolved.spec)
    result, answers = evaluate_heldout(model, loaded.tokenizer, heldout, args, loaded.device, loaded.dtype, stop_ids,
                                       "the reloaded adapter", console)
    console.print(f"reloaded adapter: exact match {result['metric']:.1%} ({result['n_exact']}/{result['n']}), "
                  f"field F1 {result['field_f1']:.1%}, held-out loss {result['heldout_loss']:.4f}")
    saved = meta.get("after")
    if not saved:
        return 0
    n_same = sum(a == b for a, b in zip(answers, meta.get("after_answers", [])))
    same = (saved["n_exact"] == result["n_exact"] and n_same == len(answers)
            and math.isclose(saved["heldout_loss"], result["heldout_loss"], rel_tol=1e-3))
    console.print(f"training run said: exact match {saved['metric']:.1%}, held-out loss {saved['heldout_loss']:.4f}; "
                  f"{n_same}/{len(answers)} answers identical -> {'reproduced' if same else 'NOT reproduced'}")
    return 0 if same else 1


# -------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default=common.DEFAULT_MODEL, help="registry name, local folder, .gguf or hub id")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 where supported), float32, ...")
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "4bit", "8bit"],
                        help="base weights: auto = 4bit (QLoRA) on CUDA, none (LoRA) elsewhere")
    parser.add_argument("--train-file", type=Path, default=DATA_DIR / "finetune_train.jsonl")
    parser.add_argument("--heldout-file", type=Path, default=DATA_DIR / "finetune_heldout.jsonl")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="checkpoints and adapter (default: runs/finetune-<model>)")
    # LoRA: rank 16 on every linear projection is the QLoRA paper's recipe; for a 1.1B model in 4 bits that is
    # ~12M trainable parameters and well under 8 GB at batch 4 x ~80 tokens.
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    # 0: with 100 examples x 2 epochs there is little to regularise, and the dropout mask on every adapted
    # layer costs ~10% of a CPU step.
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", default="all-linear", help="all-linear or a comma list, e.g. q_proj,v_proj")
    # 2 epochs x batch 4 = 50 steps: Qwen2.5-0.5B reaches ~0 loss within one epoch, SmolLM2-135M gains little
    # from a third epoch, and on CPU every epoch costs a minute or more.
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer micro-step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay); LoRA tolerates high")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up steps (<1: share of all steps)")
    parser.add_argument("--max-length", type=int, default=256,
                        help="longest training sequence in tokens (our examples are ~60-90)")
    parser.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=False,
                        help="flatten each batch into one sequence instead of padding it (pays off with flash-attn)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations in the backward pass (saves memory, costs ~30%% time)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: the idle physical cores, re-checked every step)")
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length cap (default: longest held-out answer + 16 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--eval-adapter", type=Path, default=None, metavar="DIR",
                        help="only reload this saved adapter and measure the held-out set")
    parser.add_argument("--results-dir", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    return args


def run(args, console) -> int:
    run_start = time.perf_counter()
    if args.eval_adapter:
        return eval_adapter(args, console)
    train_rows, heldout = load_jsonl(args.train_file), load_jsonl(args.heldout_file)
    overlap = {r["text"] for r in train_rows} & {r["text"] for r in heldout}
    if overlap:
        raise common.UserError(f"{len(overlap)} held-out texts also appear in the training file, e.g. "
                               f"{next(iter(overlap))!r}; the two sets must be disjoint.")
    loaded = load_for_finetune(args, args.model, console)
    tokenizer, output_dir = loaded.tokenizer, resolve_run_paths(args, loaded.resolved.label)
    if args.max_new_tokens is None:
        args.max_new_tokens = max(len(tokenizer(record_json(e["record"]))["input_ids"]) for e in heldout) + 16
    stop_ids = common.stop_token_ids(tokenizer, loaded.resolved.spec)
    common.set_seed(args.seed)
    train_rows = train_examples(train_rows, tokenizer, args.max_length, console)
    before, before_answers = cached_before(args, loaded, heldout, stop_ids, output_dir, console)
    trained = train(loaded, train_rows, args, output_dir, console)
    if trained["record"]["interrupted"]:
        console.print(f"[yellow]Stopped after step {trained['record']['n_steps']}; checkpoint saved in "
                      f"{output_dir}. Continue with the same command plus --resume.[/yellow]")
        return 130
    model = trained["model"]
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    for checkpoint in output_dir.glob("checkpoint-*"):  # finished: a later --resume must not pick these up
        shutil.rmtree(checkpoint, ignore_errors=True)
    after, after_answers = evaluate_heldout(model, tokenizer, heldout, args, loaded.device, loaded.dtype, stop_ids,
                                            "the fine-tuned model", console)
    checks = weight_change(trained["initial_weights"], model)
    checks["outputs_changed_fraction"] = sum(a != b for a, b in zip(before_answers, after_answers)) / len(heldout)
    checks["adapter_roundtrip_identical"] = adapter_roundtrip_identical(model, adapter_dir)
    samples = pick_samples(heldout, before_answers, after_answers)
    common.write_json_atomic(adapter_dir / META_FILE, {
        **{key: str(getattr(args, key)) if key.endswith("_file") else getattr(args, key) for key in META_SETTINGS},
        "heldout_file": str(Path(args.heldout_file).resolve()), "before": before, "after": after,
        "after_answers": after_answers})
    print_summary(console, before, after, trained["record"], samples)
    console.print(f"Checks: adapter weights changed: {checks['adapter_weights_changed']} "
                  f"({checks['n_tensors_changed']}/{checks['n_tensors']} tensors), outputs changed on "
                  f"{checks['outputs_changed_fraction']:.0%} of held-out examples, saved adapter identical to "
                  f"trained weights: {checks['adapter_roundtrip_identical']}")
    record = common.result_record(
        "finetune", config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("cpu_threads", "given")},
        environment_block=common.environment(loaded.device), model=loaded.identity(),
        task={"name": TASK_NAME, "system_prompt": SYSTEM_PROMPT, "train_file": str(args.train_file),
              "heldout_file": str(args.heldout_file), "train_sha256": file_sha256(args.train_file),
              "heldout_sha256": file_sha256(args.heldout_file), "n_train": len(train_rows), "n_heldout": len(heldout),
              "metric": METRIC_NAME},
        train=trained["record"], before=before, after=after, samples=samples, checks=checks,
        adapter_dir=str(adapter_dir), run_sec=time.perf_counter() - run_start,
        process_cpu_sec=time.process_time())  # CPU time of this process since it started, imports included
    path = common.write_result(record, args.results_dir)
    console.print(f"Adapter: {adapter_dir}   results: {path}   total {time.perf_counter() - run_start:.0f} s")
    return 0


def cached_before(args, loaded, heldout, stop_ids, output_dir: Path, console) -> tuple[dict, list[str]]:
    """The base model's held-out numbers; a resumed run reuses the ones saved when training started."""
    key = {"model": loaded.identity()["source"], "heldout_sha256": file_sha256(args.heldout_file),
           "max_new_tokens": args.max_new_tokens, "dtype": loaded.dtype, "quantize": loaded.quantize}
    cache = output_dir / "before.json"
    if args.resume and cache.is_file():
        saved = common.read_json(cache)
        if saved.get("key") == key:
            console.print(f"[dim]Reusing the base model's held-out numbers from {cache}.[/dim]")
            return saved["summary"], saved["answers"]
    summary, answers = evaluate_heldout(loaded.model, loaded.tokenizer, heldout, args, loaded.device, loaded.dtype,
                                        stop_ids, "the base model", console)
    common.write_json_atomic(cache, {"key": key, "summary": summary, "answers": answers})
    return summary, answers


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def body(argv):
        import logging
        import warnings
        from rich.console import Console
        args = parse_args(argv)
        # bitsandbytes warns at import, on AVX512-BF16 CPUs, that an optional `kernels` package is missing; we do
        # not use its 4-bit CPU kernels unless --quantize 4bit, and then its fallback works.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import datasets
        datasets.disable_progress_bars()
        # transformers 5 renamed gradient_checkpointing, which trl still sets: one FutureWarning per run is noise.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
        return run(args, Console(highlight=False))
    return common.run_cli(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
