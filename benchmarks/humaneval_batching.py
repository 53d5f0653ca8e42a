"""HumanEval generation speed-up: humaneval.py's batched generation vs the same code at batch size 1.

Why: benchmark.py's HumanEval phase used to generate one problem at a time. On a CPU a decode step is bound by
reading the weights, so several rows cost little more than one; on a GPU the gap is larger still. The goal is
the phase's generation >= 3x faster than batch size 1 on qwen-coder-0.5b, with *identical* greedy completions
in fp32. Both arms run in one process on the same problems, batch 1 split around the batched arm (A-B-A) so
that a drifting load on a shared machine slows both alike. The script prints the ratio, whether
every completion matches, and where one does not, the batch-1 run's logit gap at the first differing token
(bf16 rounds differently in a different batch shape and may swap two near-tied tokens; in fp32 it must not).

--reference-generate adds a third arm: transformers' generate() at batch size 1 with a stop-sequence criterion,
the code benchmark.py ran before batching, to show the completions are the same as they were.

    python benchmarks/humaneval_batching.py --threads 1                  # qwen-coder-0.5b, 20 problems, fp32
    python benchmarks/humaneval_batching.py --dtype bfloat16 --limit 16 --threads 1 --out /tmp/he_batch.json
    python benchmarks/humaneval_batching.py --cpu-kernels stock --threads 1  # batching alone, without packing
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import humaneval  # noqa: E402  (light at import: torch and transformers load inside its functions)
import models  # noqa: E402

TARGET_RATIO = 3.0  # the goal: batched >= 3x batch size 1
N_TOP_LOGITS = 8  # kept per step, to read the logit gap where two runs part


def time_generation(loaded, jobs, *, batch_size: int, max_new_tokens: int, cpu_kernels: str = "packed"
                    ) -> tuple[dict, float]:
    """{task_id: result} of greedy generation at this batch size, and the seconds it took (packing the weights
    for a batched arm on CPU, and putting them back, included)."""
    common.sync(loaded.device)
    start = time.perf_counter()
    results = {job.task_id: result for job, result in humaneval.generate_jobs(
        loaded, jobs, max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size,
        n_top_logits=N_TOP_LOGITS, cpu_kernels=cpu_kernels)}
    common.sync(loaded.device)
    return results, time.perf_counter() - start


def generate_with_transformers(loaded, prompt: str, max_new_tokens: int) -> list[int]:
    """The pre-batching path: transformers' generate(), greedy, batch 1, stopping once the text holds a stop
    sequence (checked on the last tokens, as humaneval.hits_stop_sequence does). Returns the new token ids."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    tokenizer = loaded.tokenizer
    inputs = tokenizer(prompt, return_tensors="pt").to(loaded.device)
    n_prompt, lead = inputs["input_ids"].shape[1], humaneval.prompt_lead(prompt)

    class StopOnSequences(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = humaneval.hits_stop_sequence(tokenizer, input_ids[0, n_prompt:].tolist(), lead)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       temperature=None, top_p=None, top_k=None,
                                       pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=models.stop_token_ids(tokenizer, loaded.resolved.spec),
                                       stopping_criteria=StoppingCriteriaList([StopOnSequences()]))
    return output[0, n_prompt:].tolist()


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default="qwen-coder-0.5b", help="registry name, folder, .gguf file or hub id")
    parser.add_argument("--limit", type=common.positive_int, default=humaneval.DEFAULT_LIMIT,
                        help="problems (benchmark.py's seeded choice and default count)")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=humaneval.DEFAULT_MAX_NEW_TOKENS,
                        help="longest completion per problem, in tokens (benchmark.py's default)")
    parser.add_argument("--batch-size", type=common.non_negative_int, default=0,
                        help="rows of the batched arm; 0 = automatic, from free memory, as benchmark.py")
    parser.add_argument("--cpu-kernels", choices=("packed", "stock"), default="packed",
                        help="the batched arm's Linear kernels on CPU: oneDNN-packed weights (benchmark.py's choice) "
                             "or torch's stock ones, to show what packing adds (batch 1 always runs stock)")
    parser.add_argument("--reference-generate", action="store_true",
                        help="also run transformers' generate() at batch 1 (the pre-batching code) and compare")
    # float32 by default: the comparison is about equal completions; bf16 may swap near-tied tokens (reported).
    common.add_common_flags(parser, "--device", "--dtype", "--seed", "--threads", "--models-dir",
                            defaults={"--dtype": "float32"})
    parser.add_argument("--out", type=Path, help="also write the figures as a JSON record here")
    return parser.parse_args(argv)


def compare(reference: dict, batched: dict, task_ids: list[str], dtype: str) -> list[dict]:
    rows = []
    for task_id in task_ids:
        divergence = humaneval.first_divergence(reference[task_id], batched[task_id], dtype)
        rows.append({"task_id": task_id, "n_new_tokens": reference[task_id]["n_new_tokens"],
                     "identical": divergence is None, "first_divergence": divergence})
    return rows


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.out:
        common.check_writable(args.out.parent, what="output folder")
    common.CpuThreads(args.threads, enabled=models.pick_device(args.device) == "cpu")
    loaded = models.load_model(args.model, device=args.device, dtype=args.dtype, models_dir=args.models_dir)
    problems, task_ids = humaneval.humaneval_subset(args.limit, args.seed)
    jobs = [humaneval.Job(t, 0, problems[t]["prompt"], 0) for t in task_ids]
    batch_size = humaneval.choose_batch_size(loaded, jobs, requested=args.batch_size,
                                             max_new_tokens=args.max_new_tokens)
    time_generation(loaded, jobs[:1], batch_size=1, max_new_tokens=4)  # warm-up: lazy init, not counted
    # Batch 1 runs half before and half after the batched arm (A-B-A), so a drift in the machine's load hits both.
    half = len(jobs) // 2
    results, seconds = {"batch_1": {}, "batched": {}}, {"batch_1": 0.0, "batched": 0.0}
    for arm, part, rows in (("batch_1", jobs[:half], 1), ("batched", jobs, batch_size), ("batch_1", jobs[half:], 1)):
        found, sec = time_generation(loaded, part, batch_size=rows, max_new_tokens=args.max_new_tokens,
                                     cpu_kernels=args.cpu_kernels)
        results[arm].update(found)
        seconds[arm] += sec
        print(f"{arm} ({len(part)} problems, {sum(r['n_new_tokens'] for r in found.values())} tokens): {sec:.1f} s",
              flush=True)
    rows = compare(results["batch_1"], results["batched"], task_ids, loaded.dtype)
    reference = None
    if args.reference_generate:
        start = time.perf_counter()
        old = {t: generate_with_transformers(loaded, problems[t]["prompt"], args.max_new_tokens) for t in task_ids}
        seconds["transformers_generate"] = time.perf_counter() - start
        reference = {t: old[t] == results["batch_1"][t]["tokens"] for t in task_ids}
    ratio = seconds["batch_1"] / seconds["batched"]
    n_tokens = sum(r["n_new_tokens"] for r in results["batch_1"].values())
    identical = all(row["identical"] for row in rows)
    for row in rows:
        d = row["first_divergence"]
        gap = "not in its top logits" if d is None or d["gap_logit"] is None else f"{d['gap_logit']:.4f}"
        note = "identical" if d is None else (
            f"differs at token {d['position']}: batch-1 logit gap {gap} "
            f"({'a near tie: rounding' if d['explained_by_rounding'] else 'NOT a near tie'})")
        print(f"{row['task_id']:>14} {row['n_new_tokens']:4d} tokens: {note}")
    print(f"\n{loaded.resolved.label} {loaded.dtype} on {loaded.device} ({common.cpu_name()}, "
          f"{common.environment(loaded.device)['torch_threads']} threads), {len(jobs)} problems, {n_tokens} tokens, "
          f"batch size {batch_size}, batched arm's kernels: "
          f"{humaneval.kernels_used(loaded, batch_size, args.cpu_kernels)}")
    for arm, sec in seconds.items():
        print(f"{arm:>22}: {sec:7.1f} s  {n_tokens / sec:6.2f} tok/s")
    print(f"speedup batched vs batch 1 {ratio:.2f}x (goal >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'not met'}); completions identical: "
          f"{sum(r['identical'] for r in rows)}/{len(rows)}")
    if reference is not None:
        print(f"batch 1 equals transformers' generate() (the pre-batching code): {sum(reference.values())}/{len(rows)}")
    if args.out:
        record = common.result_record("humaneval_batching", vars(args), common.environment(loaded.device),
                                      model=loaded.identity(), n_problems=len(jobs), n_new_tokens=n_tokens,
                                      batch_size=batch_size, seconds=seconds, speedup=ratio,
                                      kernels=humaneval.kernels_used(loaded, batch_size, args.cpu_kernels),
                                      identical_completions=identical, problems=rows,
                                      equal_to_transformers_generate=reference)
        print(f"written: {common.write_json_atomic(Path(args.out), record)}")
    return 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
