"""Tiny random-weight models with the seed models' real architectures, built in seconds for tests.

Each keeps its family's structure (TinyLlama's grouped-query Llama, StableLM 2's partial rotary and qkv bias,
Pythia's GPT-NeoX parallel residual) but shrinks width, depth and vocabulary. They share one small
byte-level BPE tokenizer trained here, with a ChatML template (the Pythia stand-in has no template).
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
    "Question: What is the capital of France?\nAnswer: Paris", "A. one\nB. two\nC. three\nD. four\nAnswer:",
    "import os, sys\nfor i in range(10):\n    print(i * 2)\n", "Small language models run on laptops.",
    '{"name": "Ada", "city": "London", "year": 1843}', "The following are multiple choice questions (with answers).",
] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARCHS = ("llama", "stablelm", "gpt_neox")


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_tiny_model(arch: str, dest: Path, seed: int = 0, vocab_size: int = 384) -> Path:
    """Save a tiny random model of `arch` with its tokenizer into dest; returns dest."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, StableLmConfig

    tokenizer = build_tokenizer(vocab_size)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "llama":  # TinyLlama-1.1B: 22 layers, 32 heads, 4 KV heads -> 2 layers, 4 heads, 2 KV heads
        config = LlamaConfig(intermediate_size=172, num_key_value_heads=2, rms_norm_eps=1e-5,
                             tie_word_embeddings=False, **common)
    elif arch == "stablelm":  # stablelm-2-1_6b: partial rotary 0.25, qkv bias, LayerNorm
        config = StableLmConfig(intermediate_size=172, num_key_value_heads=4, partial_rotary_factor=0.25,
                                use_qkv_bias=True, layer_norm_eps=1e-5, tie_word_embeddings=False, **common)
    elif arch == "gpt_neox":  # pythia-1b: rotary_pct 0.25, parallel residual, untied head
        config = GPTNeoXConfig(intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True,
                               tie_word_embeddings=False, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so random logits are peaked, like a trained model's
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    if arch != "gpt_neox":
        tokenizer.chat_template = CHATML
    dest = Path(dest)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
