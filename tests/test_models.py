"""models.py: the registry, resolution, dtype choice, memory preflight, loading (bf16/8-bit/4-bit), chat prompts and
stop tokens, and the one sampler."""
import pytest

import common
import models


def test_registry_has_the_seed_models_with_required_facts():
    seeds = {s.name: s for s in models.REGISTRY.values() if s.role == "seed"}
    assert set(seeds) == {"tinyllama-1.1b", "llama-3.2-1b", "stablelm-2-1.6b", "pythia-1b"}
    assert seeds["llama-3.2-1b"].gated and len(seeds["llama-3.2-1b"].stop_tokens) == 3
    assert not seeds["pythia-1b"].chat_template
    assert "fp32" in seeds["stablelm-2-1.6b"].quirks
    for spec in seeds.values():
        assert spec.target in models.REGISTRY and models.REGISTRY[spec.target].role == "target"
        assert spec.n_params > 1e9 and spec.license and spec.hub_weight_bytes > 0
    # a 1.1B fp16/bf16 model is ~2.2 GB of weights, never "0.5 GB"
    assert models.REGISTRY["tinyllama-1.1b"].hub_weight_bytes == pytest.approx(2 * 1.1e9, rel=0.01)


def test_resolve_model_forms(tmp_path, tiny_models):
    assert models.resolve_model("pythia-1b", tmp_path).source == "EleutherAI/pythia-1b"
    folder = models.resolve_model(str(tiny_models["llama"]))
    assert folder.source == str(tiny_models["llama"].resolve()) and folder.spec is None
    hub = models.resolve_model("EleutherAI/pythia-1b", tmp_path)
    assert hub.spec is models.REGISTRY["pythia-1b"]
    (tmp_path / "pythia-1b").mkdir()
    (tmp_path / "pythia-1b" / "config.json").write_text("{}")
    assert models.resolve_model("pythia-1b", tmp_path).source == str(tmp_path / "pythia-1b")
    with pytest.raises(common.UserError, match="Unknown model 'gpt-17'"):
        models.resolve_model("gpt-17")
    with pytest.raises(common.UserError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(common.UserError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_dtype_choice_on_cpu():
    assert models.pick_device("auto") == "cpu"
    assert models.pick_dtype("cpu") == "bfloat16"
    assert models.pick_dtype("cpu", "float32") == "float32"
    with pytest.raises(common.UserError):
        models.pick_dtype("cpu", "int3")
    with pytest.raises(common.UserError, match="CUDA"):
        models.pick_device("cuda")


def test_memory_estimate_and_preflight_refusal(tiny_models):
    config = models.model_config(str(tiny_models["llama"]))
    # 2 (k,v) x 2 layers x 2 kv heads x 16 head dim x 100 tokens x 2 bytes
    assert models.kv_cache_bytes(config, 100, "bfloat16") == 2 * 2 * 2 * 16 * 100 * 2
    fp16 = models.estimate_memory(1_100_000_000, None, "none", "float16", 0)
    nf4 = models.estimate_memory(1_100_000_000, None, "4bit", "float16", 0)
    assert fp16["weight_bytes"] == 2_200_000_000 and nf4["weight_bytes"] < fp16["weight_bytes"] / 3
    with pytest.raises(common.UserError, match="--quantize 4bit"):
        models.preflight_memory("huge", 10**13, config, "cpu", "none", "bfloat16", 2048)


def test_load_tiny_models_of_each_seed_architecture(tiny_models):
    import torch
    for arch, path in tiny_models.items():
        loaded = models.load_model(str(path), dtype="float32")
        assert loaded.model.config.model_type == arch
        assert loaded.n_params == sum(p.numel() for p in loaded.model.parameters())
        ids = loaded.tokenizer("hello world", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = loaded.model(ids).logits
        assert logits.shape[-1] == loaded.model.config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.parametrize("quantize,max_weight_ratio", [("none", 1.0), ("8bit", 0.7), ("4bit", 0.5)])
def test_smollm2_loads_in_bf16_8bit_4bit_with_consistent_memory(smollm2, quantize, max_weight_ratio):
    bf16_bytes = 134_515_008 * 2
    with common.MemoryMonitor("cpu") as monitor:
        loaded = models.load_model("smollm2-135m", quantize=quantize)
        tok = loaded.tokenizer
        prompt = models.chat_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
        ids = tok(prompt, return_tensors="pt")
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1]:])
    assert "Paris" in text
    assert loaded.weight_bytes <= bf16_bytes * max_weight_ratio + 4096  # + rotary buffers
    # The process holds the weights, so its peak RSS can never be below the weight bytes.
    assert monitor.result()["peak_rss_bytes"] > loaded.weight_bytes
    identity = loaded.identity()
    assert identity["quantization"] == quantize and identity["revision"] == models.REGISTRY["smollm2-135m"].gguf_sha256


def test_chat_prompt_and_stop_tokens(tiny_models, smollm2):
    from transformers import AutoTokenizer
    base = AutoTokenizer.from_pretrained(tiny_models["gpt_neox"])
    plain = models.chat_prompt(base, [{"role": "user", "content": "Hi"}], models.REGISTRY["pythia-1b"])
    assert plain == "User: Hi\n\nAssistant:"
    smol = AutoTokenizer.from_pretrained(smollm2)
    chat = models.chat_prompt(smol, [{"role": "user", "content": "Hi"}])
    assert chat.rstrip().endswith("<|im_start|>assistant")
    assert smol.convert_tokens_to_ids("<|im_end|>") in models.stop_token_ids(smol, models.REGISTRY["smollm2-135m"])


def test_the_one_sampler_argmax_when_greedy_softmax_over_temperature_otherwise():
    import torch
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert models.sample_token(logits) == 0
    hot = models.token_probabilities(logits, 2.0)
    torch.testing.assert_close(hot, torch.softmax(logits / 2.0, dim=-1))
    assert hot.dtype == torch.float32 and models.token_probabilities(logits.bfloat16()).dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    draws = [models.sample_token(logits, temperature=2.0, generator=generator) for _ in range(4000)]
    observed = torch.bincount(torch.tensor(draws), minlength=4) / len(draws)
    assert (observed - hot).abs().max() < 0.03  # 4000 draws: a standard error of at most 0.008
    nucleus = {models.sample_token(logits, temperature=2.0, top_p=0.5, generator=generator) for _ in range(200)}
    assert nucleus == {0, 1}  # p = 0.47, 0.29, ...: the top two are the smallest set reaching 0.5
