"""docs/guidance.py: the per-machine picks, the decode-speed ceiling, the training-memory formula and its calibration.

Facts are built by hand here (test fixtures, not records): the rules are pinned on numbers that could be wrong.
"""
import sys
from pathlib import Path

import pytest

import common
import models

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import generate  # noqa: E402
import guidance  # noqa: E402

LAPTOP, GPU_4, GPU_6 = guidance.MACHINES[0], guidance.MACHINES[2], guidance.MACHINES[3]
LLAMA_MMLU = {"model": "llama-3.2-1b", "checkpoint": "Llama-3.2-1B-Instruct", "benchmark": "MMLU", "value": 49.3,
              "source": ["a model card", "https://example.org/card"]}


def entry(name, correct, n=400, *, rid="R1", quantize="none", chance=False, passed=None, decode=None):
    return guidance.Entry(rid=rid, name=name, quantize=quantize, precision={"none": "bf16", "4bit": "4-bit"}[quantize],
                          mmlu=(correct, n), at_chance=chance, humaneval=(passed, 20) if passed is not None else None,
                          decode_tok_per_sec=decode, peak_bytes=None, gpu=False, mmlu_text=f"MMLU {correct}/{n}",
                          humaneval_text=f"HumanEval {passed}/20")


def cells(machine, entries, published=(), tunes=(), drafts=(), parts=None):
    parts = parts or (lambda name, quantize: (guidance.weight_bytes(name, quantize), 0))
    return guidance.pick_cells(machine, entries=list(entries), tunes=list(tunes), drafts=list(drafts),
                               published=list(published), memory_parts=parts, best=generate.best_by_counts,
                               gib=generate.gib)


def test_an_entry_at_chance_is_never_picked():
    picked = cells(LAPTOP, [entry("smollm2-135m", 100, chance=True), entry("qwen-coder-0.5b", 104, rid="R2",
                                                                           chance=True)])
    assert picked["chat"].pick is None and guidance.cell_text(picked["chat"]) == "nothing measured or published fits"


def test_a_coder_is_not_the_chat_pick_while_a_general_model_is_left_to_measure():
    chat = cells(LAPTOP, [entry("qwen-coder-0.5b", 148)], published=[LLAMA_MMLU])["chat"]
    assert chat.pick == "llama-3.2-1b" and chat.provisional
    assert chat.settle == "python benchmark.py --models llama-3.2-1b" and "qwen-coder-0.5b" in chat.note
    text = guidance.cell_text(chat)
    assert "*provisional*" in text and "**gated**" in text and "49.3% *published*" in text


def test_a_coder_is_the_chat_pick_only_when_no_general_model_is_left():
    chat = cells(LAPTOP, [entry("qwen-coder-0.5b", 148)])["chat"]
    assert chat.pick == "qwen-coder-0.5b" and not chat.provisional and "no general model is left" in chat.number


def test_a_general_model_above_chance_beats_a_better_coder_for_chat():
    picked = cells(LAPTOP, [entry("smollm2-1.7b", 180, rid="R1"), entry("qwen-coder-1.5b", 200, rid="R2")],
                   published=[LLAMA_MMLU])
    assert picked["chat"].pick == "smollm2-1.7b" and "[R1]" in picked["chat"].number
    assert "not measured here yet: llama-3.2-1b" in picked["chat"].note


def test_picks_fit_the_machine_and_speeds_are_labelled():
    huge = lambda name, quantize: (10 * common.GIB if name == "qwen-coder-1.5b" else  # noqa: E731
                                   guidance.weight_bytes(name, quantize), 0)
    entries = [entry("qwen-coder-1.5b", 190, rid="R1", passed=15, decode=4.0),
               entry("qwen-coder-0.5b", 148, rid="R2", passed=13, decode=12.4)]
    small = cells(GPU_4, entries, parts=huge)["code"]
    assert small.pick == "qwen-coder-0.5b"  # the better 1.5B does not fit 4 GB here
    laptop = cells(LAPTOP, entries)["code"]
    assert laptop.pick == "qwen-coder-1.5b" and "not separable from qwen-coder-0.5b" in laptop.note
    assert laptop.speed.startswith("≤ ") and "computed" in laptop.speed and "4.0 measured here [R1]" in laptop.speed
    gpu = cells(GPU_6, entries)["code"]
    assert "computed" in gpu.speed and "measured" not in gpu.speed  # a CPU record is no GPU measurement


def test_decode_ceiling_is_bandwidth_over_weight_bytes():
    n = models.REGISTRY["qwen-coder-0.5b"].n_params
    assert guidance.weight_bytes("qwen-coder-0.5b", "none") == 2 * n
    assert guidance.decode_ceiling("qwen-coder-0.5b", "none", LAPTOP) == pytest.approx(51.2e9 / (2 * n))
    embedding = 151936 * 896  # tied: counted once, kept at bf16 by bitsandbytes
    assert guidance.weight_bytes("qwen-coder-0.5b", "4bit") == pytest.approx((n - embedding) * 0.5625 + embedding * 2)


def test_training_formula_on_known_numbers():
    # Qwen2.5-0.5B, LoRA r=16 on all linear layers: peft reports 8,798,208 trainable parameters.
    assert guidance.adapter_params("qwen-coder-0.5b", 16) == 8_798_208
    parts = guidance.training_parts("qwen-coder-0.5b", quantize="none", rank=16, batch_tokens=100)
    assert parts == {"weights": 2 * 494_032_768, "adapter": 8_798_208 * 16,
                     "activations": 100 * 24 * 2 * (4 * 896 + 2 * 896 + 2 * 128 + 4 * 4864),
                     "loss_head": 100 * 151936 * 10}
    qlora = guidance.training_parts("qwen-coder-0.5b", quantize="4bit", rank=16, batch_tokens=100)
    assert qlora["weights"] < parts["weights"] / 2 and qlora["adapter"] == parts["adapter"]
    assert guidance.training_flops("qwen-coder-0.5b", 14316) == 4 * (494_032_768 - 151936 * 896) * 14316


def tune(name="qwen-coder-0.5b", peak=None, gpu=False, rid="R5"):
    return guidance.Tune(rid=rid, name=name, gpu=gpu, after=(48, 50), before_metric=0.0, after_metric=0.96,
                         peak_bytes=peak, weight_bytes=1_260_335_104, train_sec=68.0, n_tokens=14316, n_sequences=200,
                         batch_size=4, lora_rank=16)


def test_training_overhead_is_calibrated_on_cpu_records_and_gpu_stays_computed():
    batch = round(4 * 14316 / 200)
    formula = sum(guidance.training_parts("qwen-coder-0.5b", quantize="none", rank=16, batch_tokens=batch,
                                          weights=1_260_335_104).values())
    records = [tune(peak=formula + 1.5 * common.GIB), tune(name="smollm2-135m", peak=None, rid="R6")]
    overhead, basis = guidance.training_overhead(records)
    assert overhead == pytest.approx(1.5 * common.GIB) and [t.rid for t in basis] == ["R5"]
    assert guidance.sequence_tokens(records) == 72  # 14316 tokens over 200 sequences, rounded up
    cpu = guidance.training_bytes("qwen-coder-0.5b", gpu=False, quantize="none", tunes=records)
    parts = guidance.training_parts("qwen-coder-0.5b", quantize="none", rank=16, batch_tokens=4 * 72)
    assert cpu == pytest.approx(sum(parts.values()) + 1.5 * common.GIB)
    gpu = guidance.training_bytes("qwen-coder-0.5b", gpu=True, quantize="4bit", tunes=records)
    qlora = guidance.training_parts("qwen-coder-0.5b", quantize="4bit", rank=16, batch_tokens=4 * 72)
    assert gpu == pytest.approx(sum(qlora.values()) + guidance.gpu_overhead(qlora["weights"]))
    assert guidance.training_overhead([tune(gpu=True, peak=9e9)]) == (None, [])  # no GPU calibration from CPU rules


def test_fine_tuning_pick_uses_qlora_on_a_gpu_and_its_memory():
    picked = cells(GPU_4, [], tunes=[tune(peak=4e9)])["fine-tuning"]
    assert picked.pick == "qwen-coder-0.5b" and picked.precision == "QLoRA, 4-bit base"
    assert "s training computed" in picked.speed and "48/50" in picked.number and "[R5]" in picked.number


def test_every_candidate_has_the_shapes_the_formulas_need():
    for name in guidance.candidates():
        spec = models.REGISTRY[name]
        assert name in models.KV_SHAPES and guidance.embedding_params(name) < spec.n_params
        assert spec.role in guidance.CANDIDATE_ROLES
    assert {"qwen3-0.6b", "qwen3-1.7b", "gemma-3-1b", "smollm2-1.7b"} <= set(guidance.candidates())
    assert "llama-3.1-8b" not in guidance.candidates()  # a speculative target, not a ~1B pick
    assert guidance.size_text(134_515_008) == "135 M" and guidance.size_text(494_032_768) == "0.49 B"


def test_a_published_mmlu_near_chance_is_no_pick():
    tiny = {**LLAMA_MMLU, "model": "tinyllama-1.1b", "value": 25.92}
    assert cells(LAPTOP, [], published=[tiny])["chat"].pick is None
