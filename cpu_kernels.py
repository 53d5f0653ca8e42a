"""CPU speed-ups that lean on private or deprecated torch ops, fenced in one file.

Two swaps of nn.Linear layers:
- oneDNN pre-packed weights (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise, what torch.compile's
  CPU freezing does): a forward over several rows costs little more than one. The speculative pair's verify pass
  (k+1 tokens) and HumanEval's batched decoding (one token for each of up to 16 rows) lean on it;
  `packed_while` undoes the swap afterwards, bit for bit, where the stock kernels serve the next phase better.
- int8 dynamic-quantized Linear layers for the draft (torch.quantize_per_channel, torch.ops.quantized.*, run by
  fbgemm): a draft step reads half the bytes.

Verified on torch 2.15.0 (the project's venv; x86-64 with AVX-512, and with AVX2 only). The ops are private
(mkldnn) or deprecated (quantized), so each swap first asks whether its ops are there; if not, it logs ONE line
and leaves the stock kernels in place: slower, never wrong. tests/test_cpu_kernels.py fails loudly when an op
disappears, so an upgrade cannot make the demo silently slower.

    import cpu_kernels
    cpu_kernels.pack_linears(model, dtype="bfloat16", log=print)   # -> number of layers swapped (0 = fallback)
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc

VERIFIED_TORCH = ("2.15",)  # major.minor versions these swaps were measured and tested on
PACKING_OPS = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")  # torch.ops.mkldnn
INT8_OPS = ("linear_prepack", "linear_dynamic")  # torch.ops.quantized


def _has_op(namespace, name: str) -> bool:
    try:  # torch.ops namespaces raise AttributeError or RuntimeError for an unknown op, depending on the version
        getattr(namespace, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def packing_problem(dtype: str) -> str | None:
    """Why oneDNN packing cannot run here, or None when it can."""
    import torch
    if dtype not in ("float32", "bfloat16"):
        return f"oneDNN packing covers float32 and bfloat16, not {dtype}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    missing = [op for op in PACKING_OPS if not _has_op(torch.ops.mkldnn, op)]
    if missing:
        return f"torch {torch.__version__} lacks torch.ops.mkldnn.{', '.join(missing)}"
    if dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bf16 support in oneDNN"
    return None


def int8_problem() -> str | None:
    """Why the int8 draft layers cannot run here, or None when they can."""
    import torch
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm quantized engine"
    missing = [f"torch.ops.quantized.{op}" for op in INT8_OPS if not _has_op(torch.ops.quantized, op)]
    if not hasattr(torch, "quantize_per_channel"):
        missing.append("torch.quantize_per_channel")
    return f"torch {torch.__version__} lacks {', '.join(missing)}" if missing else None


@functools.cache
def packed_linear_class():
    """nn.Linear with its weight pre-packed for oneDNN. Measured here (Qwen2.5-Coder-1.5B, bf16, 1 thread): a
    forward over 2-9 tokens then costs 1.0-1.4x a 1-token forward instead of 1.8-2.1x with the stock kernel, whose
    1-row path is a fast GEMV but whose 2+-row path is not. Speculative decoding needs exactly that: verifying
    k+1 tokens for about the price of one."""
    import torch

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            self.bias = linear.bias

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

        def unpacked(self):
            """The nn.Linear back, its weight read out of the packed one (the same numbers, bit for bit)."""
            linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(self.packed_weight.to_dense(), requires_grad=False)
            linear.bias = self.bias
            return linear
    return PackedLinear


@functools.cache
def int8_linear_class():
    """nn.Linear with int8 weights (one scale per output row) whose input is quantized to 8 bits on the fly, run by
    fbgemm's VNNI kernels. For a draft only: its guesses are checked by the target, so a slightly different draft
    changes how many guesses are kept, never the output. Measured here (Qwen2.5-Coder-0.5B, 1 thread): a 1-token
    draft forward took 25 ms instead of 38 ms with packed bf16 weights (a decode step is bound by reading the
    weights; fbgemm's int8 GEMV reads half the bytes), and it agreed with the 1.5B target about as often
    (benchmarks/speculative_replay.py: 0.96/0.63/0.95/0.60 on the four prompts, bf16 0.95/0.64/0.97/0.62)."""
    import warnings

    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            weight = linear.weight.detach().float()
            scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-8).double()  # symmetric, one scale per row
            with warnings.catch_warnings():  # torch 2.15 deprecates the quantized tensor types this builds on
                warnings.simplefilter("ignore")
                qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                     torch.qint8)
            bias = linear.bias.detach().float() if linear.bias is not None else None
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
            # For models.model_weight_bytes: int8 weights, float64 scales and int64 zero points per row, fp32 bias
            # (a 151936 x 896 layer: 139 MB counted, 148 MB of RSS measured; fbgemm's row offsets are not counted)
            self.packed_bytes = weight.numel() + scale.numel() * 16 + (bias.numel() * 4 if bias is not None else 0)

        def forward(self, x):
            # reduce_range: 7-bit activations, as fbgemm asks, so that CPUs whose int8 kernels add in 16 bits
            # (AVX2 without VNNI) cannot saturate
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, True)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
    return Int8Linear


def swap_linears(model, make, *, only=None) -> int:
    """Replace every plain nn.Linear of a model (or of type `only`) with make(linear); returns how many."""
    import torch
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is (only or torch.nn.Linear):  # exact type: bitsandbytes' Linear4bit subclasses nn.Linear
                setattr(module, name, make(child))
                n += 1
    # The replaced weights go back to glibc's heap, not to the OS: without a trim the process keeps both copies
    # (measured: 4.5 instead of 3.2 GiB RSS for Qwen2.5-Coder-0.5B in fp32).
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return n


def pack_linears(model, *, dtype: str, log) -> int:
    """Pre-pack every plain nn.Linear of a CPU model for oneDNN; returns how many were swapped. Every method
    (target alone, assisted, ours) runs on the same model objects, so the comparison stays fair. Where packing
    cannot run, one logged line, and the stock kernels stay."""
    problem = packing_problem(dtype)
    if problem:
        log(f"cpu kernels: torch's stock Linear kernels ({problem}).")
        return 0
    return swap_linears(model, packed_linear_class())


@contextlib.contextmanager
def packed_while(model, *, dtype: str, log):
    """Every plain nn.Linear pre-packed for oneDNN inside the block, the stock layers back after it; yields the
    number packed (0: stock kernels throughout, with pack_linears' one logged line). For batched decoding: on an
    AVX2 CPU a Qwen2.5-Coder-0.5B fp32 step over 8 rows took 0.46 s packed against 1.00 s stock, while one row
    took 0.34 s packed against 0.28 s stock (torch's GEMV), so single-row phases get the stock layers back.
    A weight tied to another module (a shared embedding/LM head) is packed as a copy and its own layer put
    back, so the tie survives; untied weights are unpacked from the packed copy (no second copy is kept)."""
    if packing_problem(dtype) is not None:
        yield pack_linears(model, dtype=dtype, log=log)  # logs why, packs nothing
        return
    counts = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    packed_class, tied = packed_linear_class(), {}

    def pack(linear):
        packed = packed_class(linear)
        if counts.get(id(linear.weight), 0) > 1:  # its weight lives on in the tie anyway: keep the layer itself
            tied[id(packed)] = linear
        return packed
    n = swap_linears(model, pack)
    try:
        yield n
    finally:
        swap_linears(model, lambda packed: tied.get(id(packed)) or packed.unpacked(), only=packed_class)


def quantize_linears_int8(model, *, log) -> int:
    """The draft's plain nn.Linear layers in int8; returns how many were swapped. Where the int8 ops are gone, one
    logged line, and the draft stays in its dtype."""
    problem = int8_problem()
    if problem:
        log(f"cpu kernels: the draft keeps its float weights ({problem}).")
        return 0
    return swap_linears(model, int8_linear_class())
