"""cpu_kernels.py: the private and deprecated torch ops it builds on are there (a loud failure here, not a silently
slower demo, when an upgrade drops one), the packed and int8 layers compute what nn.Linear computes, a swapped
model really runs the swapped classes, and a missing op falls back with one logged line."""
import platform

import pytest

torch = pytest.importorskip("torch")

import cpu_kernels  # noqa: E402

X86 = platform.machine().lower() in ("x86_64", "amd64")
TORCH_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.skipif(not X86, reason="oneDNN and fbgemm ship with torch's x86 builds")
def test_the_private_ops_exist_on_this_torch():
    """On x86 the speed-ups must be available: if torch drops an op, the demo would fall back and only be slower,
    so this is where it shows. After checking a new torch, add it to VERIFIED_TORCH."""
    assert cpu_kernels.packing_problem("float32") is None, cpu_kernels.packing_problem("float32")
    assert cpu_kernels.int8_problem() is None, cpu_kernels.int8_problem()
    assert TORCH_MINOR in cpu_kernels.VERIFIED_TORCH, (
        f"torch {torch.__version__} is not among the versions cpu_kernels.py was verified on "
        f"({', '.join(cpu_kernels.VERIFIED_TORCH)}): check the packed and int8 speed-ups, then add it")


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 48, bias=False))


@pytest.mark.skipif(cpu_kernels.packing_problem("float32") is not None, reason="no oneDNN packing here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_model_uses_the_packed_class_and_computes_the_same(dtype):
    if cpu_kernels.packing_problem(dtype):
        pytest.skip(cpu_kernels.packing_problem(dtype))
    model = tiny_model().to(getattr(torch, dtype))
    x = torch.randn(3, 5, 64, dtype=getattr(torch, dtype))
    with torch.no_grad():
        want = model(x).float()
        lines = []
        assert cpu_kernels.pack_linears(model, dtype=dtype, log=lines.append) == 2 and lines == []
        assert [type(m) for m in model if not isinstance(m, torch.nn.GELU)] == [cpu_kernels.packed_linear_class()] * 2
        got = model(x).float()
    torch.testing.assert_close(got, want, **({} if dtype == "float32" else dict(atol=0.05, rtol=0.05)))


@pytest.mark.skipif(cpu_kernels.int8_problem() is not None, reason="no fbgemm int8 kernels here")
def test_int8_layers_stay_close_to_the_float_layer():
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    quantized = cpu_kernels.int8_linear_class()(linear)
    with torch.no_grad():
        error = (quantized(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert quantized(x).shape == (3, 5, 48) and 0 < error < 0.03
    model = tiny_model()
    assert cpu_kernels.quantize_linears_int8(model, log=print) == 2
    assert sum(type(m) is cpu_kernels.int8_linear_class() for m in model) == 2
    assert model[0].packed_bytes == 96 * 64 + 96 * 16 + 96 * 4  # int8 weights, per-row scale and zero point, bias


def test_a_missing_op_falls_back_to_stock_kernels_with_one_line(monkeypatch):
    """Simulate a torch without the ops: nothing is swapped, the model still runs, one line says why."""
    monkeypatch.setattr(cpu_kernels, "PACKING_OPS", ("_reorder_linear_weight", "_no_such_op_in_any_torch"))
    monkeypatch.setattr(cpu_kernels, "INT8_OPS", ("linear_dynamic", "_no_such_op_in_any_torch"))
    model = tiny_model()
    lines = []
    assert cpu_kernels.pack_linears(model, dtype="float32", log=lines.append) == 0
    assert cpu_kernels.quantize_linears_int8(model, log=lines.append) == 0
    assert len(lines) == 2 and all("_no_such_op_in_any_torch" in line for line in lines)
    assert all(type(m) in (torch.nn.Linear, torch.nn.GELU) for m in model)
    assert cpu_kernels.packing_problem("float16") is not None  # fp16 is not packed: stock kernels, also one line


class TiedHead(torch.nn.Module):
    """An embedding whose weight is also the output layer's, as in Qwen2.5 and SmolLM2 (tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.body, self.head = torch.nn.Embedding(40, 24), torch.nn.Linear(24, 24), \
            torch.nn.Linear(24, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


@pytest.mark.skipif(cpu_kernels.packing_problem("float32") is not None, reason="no oneDNN packing here")
def test_packed_while_puts_back_the_same_numbers_and_keeps_a_tie():
    model, ids = TiedHead(), torch.tensor([[1, 5, 7], [2, 2, 39]])
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids)
        with cpu_kernels.packed_while(model, dtype="float32", log=pytest.fail) as n:
            assert n == 2 and type(model.body) is type(model.head) is cpu_kernels.packed_linear_class()
            torch.testing.assert_close(model(ids), want)
        assert type(model.body) is type(model.head) is torch.nn.Linear
        assert model.head.weight is model.embed.weight  # the tie survives: one tensor, not two
        assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # bit for bit
        assert torch.equal(model(ids), want)


@pytest.mark.skipif(cpu_kernels.packing_problem("float32") is not None, reason="no oneDNN packing here")
def test_packed_while_restores_the_layers_when_the_block_fails():
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt), cpu_kernels.packed_while(model, dtype="float32", log=pytest.fail):
        raise KeyboardInterrupt
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert model[2].bias is None and model[0].weight.shape == (96, 64)


def test_packed_while_without_the_ops_runs_the_block_on_stock_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "PACKING_OPS", ("_no_such_op_in_any_torch",))
    model, lines = tiny_model(), []
    with cpu_kernels.packed_while(model, dtype="float32", log=lines.append) as n:
        assert n == 0 and all(type(m) in (torch.nn.Linear, torch.nn.GELU) for m in model)
    assert len(lines) == 1 and "_no_such_op_in_any_torch" in lines[0]
