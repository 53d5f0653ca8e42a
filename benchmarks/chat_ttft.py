"""Chat time to first token after a long turn: chat.py keeps its KV cache across turns, so a short turn after a
~2,000-token one should wait only for its own new tokens.

Why: without the cache every turn re-encodes the whole history, and after one long message each later short turn
waited seconds for its first token. The goal (issue 13) is a TTFT within 1.5x of the same short turn in a fresh
chat. One process, one model, the same short turn three ways, alternated round by round so that a noisy shared
machine slows all three alike:

  fresh      the short turn as the first turn of a new chat (the baseline);
  after      the short turn after a ~2,000-token turn, with the cache that turn left (what the chat does);
  re-encode  the same history with an empty cache (what the chat did before: the whole history is computed).

It prints each TTFT's median and raw samples, and the ratios after/fresh (the goal) and re-encode/fresh.

    python benchmarks/chat_ttft.py                                  # smollm2-135m, 5 rounds
    python benchmarks/chat_ttft.py --threads 1 --long-tokens 2000 --rounds 7
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import chat  # noqa: E402
import common  # noqa: E402

import models  # noqa: E402

TARGET_RATIO = 1.5  # the goal: after-long TTFT <= 1.5x the fresh-chat TTFT
SHORT_TURN = "Which colour did item 7 have?"
REPLY_TOKENS = 8  # only the first token is timed; a few more make the next turn's prefix realistic


def long_message(tokenizer, n_tokens: int) -> str:
    """A deterministic list that tokenizes to about n_tokens (a pasted document, as in the issue's report)."""
    colours = ("red", "green", "blue", "yellow", "black", "white", "orange")
    lines = []
    while len(tokenizer("\n".join(lines))["input_ids"]) < n_tokens:
        i = len(lines)
        lines.append(f"Item {i}: a {colours[i % len(colours)]} box holding {i * 7 % 13} marbles.")
    return "Here is my inventory:\n" + "\n".join(lines) + "\nPlease remember it."


def turn(side, text: str, settings):
    """One chat turn on this side (as the chat answers it); returns its ReplyStats."""
    _, stats, n_dropped = chat.turn(side, text, settings)
    if n_dropped:
        raise common.UserError("The long turn does not fit the context window; pass a smaller --long-tokens.")
    return stats


def measure_round(model, settings, long_text: str) -> dict:
    """TTFT of the short turn fresh, after the long turn (cache kept) and after it with the history re-encoded."""
    fresh = turn(chat.Side(model), SHORT_TURN, settings)
    side = chat.Side(model)
    long_stats = turn(side, long_text, settings)
    history = list(side.history)
    after = turn(side, SHORT_TURN, settings)
    reencode = turn(chat.Side(model, history=history), SHORT_TURN, settings)
    return {"fresh": fresh, "after": after, "re-encode": reencode, "long": long_stats}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name or model folder")
    parser.add_argument("--long-tokens", type=common.positive_int, default=2000,
                        help="length of the long turn's message, in tokens")
    parser.add_argument("--rounds", type=common.positive_int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--attention", default="as loaded", choices=("as loaded", "sdpa", "eager"),
                        help="attention kernel: the chat uses transformers' default (sdpa); eager is for comparison")
    # cpu by default: the KV-cache reuse this measures matters most where prefill is slow
    common.add_common_flags(parser, "--device", "--dtype", "--threads", "--models-dir", defaults={"--device": "cpu"})
    return parser.parse_args(argv)


def main_body(argv=None) -> int:
    args = parse_args(argv)
    model = chat.load_chat_model(args.model, device=args.device, dtype=args.dtype, quantize="none",
                                     context_tokens=args.long_tokens + 1024, models_dir=args.models_dir,
                                     log=lambda *_: None)
    if args.attention != "as loaded":
        model.loaded.model.set_attn_implementation(args.attention)
    threads = common.CpuThreads(args.threads, enabled=model.loaded.device == "cpu")
    settings = chat.Settings(system="", temperature=0.0, top_p=1.0, max_new_tokens=REPLY_TOKENS)
    long_text = long_message(model.loaded.tokenizer, args.long_tokens)
    print(f"{model.label} {model.loaded.dtype} on {model.loaded.device} ({common.cpu_name()}), attention "
          f"{args.attention}, torch threads: {threads.describe()}")
    measure_round(model, settings, long_text)  # warm-up, not counted
    rounds = [measure_round(model, settings, long_text) for _ in range(args.rounds)]
    first = rounds[0]
    print(f"long turn: {first['long'].n_prompt_tokens} prompt tokens (TTFT {first['long'].ttft_sec:.3f} s); "
          f"short turn: {first['fresh'].n_prompt_tokens} tokens fresh, {first['after'].n_prompt_tokens} after the "
          f"long turn of which {first['after'].n_cached_tokens} came from the cache")
    medians = {}
    for way in ("fresh", "after", "re-encode"):
        samples = [one[way].ttft_sec for one in rounds]
        medians[way] = statistics.median(samples)
        print(f"  TTFT {way:<9} median {medians[way]:.4f} s   samples " + " ".join(f"{s:.4f}" for s in samples))
    ratio = medians["after"] / medians["fresh"]
    print(f"after/fresh: {ratio:.2f}x (goal <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
          f"re-encode/fresh: {medians['re-encode'] / medians['fresh']:.2f}x")
    return 0


def main(argv=None) -> int:
    return common.run_cli(main_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
