"""The shared suite every quantizer backend must pass (as Optuna runs one suite over every sampler)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qradaptor.backends import BACKENDS, QuantCache, get_backend
from qradaptor.errors import BackendError

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def _linear(out_features=96, in_features=128, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    return lin


def test_supported_bits_include_the_default_ladder(backend):
    assert {2, 3, 4, 8} <= set(backend.supported_bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_shrinks_with_bits_and_matches_dense_forward(backend, bits):
    lin = _linear()
    q = backend.quantize(lin, bits, 64)
    w = backend.dequantize(q)
    assert w.shape == lin.weight.shape
    rel = ((w - lin.weight).pow(2).mean() / lin.weight.pow(2).mean()).item()
    # Uniform grid over the group's range: expected relative error ~ 4^-bits; stay well inside that.
    assert rel < 4.0 ** (-bits) * 3
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(q(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_error_is_monotone_in_bits(backend):
    lin = _linear()
    errs = [float((backend.dequantize(backend.quantize(lin, b, 64)) - lin.weight.detach()).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_held_bytes_equal_predicted_bytes(bits, dtype):
    for name in BACKENDS:
        backend = get_backend(name, compute_dtype=dtype)
        lin = _linear(bias=True)
        q = backend.quantize(lin, bits, 64)
        bias_bytes = lin.out_features * (torch.finfo(dtype).bits // 8)
        assert backend.held_bytes(q) == backend.weight_bytes(lin.out_features, lin.in_features, bits, 64) + bias_bytes


def test_hqq_packs_2_and_4_bits_exactly():
    backend = get_backend("hqq")
    n, groups = 96 * 128, 96 * 128 // 64
    meta = 2 * groups * 4
    assert backend.weight_bytes(96, 128, 2, 64) == n * 2 // 8 + meta
    assert backend.weight_bytes(96, 128, 4, 64) == n * 4 // 8 + meta
    assert backend.weight_bytes(96, 128, 8, 64) == n + meta


def test_quantize_leaves_the_source_layer_untouched(backend):
    lin = _linear(bias=True)
    before = lin.weight.detach().clone(), lin.bias.detach().clone()
    backend.quantize(lin, 3, 64)
    assert torch.equal(lin.weight, before[0]) and torch.equal(lin.bias, before[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_state_round_trips_through_safetensors(backend, bits, tmp_path):
    from safetensors.torch import load_file, save_file

    q = backend.quantize(_linear(bias=True), bits, 64)
    save_file({k: v.contiguous() for k, v in backend.state(q).items()}, tmp_path / "q.safetensors")
    q2 = backend.from_state(load_file(tmp_path / "q.safetensors"))
    assert torch.equal(backend.dequantize(q2), backend.dequantize(q))
    x = torch.randn(2, 128)
    assert torch.equal(q2(x), q(x))
    assert backend.held_bytes(q2) == backend.held_bytes(q)


def test_from_state_refuses_inconsistent_tensors(backend):
    state = backend.state(backend.quantize(_linear(), 4, 64))
    key = "W_q" if "W_q" in state else "codes"
    state[key] = state[key][: state[key].shape[0] // 2]
    with pytest.raises(BackendError):
        backend.from_state(state)


def test_unsupported_bits_are_refused_with_the_allowed_set(backend):
    with pytest.raises(BackendError) as e:
        backend.quantize(_linear(), 7, 64)
    assert "7-bit" in str(e.value) and str(list(backend.supported_bits)) in str(e.value)


def test_group_size_must_divide_the_weight(backend):
    with pytest.raises(BackendError, match="groups of 64"):
        backend.quantize(_linear(97, 100), 4, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_reaches_lora_adapters(backend, dtype):
    """Gradients must flow through the frozen quantized layer into both LoRA matrices."""
    from peft import LoraConfig, get_peft_model

    backend = get_backend(backend.name, compute_dtype=dtype)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128, dtype=dtype)  # real models always hold some parameter
            self.proj = backend.quantize(_linear(), 4, 64)

        def forward(self, x):
            return self.proj(self.norm(x))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(4, 128, dtype=dtype, requires_grad=False)
    model(x).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-3] for n in grads} == {"lora_A", "lora_B"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_cache_quantizes_each_layer_bits_pair_once(backend):
    cache = QuantCache(backend)
    lin = _linear()
    a = cache.get("layers.0.q", lin, 4, 64)
    b = cache.get("layers.0.q", lin, 4, 64)
    c = cache.get("layers.0.q", lin, 3, 64)
    assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)
    assert a is not b  # a copy each time: models built from the cache never share modules
    assert torch.equal(backend.dequantize(a), backend.dequantize(b))
    assert not torch.equal(backend.dequantize(a), backend.dequantize(c))
    with torch.no_grad():
        lin.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="changed"):
        cache.get("layers.0.q", lin, 4, 64)
