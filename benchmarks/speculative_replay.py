"""Replay drafting rules without timing noise: how adaptive k's rule was chosen, and a way to check it on a pair.

The target writes its greedy output once; the draft then reads that output token by token (its own KV cache, as in
real decoding) and records, at every position, its greedy guess and its confidence (top probability). Along the
target's greedy path that is all a drafting rule ever sees: a draft token is accepted exactly when it equals the
target's token, and everything after the first miss in a step is thrown away. So each rule can be replayed over the
same recorded positions, and priced with a cost model measured once in this run: a draft forward costs c target
steps, a verify pass over n tokens 1 + s (n - 1). Modelled speedup = new tokens / modelled cost.

Rules: fixed k; transformers' assisted generation default (draft up to 20, stop after a token under 0.4
confidence); and AdaptiveK from speculative.py (the real class, fed the modelled timings).

    python benchmarks/speculative_replay.py                          # Qwen2.5-Coder 0.5B (int8) -> 1.5B, bf16
    python benchmarks/speculative_replay.py --draft-weights same     # the bf16 draft
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import models  # noqa: E402
import speculative  # noqa: E402
import speculative_pair  # noqa: E402

TRANSFORMERS_DEFAULT = {"cap": 20, "stop_after_confidence_below": 0.4}  # num_assistant_tokens, confidence threshold


def record_path(pair, prompt_ids: list, max_new_tokens: int) -> dict:
    """The target's greedy tokens, and the draft's guess and confidence at each of them (incremental, cached)."""
    reference = speculative.reference_generate(pair.target.model, prompt_ids, max_new_tokens=max_new_tokens,
                                               stop_ids=pair.stop_ids, device=pair.device)
    cache, guesses, confidences = models.new_cache(), [], []
    feed = prompt_ids
    for token in reference.tokens:
        logits = models.forward_logits(pair.draft.model, feed, cache)[-1]
        probs = models.token_probabilities(logits)
        guesses.append(int(probs.argmax()))
        confidences.append(float(probs.max()))
        feed = [token]
    return {"tokens": reference.tokens, "guesses": guesses, "confidences": confidences}


def measure_costs(pair, prompt_ids: list, repeats: int = 9) -> tuple:
    """(c, s): draft 1-token forward over target 1-token forward, and the verify slope per extra token."""

    def median_sec(model, n_tokens: int) -> float:
        cache, times = models.new_cache(), []
        models.forward_logits(model, prompt_ids, cache)
        for _ in range(repeats):
            speculative.timed_forward(model, [100] * n_tokens, cache, trace=times, role="x", device=pair.device,
                                      n_logits=n_tokens)
            speculative.rollback(cache, len(prompt_ids))
        return statistics.median(sec for _, _, sec in times)
    one = median_sec(pair.target.model, 1)  # the caller holds torch.inference_mode()
    nine = median_sec(pair.target.model, 9)
    draft = median_sec(pair.draft.model, 1)
    return draft / one, max(0.0, (nine - one) / one / 8)


def replay(path: dict, c: float, s: float, rule) -> float:
    """Modelled speedup of one drafting rule over the target alone along one recorded path."""
    tokens, guesses, confidences = path["tokens"], path["guesses"], path["confidences"]
    position, cost = 1, 0.0  # the first new token comes from the prefill, as in both methods
    adaptive = rule if not isinstance(rule, dict) else None
    while position < len(tokens):
        cap = min(adaptive.k if adaptive else rule["cap"], len(tokens) - position - 1)
        k, path_probability = 0, 1.0
        while k < cap:
            confidence = confidences[position + k]
            k += 1
            path_probability *= confidence
            if adaptive and path_probability < adaptive.stop_below:
                break
            if not adaptive and confidence < rule.get("stop_after_confidence_below", 0.0):
                break
        accepted = 0
        while accepted < k and guesses[position + accepted] == tokens[position + accepted]:
            accepted += 1
        step_cost = k * c + 1 + s * k
        if adaptive:  # modelled timings, in units of one 1-token target forward
            adaptive.update(k, accepted, [("draft", 1, c)] * k + [("target", k + 1, 1 + s * k)],
                            confidences[position:position + k])
        cost, position = cost + step_cost, position + accepted + 1
    return (len(tokens) - 1) / cost


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--draft", default="qwen-coder-0.5b", help="draft model: registry name or folder")
    parser.add_argument("--target", default="qwen-coder-1.5b", help="target model: registry name or folder")
    parser.add_argument("--draft-weights", default="int8", choices=("int8", "same"),
                        help="the draft's Linear layers in int8, or in the target's dtype (as in speculative_demo.py)")
    parser.add_argument("--n-prompts", type=common.positive_int, default=4, choices=range(1, 5), metavar="1..4",
                        help="built-in prompts, alternating code and prose")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=128, help="tokens of each recorded path")
    parser.add_argument("--k-max", type=common.positive_int, default=16, help="most tokens adaptive k drafts")
    # one thread: a replay on a shared 2-core machine, timings only for c and s
    common.add_common_flags(parser, "--threads", "--models-dir", defaults={"--threads": 1})
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    with speculative_pair.torch_session(args.threads):
        pair = speculative_pair.load_pair(
            draft=args.draft, target=args.target, device="cpu", dtype="bfloat16", target_quantize="none",
            universal=False, int8_draft=args.draft_weights == "int8", pack_weights=True, models_dir=args.models_dir,
            log=print)
        prompts = speculative_pair.encode_prompts(pair, n_prompts=args.n_prompts)
        c, s = measure_costs(pair, prompts[0]["ids"])
        paths = [record_path(pair, p["ids"], args.max_new_tokens) for p in prompts]
    print(f"{pair.draft.resolved.label} ({pair.draft.quantize}) -> {pair.target.resolved.label}: measured c = {c:.3f}, "
          f"s = {s:.3f}; draft agreement along the target's path: "
          + ", ".join(f"{p['kind']} {statistics.fmean(g == t for g, t in zip(q['guesses'], q['tokens'])):.2f}"
                      for p, q in zip(prompts, paths)))
    rules = [(f"fixed k={k}", lambda k=k: {"cap": k}) for k in (1, 2, 3, 4, 6, 8)]
    rules += [("transformers default (20, stop < 0.4)", lambda: TRANSFORMERS_DEFAULT),
              (f"adaptive k (max {args.k_max})", lambda: speculative.AdaptiveK(k_max=args.k_max))]
    print(f"\nmodelled speedup over the target alone ({' '.join(p['kind'] for p in prompts)}; geometric mean)")
    for name, make in rules:
        speedups = [replay(path, c, s, make()) for path in paths]
        print(f"  {name:<38} {common.geometric_mean(speedups):5.2f}x  (" + " ".join(f"{x:.2f}" for x in speedups)
              + ")")
    print("(a model, not a measurement: speculative_demo.py measures)")
    return 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
