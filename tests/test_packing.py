"""Exact bit packing (backends/packing.py) and the default hqq backend built on it: the packer itself, agreement
with HQQ's own quantizer and layer, and everything downstream on 5-, 6- and 7-bit layers (training, saving)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qradaptor.backends import get_backend
from qradaptor.backends.hqq import _hqq_quantize_unlisted, hqq_quantize
from qradaptor.backends.packing import PACKABLE_BITS, PLANES, pack, packed_bytes, unpack
from qradaptor.plan import DEFAULT_BIT_LADDER, LayerChoice, Plan

SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 1003, 96 * 128]


def _codes(n, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("n", SIZES)
def test_pack_unpack_round_trip_in_ceil_n_bits_over_8_bytes(bits, n):
    codes = _codes(n, bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_bytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, n, bits), codes)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_extreme_codes_round_trip(bits):
    for value in (0, 2**bits - 1):
        codes = torch.full((77,), value, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, bits), 77, bits), codes)


def test_planes_cover_every_bit_exactly_once():
    assert PACKABLE_BITS == (2, 3, 4, 5, 6, 7, 8)
    assert all(sum(widths) == bits and all(w in (1, 2, 4, 8) for w in widths) for bits, widths in PLANES.items())


@pytest.mark.parametrize("bits", [2, 4])
def test_planes_use_hqq_own_slice_layout(bits):
    """A single 2- or 4-bit plane is laid out exactly as HQQ's uint8 packers lay out a (rows, 64) matrix."""
    from hqq.core.bitpack import BitPack

    codes = _codes(64 * 8, bits).view(8, 64)
    theirs = {2: BitPack.pack_2bit_u8, 4: BitPack.pack_4bit_u8}[bits](codes)
    assert torch.equal(pack(codes, bits), theirs.reshape(-1))


def test_pack_refuses_bit_widths_it_cannot_store():
    with pytest.raises(ValueError, match="packable bit-widths are"):
        pack(_codes(8, 1), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_pack_unpack_on_cuda_match_cpu(bits):
    codes = _codes(1003, bits)
    packed = pack(codes.cuda(), bits)
    assert torch.equal(packed.cpu(), pack(codes, bits))
    assert torch.equal(unpack(packed, 1003, bits).cpu(), codes)


# ------------------------------------------------------------------------------------------ HQQ agreement
@pytest.mark.parametrize("bits", [5, 6])
def test_the_7_bit_path_reproduces_hqq_quantizer(bits):
    """hqq 0.2.8 lists no 7 bits; our copy of Quantizer.quantize's steps must equal it where both exist."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    ours = _hqq_quantize_unlisted(w.clone(), bits, 64)
    theirs = hqq_quantize(w, bits, 64)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_hqq_dequantizes_bit_identically_to_hqq_own_layer(bits, dtype):
    """Same codes, scales and zeros as HQQLinear: only the storage differs."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    ours = get_backend("hqq", compute_dtype=dtype).quantize(lin, bits, 64)
    theirs = HQQLinear(None, BaseQuantizeConfig(nbits=bits, group_size=64, axis=1), compute_dtype=dtype, device="cpu",
                       initialize=False)
    theirs.quantize(lin.weight.detach().clone(), **theirs.quant_config)
    assert torch.equal(ours.weight, theirs.dequantize().reshape(96, 128))


def test_7_bits_sit_between_6_and_8():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    backend = get_backend("hqq")
    err = {b: float((backend.dequantize(backend.quantize(lin, b, 64)) - lin.weight.detach()).pow(2).mean()) for b in (6, 7, 8)}
    assert err[6] > err[7] > err[8]


# ------------------------------------------------------------------------------------------ downstream
def test_default_ladder_is_storable_by_the_default_backend():
    assert DEFAULT_BIT_LADDER == (2, 3, 4, 5, 6, 8)
    assert set(DEFAULT_BIT_LADDER) <= set(get_backend("hqq").supported_bits)


def _blocks(n=16, seq=32, vocab=128, seed=0):
    from qradaptor.data import TokenBlocks

    gen = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, vocab, (n, 1), generator=gen) + torch.arange(seq)) % vocab
    return TokenBlocks(input_ids=ids, labels=ids.clone())


def test_lora_trains_on_5_6_and_7_bit_layers(tiny_model):
    from qradaptor.evaluate import evaluate_loss
    from qradaptor.quantize import prepare_model
    from qradaptor.train import TrainConfig, train

    plan = Plan([LayerChoice(5, 8), LayerChoice(6, 4), LayerChoice(7, 8), LayerChoice(5, 16)])
    model = prepare_model(tiny_model, plan, "hqq")
    backend = get_backend("hqq")
    assert sorted({m.bits for m in model.modules() if backend.is_quantized(m)}) == [5, 6, 7]
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".packed")}
    held_out = _blocks(n=8, seed=1)
    before = evaluate_loss(model, held_out, progress=False)
    train(model, _blocks(), TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=2), progress=False)
    assert evaluate_loss(model, held_out, progress=False).loss < before.loss - 0.3
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n.endswith(".packed"))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_packed_modules_save_and_reload_through_safetensors(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from qradaptor.quantize import quantize_model

    backend = get_backend("hqq")
    plan = Plan([LayerChoice(5, 8), LayerChoice(6, 8), LayerChoice(7, 8), LayerChoice(3, 8)])
    model = quantize_model(tiny_model, plan, backend)
    names = [n for n, m in model.named_modules() if backend.is_quantized(m)]
    tensors = {f"{n}.{k}": v.contiguous() for n in names for k, v in backend.state(model.get_submodule(n)).items()}
    save_file(tensors, tmp_path / "base.safetensors")

    loaded = load_file(tmp_path / "base.safetensors")
    rebuilt = quantize_model(tiny_model, plan, backend)
    for n in names:
        state = {k[len(n) + 1 :]: v for k, v in loaded.items() if k.startswith(n + ".")}
        parent, _, child = n.rpartition(".")
        setattr(rebuilt.get_submodule(parent), child, backend.from_state(state, name=n))
    ids = _blocks(n=2).input_ids
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)
    for n in names:  # on disk too, n codes of b bits take ceil(n·b/8) bytes
        m = model.get_submodule(n)
        assert loaded[f"{n}.packed"].numel() == math.ceil(m.out_features * m.in_features * m.bits / 8)
