"""Speculative decoding, the algorithm: a small draft model proposes tokens, the big target checks them all in
one forward pass and keeps the longest prefix it agrees with, plus one token of its own.

Leviathan et al. 2023 (https://arxiv.org/abs/2211.17192) and Chen et al. 2023 (https://arxiv.org/abs/2302.01318).
Both KV caches are kept and rolled back after a rejection, so no token is read twice. Greedy output is
token-for-token the target's own greedy output; sampling keeps the target's distribution exactly (the proof is
in accept_drafts). speculative_pair.py measures and checks all of this, speculative_demo.py draws it; this file
only decodes, with every forward pass timed into a trace so the demo can say where the time went.

Read top to bottom: one Generation, the timed forward pass, the accept rule, speculative_generate, the adaptive
choice of k, the two baselines (the target alone in our loop and in transformers' generate()), and Leviathan's
speed-up model.

    import speculative
    speculative.speculative_generate(target, draft, prompt_ids, k=5, max_new_tokens=128)   # 5 drafts a step
    speculative.speculative_generate(target, draft, prompt_ids, k=speculative.AdaptiveK(), max_new_tokens=128)
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import operator
import statistics
import time

import common
import models
import transformers_internals

N_TOP_LOGITS = 5  # logits the reference keeps per position, so that a divergence can be explained by its margin


@dataclasses.dataclass
class Generation:
    """One generation: the new tokens, how each came about, and a trace of every forward pass."""
    tokens: list = dataclasses.field(default_factory=list)
    # per token: "accepted" (a draft the target kept), "correction" (the target's token after a rejection),
    # "bonus" (the target's token after all drafts were kept), "target" (prefill, plain step, or no drafts)
    kinds: list = dataclasses.field(default_factory=list)
    steps: list = dataclasses.field(default_factory=list)  # per speculative step: k, n_accepted, cache lengths
    forwards: list = dataclasses.field(default_factory=list)  # (role, n_tokens, sec) per forward pass
    top_logits: list = dataclasses.field(default_factory=list)  # reference only: [(ids, values)] per position
    total_sec: float = 0.0
    k_trace: list = dataclasses.field(default_factory=list)  # k allowed per step (adaptive: the chosen cap)

    def add(self, token_ids, kinds, stop_ids) -> None:
        for token, kind in zip(token_ids, kinds):
            self.tokens.append(token)
            self.kinds.append(kind)
            if token in stop_ids:
                break

    def finished(self, max_new_tokens: int, stop_ids) -> bool:
        return len(self.tokens) >= max_new_tokens or (bool(self.tokens) and self.tokens[-1] in stop_ids)


def timed_forward(model, token_ids: list, cache, *, trace: list, role: str, device: str, n_logits: int = 1):
    """models.forward_logits (the new tokens only; the cache holds the rest), timed into trace as (role, n, sec)
    with the device synchronised on both sides of the clock."""
    common.sync(device)
    start = time.perf_counter()
    logits = models.forward_logits(model, token_ids, cache, n_logits)
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


def pick(logits, temperature: float, generator) -> int:
    """The target's own choice from one row of logits (argmax when greedy, else a sample of softmax(logits / T))."""
    return models.sample_token(logits, temperature=temperature, generator=generator)


def sample_from(probs, generator) -> int:
    import torch
    return int(torch.multinomial(probs, 1, generator=generator))


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
    p = models.token_probabilities(target_logits, temperature)
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
    """Drop cached keys/values past the accepted prefix. A cache that cannot be cut (a sliding-window layer already
    evicted part of the prefix) would make every later token wrong, so that is an error, not a fresh start."""
    if not transformers_internals.crop_cache(cache, keep_tokens):
        raise RuntimeError(f"cannot roll this model's KV cache back to {keep_tokens} tokens (sliding-window "
                           "attention?); speculative decoding needs a cache it can cut")


def propose_drafts(draft, sequence: list, cache, *, k: int, vocab_size: int, temperature: float, generator,
                   forward, stop_below: float | None = None) -> tuple:
    """Up to k draft tokens, one forward each; the first forward also feeds what the draft's cache missed.
    Returns (tokens, their distributions q when sampling, the draft's top probability per token when adaptive).
    stop_below (adaptive k): stop once the draft's own chance that every draft so far is right (the product of
    its top probabilities) falls below it. A rule that looks only at the draft keeps the output exact."""
    tokens, probs, confidences = [], [], []
    path_probability, feed = 1.0, sequence[cache.get_seq_length():]
    for _ in range(k):
        q_logits = align_vocab(forward(draft, feed, cache, role="draft")[-1], vocab_size)
        if temperature == 0:
            tokens.append(int(q_logits.argmax()))
        else:
            probs.append(models.token_probabilities(q_logits, temperature))
            tokens.append(sample_from(probs[-1], generator))
        feed = tokens[-1:]
        if stop_below is not None:
            confidences.append(float((probs[-1] if temperature else models.token_probabilities(q_logits)).max()))
            path_probability *= confidences[-1]
            if path_probability < stop_below:
                break
    return tokens, probs, confidences


def speculative_generate(target, draft, prompt_ids: list, *, k: int | AdaptiveK, max_new_tokens: int,
                         temperature: float = 0.0, stop_ids=(), seed: int = 0, device: str = "cpu") -> Generation:
    """Speculative decoding of one prompt: the draft proposes k tokens, the target verifies all k in one pass.
    k is a fixed number of drafts per step, or an AdaptiveK that sets the cap of each step (and the draft may
    stop before it).

    Invariant between steps: the target's cache holds every token but the last one (which leads its next
    verify pass). The draft's cache may lag further (after a k=0 step, or when all drafts were accepted and the
    draft never saw its own last one); it catches up with `sequence[draft_len:]` in its next forward, one pass.
    """
    import torch
    adaptive = k if isinstance(k, AdaptiveK) else None
    out = Generation()
    generator = torch.Generator(device=device).manual_seed(seed)  # on the logits' device: multinomial needs it
    target_cache, draft_cache = models.new_cache(), models.new_cache()
    forward = functools.partial(timed_forward, trace=out.forwards, device=device)
    start = time.perf_counter()
    # Prefill: the target reads the prompt once and chooses the first new token itself.
    logits = forward(target, prompt_ids, target_cache, role="target")
    vocab_size = logits.shape[-1]  # the target's rows: draft logits are aligned to these
    sequence = list(prompt_ids) + [pick(logits[-1], temperature, generator)]
    out.add(sequence[-1:], ["target"], stop_ids)
    while not out.finished(max_new_tokens, stop_ids):
        k_cap = min(adaptive.k if adaptive else k, max_new_tokens - len(out.tokens) - 1)
        out.k_trace.append(k_cap)
        n_forwards = len(out.forwards)
        # 1. The draft proposes up to k_cap tokens.
        drafts, draft_probs, confidences = propose_drafts(
            draft, sequence, draft_cache, k=k_cap, vocab_size=vocab_size, temperature=temperature,
            generator=generator, forward=forward, stop_below=adaptive.stop_below if adaptive else None)
        # 2. The target scores its pending token and all drafts in ONE forward: len(drafts) + 1 distributions.
        p_logits = forward(target, sequence[-1:] + drafts, target_cache, role="target", n_logits=len(drafts) + 1)
        # 3. Keep the agreed prefix, plus one token from the target: a correction at the first rejected draft,
        #    or a bonus token if every draft was kept.
        n_accepted, token = accept_drafts(p_logits, draft_probs, drafts, temperature, generator)
        sequence += drafts[:n_accepted] + [token]
        kind = "target" if not drafts else "bonus" if n_accepted == len(drafts) else "correction"
        out.add(drafts[:n_accepted] + [token], ["accepted"] * n_accepted + [kind], stop_ids)
        # 4. Roll both caches back to the accepted prefix: rejected drafts' keys/values are dropped, the rest kept.
        rollback(target_cache, len(sequence) - 1)
        rollback(draft_cache, len(sequence) - 1)
        out.steps.append({"k": len(drafts), "n_accepted": n_accepted, "sequence_len": len(sequence),
                          "draft_confidences": confidences, "target_cache_len": target_cache.get_seq_length(),
                          "draft_cache_len": draft_cache.get_seq_length()})
        if adaptive:
            adaptive.update(len(drafts), n_accepted, out.forwards[n_forwards:], confidences)
    out.total_sec = time.perf_counter() - start
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


# ------------------------------------------------------------------------------------------- the baselines
def reference_generate(model, prompt_ids: list, *, max_new_tokens: int, temperature: float = 0.0,
                       stop_ids=(), seed: int = 0, device: str = "cpu") -> Generation:
    """The target alone, one token per forward with a KV cache (models.decode_steps, timed): the output
    speculative decoding must reproduce. Keeps the top logits at every position so that a divergence can be
    explained by its margin."""
    import torch
    out = Generation()
    generator = torch.Generator(device=device).manual_seed(seed)

    def forward(model, feed, cache):
        return timed_forward(model, feed, cache, trace=out.forwards, role="target", device=device)
    start = time.perf_counter()
    for token, logits in models.decode_steps(model, prompt_ids, cache=models.new_cache(), stop_ids=stop_ids,
                                             max_new_tokens=max_new_tokens, forward=forward,
                                             pick=lambda row: pick(row, temperature, generator)):
        top = torch.topk(logits, N_TOP_LOGITS)
        out.top_logits.append((top.indices.tolist(), top.values.tolist()))
        out.add([token], ["target"], stop_ids)
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

    def __init__(self, modules: dict, trace: list, device: str):
        self.modules, self.trace, self.device, self.handles = modules, trace, device, []

    def __enter__(self):
        for role, model in self.modules.items():
            if model is None:
                continue
            def before(module, args, kwargs):
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


# ------------------------------------------------------------------------------------- the speed-up model
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
