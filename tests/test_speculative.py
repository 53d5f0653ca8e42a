"""speculative.py, speculative_pair.py and speculative_demo.py on tiny random models: greedy output identical to the
target's, caches rolled back to the accepted prefix, the sampling rule keeps the target's distribution, vocabulary
mismatches refused or aligned; the demo's flags refused up front and its one record."""
import copy
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import common  # noqa: E402
import models as model_io  # noqa: E402  (the fixture `models` below is the loaded pair)
import cpu_kernels  # noqa: E402
import speculative as spec  # noqa: E402
import speculative_demo as sd  # noqa: E402
import speculative_pair as sp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a busy 2-core machine run 10-50x faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def noisy_copy(model, scale: float, seed: int):
    """The target with its weights nudged: agrees often but not always, so every accepted length shows up."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return draft


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    from tiny_models import build_tiny_model
    target = load(tiny_models["llama"])
    other = load(build_tiny_model("llama", tmp_path_factory.mktemp("seed1") / "llama", seed=1))
    return {"target": target, "independent": other, "noisy": noisy_copy(target, 0.03, seed=0), "same": target,
            "target_path": tiny_models["llama"]}


def random_prompts(n: int, seed: int, vocab: int = 384):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 24, (n,), generator=generator).tolist()
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in lengths]


# -------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("draft_name", ["independent", "noisy", "same"])
def test_greedy_output_is_the_targets_own(models, draft_name):
    target, draft = models["target"], models[draft_name]
    histogram = {}
    for index, prompt in enumerate(random_prompts(5, seed=len(draft_name))):
        stop_ids = (0,) if index % 2 else ()  # half the runs may stop early at the tiny models' EOS
        reference = spec.reference_generate(target, prompt, max_new_tokens=20, stop_ids=stop_ids)
        for k in (1, 2, 4, 7):
            out = spec.speculative_generate(target, draft, prompt, max_new_tokens=20, k=k, stop_ids=stop_ids)
            assert out.tokens == reference.tokens, (draft_name, index, k)
            assert len(out.kinds) == len(out.tokens)
            for step in out.steps:
                histogram[step["n_accepted"]] = histogram.get(step["n_accepted"], 0) + 1
        adaptive = spec.speculative_generate(target, draft, prompt, max_new_tokens=20, stop_ids=stop_ids,
                                             k=spec.AdaptiveK(k_max=6))
        assert adaptive.tokens == reference.tokens
    if draft_name == "noisy":  # partial acceptance really happened, so the rollback paths were exercised
        assert histogram.get(0, 0) > 0 and sum(v for n, v in histogram.items() if 0 < n < 7) > 10


@pytest.mark.skipif(cpu_kernels.int8_problem() is not None, reason="torch without fbgemm")
def test_int8_draft_keeps_the_output_exact(models):
    """The CPU draft's Linear layers in int8 (tests/test_cpu_kernels.py checks the layer): the target still decides
    every token."""
    draft = copy.deepcopy(models["noisy"])
    assert cpu_kernels.quantize_linears_int8(draft, log=print) == sum(
        type(m) is torch.nn.Linear for m in models["noisy"].modules())
    target = models["target"]
    for prompt in random_prompts(4, seed=11):
        reference = spec.reference_generate(target, prompt, max_new_tokens=20)
        for k in (2, 5):
            out = spec.speculative_generate(target, draft, prompt, max_new_tokens=20, k=k)
            assert out.tokens == reference.tokens and sp.run_stats("ours", out)["n_accepted"] > 0
        out = spec.speculative_generate(target, draft, prompt, max_new_tokens=20, k=spec.AdaptiveK())
        assert out.tokens == reference.tokens


def test_identical_draft_accepts_every_token(models):
    prompt = random_prompts(1, seed=7)[0]
    out = spec.speculative_generate(models["target"], models["same"], prompt, max_new_tokens=21, k=4)
    stats = sp.run_stats("ours", out)
    assert stats["acceptance_rate"] == 1.0 and stats["alpha"] == 1.0
    assert [s["n_accepted"] for s in out.steps] == [4] * 4
    assert out.kinds == ["target"] + (["accepted"] * 4 + ["bonus"]) * 4


def test_independent_draft_is_mostly_rejected_and_adaptive_k_backs_off(models):
    prompt = random_prompts(1, seed=3)[0]
    adaptive = spec.AdaptiveK(k_max=8)
    out = spec.speculative_generate(models["target"], models["independent"], prompt, max_new_tokens=60,
                                    k=adaptive)
    assert sp.run_stats("ours", out)["acceptance_rate"] < 0.3
    assert out.k_trace[:2] == [0, 8] and out.k_trace[-10:].count(0) >= 7  # mostly plain steps at the end
    assert out.steps[1]["k"] < 8  # and the unsure draft stopped before its cap


# -------------------------------------------------------------------------------------------- caches
def last_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_caches_roll_back_to_the_accepted_prefix(models, monkeypatch):
    target, draft = models["target"], models["noisy"]
    prompt = random_prompts(1, seed=11)[0]
    caches = []  # the two caches speculative_generate makes, kept here to continue from them
    monkeypatch.setattr(model_io, "new_cache", lambda make=model_io.new_cache: caches.append(make()) or caches[-1])
    out = spec.speculative_generate(target, draft, prompt, max_new_tokens=40, k=5)
    assert any(s["n_accepted"] < s["k"] for s in out.steps), "no rejection happened: the test proves nothing"
    for step in out.steps:  # after every step, including the rejected ones
        assert step["target_cache_len"] == step["sequence_len"] - 1
        assert step["draft_cache_len"] <= step["sequence_len"] - 1
    # Continuing from the rolled-back caches gives the logits of a fresh forward over the whole sequence.
    sequence = prompt + out.tokens
    target_cache, draft_cache = caches
    assert target_cache.get_seq_length() == len(sequence) - 1
    for model, cache in ((target, target_cache), (draft, draft_cache)):
        feed = sequence[cache.get_seq_length():]
        continued = spec.timed_forward(model, feed, cache, trace=[], role="x", device="cpu")[-1]
        torch.testing.assert_close(continued, last_logits(model, sequence), atol=1e-4, rtol=1e-4)


def test_rollback_drops_exactly_the_rejected_tokens(models):
    from transformers import DynamicCache
    cache = DynamicCache()
    ids = random_prompts(1, seed=5)[0]
    spec.timed_forward(models["target"], ids + [5, 6, 7], cache, trace=[], role="x", device="cpu")
    spec.rollback(cache, len(ids))
    assert cache.get_seq_length() == len(ids)
    continued = spec.timed_forward(models["target"], [9], cache, trace=[], role="x", device="cpu")[-1]
    torch.testing.assert_close(continued, last_logits(models["target"], ids + [9]), atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------- sampling
def total_variation(counts, probs) -> float:
    empirical = counts / counts.sum()
    return 0.5 * float((empirical - probs).abs().sum())


def noise_bound(vocab: int, n: int) -> float:
    """Three times the bound 0.5 * sqrt(2 V / (pi n)) on the expected total variation of n samples over V ids."""
    return 3 * 0.5 * (2 * vocab / (torch.pi * n)) ** 0.5


def test_accept_rule_keeps_the_target_distribution_at_every_position():
    """Fixed p (target) and q (draft) per position; 10,000 steps of the accept rule with drafts drawn from q."""
    generator = torch.Generator().manual_seed(0)
    vocab, k, n_trials = 6, 3, 10_000
    def dirichlet():  # flat Dirichlet = normalised Exp(1) draws, from the seeded generator (not the global RNG)
        e = -torch.rand(k + 1, vocab, generator=generator).log()
        return e / e.sum(dim=-1, keepdim=True)
    p, q = dirichlet(), dirichlet()
    p_logits = p.log()  # temperature 1: softmax(log p) = p
    counts = torch.zeros(k + 1, vocab)
    for _ in range(n_trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(k)]
        n, token = spec.accept_drafts(p_logits, [q[i] for i in range(k)], drafts, 1.0, generator)
        for position, emitted in enumerate(drafts[:n] + [token]):
            counts[position, emitted] += 1
    for position in range(k + 1):  # position i is reached only when the drafts before it were accepted
        bound = noise_bound(vocab, int(counts[position].sum()))
        assert total_variation(counts[position], p[position]) < bound, position
        assert total_variation(counts[position], q[position]) > 2 * bound  # the test can tell p from q
    assert counts[k].sum() > 300  # the bonus position was reached often enough to mean something


def binned(distribution, bins):
    """Probabilities of the given ids plus one bin for everything else."""
    kept = distribution[bins]
    return torch.cat([kept, (distribution.sum() - kept.sum()).reshape(1)])


def test_sampling_end_to_end_matches_the_target_distribution(models):
    """Second token of real speculative runs (the first speculative step, k=2) vs the target's exact marginal
    sum_t1 p(t1) p(t2 | t1), on its 15 likeliest ids plus 'other'. The threshold is the largest of 300 binned
    TVs of exact samples from that marginal (the null); a sampler that emitted the draft's tokens would be far off."""
    target, draft = models["target"], models["noisy"]
    prompt = random_prompts(1, seed=2)[0]
    temperature, n_runs = 0.6, 600
    vocab = target.config.vocab_size
    batch = torch.tensor([prompt + [t] for t in range(vocab)])
    p1 = torch.softmax(last_logits(target, prompt) / temperature, dim=-1)
    marginal = p1 @ torch.softmax(target(input_ids=batch).logits[:, -1] / temperature, dim=-1)
    draft_marginal = p1 @ torch.softmax(draft(input_ids=batch).logits[:, -1] / temperature, dim=-1)
    bins = marginal.topk(15).indices
    counts, n_accepted = torch.zeros(vocab), 0
    for seed in range(n_runs):
        out = spec.speculative_generate(target, draft, prompt, max_new_tokens=4, k=2, temperature=temperature,
                                      seed=seed)
        assert out.steps[0]["k"] == 2
        counts[out.tokens[1]] += 1
        n_accepted += out.kinds[1] == "accepted"
    generator = torch.Generator().manual_seed(0)
    null = [total_variation(binned(torch.bincount(torch.multinomial(marginal, n_runs, True, generator=generator),
                                                  minlength=vocab).float(), bins), binned(marginal, bins))
            for _ in range(300)]
    threshold = max(null)
    assert total_variation(binned(counts, bins), binned(marginal, bins)) <= threshold
    assert 0.5 * float((binned(draft_marginal, bins) - binned(marginal, bins)).abs().sum()) > 1.5 * threshold
    assert 0.2 * n_runs < n_accepted < 0.95 * n_runs  # both the accept and the residual paths were taken


# -------------------------------------------------------------------------------------------- vocabularies
def test_different_tokenizers_are_refused_with_a_clear_message(tmp_path, tiny_models, capsys):
    from tiny_models import build_tiny_model
    smaller = build_tiny_model("llama", tmp_path / "v300", vocab_size=300)
    code = sd.main(["--draft", str(smaller), "--target", str(tiny_models["llama"]), "--no-save", "--threads", "1"])
    error = capsys.readouterr().err
    assert code == 2
    assert "do not share a vocabulary" in error and "--universal" in error and "Traceback" not in error


def test_universal_flag_runs_transformers_universal_assisted_generation(tmp_path, tiny_models, results_dir):
    from tiny_models import build_tiny_model
    smaller = build_tiny_model("llama", tmp_path / "v300", vocab_size=300)
    code = sd.main(["--draft", str(smaller), "--target", str(tiny_models["llama"]), "--universal", "--threads", "1",
                    "--max-new-tokens", "8", "--n-prompts", "1", "--results-dir", str(results_dir)])
    assert code == 0
    record = json.loads(next(results_dir.glob("speculative-*.json")).read_text())
    assert record["universal"] and set(record["methods"]) == {"target_only", "assisted"}
    assert record["k_sweep"] == []


def test_padded_embedding_rows_are_aligned(models):
    """pythia-1b (50304 rows) drafting for pythia-6.9b (50432): same tokenizer, different logits widths."""
    target = models["target"]
    wide_draft = noisy_copy(target, 0.03, seed=1)
    wide_draft.resize_token_embeddings(448)  # more rows than the target
    wide_target = copy.deepcopy(target)
    wide_target.resize_token_embeddings(512)  # more rows than the draft
    prompt = random_prompts(1, seed=9)[0]
    for t, d in ((target, wide_draft), (wide_target, models["noisy"])):
        reference = spec.reference_generate(t, prompt, max_new_tokens=20)
        assert spec.speculative_generate(t, d, prompt, max_new_tokens=20, k=4).tokens == reference.tokens
    logits = torch.randn(2, 10)
    assert spec.align_vocab(logits, 8).shape == (2, 8)
    padded = spec.align_vocab(logits, 12)
    assert padded.shape == (2, 12) and torch.isinf(padded[:, 10:]).all()


# -------------------------------------------------------------------------------------------- adaptive, formulas
def simulate_adaptive(adaptive, accept, n_steps: int) -> list:
    """Drive AdaptiveK with made-up costs (draft 0.1 s, target 1 s + 0.05 s per extra token); returns the k trace."""
    trace = []
    for _ in range(n_steps):
        k = adaptive.k
        trace.append(k)
        adaptive.update(k, accept(k), [("draft", 1, 0.1)] * k + [("target", k + 1, 1.0 + 0.05 * k)])
    return trace


def test_adaptive_k_speculates_while_it_pays_and_falls_back_to_plain_decoding():
    passing = simulate_adaptive(spec.AdaptiveK(k_max=6), accept=lambda k: k, n_steps=12)
    assert passing == [0] + [6] * 11  # first a plain step to measure the 1-token cost, then up to k_max
    failing = simulate_adaptive(spec.AdaptiveK(k_max=6), accept=lambda k: 0, n_steps=60)
    assert failing[:2] == [0, 6]
    switched = failing.index(0, 1)  # the first plain step after speculation stopped paying
    assert switched <= 8 and failing[switched:].count(0) >= 50  # plain decoding from then on,
    assert 6 in failing[switched:]  # with an occasional probe
    probes = [i for i in range(switched, 60) if failing[i] == 6]
    assert probes == sorted(probes) and probes[1] - probes[0] > probes[0] - switched  # probing less often


def test_adaptive_stop_rule_prices_one_more_draft():
    adaptive = spec.AdaptiveK(k_max=6)
    simulate_adaptive(adaptive, accept=lambda k: k, n_steps=6)  # c = 0.1, s = 0.05, rate (6 + 1) / 1.9
    rate = adaptive.rate
    assert 1.25 < rate < 7 / 1.9
    assert adaptive.stop_below == pytest.approx((0.1 + 0.05) * rate)


def test_expected_speedup_and_break_even():
    assert spec.expected_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert spec.expected_speedup(0.0, 4, 0.25) == pytest.approx(0.5)
    alpha = spec.break_even_alpha(4, 0.3)
    assert 0 < alpha < 1 and spec.expected_speedup(alpha, 4, 0.3) == pytest.approx(1.0, abs=1e-6)
    assert spec.break_even_alpha(3, 1.0) is None  # a draft as costly as the target never pays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_greedy_is_exact_and_a_4bit_target_runs(models):
    """The GPU paths: device-side sampling generator, synchronised timers, a bitsandbytes 4-bit target."""
    target, draft = copy.deepcopy(models["target"]).cuda(), copy.deepcopy(models["noisy"]).cuda()
    for prompt in random_prompts(3, seed=4):
        reference = spec.reference_generate(target, prompt, max_new_tokens=20, device="cuda")
        out = spec.speculative_generate(target, draft, prompt, max_new_tokens=20, k=4, device="cuda")
        assert out.tokens == reference.tokens
        sampled = spec.speculative_generate(target, draft, prompt, max_new_tokens=20, temperature=1.0,
                                            device="cuda", k=spec.AdaptiveK())
        assert len(sampled.tokens) == 20
    quantized = model_io.load_model(str(models["target_path"]), device="cuda", dtype="bfloat16", quantize="4bit",
                                  log=lambda *_: None)
    prompt = random_prompts(1, seed=8)[0]
    out = spec.speculative_generate(quantized.model, draft.to(torch.bfloat16), prompt, max_new_tokens=16, k=3,
                                  device="cuda")
    assert len(out.tokens) == 16 and out.steps


# -------------------------------------------------------------------------------------------- the CLI
def test_missing_pair_says_exactly_what_to_download(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(common, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert sd.main(["--no-save"]) == 2
    error = capsys.readouterr().err
    assert "qwen-coder-0.5b and qwen-coder-1.5b are not on disk" in error
    assert "python download_models.py --models qwen-coder-0.5b --targets" in error
    assert "--draft PATH --target PATH" in error and "Traceback" not in error


def test_demo_runs_end_to_end_and_writes_its_record(models, results_dir, tmp_path, capsys):
    draft_dir = tmp_path / "noisy"
    models["noisy"].save_pretrained(draft_dir)
    for file in Path(models["target_path"]).iterdir():  # the same tokenizer files as the target
        if not (draft_dir / file.name).exists():
            (draft_dir / file.name).write_bytes(file.read_bytes())
    code = sd.main(["--draft", str(draft_dir), "--target", str(models["target_path"]), "--dtype", "float32",
                    "--max-new-tokens", "16", "--k", "3", "--k-max", "5", "--k-sweep", "1,4", "--threads", "1",
                    "--methods", ",".join(sp.METHODS), "--results-dir", str(results_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads(next(results_dir.glob("speculative-*.json")).read_text())
    assert record["kind"] == "speculative" and record["dtype"] == "float32"
    int8 = cpu_kernels.int8_problem() is None
    assert record["draft"]["quantization"] == ("int8-dynamic" if int8 else "none")
    if int8:  # the identity counts the int8 copies, not the float weights they replaced
        assert 0 < record["draft"]["weight_bytes"] < record["target"]["weight_bytes"]
    assert set(record["methods"]) == set(sp.METHODS)
    assert record["lossless"]["checked"] and record["lossless"]["n_runs"] == 2 + 2 + 4
    assert record["lossless"]["n_identical"] == record["lossless"]["n_runs"]
    assert [row["k"] for row in record["k_sweep"]] == [1, 4]
    assert record["methods"]["ours"]["acceptance_rate"] > 0 and record["cost"]["cost_ratio"] > 0
    ratios = record["ratios"]
    assert record["ours_method"] == "ours_adaptive" and "notes" not in record and set(ratios) == set(sp.METHODS)
    for method, row in ratios.items():  # one paired computation behind the table's speedup and the ratios
        assert row["vs_target"] == record["methods"][method]["speedup"] and len(row["vs_assisted_by_prompt"]) == 2
    assert ratios["assisted"]["vs_assisted"] == pytest.approx(1.0)
    assert max(ratios["target_only"]["vs_target"], ratios["target_generate"]["vs_target"]) <= 1.0
    assert "lossless check (float32), ours: 8/8" in out and "note: draft/target cost ratio" in out
    assert "[" in out and "draft token accepted" in out  # plain-text markers, since stdout is not a terminal


def test_replay_tool_runs_on_a_tiny_pair(models, tmp_path, capsys):
    """The replay tool reaches the demo's loading and the algorithm through keyword calls, no fake argv."""
    import runpy
    main = runpy.run_path(str(REPO / "benchmarks" / "speculative_replay.py"))["main"]
    target = str(models["target_path"])
    assert main(["--draft", target, "--target", target, "--draft-weights", "same", "--n-prompts", "1",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "draft agreement along the target's path: code 1.00" in out  # the target drafting for itself
    assert "adaptive k (max 16)" in out and "fixed k=8" in out


def test_replay_prices_drafting_rules_on_a_recorded_path():
    import runpy
    replay = runpy.run_path(str(REPO / "benchmarks" / "speculative_replay.py"))["replay"]
    perfect = {"tokens": list(range(41)), "guesses": list(range(41)), "confidences": [1.0] * 41}
    assert replay(perfect, 0.0, 0.0, {"cap": 4}) == pytest.approx(40 / 8)  # 8 free steps of 4 drafts + 1 bonus
    assert replay(perfect, 0.25, 0.05, spec.AdaptiveK(k_max=16)) > 2.5  # a perfect cheap draft: long runs
    useless = {"tokens": list(range(81)), "guesses": [-1] * 81, "confidences": [0.9] * 81}
    assert replay(useless, 0.25, 0.05, {"cap": 4}) < 0.5  # 4 wasted drafts per token
    assert 0.85 < replay(useless, 0.25, 0.05, spec.AdaptiveK(k_max=16)) <= 1.0  # falls back to the target alone


def test_unwritable_results_folder_is_refused_before_loading(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # models that do not exist: had the models been looked at first, the error would name them
    assert sd.main(["--draft", "no-such-draft", "--target", "no-such-target", "--results-dir", str(blocker)]) == 2
    error = capsys.readouterr().err
    assert "results folder" in error and str(blocker) in error and "no-such" not in error
