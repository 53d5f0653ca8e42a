"""The reader's answers in docs/COMPARISON.md: which model for which machine and use, what fine-tuning needs in
memory, and what "why ~1B" rests on. Pure arithmetic and rules over facts docs/generate.py reads from results/.

Kept apart from generate.py (which reads records, ranks them and renders the page) so each rule can be tested on
hand-made facts: the machine classes with their memory and bandwidth assumptions, the decode-speed ceiling
(bandwidth ÷ weight bytes), the training-memory formula, and the pick per machine and use. Nothing here reads a
file or imports torch.

    python docs/generate.py     # renders what this computes
"""
from __future__ import annotations

import dataclasses
import math

import common  # docs/generate.py puts the repository root on sys.path
import models


# --------------------------------------------------------------------------------------------- machines
PRECISION_WORDS = {"none": "bf16", "8bit": "8-bit", "4bit": "4-bit"}  # what a pick is loaded as, by --quantize


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    gpu: bool
    budget_gib: float  # what the machine leaves to one model
    bandwidth_gb_s: float  # memory bandwidth, 1e9 bytes/s: the assumption behind every computed speed
    example: str  # the typical part that bandwidth is the specification of


# An 8 GB laptop keeps ~2 GiB for the OS and a browser; a GPU's whole memory is usable (the CUDA context is in the
# overhead). Bandwidths are the parts' specifications: a computed speed is a ceiling, never a measurement.
MACHINES = (
    Machine("CPU laptop, 8 GB RAM", False, 6, 51.2, "dual-channel DDR4-3200"),
    Machine("CPU laptop, 16 GB RAM", False, 14, 51.2, "dual-channel DDR4-3200"),
    Machine("GPU, 4 GB", True, 4, 128, "GTX 1650, GDDR5"),
    Machine("GPU, 6 GB", True, 6, 336, "RTX 2060"),
    Machine("GPU, 8 GB", True, 8, 272, "RTX 4060"),
    Machine("GPU, 12 GB", True, 12, 360, "RTX 3060 12 GB"),
)
USES = ("chat", "code", "fine-tuning", "speculative draft")


# -------------------------------------------------------------------------------------------- the facts
@dataclasses.dataclass(frozen=True)
class Entry:
    """One benchmark record, as the guidance needs it (built by generate.guidance_facts)."""
    rid: str
    name: str
    quantize: str  # none / 8bit / 4bit
    precision: str  # bf16 / 8-bit / 4-bit
    mmlu: tuple | None  # (correct, n)
    at_chance: bool
    humaneval: tuple | None  # (passed, n)
    decode_tok_per_sec: float | None
    peak_bytes: float | None
    gpu: bool
    mmlu_text: str = ""
    humaneval_text: str = ""


@dataclasses.dataclass(frozen=True)
class Tune:
    """One fine-tune record."""
    rid: str
    name: str
    gpu: bool
    after: tuple | None  # held-out (exact, n) after training
    before_metric: float | None
    after_metric: float | None
    peak_bytes: float | None  # peak RSS (CPU) or allocator peak (GPU)
    weight_bytes: float | None  # what the loaded base really held
    train_sec: float | None
    n_tokens: int | None  # tokens trained on, every epoch counted
    n_sequences: int | None  # examples x epochs
    batch_size: int
    lora_rank: int
    dtype: str = "bfloat16"  # what the base computed in: fp32 on a CPU without fast bf16


@dataclasses.dataclass(frozen=True)
class Draft:
    """One speculative headline: a draft and its target, our speed-up over the target alone."""
    rid: str
    draft: str
    draft_precision: str
    target: str
    speedup: float
    low: float
    high: float
    n_prompts: int


# ----------------------------------------------------------------------------------------- architecture
# From each model's config.json on the hub, for the training-memory formula (models.KV_SHAPES has the attention
# shapes): (hidden size, MLP intermediate size, vocabulary rows, tied input/output embeddings, query width,
# MLP matrices: 3 for gated SwiGLU/GeGLU, 2 for GPT-NeoX's plain MLP).
ARCH: dict[str, tuple[int, int, int, bool, int, int]] = {
    "smollm2-135m": (576, 1536, 49152, True, 576, 3), "qwen-coder-0.5b": (896, 4864, 151936, True, 896, 3),
    "qwen3-0.6b": (1024, 3072, 151936, True, 2048, 3), "gemma-3-1b": (1152, 6912, 262144, True, 1024, 3),
    "pythia-1b": (2048, 8192, 50304, False, 2048, 2), "tinyllama-1.1b": (2048, 5632, 32000, False, 2048, 3),
    "llama-3.2-1b": (2048, 8192, 128256, True, 2048, 3), "qwen-coder-1.5b": (1536, 8960, 151936, True, 1536, 3),
    "stablelm-2-1.6b": (2048, 5632, 100352, False, 2048, 3), "qwen3-1.7b": (2048, 6144, 151936, True, 2048, 3),
    "smollm2-1.7b": (2048, 8192, 49152, True, 2048, 3), "llama-3.1-8b": (4096, 14336, 128256, False, 4096, 3),
}
CANDIDATE_ROLES = ("seed", "small", "peer")  # speculative targets (7-12B) are not ~1B picks


def candidates() -> list[str]:
    """Registry models the guidance may pick, smallest first."""
    return sorted((n for n, s in models.REGISTRY.items() if s.role in CANDIDATE_ROLES and n in ARCH
                   and n in models.KV_SHAPES), key=lambda n: (models.REGISTRY[n].n_params, n))


def is_coder(name: str) -> bool:
    """A code-specialised model: never the general-chat pick unless the evidence says so."""
    spec = models.REGISTRY.get(name)
    return spec is not None and "coder" in spec.hub_id.lower()


def general_chat(name: str) -> bool:
    spec = models.REGISTRY.get(name)
    return spec is not None and spec.chat_template and not is_coder(name)


def size_text(n_params: float) -> str:
    """The one way the page writes a parameter count: '135 M', '0.49 B', '1.54 B'."""
    return f"{n_params / 1e6:.0f} M" if n_params < 3e8 else f"{n_params / 1e9:.2f} B"


def embedding_params(name: str) -> int:
    """Input embedding plus output head parameters (the head counted once when tied)."""
    hidden, _, vocab, tied, _, _ = ARCH[name]
    return vocab * hidden * (1 if tied else 2)


def weight_bytes(name: str, quantize: str) -> float:
    """Weights at a precision. bitsandbytes quantizes the Linear layers only: the embedding and output head stay
    16-bit (transformers keeps the head unconverted), so 8/4-bit shrink the non-embedding part."""
    n, emb = models.REGISTRY[name].n_params, embedding_params(name)
    if quantize == "none":
        return n * models.BYTES_PER_PARAM["bfloat16"]
    return (n - emb) * models.BYTES_PER_PARAM[quantize] + emb * models.BYTES_PER_PARAM["bfloat16"]


def decode_ceiling(name: str, quantize: str, machine: Machine) -> float:
    """Computed decode tok/s: each new token reads every weight once, so speed <= bandwidth / weight bytes."""
    return machine.bandwidth_gb_s * 1e9 / weight_bytes(name, quantize)


# ------------------------------------------------------------------------------------- training memory
ADAPTER_BYTES_PER_PARAM = 16  # fp32 LoRA weight 4 + its gradient 4 + Adam's two moments 8
LOSS_HEAD_BYTES = 10  # per position and vocabulary row: bf16 logits 2 + their fp32 copy 4 + its gradient 4
DEFAULT_SEQUENCE_TOKENS = 96  # the demo's examples are ~60-90 tokens; used until a record measures them


def adapter_params(name: str, rank: int) -> int:
    """LoRA on every linear projection: rank x (inputs + outputs) for each, in every layer."""
    hidden, inter, _, _, q_dim, n_mlp = ARCH[name]
    layers, kv_heads, head_dim, _ = models.KV_SHAPES[name]
    kv = kv_heads * head_dim
    per_layer = (hidden + q_dim) * 2 + (hidden + kv) * 2 + (hidden + inter) * n_mlp
    return rank * per_layer * layers


def activation_bytes(name: str, tokens: int) -> int:
    """bf16 activations kept for the backward pass, per token and layer: the residual, norm and attention
    inputs/outputs (4 x hidden + 2 x query width + 2 x key/value width) and the MLP's (matrices + 1) x intermediate."""
    hidden, inter, _, _, q_dim, n_mlp = ARCH[name]
    layers, kv_heads, head_dim, _ = models.KV_SHAPES[name]
    return tokens * layers * 2 * (4 * hidden + 2 * q_dim + 2 * kv_heads * head_dim + (n_mlp + 1) * inter)


def training_parts(name: str, *, quantize: str, rank: int, batch_tokens: int, weights: float | None = None) -> dict:
    """The formula's terms in bytes (weights given when a record measured them): LoRA on a bf16 base
    (quantize 'none') or QLoRA on a 4-bit base ('4bit'); the loss head over every position of the batch, an
    upper bound (finetune_demo.py projects only the answer positions)."""
    return {"weights": weights if weights is not None else weight_bytes(name, quantize),
            "adapter": adapter_params(name, rank) * ADAPTER_BYTES_PER_PARAM,
            "activations": activation_bytes(name, batch_tokens),
            "loss_head": batch_tokens * ARCH[name][2] * LOSS_HEAD_BYTES}


def sequence_tokens(tunes: list[Tune]) -> int:
    """The demo's sequence length as measured: the longest mean tokens per training example over the records."""
    means = [t.n_tokens / t.n_sequences for t in tunes if t.n_tokens and t.n_sequences]
    return math.ceil(max(means)) if means else DEFAULT_SEQUENCE_TOKENS


def training_overhead(tunes: list[Tune]) -> tuple[float | None, list[Tune]]:
    """Calibration on measured CPU fine-tunes: peak RSS minus the formula (weights as loaded). The largest is the
    process's overhead (Python, torch, the trainer); (bytes, the records it came from)."""
    found = []
    for t in tunes:
        if t.gpu or t.name not in ARCH or not t.peak_bytes or not t.n_tokens or not t.n_sequences:
            continue
        batch = round(t.batch_size * t.n_tokens / t.n_sequences)
        parts = training_parts(t.name, quantize="none", rank=t.lora_rank, batch_tokens=batch, weights=t.weight_bytes)
        found.append((t.peak_bytes - sum(parts.values()), t))
    if not found:
        return None, []
    return max(o for o, _ in found), sorted((t for _, t in found), key=lambda t: t.rid)


def gpu_overhead(weights: float) -> float:
    """No GPU record yet: the loader's own estimate (models.estimate_memory), CUDA context included."""
    return 0.1 * weights + 300 * 1024**2


def training_bytes(name: str, *, gpu: bool, quantize: str, tunes: list[Tune], rank: int = 16,
                   batch_size: int = 4) -> float:
    """Computed peak memory of finetune_demo.py's run for a model: the formula plus the overhead (calibrated on
    CPU records for RAM; the loader's estimate for VRAM until a GPU record exists)."""
    parts = training_parts(name, quantize=quantize, rank=rank, batch_tokens=batch_size * sequence_tokens(tunes))
    cpu_overhead, _ = training_overhead(tunes)
    overhead = gpu_overhead(parts["weights"]) if gpu or cpu_overhead is None else cpu_overhead
    return sum(parts.values()) + overhead


def training_flops(name: str, tokens: int) -> float:
    """LoRA on a frozen base: forward 2N and backward through the activations 2N FLOPs per token (no weight
    gradients), N the non-embedding parameters."""
    return 4 * (models.REGISTRY[name].n_params - embedding_params(name)) * tokens


GPU_TFLOPS_ASSUMED = (2, 5)  # effective TFLOP/s of a 4-bit QLoRA step on an 8 GB consumer GPU: an assumption


# ---------------------------------------------------------------------------------------------- picks
@dataclasses.dataclass
class Cell:
    """One machine x use answer."""
    pick: str | None = None  # model name
    precision: str = ""  # bf16 / 8-bit / 4-bit
    provisional: bool = False  # only published figures back it
    number: str = ""  # the number that decides it, with its source
    speed: str = ""
    memory: str = ""
    licence: str = ""
    command: str = ""
    settle: str = ""  # the command that settles a provisional pick
    note: str = ""


QUANTIZE_OF = {"bf16": "none", "8-bit": "8bit", "4-bit": "4bit"}
NEAR_CHANCE_POINTS = 5  # a published MMLU score this close to 25% is not evidence of anything


def licence_text(name: str) -> str:
    spec = models.REGISTRY[name]
    return f"{spec.license}, " + ("**gated**" if spec.gated else "not gated")


def quantize_flag(quantize: str) -> str:
    return "" if quantize == "none" else f" --quantize {quantize}"


def pick_cells(machine: Machine, *, entries: list[Entry], tunes: list[Tune], drafts: list[Draft], published: list,
               memory_parts, best, gib) -> dict[str, Cell]:
    """The four uses on one machine.

    memory_parts(name, quantize) -> (model bytes, process overhead bytes), computed for this kind of machine with
    4,096 tokens of context; best(items, counts) -> the best item by a proportion with those the evidence cannot
    separate from it (p >= 0.05), best first (generate.best_by_counts); gib(bytes) -> text."""
    budget = machine.budget_gib * common.GIB
    memory = lambda name, quantize: sum(memory_parts(name, quantize))  # noqa: E731
    fits = lambda name, quantize: name in ARCH and memory(name, quantize) <= budget  # noqa: E731
    first_fit = {n: next((q for q in ("none", "8bit", "4bit") if fits(n, q)), None) for n in candidates()}

    def speed(name, quantize):
        text = f"≤ {decode_ceiling(name, quantize, machine):.0f} tok/s computed"
        measured = [e for e in entries if e.name == name and e.quantize == quantize and e.gpu == machine.gpu
                    and e.decode_tok_per_sec]
        if measured:
            e = max(measured, key=lambda e: e.rid)
            # a record at another precision (fp32 on a CPU without fast bf16) is named as such, never passed off
            other = "" if e.precision == PRECISION_WORDS[quantize] else f" at {e.precision}"
            text += f"; {e.decode_tok_per_sec:.1f} measured here{other} [{e.rid}]"
        return text

    def measured_at(e) -> str:
        """Where the record ran at another precision than the pick names (fp32 on a CPU without fast bf16)."""
        return "" if e.precision == PRECISION_WORDS[e.quantize] else f", measured at {e.precision}"

    def filled(cell, name, quantize, command):
        cell.pick, cell.precision = name, PRECISION_WORDS[quantize]
        cell.speed, cell.memory = speed(name, quantize), f"{gib(memory(name, quantize))} computed"
        cell.licence, cell.command = licence_text(name), command
        return cell

    def published_best(benchmark, keep):
        """The best published figure of a model that fits and is not measured here; an MMLU figure near chance
        (no n to test it) never qualifies."""
        pool = [p for p in published if p["benchmark"] == benchmark and keep(p["model"]) and first_fit.get(p["model"])
                and not any(e.name == p["model"] for e in entries)
                and not (benchmark == "MMLU" and p["value"] - common.CHANCE_ACCURACY * 100 < NEAR_CHANCE_POINTS)]
        return max(pool, key=lambda p: (p["value"], p["model"]), default=None)

    def provisional(cell, p, command_for):
        q = first_fit[p["model"]]
        filled(cell, p["model"], q, command_for(p["model"], q))
        cell.provisional = True
        cell.number = f"{p['benchmark']} {p['value']}% *published* ([{p['source'][0]}]({p['source'][1]}))"
        cell.settle = f"python benchmark.py --models {p['model']}{quantize_flag(q)}"
        return cell

    chat_cmd = lambda n, q: f"python demo_chat.py --model {n}{quantize_flag(q)}"  # noqa: E731
    cells = {use: Cell() for use in USES}

    # Chat: the best general model measured above chance; a coder only when it beats every general model the
    # machine fits and no general candidate is left unmeasured; else the best published figure, provisional.
    scored = [e for e in entries if e.mmlu and not e.at_chance and fits(e.name, e.quantize)]
    general = [e for e in scored if general_chat(e.name)]
    unmeasured = published_best("MMLU", general_chat)
    top = best(general, lambda e: e.mmlu)
    if top:
        filled(cells["chat"], top[0].name, top[0].quantize, chat_cmd(top[0].name, top[0].quantize))
        cells["chat"].number = f"{top[0].mmlu_text}{measured_at(top[0])} [{top[0].rid}]"
        if unmeasured:
            cells["chat"].note = (f"not measured here yet: {unmeasured['model']}, {unmeasured['benchmark']} "
                                  f"{unmeasured['value']}% *published*")
    elif unmeasured:
        provisional(cells["chat"], unmeasured, chat_cmd)
        coders = best([e for e in scored if is_coder(e.name)], lambda e: e.mmlu)
        if coders:
            cells["chat"].note = (f"coder measured here: {coders[0].name} {coders[0].precision}, "
                                  f"{coders[0].mmlu_text} [{coders[0].rid}]")
    else:
        coders = best([e for e in scored if is_coder(e.name)], lambda e: e.mmlu)
        if coders:
            filled(cells["chat"], coders[0].name, coders[0].quantize, chat_cmd(coders[0].name, coders[0].quantize))
            cells["chat"].number = (f"{coders[0].mmlu_text}{measured_at(coders[0])} [{coders[0].rid}]; a coder "
                                    f"model: no general model is left")

    # Code: the best HumanEval measured here that fits; ties are named.
    coded = best([e for e in entries if e.humaneval and fits(e.name, e.quantize)], lambda e: e.humaneval)
    if coded:
        e = coded[0]
        filled(cells["code"], e.name, e.quantize, chat_cmd(e.name, e.quantize))
        cells["code"].number = f"{e.humaneval_text}{measured_at(e)} [{e.rid}]"
        if len(coded) > 1:
            cells["code"].note = "not separable from " + ", ".join(f"{o.name} {o.precision} [{o.rid}]"
                                                                    for o in coded[1:])
    elif p := published_best("HumanEval", lambda name: True):
        provisional(cells["code"], p, chat_cmd)

    # Fine-tuning: the best held-out result measured here whose run fits this machine (QLoRA on a GPU, as
    # finetune_demo.py does on CUDA; LoRA on a bf16 base on a CPU).
    method = "4bit" if machine.gpu else "none"
    tuned = best([t for t in tunes if t.after and t.name in ARCH and training_bytes(
        t.name, gpu=machine.gpu, quantize=method, tunes=tunes) <= budget], lambda t: t.after)
    if tuned:
        t, cell = tuned[0], cells["fine-tuning"]
        cell.pick, cell.precision = t.name, "QLoRA, 4-bit base" if machine.gpu else "LoRA, bf16 base"
        cell.number = (f"held-out exact match {t.before_metric:.0%} → {t.after_metric:.0%} "
                       f"({t.after[0]}/{t.after[1]}) [{t.rid}]")
        flops = training_flops(t.name, t.n_tokens or 0)
        at = "" if t.dtype == "bfloat16" else f" at {t.dtype.replace('float', 'fp')}"
        cell.speed = (f"{t.train_sec:.0f} s training measured{at} on this repo's CPU [{t.rid}]" if not machine.gpu
                      and t.train_sec else f"{flops / GPU_TFLOPS_ASSUMED[1] / 1e12:.0f}–"
                      f"{flops / GPU_TFLOPS_ASSUMED[0] / 1e12:.0f} s training computed")
        cell.memory = f"{gib(training_bytes(t.name, gpu=machine.gpu, quantize=method, tunes=tunes))} computed"
        cell.licence, cell.command = licence_text(t.name), f"python finetune_demo.py --model {t.name}"

    # Speculative draft: the fastest measured pair that fits together, the target at bf16 as it was measured (one
    # process: the overhead counts once).
    def pair_bytes(d):
        (draft, overhead), (target, _) = memory_parts(d.draft, "none"), memory_parts(d.target, "none")
        return draft + target + overhead
    pairs = [d for d in drafts if d.draft in ARCH and d.target in ARCH and pair_bytes(d) <= budget]
    if pairs:
        d, cell = max(pairs, key=lambda d: (d.speedup, d.rid)), cells["speculative draft"]
        cell.pick, cell.precision = d.draft, f"{d.draft_precision} draft for {d.target}"
        cell.number = (f"{d.speedup:.2f}× the target alone ({d.low:.2f}–{d.high:.2f}× over {d.n_prompts} prompts) "
                       f"[{d.rid}]")
        cell.memory = f"{gib(pair_bytes(d))} for both, computed"
        cell.speed = "speed-up measured on a CPU, not on a GPU" if machine.gpu else "speed-up measured on a CPU"
        cell.licence = licence_text(d.draft)
        cell.command = f"python speculative_demo.py --draft {d.draft} --target {d.target}"
    return cells


def cell_text(cell: Cell) -> str:
    """A table cell in short lines: the pick, the deciding number, speed · memory · licence, the command."""
    if not cell.pick:
        return "nothing measured or published fits"
    head = f"**{cell.pick}** {cell.precision}" + (", *provisional*" if cell.provisional else "")
    facts = " · ".join(part for part in (cell.speed, cell.memory, cell.licence) if part)
    command = f"`{cell.command}`" + (f"; settle it: `{cell.settle}`" if cell.settle else "")
    return "<br>".join(line for line in (head, cell.number, facts, command, cell.note) if line)
