"""transformers' cache and model internals, fenced in one file.

Everything here leans on a part of transformers that is private, undocumented, or changed shape between
releases: the KV cache's per-layer tensors (`DynamicCache.layers[i].keys`), a `DynamicCache` built from a list
of (keys, values), a negative `crop`, the forward keyword that takes the cache (`past_key_values` became
`cache`), where the output head sits and when it is a plain Linear, the module the chat imports ahead of time,
and GenerationConfig's private assisted-generation defaults, and the decoder-layer list that a LoRA run on the top
layers skips the frozen bottom of (`backbone.layers`, each layer called with the hidden states first and
returning them). No other file of ours touches these.

Checked on transformers VERIFIED_TRANSFORMERS (the pin in requirements.txt; tests/test_transformers_internals.py
checks both). After an upgrade, that test names the piece that vanished or changed, so a release cannot break a
run silently. Heavy imports stay inside functions, and this file imports nothing of ours.

    import transformers_internals as hf
    cache = hf.new_cache(); ...; hf.crop_cache(cache, keep_tokens=10)
    hf.head_logits(model, input_ids=ids, positions=3, float32=True)   # the last 3 positions' logits, fp32 head
"""
from __future__ import annotations

import contextlib
import functools

VERIFIED_TRANSFORMERS = "5.24.0"  # every function below was checked on this release (the pin in requirements.txt)
# The module whose import is most of a cold start (torch, the model classes): the chat begins it while the user
# reads its menu.
MODEL_CODE_MODULE = "transformers.modeling_utils"
# Config keys with which a model's logits are more than lm_head(hidden): soft-capping (Gemma 2), scaling (Cohere,
# Granite, MiniCPM...). Only a model with none of them may have its head run on chosen positions by us.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                        "lm_head_multiplier")


# ------------------------------------------------------------------------------------------------- KV cache
def new_cache():
    """An empty KV cache that forward() fills in place."""
    from transformers import DynamicCache
    return DynamicCache()


def crop_cache(cache, keep_tokens: int) -> bool:
    """Drop cached keys/values past the first keep_tokens. crop() with a negative count removes that many tokens
    from the end in both transformers 4.x (absolute length) and 5.x (count) APIs, where a positive argument means
    different things. False when the cache cannot be cut there (a sliding-window layer already evicted what would
    be kept): the caller starts a fresh one."""
    extra = cache.get_seq_length() - keep_tokens
    if extra <= 0:
        return True
    try:
        cache.crop(-extra)
    except (RuntimeError, ValueError):
        return False
    return True


def cache_layers(cache) -> list:
    """The cache's tensors, one (keys, values) pair per layer, each [batch, heads, tokens, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(layers: list, *, batch_size: int | None, config):
    """A fresh cache holding `layers` (one (keys, values) pair per layer, as cache_layers gives them).
    batch_size: a batch-1 cache's layers for each of batch_size rows, as expanded views, not copies (update()
    concatenates new tokens into new tensors, so the views are only read and one prefix serves batch after batch).
    None: the tensors as they are, rows padded or selected by the caller (humaneval's decoding batch)."""
    from transformers import DynamicCache
    if batch_size is not None:
        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in layers]
    return DynamicCache(list(layers), config=config)


def cache_keyword(model) -> str:
    """forward()'s KV-cache argument name: transformers 5.2x renamed `past_key_values` to `cache` (the old name
    warns on every call), so ask the model class which one it takes."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(model_class) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_inputs(module, cache) -> dict:
    """forward() keywords for a pass that extends `cache` in place, or for one without a cache (None)."""
    return {cache_keyword(module): cache, "use_cache": True} if cache is not None else {"use_cache": False}


# --------------------------------------------------------------------------------------------- output head
def unwrap(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_lm_head(model) -> bool:
    """True when the logits are just lm_head(hidden): a floating-point Linear head and none of the config keys
    that soft-cap or scale logits. Only then may head_logits run the head itself (in fp32, or on chosen
    positions only)."""
    import torch
    model = unwrap(model)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype not in (torch.float32, torch.bfloat16,
                                                                          torch.float16):
        return False
    config = model.config.get_text_config()
    return not any(getattr(config, key, None) for key in LOGIT_TRANSFORM_KEYS)


def head_logits(model, *, positions, float32: bool, cache=None, **inputs):
    """Logits at chosen positions only, the output head run on those rows and no others.

    positions: an int (the last n positions), a 1-D index tensor (the same positions in every row), or a boolean
    [batch, seq] mask (the selected positions of all rows, flattened in order). Returns [batch, n, vocab] for the
    first two, [n_selected, vocab] for a mask (an answer-only loss passes its label mask, shifted: position p
    predicts token p+1). float32: run the head in fp32 (in bf16 a small model's logits,
    |x| ~ 16-32, are rounded to steps of 0.125, so near-tied answers flip on noise); else in the head's own dtype
    (or autocast's). cache: a KV cache, extended in place (use_cache is on exactly when one is given).

    The one policy for a head that is not plain (plain_lm_head False): the model's own forward computes the
    logits, with its soft-capping or scaling and in its own precision, and the chosen positions are taken from
    them (transformers' logits_to_keep where it can, the full logits under a mask)."""
    import torch
    base = unwrap(model)
    mask = isinstance(positions, torch.Tensor) and positions.dtype == torch.bool
    if not plain_lm_head(base):
        if mask:
            return base(**inputs, **cache_inputs(base, cache)).logits[positions]
        return base(**inputs, logits_to_keep=positions, **cache_inputs(base, cache)).logits
    hidden = base.base_model(**inputs, **cache_inputs(base.base_model, cache)).last_hidden_state
    hidden = hidden[positions] if mask else hidden[:, -positions:] if isinstance(positions, int) else \
        hidden[:, positions]
    head = base.get_output_embeddings()
    if not float32:
        return head(hidden)
    bias = head.bias.float() if head.bias is not None else None
    return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


# ----------------------------------------------------------------------------------------- decoder layers
def decoder_layers(model):
    """The backbone's decoder layers (a ModuleList at backbone.layers), or None where a model is not built so,
    or where its layers are not interchangeable (mixed attention types, e.g. Gemma 3's sliding and full layers,
    which the backbone picks by index)."""
    import torch
    backbone = unwrap(model).base_model
    layers = getattr(backbone, "layers", None)
    config = unwrap(model).config.get_text_config()
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != config.num_hidden_layers:
        return None
    if len(set(getattr(config, "layer_types", None) or ["one"])) > 1:
        return None
    return layers


def _replay_layer(hidden):
    """A stand-in decoder layer that ignores its input and returns `hidden` (None: passes its input on)."""
    import torch

    class Replay(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states if hidden is None else hidden
    return Replay()


def bottom_hidden(model, n_bottom: int, **inputs):
    """The hidden states entering decoder layer n_bottom (what the bottom n_bottom layers output), computed by
    the backbone with its later layers cut off."""
    layers = decoder_layers(model)
    backbone = unwrap(model).base_model
    captured = {}
    hook = layers[n_bottom - 1].register_forward_hook(lambda module, args, output: captured.update(hidden=output))
    backbone.layers = layers[:n_bottom]
    try:
        backbone(**inputs, use_cache=False)
    finally:
        backbone.layers = layers
        hook.remove()
    return captured["hidden"]


@contextlib.contextmanager
def skip_bottom_layers(model, n_bottom: int, hidden):
    """Within the block, the backbone's bottom n_bottom layers do no work: the first hands on `hidden` (what they
    would output, from bottom_hidden), the rest pass it through, so the layers above see the same inputs at the
    same indices (the backbone picks per-layer masks by index)."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(n_bottom)]
    for i in range(n_bottom):
        layers[i] = _replay_layer(hidden if i == 0 else None)
    try:
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


# ---------------------------------------------------------------------------------------------- generation
def assisted_defaults(generation_config) -> dict:
    """The assistant settings transformers' assisted generation uses with this draft: the draft config's own, or
    transformers' defaults where it sets none. Those defaults are only reachable through the private
    GenerationConfig._get_default_generation_params; if it disappears, the unknown defaults read None rather
    than a guess."""
    private = getattr(generation_config, "_get_default_generation_params", None)
    defaults = private() if callable(private) else {}
    return {name: getattr(generation_config, name, None) or defaults.get(name)
            for name in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
