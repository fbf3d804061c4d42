"""The shared suite every quantizer backend must pass (as Optuna runs one suite over every sampler)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import math

from qradaptor.backends import BACKENDS, QuantCache, QuantizedLinear, get_backend, is_quantized
from qradaptor.errors import BackendError

DTYPES = [torch.float32, torch.bfloat16]
#: Every (backend, bit-width) pair a backend claims to store.
PAIRS = [(name, bits) for name in BACKENDS for bits in get_backend(name).supported_bits]
#: Backends that store any weight whose size the group size divides (hqq-native's 2- and 4-bit packers need
#: the group count to be a multiple of 4 or 2 and refuse other sizes).
ANY_SIZE = {"hqq", "reference"}
#: (out_features, in_features, group_size) with a number of weights that is not a multiple of 8.
ODD_SHAPES = [(3, 5, 5), (7, 9, 21), (5, 13, 13), (33, 17, 17)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def _linear(out_features=96, in_features=128, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    return lin


def test_supported_bits_include_the_default_ladder(backend):
    assert {2, 3, 4, 8} <= set(backend.supported_bits)


def test_hqq_and_reference_store_every_bit_width_2_to_8():
    assert get_backend("hqq").supported_bits == get_backend("reference").supported_bits == (2, 3, 4, 5, 6, 7, 8)
    assert get_backend("hqq-native").supported_bits == (2, 3, 4, 8)


@pytest.mark.parametrize("name, bits", PAIRS)
def test_error_shrinks_with_bits_and_matches_dense_forward(name, bits):
    backend = get_backend(name)
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
    errs = [float((backend.dequantize(backend.quantize(lin, b, 64)) - lin.weight.detach()).pow(2).mean())
            for b in backend.supported_bits]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, bits", PAIRS)
def test_held_bytes_equal_predicted_bytes(name, bits, dtype):
    backend = get_backend(name, compute_dtype=dtype)
    lin = _linear(bias=True)
    q = backend.quantize(lin, bits, 64)
    bias_bytes = lin.out_features * (torch.finfo(dtype).bits // 8)
    assert backend.held_bytes(q) == backend.weight_bytes(lin.out_features, lin.in_features, bits, 64) + bias_bytes


@pytest.mark.parametrize("name, bits", PAIRS)
def test_quantized_modules_describe_themselves(name, bits):
    """Every backend's module answers for itself (bits, group size, bytes held, state, dequantized weight),
    and the backend's methods say the same."""
    backend = get_backend(name)
    lin = _linear(bias=True)
    q = backend.quantize(lin, bits, 64)
    assert isinstance(q, QuantizedLinear) and is_quantized(q) and backend.is_quantized(q)
    assert (q.bits, q.group_size) == (bits, 64)
    assert q.held_bytes() == backend.held_bytes(q) == backend.weight_bytes(96, 128, bits, 64) + 96 * 4
    w = q.dequantize()
    assert w.shape == (96, 128) and torch.equal(w, backend.dequantize(q))
    state = q.state()
    assert state.keys() == backend.state(q).keys() and int(state["nbits"]) == bits
    q2 = backend.from_state(state)
    assert (q2.bits, q2.group_size, q2.held_bytes()) == (bits, 64, q.held_bytes())
    assert torch.equal(q2.dequantize(), w)
    copied = QuantCache(backend).get("l", lin, bits, 64)  # the cache's copies are the same kind of module
    assert is_quantized(copied) and copied.bits == bits and torch.equal(copied.dequantize(), w)


def test_is_quantized_knows_every_backend_and_nothing_else():
    modules = {name: get_backend(name).quantize(_linear(), 4, 64) for name in BACKENDS}
    for name, module in modules.items():
        assert is_quantized(module)
        assert [other for other in BACKENDS if get_backend(other).is_quantized(module)] == [name]
    assert not is_quantized(_linear()) and not is_quantized(nn.Sequential(modules["hqq"]))


def test_hqq_native_module_is_hqqs_own_layer():
    """hqq-native's module is HQQ's HQQLinear (PEFT wraps it as such, HQQ runs its forward)."""
    from hqq.core.quantize import HQQLinear

    q = get_backend("hqq-native").quantize(_linear(), 4, 64)
    assert isinstance(q, HQQLinear)
    x = torch.randn(2, 128)
    torch.testing.assert_close(q(x), x @ q.dequantize().T, rtol=1e-4, atol=1e-4)


def test_hqq_native_packs_2_and_4_bits_exactly_and_3_bits_ten_to_an_int32():
    backend = get_backend("hqq-native")
    n, groups = 96 * 128, 96 * 128 // 64
    meta = 2 * groups * 4
    assert backend.weight_bytes(96, 128, 2, 64) == n * 2 // 8 + meta
    assert backend.weight_bytes(96, 128, 3, 64) == math.ceil(groups / 10) * 64 * 4 + meta  # 3.2 bits a weight
    assert backend.weight_bytes(96, 128, 4, 64) == n * 4 // 8 + meta
    assert backend.weight_bytes(96, 128, 8, 64) == n + meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(96, 128, 64), *ODD_SHAPES])
def test_hqq_stores_n_codes_in_ceil_n_bits_over_8_bytes(bits, shape, dtype):
    out_features, in_features, group_size = shape
    backend = get_backend("hqq", compute_dtype=dtype)
    n = out_features * in_features
    meta = 2 * (n // group_size) * (torch.finfo(dtype).bits // 8)
    assert backend.weight_bytes(out_features, in_features, bits, group_size) == math.ceil(n * bits / 8) + meta
    q = backend.quantize(_linear(out_features, in_features), bits, group_size)
    assert backend.held_bytes(q) == math.ceil(n * bits / 8) + meta


@pytest.mark.parametrize("name, bits", PAIRS)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_odd_sizes_round_trip_exactly_or_are_refused(name, bits, shape, tmp_path):
    """A number of weights that is not a multiple of 8 is stored exactly (never silently truncated)."""
    from safetensors.torch import load_file, save_file

    out_features, in_features, group_size = shape
    backend = get_backend(name)
    lin = _linear(out_features, in_features, bias=True)
    try:
        q = backend.quantize(lin, bits, group_size)
    except BackendError as e:
        assert name not in ANY_SIZE, e
        assert "multiple" in str(e)
        return
    w = backend.dequantize(q)
    assert w.shape == lin.weight.shape
    assert ((w - lin.weight).abs() <= (lin.weight.abs().max() * 2.0 ** (1 - bits))).all()
    save_file({k: v.contiguous() for k, v in backend.state(q).items()}, tmp_path / "q.safetensors")
    q2 = backend.from_state(load_file(tmp_path / "q.safetensors"))
    assert torch.equal(backend.dequantize(q2), w)
    assert backend.held_bytes(q2) == backend.held_bytes(q) == (
        backend.weight_bytes(out_features, in_features, bits, group_size) + 4 * out_features)


def test_quantize_leaves_the_source_layer_untouched(backend):
    lin = _linear(bias=True)
    before = lin.weight.detach().clone(), lin.bias.detach().clone()
    backend.quantize(lin, 3, 64)
    assert torch.equal(lin.weight, before[0]) and torch.equal(lin.bias, before[1])


@pytest.mark.parametrize("name, bits", PAIRS)
def test_state_round_trips_through_safetensors(name, bits, tmp_path):
    from safetensors.torch import load_file, save_file

    backend = get_backend(name)
    q = backend.quantize(_linear(bias=True), bits, 64)
    save_file({k: v.contiguous() for k, v in backend.state(q).items()}, tmp_path / "q.safetensors")
    q2 = backend.from_state(load_file(tmp_path / "q.safetensors"))
    assert torch.equal(backend.dequantize(q2), backend.dequantize(q))
    x = torch.randn(2, 128)
    assert torch.equal(q2(x), q(x))
    assert backend.held_bytes(q2) == backend.held_bytes(q)


def test_from_state_refuses_inconsistent_tensors(backend):
    state = backend.state(backend.quantize(_linear(), 4, 64))
    key = max(state, key=lambda k: state[k].numel())  # the stored codes
    state[key] = state[key][: state[key].shape[0] // 2]
    with pytest.raises(BackendError) as e:
        backend.from_state(state, name="model.layers.0.mlp.up_proj")
    assert f"model.layers.0.mlp.up_proj.{key}" in str(e.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda s: s.update(packed=s["packed"][:-1]), "packed"),  # one byte short
        (lambda s: s.update(packed=torch.cat([s["packed"], s["packed"][:1]])), "packed"),  # one byte over
        (lambda s: s.update(packed=s["packed"].view(-1, 64)), "packed"),  # right bytes, wrong shape
        (lambda s: s.update(packed=s["packed"].view(torch.int8)), "packed"),  # wrong dtype
        (lambda s: s.update(nbits=torch.tensor(6)), "packed"),  # 5-bit bytes recorded as 6-bit
        (lambda s: s.update(shape=torch.tensor([96, 64])), "packed"),  # recorded size does not match
        (lambda s: s.update(scale=s["scale"][:-1]), "scale"),
        (lambda s: s.update(shape=torch.tensor([97, 127])), "groups of 64"),
        (lambda s: s.pop("zero"), "lacks ['zero']"),
        (lambda s: s.update(nbits=torch.tensor(9)), "9-bit"),
    ],
)
def test_hqq_from_state_refuses_packed_tensors_that_do_not_match_their_bits_and_size(change, needle):
    backend = get_backend("hqq")
    state = dict(backend.state(backend.quantize(_linear(), 5, 64)))
    change(state)
    with pytest.raises(BackendError) as e:
        backend.from_state(state, name="model.layers.3.self_attn.q_proj")
    assert needle in str(e.value)
    if needle in ("packed", "scale"):
        assert f"model.layers.3.self_attn.q_proj.{needle}" in str(e.value)


def test_unsupported_bits_are_refused_with_the_allowed_set(backend):
    bits = next(b for b in (5, 7, 9) if b not in backend.supported_bits)
    with pytest.raises(BackendError) as e:
        backend.quantize(_linear(), bits, 64)
    assert f"{bits}-bit" in str(e.value) and str(list(backend.supported_bits)) in str(e.value)


def test_group_size_must_divide_the_weight(backend):
    with pytest.raises(BackendError, match="groups of 64"):
        backend.quantize(_linear(97, 100), 4, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, bits", [(n, b) for n, b in PAIRS if b in (3, 4, 5, 6, 7)])
def test_backward_reaches_lora_adapters(name, bits, dtype):
    """Gradients must flow through the frozen quantized layer into both LoRA matrices."""
    from peft import LoraConfig, get_peft_model

    backend = get_backend(name, compute_dtype=dtype)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128, dtype=dtype)  # real models always hold some parameter
            self.proj = backend.quantize(_linear(), bits, 64)

        def forward(self, x):
            return self.proj(self.norm(x))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(4, 128, dtype=dtype, requires_grad=False)
    model(x).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-3] for n in grads} == {"lora_A", "lora_B"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def _two_layer_lora_net(layers: list[nn.Module], dtype):
    """Two frozen linears in a row with LoRA on both, so the second one's input needs a gradient."""
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128, dtype=dtype)
            self.first, self.second = layers

        def forward(self, x):
            return self.second(self.first(self.norm(x)))

    torch.manual_seed(0)
    return get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["first", "second"],
                                            init_lora_weights=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_backward_keeps_no_dequantized_weight_and_matches_dense_gradients(name, dtype):
    """Autograd must not save a weight-shaped tensor (the dequantized weight) for backward, and the LoRA
    gradients must equal those of plain linears holding the dequantized weights."""
    backend = get_backend(name, compute_dtype=dtype)
    sources = [_linear(128, 128, seed=1), _linear(128, 128, seed=2)]
    quantized = [backend.quantize(lin, 4, 64) for lin in sources]
    dense = []
    for q in quantized:
        lin = nn.Linear(128, 128, bias=False, dtype=dtype)
        lin.weight.data.copy_(backend.dequantize(q).to(dtype))
        dense.append(lin)
    x = torch.randn(6, 128, dtype=dtype)

    def grads(layers, hook_saved: list | None = None):
        model = _two_layer_lora_net(layers, dtype)
        if hook_saved is None:
            out = model(x)
        else:
            def pack(t):
                hook_saved.append(tuple(t.shape))
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
        out.float().pow(2).mean().backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    saved: list[tuple] = []
    got = grads(quantized, saved)
    assert saved, "the forward saved nothing at all: the hook did not run"
    assert (128, 128) not in saved, f"a weight-shaped tensor was saved for backward: {saved}"
    dense_saved: list[tuple] = []
    want = grads(dense, dense_saved)
    assert (128, 128) in dense_saved  # the check above can fail: plain linears do save their weight
    assert got.keys() == want.keys() and len(got) == 4
    for key in got:
        if dtype == torch.float32:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
        else:  # bf16 rounds each product differently when the matmuls are ordered differently
            assert float((got[key] - want[key]).norm() / want[key].norm()) < 2e-2


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


@pytest.mark.parametrize("name,tied", [("hqq", False), ("reference", True)])
def test_dequantized_model_is_the_plain_model_the_quantized_one_computes(tiny_config, name, tied):
    """What an export saves for stock transformers: dequantized linears, the rest copied, ties kept, no adapters."""
    import copy

    from transformers import LlamaForCausalLM

    from qradaptor.plan import Plan
    from qradaptor.quantize import add_adapters, dequantized_model, quantize_model

    config = copy.deepcopy(tiny_config)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    tiny_model = LlamaForCausalLM(config).eval()
    assert (tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight) == tied
    plan = Plan.from_dict({"layers": [{"bits": 4, "rank": 4}, {"bits": 16, "rank": 4}, {"bits": 3, "rank": 8},
                                      {"bits": 8, "rank": 4}]})
    tuned = add_adapters(quantize_model(tiny_model, plan, name), plan)
    with torch.no_grad():  # as if trained: adapters that change the output
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    dense = dequantized_model(tuned, torch.float32)
    assert type(dense) is type(tiny_model) and not any(is_quantized(m) for m in dense.modules())
    assert not any("lora" in n for n, _ in dense.named_parameters())
    q0 = tuned.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, q0.dequantize())
    assert torch.equal(dense.model.layers[1].mlp.up_proj.weight, tiny_model.model.layers[1].mlp.up_proj.weight.data)
    assert (dense.lm_head.weight is dense.model.embed_tokens.weight) == tied
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    with torch.no_grad(), tuned.disable_adapter():
        assert torch.allclose(dense(ids).logits, tuned(ids).logits, atol=1e-5)
    assert not torch.allclose(dense(ids).logits, tuned(ids).logits, atol=1e-3)  # the tuned model is unchanged


def test_attaching_adapters_does_not_repeat_peft_s_deprecation_warning(tiny_model):
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model; a search attaches
    adapters dozens of times, so `add_adapters` keeps that FutureWarning (not the user's) out of its log."""
    import warnings

    from qradaptor.plan import Plan
    from qradaptor.quantize import add_adapters, quantize_model

    plan = Plan.uniform(len(tiny_model.model.layers), 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_adapters(quantize_model(tiny_model, plan, "reference"), plan)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # the filter is scoped: a caller's own warnings still show
        warnings.simplefilter("always")
        add_adapters(quantize_model(tiny_model, plan, "reference"), plan)
        warnings.warn("the caller's own", FutureWarning)
    assert "the caller's own" in [str(w.message) for w in caught]
