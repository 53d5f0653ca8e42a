"""Teach a small model a new skill in minutes with LoRA, and prove it with before/after numbers.

The task (data/README.md): turn a free-text shipping request into a fixed-key JSON "order record" in a house
format no base model can guess. A base model scores ~0 exact matches on the held-out set; a LoRA adapter
trained on 100 examples (QLoRA on a CUDA GPU, plain LoRA on CPU, trl's SFTTrainer, the model's own chat
template, loss on the answer tokens only) gets most of them right. The script measures the held-out exact
match and loss before and after on the same examples, shows sample outputs side by side, checks that the
adapter weights and the outputs changed, saves the adapter, and writes a results JSON (kind "finetune").

Ctrl-C during training saves a checkpoint; `--resume` continues from it, and the training figures of the
record are totals over both parts. `--eval-adapter DIR` reloads a saved adapter and re-measures the held-out
numbers, which must reproduce the "after" figures. The recipe, data, loss, training and evaluation live in
finetune.py; this script is the command line and the display.

    python finetune_demo.py                                  # SmolLM2-135M on CPU: 0% -> ~76% in ~1 min (2 cores)
    python finetune_demo.py --model qwen-coder-0.5b          # Qwen2.5-Coder-0.5B: 0% -> ~96% in ~2 min (2 cores)
    python finetune_demo.py --model tinyllama-1.1b --device cuda   # QLoRA (4-bit base) on an 8 GB GPU
    python finetune_demo.py --eval-adapter runs/finetune-smollm2-135m/adapter
"""
from __future__ import annotations

from pathlib import Path

import common
import finetune
import models


# ----------------------------------------------------------------------------------------------- display
def print_summary(console, before: dict, after: dict, train_record: dict, samples: list[dict]) -> None:
    from rich.table import Table
    table = Table(title="Held-out results (same examples before and after)")
    for column in ("", "exact match", "field F1", "valid JSON", "held-out loss"):
        table.add_column(column, justify="right" if column else "left")
    for label, row in (("before", before), ("after", after)):
        table.add_row(label, f"{row['metric']:.1%} ({row['n_exact']}/{row['n']})", f"{row['field_f1']:.1%}",
                      f"{row['json_valid_rate']:.0%}", f"{row['heldout_loss']:.3f}")
    console.print(table)
    t = train_record
    parts = f" (totals over {t['n_parts']} runs)" if t["n_parts"] > 1 else \
        f" (resumed part only, from step {t['resumed_from_step']})" if t["resumed_from_step"] else ""
    console.print(f"Training{parts}: {t['n_steps']} steps in {t['train_sec']:.1f} s, "
                  f"{t['tokens_per_sec'] or 0:,.0f} tok/s, loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}, "
                  f"peak RSS {common.human_bytes(t['peak_rss_bytes'])}"
                  + (f", peak VRAM {common.human_bytes(t['peak_vram_allocated_bytes'])}"
                     if t.get("peak_vram_allocated_bytes") else ""))
    sample_table = Table(title="Sample held-out outputs", show_lines=True)
    for column in ("input", "expected", "before", "after"):
        sample_table.add_column(column, overflow="fold")
    for sample in samples:
        sample_table.add_row(*(sample[key] for key in ("input", "expected", "before", "after")))
    console.print(sample_table)



def print_checks(console, checks: dict) -> None:
    console.print(f"Checks: adapter weights changed: {checks['adapter_weights_changed']} "
                  f"({checks['n_tensors_changed']}/{checks['n_tensors']} tensors), outputs changed on "
                  f"{checks['outputs_changed_fraction']:.0%} of held-out examples, saved adapter identical to "
                  f"trained weights: {checks['adapter_roundtrip_identical']}")


def print_reevaluation(console, outcome: dict) -> None:
    result, saved = outcome["result"], outcome["saved"]
    console.print(f"reloaded adapter: exact match {result['metric']:.1%} ({result['n_exact']}/{result['n']}), "
                  f"field F1 {result['field_f1']:.1%}, held-out loss {result['heldout_loss']:.4f}")
    if saved:
        console.print(f"training run said: exact match {saved['metric']:.1%}, held-out loss "
                      f"{saved['heldout_loss']:.4f}; {outcome['n_same']}/{outcome['n']} answers identical -> "
                      f"{'reproduced' if outcome['reproduced'] else 'NOT reproduced'}")


# -------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None, saved: dict | None = None):
    """saved: settings that replace the defaults (--eval-adapter's training run); the command line still wins."""
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name, local folder, .gguf or hub id")
    # auto: QLoRA (a 4-bit base) on CUDA, plain LoRA elsewhere
    common.add_common_flags(parser, "--device", "--dtype", "--quantize", "--threads", "--models-dir", "--results-dir",
                            defaults={"--quantize": "auto"})  # --seed is the recipe's (finetune.add_recipe_flags)
    parser.add_argument("--train-file", type=Path, default=finetune.TRAIN_FILE, help="training examples (JSON lines)")
    parser.add_argument("--heldout-file", type=Path, default=finetune.HELDOUT_FILE,
                        help="held-out examples (JSON lines)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="checkpoints and adapter; when not given, runs/finetune-<model>")
    finetune.add_recipe_flags(parser)
    parser.add_argument("--eval-batch-size", type=common.positive_int, default=finetune.EVAL_BATCH_SIZE,
                        help="held-out prompts generated together")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=None,
                        help=f"answer length cap; when not given, the longest held-out answer + "
                             f"{finetune.ANSWER_SLACK_TOKENS} tokens")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--eval-adapter", type=Path, default=None, metavar="DIR",
                        help="only reload this saved adapter and measure the held-out set")
    common.deprecated_alias(parser, "--warmup", "--warmup-steps")
    if saved:
        parser.set_defaults(**saved)
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.eval_adapter:  # re-measure as the training run did, unless this command line says otherwise
        meta = finetune.read_meta(args.eval_adapter)
        args = parse_args(argv, saved={key: meta[key] for key in finetune.META_SETTINGS if key in meta})
    console = common.make_console()
    if args.eval_adapter:
        outcome = finetune.reevaluate_adapter(
            args.eval_adapter, model=args.model, heldout_file=args.heldout_file, device=args.device,
            dtype=args.dtype, quantize=args.quantize, models_dir=args.models_dir, threads=args.threads,
            eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens, console=console)
        print_reevaluation(console, outcome)
        return 0 if outcome["reproduced"] else 1
    outcome = finetune.run_finetune(
        model=args.model, recipe=finetune.recipe_from(vars(args)), train_file=args.train_file,
        heldout_file=args.heldout_file, output_dir=args.output_dir, results_dir=args.results_dir,
        models_dir=args.models_dir, device=args.device, dtype=args.dtype, quantize=args.quantize,
        threads=args.threads, eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
        resume=args.resume, console=console)
    if outcome is None:
        return 130
    record = outcome["record"]
    print_summary(console, record["before"], record["after"], record["train"], record["samples"])
    print_checks(console, record["checks"])
    console.print(f"Adapter: {record['adapter_dir']}   results: {outcome['path']}   total {record['run_sec']:.0f} s")
    return 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
