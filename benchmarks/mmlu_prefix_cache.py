"""MMLU prefix-cache speedup: questions/s of mmlu.py's prefix-cached scoring vs plain full-prompt scoring.

Why: a 5-shot MMLU prompt is ~80% few-shot prefix that is the same for every question of a subject. mmlu.py
computes that prefix's KV cache once per subject and scores only each question's own tokens (batched). The goal
is >= 3x the questions per second of plain scoring with *identical predictions*. Both run in one process, on
the same questions, alternating subject by subject so that a noisy shared machine slows both alike; the script
prints the ratio, whether every prediction matches, and the largest log-likelihood difference.

Plain scoring is the reference lm-eval computes: each question's full prompt in one forward pass (batch 1,
no cache), the log-likelihood of " A".." D" read from the last position.

    python benchmarks/mmlu_prefix_cache.py                       # smollm2-135m, 3 subjects x 32 questions
    python benchmarks/mmlu_prefix_cache.py --dtype bfloat16 --threads 1 --out /tmp/mmlu_prefix_cache.json
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import mmlu  # noqa: E402  (torch-free at import: --help stays instant)
import models  # noqa: E402

TARGET_RATIO = 3.0  # the goal: prefix-cached >= 3x plain questions/s


def time_scoring(loaded, subject, data, use_cache: bool, batch_size: int) -> tuple[list[list[float]], float]:
    """Scores of one subject's questions and the seconds they took (prefix cache included when used)."""
    common.sync(loaded.device)
    start = time.perf_counter()
    scores, _ = mmlu.score_mmlu_subject(loaded.model, loaded.tokenizer, subject, data["exemplars"],
                                        data["questions"], use_cache=use_cache, batch_size=batch_size)
    common.sync(loaded.device)
    return scores, time.perf_counter() - start


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name, folder, .gguf file or hub id")
    parser.add_argument("--subjects", type=common.comma_list(mmlu.ALL_SUBJECTS, "MMLU subject",
                                                             listed_by=mmlu.LIST_SUBJECTS),
                        default="high_school_biology,world_religions,marketing", help="comma-separated MMLU subjects")
    # The prefix is paid once per subject, so a handful of questions understates the gain (real subjects have
    # 100-545 questions); 32 keeps the slow plain reference to a few minutes on a 2-core CPU.
    parser.add_argument("--limit", type=common.positive_int, default=32, help="questions per subject (seeded choice)")
    parser.add_argument("--shots", type=common.non_negative_int, default=5, help="few-shot exemplars")
    parser.add_argument("--batch-size", type=common.positive_int, default=8,
                        help="suffixes per forward pass in cached scoring")
    # float32 by default: the comparison is about equal predictions, and bf16 rounding (~0.1 nat on CPU) can
    # flip a near-tie between two letters whichever way the prompt is split; pass --dtype bfloat16 to see it.
    common.add_common_flags(parser, "--device", "--dtype", "--seed", "--threads", "--models-dir",
                            defaults={"--dtype": "float32"})
    parser.add_argument("--out", type=Path, help="also write the figures as a JSON record here")
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    import mmlu
    if args.out:
        common.check_writable(args.out.parent, what="output folder")
    common.CpuThreads(args.threads, enabled=models.pick_device(args.device) == "cpu")
    loaded = models.load_model(args.model, device=args.device, dtype=args.dtype, models_dir=args.models_dir)
    subjects = args.subjects.split(",")
    data, _ = mmlu.load_mmlu(subjects, args.shots, args.limit, args.seed, use_hub=False,
                             cache_dir=args.models_dir / ".wheels")
    # Warm-up (not counted): first calls pay for lazy initialisation in torch.
    warm = {"exemplars": data[subjects[0]]["exemplars"], "questions": data[subjects[0]]["questions"][:2]}
    time_scoring(loaded, subjects[0], warm, True, args.batch_size)
    time_scoring(loaded, subjects[0], warm, False, 1)
    # plain: lm-eval's batch-1 reference; batched: the same full prompts right-padded together (what
    # lm-eval --batch_size does): shows how much batching alone gives, and the numerical noise floor of plain
    # scoring itself (in bf16 two shapes of the same computation round differently).
    methods = {"plain": (False, 1), "plain_batched": (False, args.batch_size), "cached": (True, args.batch_size)}
    seconds = dict.fromkeys(methods, 0.0)
    agree = dict.fromkeys(methods, 0)
    max_diff = dict.fromkeys(methods, 0.0)
    n_questions, rows = 0, []
    for subject in subjects:
        scores, row = {}, {"subject": subject}
        for method, (use_cache, batch_size) in methods.items():
            scores[method], sec = time_scoring(loaded, subject, data[subject], use_cache, batch_size)
            seconds[method] += sec
            same = sum(mmlu.argmax(a) == mmlu.argmax(b) for a, b in zip(scores["plain"], scores[method]))
            diff = max(abs(x - y) for a, b in zip(scores["plain"], scores[method]) for x, y in zip(a, b))
            agree[method] += same
            max_diff[method] = max(max_diff[method], diff)
            row[method] = {"sec": sec, "same_predictions_as_plain": same, "max_abs_loglik_diff": diff}
        n = len(scores["plain"])
        n_questions += n
        row["n"] = n
        rows.append(row)
        print(f"{subject:>28}: {n:3d} q  plain {n / row['plain']['sec']:6.2f} q/s  batched "
              f"{n / row['plain_batched']['sec']:6.2f} q/s ({row['plain_batched']['same_predictions_as_plain']}/{n} "
              f"same)  cached {n / row['cached']['sec']:6.2f} q/s ({row['cached']['same_predictions_as_plain']}/{n} "
              f"same, max |d loglik| {row['cached']['max_abs_loglik_diff']:.1e})", flush=True)
    ratio = seconds["plain"] / seconds["cached"]
    identical = agree["cached"] == n_questions
    print(f"\n{loaded.resolved.label} {loaded.dtype} on {loaded.device} ({common.cpu_name()}, "
          f"{common.environment(loaded.device)['torch_threads']} threads), {n_questions} questions, {args.shots}-shot")
    for method in methods:
        print(f"{method:>14}: {n_questions / seconds[method]:6.2f} questions/s, predictions equal to plain "
              f"{agree[method]}/{n_questions}, max |d loglik| {max_diff[method]:.2e}")
    print(f"speedup cached vs plain {ratio:.2f}x (goal >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'not met'}); vs plain batched "
          f"{seconds['plain_batched'] / seconds['cached']:.2f}x; predictions identical: {identical}")
    if args.out:
        record = common.result_record("mmlu_prefix_cache", vars(args), common.environment(loaded.device),
                                      model=loaded.identity(), n_questions=n_questions, speedup=ratio,
                                      questions_per_sec={m: n_questions / seconds[m] for m in methods},
                                      same_predictions_as_plain=agree, max_abs_loglik_diff=max_diff,
                                      identical_predictions=identical, subjects=rows)
        print(f"written: {common.write_result(record, Path(args.out).parent, Path(args.out).name)}")
    return 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
