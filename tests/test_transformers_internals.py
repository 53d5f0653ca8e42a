"""The transformers fence (transformers_internals.py): every private or reshaped piece it leans on, checked on a tiny
real model, each failure naming what vanished and the release the fence was checked on."""
import importlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import transformers_internals as hf  # noqa: E402

CHECKED = f"(transformers {transformers.__version__}; the fence was checked on {hf.VERIFIED_TRANSFORMERS}: " \
          "update transformers_internals.py)"


@pytest.fixture(scope="module")
def model(tiny_models):
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    return loaded


def ids(n: int, seed: int = 0):
    return torch.randint(5, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_forward_keyword_for_the_cache_is_found(model):
    import inspect
    names = set(inspect.signature(type(model).forward).parameters)
    assert names & {"cache", "past_key_values"}, f"forward() takes neither `cache` nor `past_key_values` {CHECKED}"
    assert hf.cache_keyword(model) in names and hf.cache_keyword(model.base_model) in names


def test_cache_layers_hold_keys_and_values_per_layer(model):
    cache = hf.new_cache()
    with torch.inference_mode():
        model(input_ids=ids(7), **hf.cache_inputs(model, cache))
    assert hasattr(cache, "layers"), f"DynamicCache has no `.layers` {CHECKED}"
    layers = hf.cache_layers(cache)
    assert len(layers) == model.config.num_hidden_layers, f"cache.layers is not one entry per layer {CHECKED}"
    for keys, values in layers:
        assert keys.shape[2] == values.shape[2] == 7, "cache layer .keys/.values are not [batch, heads, tokens, dim]"


def test_a_cache_built_from_layers_continues_like_the_original(model):
    """DynamicCache(list of (keys, values), config=...): the prefix cache MMLU scoring reuses for a whole batch."""
    prefix, rest = ids(9, seed=1), ids(3, seed=2)
    cache = hf.new_cache()
    with torch.inference_mode():
        model(input_ids=prefix, **hf.cache_inputs(model, cache))
        try:
            rebuilt = hf.cache_from_layers(hf.cache_layers(cache), batch_size=2, config=model.config)
        except TypeError as error:
            pytest.fail(f"DynamicCache no longer takes a list of (keys, values): {error} {CHECKED}")
        continued = model(input_ids=rest.expand(2, -1), **hf.cache_inputs(model, rebuilt)).logits
        whole = model(input_ids=torch.cat([prefix, rest], dim=1), use_cache=False).logits[:, -3:]
    assert rebuilt.get_seq_length() == 12
    torch.testing.assert_close(continued, whole.expand(2, -1, -1), atol=1e-4, rtol=1e-4)
    as_they_are = hf.cache_from_layers([(k[:1], v[:1]) for k, v in hf.cache_layers(rebuilt)], batch_size=None,
                                       config=model.config)  # rows the caller selected (humaneval's batch)
    assert [k.shape for k, _ in hf.cache_layers(as_they_are)] == [k[:1].shape for k, _ in hf.cache_layers(rebuilt)]


def test_a_negative_crop_drops_exactly_the_tokens_past_the_kept_prefix(model):
    cache = hf.new_cache()
    prompt = ids(6, seed=3)
    with torch.inference_mode():
        model(input_ids=torch.cat([prompt, ids(4, seed=4)], dim=1), **hf.cache_inputs(model, cache))
        assert hf.crop_cache(cache, keep_tokens=6), f"DynamicCache.crop(-n) raised {CHECKED}"
        assert cache.get_seq_length() == 6, f"DynamicCache.crop(-n) no longer removes n tokens {CHECKED}"
        assert hf.crop_cache(cache, keep_tokens=8) and cache.get_seq_length() == 6  # nothing to drop
        token = ids(1, seed=5)
        continued = model(input_ids=token, **hf.cache_inputs(model, cache)).logits[0, -1]
        fresh = model(input_ids=torch.cat([prompt, token], dim=1), use_cache=False).logits[0, -1]
    torch.testing.assert_close(continued, fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("float32", [True, False])
def test_head_logits_at_chosen_positions_equal_the_models_own(model, float32):
    """Last n, chosen indices and a boolean mask, on a plain head (run by us) and on a head marked as soft-capped
    (the one policy: the model's own logits)."""
    input_ids = torch.cat([ids(10, seed=6), ids(10, seed=7)])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [2, 5]] = mask[1, 9] = True
    index = torch.tensor([1, 4, 9])
    with torch.inference_mode():
        full = model(input_ids=input_ids, use_cache=False).logits
        for plain in (True, False):
            if not plain:
                model.config.final_logit_softcapping = 30.0  # llama ignores it; the fence must not run the head
            try:
                assert hf.plain_lm_head(model) is plain
                last = hf.head_logits(model, input_ids=input_ids, positions=3, float32=float32)
                chosen = hf.head_logits(model, input_ids=input_ids, positions=index, float32=float32)
                masked = hf.head_logits(model, input_ids=input_ids, positions=mask, float32=float32)
            finally:
                model.config.final_logit_softcapping = None
            torch.testing.assert_close(last.float(), full[:, -3:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(chosen.float(), full[:, index], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(masked.float(), full[mask], atol=1e-5, rtol=1e-5)


def test_head_logits_run_the_head_in_float32_when_asked(model):
    bf16 = type(model).from_pretrained(model.name_or_path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        logits = hf.head_logits(bf16, input_ids=ids(5), positions=2, float32=True)
        own = hf.head_logits(bf16, input_ids=ids(5), positions=2, float32=False)
    assert logits.dtype == torch.float32 and own.dtype == torch.bfloat16
    torch.testing.assert_close(logits, own.float(), atol=0.25, rtol=0.02)  # the same logits, less rounded


def test_the_chat_preloads_a_module_that_exists():
    assert importlib.util.find_spec(hf.MODEL_CODE_MODULE), f"{hf.MODEL_CODE_MODULE} is gone {CHECKED}"


def test_assisted_defaults_read_transformers_private_defaults():
    """GenerationConfig._get_default_generation_params is private: without it the record's assisted_defaults go
    None, so its disappearance must show here."""
    from transformers import GenerationConfig
    assert hasattr(GenerationConfig, "_get_default_generation_params"), \
        f"GenerationConfig._get_default_generation_params is gone {CHECKED}"
    assert hf.assisted_defaults(GenerationConfig()) == {
        "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4}
    assert hf.assisted_defaults(GenerationConfig(num_assistant_tokens=7))["num_assistant_tokens"] == 7
