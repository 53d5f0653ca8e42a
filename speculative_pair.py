"""A speculative-decoding pair, loaded and measured: the draft and target models (after checking they are on disk and
share a vocabulary, with cpu_kernels.py's speed-ups on CPU), every method run on the same prompts in interleaved
rounds, the paired ratios, the measured costs, the k sweep, the lossless check and the one `speculative` record.

speculative.py is the algorithm; this file is how it is measured; speculative_demo.py (the command line and the
display) and benchmarks/speculative_replay.py are built on both.

    import speculative_pair as sp
    pair = sp.load_pair(draft="qwen-coder-0.5b", target="qwen-coder-1.5b", device="cpu", dtype="float32",
                        target_quantize="none", universal=False, int8_draft=True, pack_weights=True,
                        models_dir=None, log=print)
    runs = sp.measure(pair, sp.encode_prompts(pair, n_prompts=2), ["target_only", "ours"], repeats=1,
                      max_new_tokens=32, k=5, k_max=16, temperature=0.0, seed=0, log=print)
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics

import common
import cpu_kernels
import models
import speculative
import transformers_internals
from speculative import break_even_alpha, expected_speedup

DEFAULT_PROMPTS = (  # (kind, text): code is where a coder draft agrees most, prose where it agrees least
    ("code", "Write a Python function `is_palindrome(s)` that ignores case and punctuation, with a docstring."),
    ("prose", "In one paragraph, explain to a child why the sky is blue."),
    ("code", "Write a Python class `Stack` with push, pop, peek and is_empty methods, and a short usage example."),
    ("prose", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
)
METHODS = common.METHOD_ORDER
METHOD_TITLES = {"target_only": "target alone (KV cache loop)", "target_generate": "target alone (generate())",
                 "assisted": "transformers assisted", "ours": "ours, fixed k", "ours_adaptive": "ours, adaptive k"}
TARGET_METHODS = ("target_only", "target_generate")  # the baselines: speedups are against the faster of the two
# A greedy divergence is "explained by rounding" when the target itself ranked the two tokens closer than this
# (logits): bf16 keeps 8 mantissa bits (a logit between 16 and 32 is a multiple of 0.125) and the error grows
# through the layers, so a (k+1)-token verify pass and a 1-token decode can swap two near-tied tokens. In fp32
# only a gap under 1e-3 may flip; anything wider is a bug.
NEAR_TIE_LOGIT = models.NEAR_TIE_LOGIT  # one threshold table for every lossless check
INT8_DRAFT = "int8-dynamic"  # the draft's `quantization` once its Linear layers run in int8 (--draft-weights int8)
KV_CONTEXT_TOKENS = 2048  # KV cache the memory preflight budgets for: prompt + new tokens + drafts


# ----------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Pair:
    draft: object  # models.LoadedModel
    target: object
    stop_ids: list
    device: str
    universal: bool = False  # tokenizers differ: only transformers' universal assisted generation can run


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
        "family (see `python download_models.py --list`) or pass --universal to run transformers' universal "
        "assisted generation instead.")


def require_pair_on_disk(draft: str, target: str, models_dir) -> None:
    """On a fresh clone, say exactly what to download instead of failing deep inside from_pretrained."""
    # resolve first: an unknown name gets "Unknown model", not "not on disk"; a bare hub id may still be fetched
    missing = [name for name in (draft, target) if models.resolve_model(name, models_dir) and not models.is_hub_id(name)
               and models.model_on_disk(name, models_dir)[1] == "missing"]
    if not missing:
        return
    spec = models.REGISTRY.get(draft)
    if draft in missing and spec and spec.target == target:
        command = f"python download_models.py --models {draft} --targets"
    else:
        command = f"python download_models.py --models {','.join(missing)}"
    raise common.UserError(
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on disk (looked in {models_dir} "
        f"and the Hugging Face cache); download with `{command}`, or pass local files with --draft PATH --target "
        "PATH (transformers folders or .gguf files).")


def pick_target_quantize(requested: str, device: str, target: str) -> str:
    """4-bit for a 7B+ target on a GPU so the pair fits 8 GB (NF4 7B ~ 4 GB); full precision otherwise."""
    if requested != "auto":
        return requested
    spec = models.REGISTRY.get(target)
    return "4bit" if device.startswith("cuda") and spec is not None and spec.n_params > 3e9 else "none"


def load_pair(*, draft: str, target: str, device: str, dtype: str, target_quantize: str, universal: bool,
              int8_draft: bool, pack_weights: bool, models_dir, log) -> Pair:
    """Both models, after two cheap checks: both on disk, and (before any weights load) one shared vocabulary.
    On CPU, then the fenced speed-ups of cpu_kernels.py: the draft in int8, every Linear pre-packed."""
    from transformers import AutoTokenizer
    require_pair_on_disk(draft, target, models_dir)
    resolved = [models.available_model(name, models_dir, log=log) for name in (draft, target)]
    tokenizers = [AutoTokenizer.from_pretrained(r.source) for r in resolved]
    try:
        check_same_vocabulary(*tokenizers, resolved[0].label, resolved[1].label)
        universal = False
    except common.UserError:
        if not universal:
            raise
    device = models.pick_device(device)
    loaded_target = models.load_model(target, device=device, dtype=dtype, context_tokens=KV_CONTEXT_TOKENS,
                                      models_dir=models_dir, log=log,
                                      quantize=pick_target_quantize(target_quantize, device, target))
    loaded_draft = models.load_model(draft, device=device, dtype=loaded_target.dtype, models_dir=models_dir,
                                     context_tokens=KV_CONTEXT_TOKENS, log=log)
    if device == "cpu" and not universal:
        if int8_draft and loaded_draft.quantize == "none" and \
                cpu_kernels.quantize_linears_int8(loaded_draft.model, log=log):
            loaded_draft.quantize = INT8_DRAFT
            loaded_draft.weight_bytes = models.model_weight_bytes(loaded_draft.model)
        for loaded in (loaded_target, loaded_draft):
            if pack_weights and loaded.quantize == "none":
                cpu_kernels.pack_linears(loaded.model, dtype=loaded.dtype, log=log)
    stop_ids = models.stop_token_ids(loaded_target.tokenizer, loaded_target.resolved.spec)
    return Pair(draft=loaded_draft, target=loaded_target, stop_ids=stop_ids, device=device, universal=universal)


def encode_prompts(pair: Pair, *, texts=(), n_prompts: int) -> list:
    """The given prompts ("custom"), or the first n built-in ones, in the target's chat format."""
    chosen = [("custom", text) for text in texts] if texts else list(DEFAULT_PROMPTS[:n_prompts])
    prompts = []
    for kind, text in chosen:
        chat = models.chat_prompt(pair.target.tokenizer, [{"role": "user", "content": text}], pair.target.resolved.spec)
        ids = pair.target.tokenizer(chat, add_special_tokens=False).input_ids
        prompts.append({"kind": kind, "text": text, "n_tokens": len(ids), "ids": ids})
    return prompts



# --------------------------------------------------------------------------------------------- measuring
def run_method(method: str, pair: Pair, prompt_ids: list, *, max_new_tokens: int, k: int, k_max: int,
               temperature: float, seed: int):
    """One generation of one method on one prompt (k: ours' fixed k; k_max: adaptive k's cap)."""
    target, stop_ids, device = pair.target.model, pair.stop_ids, pair.device
    if method == "target_only":
        return speculative.reference_generate(target, prompt_ids, max_new_tokens=max_new_tokens,
                                              temperature=temperature, stop_ids=stop_ids, seed=seed, device=device)
    if method in ("target_generate", "assisted"):
        tokenizer = pair.target.tokenizer
        return speculative.hf_generate(
            target, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stop_ids, seed=seed,
            device=device, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
            assistant=pair.draft.model if method == "assisted" else None,
            assistant_tokenizer=pair.draft.tokenizer if pair.universal else None)
    k_rule = speculative.AdaptiveK(k_max=k_max) if method == "ours_adaptive" else k
    return speculative.speculative_generate(target, pair.draft.model, prompt_ids, k=k_rule,
                                            max_new_tokens=max_new_tokens, temperature=temperature,
                                            stop_ids=stop_ids, seed=seed, device=device)


def run_stats(method: str, generation) -> dict:
    """Flat numbers for one generation: speed, acceptance, where the time went."""
    n_tokens, total_sec = len(generation.tokens), generation.total_sec
    sec = {role: sum(t for r, _, t in generation.forwards if r == role) for role in ("draft", "target")}
    n_forwards = {role: sum(r == role for r, *_ in generation.forwards) for role in ("draft", "target")}
    n_steps = n_proposed = n_accepted = 0
    n_rejections = None
    if generation.steps:  # ours: counted exactly, per step
        drafted = [s for s in generation.steps if s["k"] > 0]
        n_steps, n_proposed = len(drafted), sum(s["k"] for s in drafted)
        n_accepted = sum(s["n_accepted"] for s in drafted)
        n_rejections = sum(s["n_accepted"] < s["k"] for s in drafted)
    elif method == "assisted" and n_forwards["draft"]:  # transformers: derived from forward counts (one target
        # pass per step, each draft pass proposes one candidate, each step adds exactly one target token)
        n_steps, n_proposed = n_forwards["target"], n_forwards["draft"]
        n_accepted = max(0, n_tokens - n_forwards["target"])
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"n_tokens": n_tokens, "total_sec": total_sec, "tok_per_sec": ratio(n_tokens, total_sec),
            "draft_sec": sec["draft"], "target_sec": sec["target"], "draft_time_share": ratio(sec["draft"], total_sec),
            "target_time_share": ratio(sec["target"], total_sec), "n_target_forwards": n_forwards["target"],
            "n_draft_forwards": n_forwards["draft"], "n_steps": n_steps, "n_proposed": n_proposed,
            "n_accepted": n_accepted, "n_rejections": n_rejections, "acceptance_rate": ratio(n_accepted, n_proposed),
            "mean_accepted_per_step": ratio(n_accepted, n_steps),
            "alpha": ratio(n_accepted, n_accepted + n_rejections) if n_rejections is not None else None}


def measure(pair: Pair, prompts: list, methods: list, *, repeats: int, max_new_tokens: int, k: int, k_max: int,
            temperature: float, seed: int, log) -> dict:
    """Every method on every prompt, `repeats` times, interleaved (the order rotates each round) so that load
    from other processes hits all methods alike. Returns {method: [(prompt_index, Generation, stats)]}."""
    runs = {m: [] for m in methods}
    for method in methods:  # warm-up, not counted: first-call allocations, thread pools, lazy imports
        run_method(method, pair, prompts[0]["ids"], max_new_tokens=min(8, max_new_tokens), k=k, k_max=k_max,
                   temperature=temperature, seed=seed)
    for round_index in range(repeats):
        order = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
        for index, prompt in enumerate(prompts):
            for method in order:
                generation = run_method(method, pair, prompt["ids"], max_new_tokens=max_new_tokens, k=k,
                                        k_max=k_max, temperature=temperature, seed=seed)
                stats = {**run_stats(method, generation), "prompt_index": index, "round": round_index}
                runs[method].append((index, generation, stats))
                log(f"  round {round_index + 1}/{repeats}  prompt {index + 1} ({prompt['kind']})  "
                    f"{METHOD_TITLES[method]:<28} {stats['tok_per_sec']:6.2f} tok/s")
    return runs


def paired_ratios(runs: dict) -> dict:
    """{method: {vs_target_by_prompt, vs_target, vs_assisted_by_prompt, vs_assisted}}: common.paired_ratios
    against the faster target-alone method of the same prompt and round, and against assisted likewise."""
    tok_per_sec = {m: {(i, s["round"]): s["tok_per_sec"] for i, _, s in items} for m, items in runs.items()}
    target = {}
    for method in TARGET_METHODS:
        for key, value in tok_per_sec.get(method, {}).items():
            target[key] = max(target.get(key, 0.0), value)
    out = {}
    for method, values in tok_per_sec.items():
        for name, baseline in (("vs_target", target), ("vs_assisted", tok_per_sec.get("assisted"))):
            if baseline:
                ratios = common.paired_ratios(values, baseline)
                out.setdefault(method, {}).update({f"{name}_by_prompt": ratios["by_prompt"],
                                                   name: ratios["geomean"]})
    return out


def summarise(samples: list, vs_target: dict) -> dict:
    """Mean/median/stddev over all runs of a method; speedup: its paired ratio against the target alone."""
    tok_per_sec = [s["tok_per_sec"] for s in samples]
    alpha_by_prompt = []
    for index in sorted({s["prompt_index"] for s in samples}):
        mine = [s for s in samples if s["prompt_index"] == index and s["n_rejections"] is not None]
        events = sum(s["n_accepted"] + s["n_rejections"] for s in mine)
        alpha_by_prompt.append(sum(s["n_accepted"] for s in mine) / events if events else None)
    total = lambda key: sum(s[key] or 0 for s in samples)  # noqa: E731
    share = lambda key: total(key) / total("total_sec") if total("total_sec") else None  # noqa: E731
    n_steps, n_proposed = total("n_steps"), total("n_proposed")
    rejections = [s["n_rejections"] for s in samples if s["n_rejections"] is not None]
    return {"tok_per_sec_mean": statistics.fmean(tok_per_sec), "tok_per_sec_median": statistics.median(tok_per_sec),
            "tok_per_sec_stddev": common.mean_stddev(tok_per_sec)[1],  # nan (null) for a single run
            "tok_per_sec_samples": tok_per_sec, "n_runs": len(samples),
            "speedup": vs_target["vs_target"], "speedup_by_prompt": vs_target["vs_target_by_prompt"],
            "alpha_by_prompt": alpha_by_prompt,
            "acceptance_rate": total("n_accepted") / n_proposed if n_proposed else None,
            "mean_accepted_per_step": total("n_accepted") / n_steps if n_steps else None,
            "alpha": (total("n_accepted") / (total("n_accepted") + sum(rejections))
                      if rejections and total("n_accepted") + sum(rejections) else None),
            "draft_time_share": share("draft_sec"), "target_time_share": share("target_sec")}


def median_forward_sec(generations: list, role: str, n_tokens) -> float | None:
    times = [sec for g in generations for r, n, sec in g.forwards[1:] if r == role and n in n_tokens]
    return statistics.median(times) if times else None


def measured_costs(runs: dict, *, k: int) -> dict:
    """The cost ratio c = draft forward / 1-token target forward, and what a (k+1)-token verify pass costs,
    from the medians of every timed forward pass in this run."""
    ours = [g for m in ("ours", "ours_adaptive") for _, g, _ in runs.get(m, [])]
    one_token = median_forward_sec([g for _, g, _ in runs.get("target_only", [])], "target", (1,))
    draft_step = median_forward_sec(ours, "draft", (1, 2))
    verify = median_forward_sec(ours, "target", (k + 1,))
    return {"target_step_sec": one_token, "draft_step_sec": draft_step,
            "cost_ratio": draft_step / one_token if draft_step and one_token else None,
            "verify_tokens": k + 1, "verify_sec": verify,
            "verify_cost_ratio": verify / one_token if verify and one_token else None}


def k_sweep(pair: Pair, prompts: list, ks: list, *, max_new_tokens: int, temperature: float, seed: int,
            cost_ratio: float | None, log) -> tuple:
    """Ours at each k, one run per prompt, each prompt's k values run next to a fresh target-alone run. A row is
    summarise()'s numbers plus Leviathan's model, with his 1-step verify pass and with the measured one.
    Returns (one row per k, [(label, prompt_index, Generation)] for the lossless check)."""
    baselines, baseline_tok_per_sec, by_k = [], {}, {k: [] for k in ks}
    for index, prompt in enumerate(prompts):
        baselines.append(run_method("target_only", pair, prompt["ids"], max_new_tokens=max_new_tokens, k=0,
                                    k_max=max(ks), temperature=temperature, seed=seed))
        baseline_tok_per_sec[index, 0] = run_stats("target_only", baselines[-1])["tok_per_sec"]
        for k in ks:
            generation = run_method("ours", pair, prompt["ids"], max_new_tokens=max_new_tokens, k=k, k_max=max(ks),
                                    temperature=temperature, seed=seed)
            stats = {**run_stats("ours", generation), "prompt_index": index, "round": 0}
            by_k[k].append((index, generation, stats))
            log(f"  k sweep  prompt {index + 1}  k={k}  {stats['tok_per_sec']:6.2f} tok/s  "
                f"x{stats['tok_per_sec'] / baseline_tok_per_sec[index, 0]:.2f}  alpha {stats['alpha'] or 0:.2f}")
    table, one_token = [], median_forward_sec(baselines, "target", (1,))
    for k, items in by_k.items():
        ratios = common.paired_ratios({(i, 0): s["tok_per_sec"] for i, _, s in items}, baseline_tok_per_sec)
        row = summarise([s for _, _, s in items], {"vs_target": ratios["geomean"],
                                                   "vs_target_by_prompt": ratios["by_prompt"]})
        verify = median_forward_sec([g for _, g, _ in items], "target", (k + 1,))
        verify_cost = verify / one_token if verify and one_token else None
        alpha, measured_verify = row["alpha"], verify_cost or 1.0
        table.append({"k": k, **row, "expected_speedup": expected_speedup(alpha, k, cost_ratio),
                      "break_even_alpha": break_even_alpha(k, cost_ratio), "verify_cost_ratio": verify_cost,
                      "expected_speedup_measured_verify": expected_speedup(alpha, k, cost_ratio, measured_verify),
                      "break_even_alpha_measured_verify": break_even_alpha(k, cost_ratio, measured_verify)})
    return table, [(f"ours k={k}", i, g) for k, items in by_k.items() for i, g, _ in items]


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


# --------------------------------------------------------------------------------------- lossless check
def first_divergence(reference, other, tokenizer, dtype: str) -> dict | None:
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
    gap = values[0] - values[ids.index(got)] if got in ids else None
    return {"position": position, "target_token": want, "other_token": got,
            "target_text": tokenizer.decode([want]), "other_text": tokenizer.decode([got]),
            "target_margin_logit": values[0] - values[1], "gap_logit": gap,
            "explained_by_rounding": gap is not None and gap <= NEAR_TIE_LOGIT.get(dtype, 0.0)}


def lossless_report(runs: dict, sweep_generations: list, tokenizer, dtype: str, temperature: float) -> dict:
    """Compare every greedy output of ours (and of transformers' assisted generation) with the target's."""
    if temperature > 0:
        # sampling: exactness is a distribution property, tested statistically in tests/test_speculative.py
        return {"checked": False, "reason": "sampling"}
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
    report.update({key: report["by_method"]["ours"][key] for key in ("n_runs", "n_identical", "divergences")})
    report["all_explained"] = all(d.get("explained_by_rounding") for d in report["divergences"])
    return report


# ------------------------------------------------------------------------------------------------ record
def build_record(*, pair: Pair, prompts: list, runs: dict, sweep: list, sweep_generations: list, cost: dict,
                 k: int, k_max: int, max_new_tokens: int, temperature: float, repeats: int, config: dict) -> dict:
    """The one `speculative` record: every method's numbers, the paired ratios, the k sweep, the lossless check."""
    ratios = paired_ratios(runs)
    methods = {}
    for method, items in runs.items():
        methods[method] = summarise([stats for _, _, stats in items], ratios[method])
        if method in ("ours", "ours_adaptive"):
            methods[method]["k"] = k if method == "ours" else f"adaptive, max {k_max}"
            methods[method]["acceptance_profile"] = acceptance_profile([g for _, g, _ in items])
    if "ours" in methods:
        methods["ours"]["expected_speedup"] = expected_speedup(methods["ours"]["alpha"], k, cost["cost_ratio"])
    adaptive = None
    if "ours_adaptive" in runs:
        k_trace = [step_k for _, g, _ in runs["ours_adaptive"] for step_k in g.k_trace]
        drafted = [step["k"] for _, g, _ in runs["ours_adaptive"] for step in g.steps]
        adaptive = {**methods["ours_adaptive"], "k_max": k_max,
                    "plain_step_share": k_trace.count(0) / len(k_trace) if k_trace else None,
                    "k_drafted_histogram": [drafted.count(n) for n in range(k_max + 1)],
                    "never_slower_than_target": all(r >= 1 for r in methods["ours_adaptive"]["speedup_by_prompt"])}
    if sweep:
        cost = {**cost, "best_k_measured": max(sweep, key=lambda row: row["speedup"])["k"]}
    return common.result_record(
        "speculative", config=config, environment_block=common.environment(pair.device),
        draft=pair.draft.identity(), target=pair.target.identity(), dtype=pair.target.dtype,
        max_new_tokens=max_new_tokens, temperature=temperature, k=k, repeats=repeats,
        prompts=[{key: v for key, v in p.items() if key != "ids"} for p in prompts], methods=methods,
        ours_method=next((m for m in ("ours_adaptive", "ours") if m in runs), None), ratios=ratios, k_sweep=sweep,
        adaptive=adaptive, cost=cost, universal=pair.universal,
        break_even=[{"k": n, "break_even_alpha": break_even_alpha(n, cost["cost_ratio"])} for n in range(1, k_max + 1)],
        lossless=lossless_report(runs, sweep_generations, pair.target.tokenizer, pair.target.dtype, temperature),
        assisted_defaults=transformers_internals.assisted_defaults(pair.draft.model.generation_config),
        n_generations=sum(len(items) for items in runs.values()))


# ------------------------------------------------------------------------------------------------ session
@contextlib.contextmanager
def torch_session(threads: int):
    """Threads fixed (or chosen once from the idle cores), transformers' chatter off, inference mode; and the
    process left as found afterwards (the tests call main() in-process)."""
    import torch
    from transformers.utils import logging as hf_logging
    saved_threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    try:
        cpu = common.CpuThreads(fixed=threads)
        hf_logging.set_verbosity_error()  # generate()'s deprecation chatter would bury the measurements
        with torch.inference_mode():
            yield cpu
    finally:
        torch.set_num_threads(saved_threads)
        hf_logging.set_verbosity(verbosity)

