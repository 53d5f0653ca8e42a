"""Speculative decoding, lossless, measured and visualised: a small draft model makes its big sibling faster
without changing a single token the big model writes. The algorithm is in speculative.py, the loading and
measuring in speculative_pair.py; this script is the command line and the display.

One run compares the target alone (our KV-cache loop and transformers' generate()), transformers' assisted
generation (`assistant_model=`) and ours (fixed k and adaptive k) on the same prompts, in interleaved rounds after
an uncounted warm-up; every run is divided by the target alone (and by assisted) of the same prompt and round.
It sweeps k, puts the expected speedup from the measured acceptance rate and cost ratio next to the measured one,
shows the break-even point, checks every greedy output against the target's own token for token, and draws the
text coloured by what happened to each token. One JSON record per run goes to results/.

    python speculative_demo.py                          # Qwen2.5-Coder 0.5B -> 1.5B, greedy, bf16 on CPU
    python speculative_demo.py --threads 1 --repeats 3 --n-prompts 4 --k-sweep '' \\
        --methods target_only,target_generate,assisted,ours,ours_adaptive    # the ratios vs assisted (~25 min)
    python speculative_demo.py --dtype float32 --max-new-tokens 64 --k-sweep 2,4,8   # the strict lossless check
    python speculative_demo.py --draft llama-3.2-1b --target llama-3.1-8b   # CUDA: target in 4-bit, fits 8 GB
    python speculative_demo.py --temperature 1.0        # sampling: exact, but the draft agrees less often
"""
from __future__ import annotations

import common
import speculative_pair as sp
from speculative import break_even_alpha

# How each generated token came about, and how the terminal shows it (markers when there is no colour).
TOKEN_STYLES = {"accepted": "green", "correction": "bold red", "bonus": "bold blue", "target": "yellow"}
PLAIN_MARKS = {"accepted": "{}", "correction": "[{}]", "bonus": "<{}>", "target": "{}"}
TOKEN_LEGEND = {"accepted": "draft token accepted", "correction": "target's correction after a rejection",
                "bonus": "bonus token (all drafts accepted)", "target": "target alone (prefill or k=0 step)"}


def honesty_notes(record: dict) -> list:
    """Plain sentences, printed after a run, on where speculative decoding did not pay (from the record's numbers)."""
    notes, cost, k = [], record["cost"], record["k"]
    if record["draft"]["quantization"] == sp.INT8_DRAFT:
        notes.append("the draft's Linear layers ran in int8 (--draft-weights int8) for transformers' assisted "
                     "generation and ours alike; the target was not quantized, so its output is unchanged.")
    if cost["cost_ratio"] is not None:
        notes.append(f"draft/target cost ratio c = {cost['cost_ratio']:.3f}; a {cost['verify_tokens']}-token "
                     f"verify pass costs {fmt(cost['verify_cost_ratio'])}x a 1-token target step here.")
    if (cost["verify_cost_ratio"] or 1.0) < 0.95:
        notes.append("timings were disturbed by other load: a multi-token verify pass measured cheaper than a "
                     "1-token step, which it cannot be; treat this run's speedups as rough and rerun with --repeats.")
    notes += [f"k={row['k']}: cannot pay at this cost ratio, even with every draft accepted."
              for row in record["k_sweep"] if row["break_even_alpha"] is None]
    ours = record["methods"].get("ours")
    if ours and cost["cost_ratio"] is not None:
        need = break_even_alpha(k, cost["cost_ratio"])
        need_measured = break_even_alpha(k, cost["cost_ratio"], cost["verify_cost_ratio"] or 1.0)
        for index, alpha in enumerate(ours["alpha_by_prompt"]):
            if alpha is not None and need is not None:
                notes.append(f"prompt {index + 1} ({record['prompts'][index]['kind']}), k={k}: alpha {alpha:.2f}; "
                             f"break-even {need:.2f} by Leviathan's model (c={cost['cost_ratio']:.2f}), "
                             f"{fmt(need_measured)} with the measured {fmt(cost['verify_cost_ratio'])}x verify pass; "
                             f"measured {ours['speedup_by_prompt'][index]:.2f}x.")
    for method in ("ours", "ours_adaptive", "assisted"):
        for index, ratio in enumerate(record["methods"].get(method, {}).get("speedup_by_prompt", [])):
            if ratio < 1:
                notes.append(f"{sp.METHOD_TITLES[method]} was slower than the target alone on prompt {index + 1} "
                             f"({record['prompts'][index]['kind']}): {ratio:.2f}x.")
    if record["temperature"] > 0 and ours:
        notes.append(f"sampling at temperature {record['temperature']}: a draft is kept with probability "
                     f"min(1, p/q), not on argmax agreement; measured alpha here: "
                     + ", ".join(fmt(a) for a in ours["alpha_by_prompt"]) + " (compare a greedy run).")
    return notes


# ---------------------------------------------------------------------------------------------- display
def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def token_pieces(tokenizer, tokens: list) -> list:
    """Each token's text, decoded incrementally so multi-byte characters split over tokens survive."""
    pieces, previous = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[:i + 1])
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode(tokens[i:i + 1]))
        previous = text
    return pieces


def render_tokens(console, fancy: bool, tokenizer, generation) -> None:
    from rich.text import Text
    pieces = token_pieces(tokenizer, generation.tokens)
    if fancy:
        text = Text()
        for piece, kind in zip(pieces, generation.kinds):
            text.append(piece, style=TOKEN_STYLES[kind])
        console.print(Text("  ").join(Text(TOKEN_LEGEND[k], style=s) for k, s in TOKEN_STYLES.items()))
        console.print(text)
    else:
        print("  ".join(PLAIN_MARKS[k].format(TOKEN_LEGEND[k]) for k in TOKEN_STYLES))
        print("".join(PLAIN_MARKS[kind].format(piece) for piece, kind in zip(pieces, generation.kinds)))


def bar(fraction: float, width: int, fancy: bool) -> str:
    return ("█" if fancy else "#") * round(max(0.0, min(1.0, fraction)) * width)


def render_profile(console, fancy: bool, profile: dict, title: str) -> None:
    console.print(f"\n{title}: accepted drafts per step ({profile['n_steps']} steps)")
    peak = max(profile["accepted_length_histogram"] or [1]) or 1
    for n, count in enumerate(profile["accepted_length_histogram"]):
        console.print(f"  {n:>2} accepted {count:>4}  {bar(count / peak, 40, fancy)}")
    console.print("acceptance by draft position (given the earlier drafts were accepted)")
    for i, rate in enumerate(profile["acceptance_by_position"]):
        shown = "  -" if rate is None else f"{rate:4.0%}"
        console.print(f"  draft {i + 1:>2}  {shown}  {bar(rate or 0.0, 40, fancy)}")


def render_summary(console, fancy: bool, record: dict) -> None:
    from rich import box
    from rich.table import Table
    style = box.SIMPLE if fancy else box.ASCII
    table = Table(title=f"{record['draft']['name']} -> {record['target']['name']}: the same prompts, every method "
                        f"({record['repeats']} interleaved round(s); speedups paired per prompt and round)", box=style)
    for column in ("method", "tok/s (median)", "vs target", "by prompt", "vs assisted", "accept rate",
                   "accepted/step", "draft time", "target time"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in record["methods"].items():
        ratios = record["ratios"][method]
        table.add_row(f"ours, k={row['k']}" if method == "ours" else sp.METHOD_TITLES[method],
                      fmt(row["tok_per_sec_median"]), fmt(ratios["vs_target"], ".2f", "x"),
                      " ".join(fmt(r) for r in ratios["vs_target_by_prompt"]),
                      fmt(ratios.get("vs_assisted"), ".2f", "x"), fmt(row["acceptance_rate"], ".0%"),
                      fmt(row["mean_accepted_per_step"]), fmt(row["draft_time_share"], ".0%"),
                      fmt(row["target_time_share"], ".0%"))
    console.print(table)
    if record["k_sweep"]:
        sweep = Table(title=f"k sweep (cost ratio c = {fmt(record['cost']['cost_ratio'], '.3f')}; expected = "
                            "Leviathan eq. 1 from measured alpha and c)", box=style)
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


def show(console, fancy: bool, record: dict, runs: dict, prompts: list, tokenizer) -> None:
    """The first round's text of ours coloured by token kind, its acceptance profile, the tables, the lossless
    check and the notes."""
    method = next((m for m in ("ours", "ours_adaptive") if m in runs), None)  # fixed k shows the pattern best
    if method:
        for index, generation, _ in runs[method][:len(prompts)]:
            console.print(f"\n[{sp.METHOD_TITLES[method]}, k={record['methods'][method]['k']}] prompt {index + 1} "
                          f"({prompts[index]['kind']}): {prompts[index]['text']}")
            render_tokens(console, fancy, tokenizer, generation)
        render_profile(console, fancy, record["methods"][method]["acceptance_profile"], sp.METHOD_TITLES[method])
    render_summary(console, fancy, record)
    render_lossless(console, record["lossless"])
    for note in honesty_notes(record):
        console.print(f"note: {note}")


# ------------------------------------------------------------------------------------------------- CLI
def method_list(text: str) -> list:
    import argparse
    methods = common.comma_list(sp.METHODS, "method")(text).split(",")
    if "target_only" not in methods:  # every speed-up is measured against it
        raise argparse.ArgumentTypeError(f"'{text}' must include target_only")
    return methods


def k_list(text: str) -> list:
    return [common.positive_int(k.strip()) for k in text.split(",") if k.strip()]


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--draft", default="qwen-coder-0.5b", help="draft model: registry name, folder or .gguf")
    parser.add_argument("--target", default="qwen-coder-1.5b", help="target model: registry name, folder or .gguf")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); none = the built-in set")
    parser.add_argument("--n-prompts", type=common.positive_int, default=2, metavar=f"1..{len(sp.DEFAULT_PROMPTS)}",
                        choices=range(1, len(sp.DEFAULT_PROMPTS) + 1),
                        help="built-in prompts, alternating code and prose")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=128, help="tokens to generate per run")
    parser.add_argument("--k", type=common.positive_int, default=5, help="draft tokens per step of ours, fixed k")
    parser.add_argument("--k-max", type=common.positive_int, default=16, help="most tokens adaptive k drafts per step")
    parser.add_argument("--k-sweep", type=k_list, default="1,2,3,4,6,8",
                        help="comma-separated k values to sweep ('' = none)")
    parser.add_argument("--methods", type=method_list, default="target_only,assisted,ours,ours_adaptive",
                        help=f"comma-separated, from {', '.join(sp.METHODS)}; target_only is required")
    parser.add_argument("--repeats", type=common.positive_int, default=1,
                        help="interleaved rounds of every method on every prompt; each prompt reports the median")
    parser.add_argument("--temperature", type=common.non_negative_float, default=0.0,
                        help="0 = greedy; > 0 samples (exact rejection sampling)")
    # float32 gives the strict lossless check
    common.add_common_flags(parser, "--device", "--dtype", "--seed", "--threads", "--models-dir", "--results-dir",
                            defaults={"--seed": 0})
    parser.add_argument("--target-quantize", default="auto", type=common.one_of(common.QUANTIZE_CHOICES,
                                                                                "quantization"),
                        metavar="{" + ",".join(common.QUANTIZE_CHOICES) + "}",
                        help="the target's bitsandbytes weights (the draft stays as loaded): auto = 4-bit for a "
                             "7B+ target on CUDA so the pair fits 8 GB, none otherwise")
    parser.add_argument("--universal", action="store_true",
                        help="if the tokenizers differ, run transformers' universal assisted generation "
                             "(assistant_tokenizer=) instead of refusing")
    parser.add_argument("--cpu-kernels", default="packed", choices=("packed", "default"),
                        help="packed = oneDNN pre-packed Linear weights for every method (a k+1-token verify pass "
                             "then costs about one decode step); default = torch's stock kernels")
    parser.add_argument("--draft-weights", default="int8", choices=("int8", "same"),
                        help="CPU: int8 = the draft's Linear layers in int8 (fbgemm), about two thirds of the cost "
                             "of a bf16 draft step, for ours and transformers' assisted generation alike; same = the "
                             "target's dtype. The target is never quantized, so the output does not change")
    parser.add_argument("--no-save", action="store_true", help="do not write results/speculative-*.json")
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_save:
        common.check_writable(args.results_dir, what="results folder")
    console = common.make_console(markup=False)  # generated text is printed as is: "[x]" is no style tag
    fancy = console.is_terminal and not console.no_color
    with sp.torch_session(args.threads) as cpu:
        pair = sp.load_pair(draft=args.draft, target=args.target, device=args.device, dtype=args.dtype,
                            target_quantize=args.target_quantize, universal=args.universal,
                            models_dir=args.models_dir, int8_draft=args.draft_weights == "int8",
                            pack_weights=args.cpu_kernels == "packed", log=console.print)
        methods, ks = args.methods, args.k_sweep
        if pair.universal:  # our algorithm needs shared token ids; only the universal assisted path can run
            console.print("tokenizers differ: running transformers' universal assisted generation only.")
            methods, ks = [m for m in methods if m in ("target_only", "target_generate", "assisted")], []
        prompts = sp.encode_prompts(pair, texts=args.prompt, n_prompts=args.n_prompts)
        console.print(f"{pair.draft.resolved.label} ({pair.draft.quantize}) -> {pair.target.resolved.label} on "
                      f"{pair.device}, {pair.target.dtype}, {cpu.describe()} threads, {len(prompts)} prompts x "
                      f"{args.max_new_tokens} tokens, temperature {args.temperature}")
        runs = sp.measure(pair, prompts, methods, repeats=args.repeats, max_new_tokens=args.max_new_tokens,
                          k=args.k, k_max=args.k_max, temperature=args.temperature, seed=args.seed,
                          log=console.print)
        cost = sp.measured_costs(runs, k=args.k)
        sweep, sweep_runs = sp.k_sweep(pair, prompts, ks, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, seed=args.seed, cost_ratio=cost["cost_ratio"],
                                       log=console.print) if ks else ([], [])
        record = sp.build_record(pair=pair, prompts=prompts, runs=runs, sweep=sweep, sweep_generations=sweep_runs,
                                 cost=cost, k=args.k, k_max=args.k_max, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, repeats=args.repeats, config=vars(args))
    show(console, fancy, record, runs, prompts, pair.target.tokenizer)
    if not args.no_save:
        name = f"speculative-{common.safe_name(pair.draft.resolved.label)}-to-" \
               f"{common.safe_name(pair.target.resolved.label)}-{common.utc_stamp()}.json"
        console.print(f"wrote {common.write_result(record, results_dir=args.results_dir, name=name)}")
    return 1 if record["lossless"]["checked"] and not record["lossless"]["all_explained"] else 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
