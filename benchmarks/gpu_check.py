"""Prepared CUDA check: the GPU-only paths of common.py on tiny models and, if present, on SmolLM2-135M.

CI has no GPU, so these paths are only exercised when a GPU is at hand. One short run checks:
4-bit (NF4) and 8-bit loading through bitsandbytes on CUDA, VRAM readings from the allocator and NVML
(and that they are consistent with the weight bytes), greedy generation, and decode speed in bf16 vs 4-bit.

    python benchmarks/gpu_check.py                  # tiny Llama/StableLM/GPT-NeoX + smollm2-135m if on disk
    python benchmarks/gpu_check.py --out gpu.json   # also save the readings
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import common  # noqa: E402
import models  # noqa: E402


def decode_tok_per_sec(loaded, n_tokens: int = 64) -> float:
    """Greedy decode through the project's own loop (models.decode_steps), after an uncounted warm-up."""
    import torch
    ids = loaded.tokenizer("The quick brown fox")["input_ids"]
    with torch.inference_mode():
        for _ in models.decode_steps(loaded.model, ids, cache=models.new_cache(), max_new_tokens=4):
            pass
        steps = models.decode_steps(loaded.model, ids, cache=models.new_cache(), max_new_tokens=n_tokens + 1)
        next(steps)  # the prompt's forward pass is prefill, not decode
        common.sync(loaded.device)
        start = time.perf_counter()
        n = sum(1 for _ in steps)
        common.sync(loaded.device)
    return n / (time.perf_counter() - start)


def check_one(name: str, quantize: str) -> dict:
    import torch
    torch.cuda.empty_cache()
    with common.MemoryMonitor("cuda") as monitor:
        loaded = models.load_model(name, device="cuda", quantize=quantize, log=lambda *_: None)
        speed = decode_tok_per_sec(loaded)
    memory = monitor.result()
    row = {"model": name if not Path(name).exists() else Path(name).name, "quantize": quantize,
           "weight_bytes": loaded.weight_bytes, "decode_tok_per_sec": speed, **memory,
           "on_cuda": next(loaded.model.parameters()).is_cuda}
    # Consistency: the allocator's peak holds at least the weights; NVML (whole device) at least the allocator's reserve.
    row["consistent"] = bool(memory["peak_vram_allocated_bytes"] >= loaded.weight_bytes
                             and (memory["peak_vram_nvml_bytes"] is None
                                  or memory["peak_vram_nvml_bytes"] >= memory["peak_vram_reserved_bytes"]))
    del loaded
    return row


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--out", type=Path, help="also write the readings to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tiny_models import ARCHS, build_tiny_model
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch; this check only runs on a GPU machine.", file=sys.stderr)
        return 2
    names = [str(build_tiny_model(arch, Path(tempfile.mkdtemp()) / arch)) for arch in ARCHS]
    if models.model_on_disk("smollm2-135m")[1] == "ready":  # carried over, never fetched on the GPU box
        names.append("smollm2-135m")
    rows = [check_one(name, quantize) for name in names for quantize in ("none", "8bit", "4bit")]
    for row in rows:
        print(f"{row['model']:>14} {row['quantize']:>5}  weights {common.human_bytes(row['weight_bytes']):>10}  "
              f"alloc {common.human_bytes(row['peak_vram_allocated_bytes']):>10}  "
              f"nvml {common.human_bytes(row['peak_vram_nvml_bytes']):>10}  {row['decode_tok_per_sec']:7.1f} tok/s  "
              f"{'ok' if row['consistent'] and row['on_cuda'] else 'INCONSISTENT'}")
    if args.out:
        common.write_json_atomic(args.out, {"environment": common.environment("cuda"), "rows": rows})
    return 0 if all(r["consistent"] and r["on_cuda"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
