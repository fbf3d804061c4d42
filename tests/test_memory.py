from __future__ import annotations

import pytest
import torch

from qradaptor.backends import BACKENDS, get_backend
from qradaptor.errors import BudgetError
from qradaptor.memory import ModelShapes, check_budget, measured_bytes, parse_budget, predict, training_memory, uniform_bytes
from qradaptor.plan import LayerChoice, ModuleChoice, Plan
from qradaptor.quantize import prepare_model

MIXED = [LayerChoice(2, 4), LayerChoice(3, 32), LayerChoice(8, 8), LayerChoice(16, 16)]
MIXED_FINE = [LayerChoice(5, 4), LayerChoice(6, 32), LayerChoice(7, 8), LayerChoice(3, 16)]
# linears with bits and ranks of their own (`ModuleChoice`), among them 16-bit ones in quantized layers and back
PER_MODULE = [LayerChoice(4, 16, (ModuleChoice("k_proj", 8, 16), ModuleChoice("down_proj", 3, 32))),
              LayerChoice(16, 8, (ModuleChoice("q_proj", 2, 4),)), LayerChoice(3, 4),
              LayerChoice(8, 8, (ModuleChoice("up_proj", 16, 2), ModuleChoice("v_proj", 4, 8)))]
# layers and linears with group sizes of their own (the plan's is 64)
GROUPS = [LayerChoice(4, 16, (ModuleChoice("k_proj", 8, 16, 32),), group_size=128),
          LayerChoice(3, 8, (ModuleChoice("down_proj", 4, 8, 128), ModuleChoice("q_proj", 3, 8, 32))),
          LayerChoice(16, 8, (ModuleChoice("o_proj", 4, 4, 32),)), LayerChoice(2, 4, group_size=32)]


def _storable(layers):
    """The backends that store every bit-width of ``layers`` (hqq-native has no 5, 6 or 7 bits)."""
    return [name for name in BACKENDS if set(Plan(layers).bit_widths) - {16} <= set(get_backend(name).supported_bits)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers, name", [(layers, name) for layers in (MIXED, MIXED_FINE, PER_MODULE, GROUPS,
                                                                           [LayerChoice(4, 16)] * 4)
                                          for name in _storable(layers)])
def test_prediction_matches_measured_bytes(tiny_model, name, dtype, layers):
    backend = get_backend(name, compute_dtype=dtype)
    plan = Plan(layers)
    model = prepare_model(tiny_model, plan, backend)
    predicted = predict(ModelShapes.from_config(tiny_model.config), plan, backend).total_bytes
    assert abs(measured_bytes(model) - predicted) / predicted < 0.01
    # Exactly equal in fact: every tensor is accounted for.
    assert measured_bytes(model) == predicted
    # found through the modules themselves: nothing on the model says which backend made them
    assert not [k for m in model.modules() for k in vars(m) if k.startswith("qradaptor")]
    # each linear is quantized with its own group size (its own, its layer's, or the plan's)
    layers = model.base_model.model.model.layers if hasattr(model, "base_model") else model.model.layers
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if hasattr(module, "group_size") and hasattr(module, "bits"):
                assert module.group_size == plan.group_size_of(i, name.removesuffix(".base_layer"))


@pytest.mark.parametrize("name", BACKENDS)
def test_prediction_matches_measured_bytes_at_every_stored_bit_width(tiny_model, name):
    backend = get_backend(name)
    shapes = ModelShapes.from_config(tiny_model.config)
    for bits in backend.supported_bits:
        plan = Plan.uniform(4, bits, 8)
        assert measured_bytes(prepare_model(tiny_model, plan, backend)) == predict(shapes, plan, backend).total_bytes


@pytest.mark.parametrize("dtype, meta_bits", [(torch.float32, 1.0), (torch.bfloat16, 0.5)])
def test_hqq_stores_exactly_b_bits_per_weight_plus_metadata(tiny_config, dtype, meta_bits):
    shapes, backend = ModelShapes.from_config(tiny_config), get_backend("hqq", compute_dtype=dtype)
    for bits in range(2, 9):
        report = predict(shapes, Plan.uniform(4, bits), backend)
        assert report.avg_bits == pytest.approx(bits + meta_bits) and report.code_bits == bits
    native = get_backend("hqq-native", compute_dtype=dtype)
    assert predict(shapes, Plan.uniform(4, 3), native).avg_bits > 3.19 + meta_bits  # HQQ's own 3-bit: 10 per int32


def test_shapes_from_config_equal_shapes_from_model(tiny_model):
    assert ModelShapes.from_config(tiny_model.config) == ModelShapes.from_model(tiny_model)


def test_avg_bits_count_metadata_and_code_bits_do_not(tiny_config):
    shapes = ModelShapes.from_config(tiny_config)
    backend = get_backend("hqq")
    report = predict(shapes, Plan.uniform(4, 4), backend)
    assert report.code_bits == 4
    assert report.avg_bits == pytest.approx(4 + 2 * 32 / 64)  # fp32 scale + zero per 64 weights
    bf16 = predict(shapes, Plan.uniform(4, 4), get_backend("hqq", compute_dtype=torch.bfloat16))
    assert bf16.avg_bits == pytest.approx(4.5)


def test_memory_grows_with_bits_and_rank(tiny_config):
    shapes, backend = ModelShapes.from_config(tiny_config), get_backend("hqq")
    totals = [predict(shapes, Plan.uniform(4, b), backend).total_bytes for b in (2, 3, 4, 5, 6, 7, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == 8
    ranks = [predict(shapes, Plan.uniform(4, 4, r), backend).lora_bytes for r in (4, 8, 16)]
    assert ranks[1] == 2 * ranks[0] and ranks[2] == 2 * ranks[1]


def test_budget_parsing(tiny_config):
    shapes, backend = ModelShapes.from_config(tiny_config), get_backend("hqq")
    four = predict(shapes, Plan.uniform(4, 4, 16), backend).total_bytes
    assert parse_budget("4bit", shapes, backend) == four
    three = predict(shapes, Plan.uniform(4, 3, 16), backend).total_bytes
    assert parse_budget("3.5bit", shapes, backend) == round((three + four) / 2)
    assert parse_budget("350MB", shapes, backend) == 350_000_000
    assert parse_budget("1.5GiB", shapes, backend) == int(1.5 * 2**30)
    assert parse_budget("123456789", shapes, backend) == 123456789
    assert parse_budget("0.3x", shapes, backend) == int(0.3 * shapes.bytes_16bit())  # rotary tables included
    assert uniform_bytes(shapes, backend, 8) > four
    five = predict(shapes, Plan.uniform(4, 5, 16), backend).total_bytes
    six = predict(shapes, Plan.uniform(4, 6, 16), backend).total_bytes
    assert parse_budget("5bit", shapes, backend) == five and parse_budget("6bits", shapes, backend) == six
    assert parse_budget("4.5bit", shapes, backend) == round((four + five) / 2)


def test_budget_parsing_on_a_backend_without_5_bits_interpolates_4_to_8(tiny_config):
    shapes, backend = ModelShapes.from_config(tiny_config), get_backend("hqq-native")
    four, eight = (predict(shapes, Plan.uniform(4, b, 16), backend).total_bytes for b in (4, 8))
    assert parse_budget("5bit", shapes, backend) == round(four + (eight - four) / 4)


@pytest.mark.parametrize("text", ["four bits", "12parsecs", "1.5x", "9bit", "-3MB"])
def test_bad_budgets_name_the_accepted_forms(tiny_config, text):
    with pytest.raises(BudgetError):
        parse_budget(text, ModelShapes.from_config(tiny_config), get_backend("hqq"))


def test_budget_below_the_cheapest_plan_names_the_cheapest_memory(tiny_config):
    shapes, backend = ModelShapes.from_config(tiny_config), get_backend("hqq")
    floor = predict(shapes, Plan.uniform(4, 2, 4), backend).total_bytes
    check_budget(floor, shapes, backend)  # exactly the floor is feasible
    with pytest.raises(BudgetError) as e:
        check_budget(floor - 1, shapes, backend)
    assert str(floor) in str(e.value)


def test_training_memory_scales_with_batch_rank_and_checkpointing(tiny_config):
    shapes, backend = ModelShapes.from_config(tiny_config), get_backend("hqq")
    est = lambda plan, b, ckpt=True: training_memory(shapes, plan, backend, tiny_config, batch_size=b, seq_len=64,
                                                     checkpointing=ckpt)
    small, big = est(Plan.uniform(4, 4, 4), 1), est(Plan.uniform(4, 4, 4), 4)
    assert big.activation_bytes == 4 * small.activation_bytes
    assert est(Plan.uniform(4, 4, 16), 1).optimizer_bytes == 4 * small.optimizer_bytes
    assert small.peak_bytes > small.weights_bytes + small.runtime_bytes
    assert est(Plan.uniform(4, 4, 4), 4, ckpt=False).activation_bytes > 2 * big.activation_bytes
    plain = training_memory(shapes, Plan.uniform(4, 16, 4), None, tiny_config, batch_size=4, seq_len=64,
                            dtype=torch.bfloat16, plain_peft=True)
    assert plain.weights_bytes > big.weights_bytes  # every layer at 16 bits
    assert plain.loss_bytes == 4 * 64 * tiny_config.vocab_size * (2 + 4 + 4)  # the whole batch's logits


def test_training_memory_model_counts_what_autograd_saves(tiny_config):
    """Without checkpointing the predicted activations are the bytes autograd really keeps (hooked), within 15%."""
    from transformers import LlamaForCausalLM

    from qradaptor.evaluate import token_nll
    from qradaptor.quantize import prepare_model

    for dtype, plan in ((torch.float32, Plan.uniform(4, 4, 8)), (torch.bfloat16, Plan.uniform(4, 4, 8)),
                        (torch.float32, Plan(PER_MODULE))):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_config)
        model = prepare_model(base, plan, get_backend("hqq", compute_dtype=dtype), dtype=dtype)
        model.train()
        ids = torch.randint(0, tiny_config.vocab_size, (4, 64))
        seen: dict[tuple, int] = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):  # parameters are counted with the weights
                seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_nll(model, ids, ids)[0].backward()
        saved = sum(seen.values())
        predicted = training_memory(ModelShapes.from_config(tiny_config), plan, get_backend("hqq", compute_dtype=dtype),
                                    tiny_config, batch_size=4, seq_len=64, dtype=dtype, checkpointing=False)
        layers_only = predicted.activation_bytes - 4 * 64 * tiny_config.hidden_size * (2 if dtype != torch.float32 else 4)
        assert abs(saved / layers_only - 1) < 0.15, (dtype, saved, layers_only)


def test_training_budget_parsing_and_refusal_names_a_fitting_setting(tiny_config):
    from qradaptor.memory import check_training_budget, parse_training_budget

    assert parse_training_budget("train:1.5GiB") == int(1.5 * 2**30)
    assert parse_training_budget("TRAIN: 700MB") == 700 * 10**6
    assert parse_training_budget("4bit") is None and parse_training_budget(None) is None
    for bad in ("train:", "train:abc", "train:4bit", "train:0"):
        with pytest.raises(BudgetError, match="train:"):
            parse_training_budget(bad)
    shapes, backend, plan = ModelShapes.from_config(tiny_config), get_backend("hqq"), Plan.uniform(4, 4, 8)
    est = lambda b, ckpt: training_memory(shapes, plan, backend, tiny_config, batch_size=b, seq_len=256,
                                          checkpointing=ckpt)
    big = est(8, False)
    check_training_budget(big, big.peak_bytes, shapes, plan, backend, tiny_config, dtype=torch.float32)  # fits
    budget = est(2, True).peak_bytes  # checkpointing on and a quarter of the batch fits
    with pytest.raises(BudgetError) as e:
        check_training_budget(big, budget, shapes, plan, backend, tiny_config, dtype=torch.float32)
    assert "--gradient-checkpointing" in e.value.fix and "--batch-size" in e.value.fix
    batch = int(e.value.fix.split("--batch-size ")[1].split()[0])
    assert 2 <= batch < 8 and est(batch, True).peak_bytes <= budget < est(batch + 1, True).peak_bytes
    with pytest.raises(BudgetError, match="even one block"):
        check_training_budget(big, est(1, True).peak_bytes - 1, shapes, plan, backend, tiny_config,
                              dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_prediction_matches_measured_bytes_on_smollm2(smollm2_dir, name):
    from qradaptor.models import load_model

    model, _ = load_model(str(smollm2_dir))
    backend = get_backend(name)
    bits = [4] * 30
    bits[0], bits[5], bits[29], bits[12] = 8, 3, 16, 2
    if 5 in backend.supported_bits:
        bits[1], bits[2], bits[3] = 5, 6, 7
    plan = Plan([LayerChoice(b, r) for b, r in zip(bits, [16, 8, 32, 4, 16] * 6)])
    built = prepare_model(model, plan, backend)
    predicted = predict(ModelShapes.from_config(model.config), plan, backend).total_bytes
    measured = measured_bytes(built)
    assert abs(measured - predicted) / predicted < 0.01, (measured, predicted)
