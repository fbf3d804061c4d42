from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qradaptor.errors import PlanError
from qradaptor.plan import DEFAULT_TARGET_MODULES, LayerChoice, ModuleChoice, Plan, lora_config


def test_minimal_hand_written_plan_gets_documented_defaults(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layers": [{"bits": 4, "rank": 16}, {"bits": 8, "rank": 4}]}))
    plan = Plan.load(path)
    assert plan.layers == [LayerChoice(4, 16), LayerChoice(8, 4)]
    assert plan.group_size == 64 and plan.alpha_ratio == 2.0 and plan.target_modules == DEFAULT_TARGET_MODULES


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_is_exact(tmp_path, suffix):
    plan = Plan([LayerChoice(b, r) for b, r in [(2, 4), (3, 8), (4, 16), (8, 32), (16, 8)]], group_size=32,
                alpha_ratio=1.5, target_modules=("q_proj", "v_proj"), dropout=0.05)
    path = plan.save(tmp_path / f"plan{suffix}")
    again = Plan.load(path)
    assert again == plan
    assert again.to_dict() == plan.to_dict()


@pytest.mark.parametrize(
    "obj, needle",
    [
        ({"layers": [{"bits": 9, "rank": 16}]}, "9-bit"),
        ({"layers": [{"bits": 4, "rank": 0}]}, "rank 0"),
        ({"layers": [{"bits": 4}]}, "with 'bits' and 'rank'"),
        ({"layers": [{"bits": 4, "rank": 8, "colour": 1}]}, "with 'bits' and 'rank'"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": 8}}]}, "map module names"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": {}}}]}, "map module names"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": {"bits": 8, "group": 32}}}]}, "map module names"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": {"bits": 9}}}]}, "k_proj asks for 9-bit"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": {"rank": -1}}}]}, "k_proj has rank -1"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": {"bits": True}}}]}, "non-integer"),
        ({"layers": []}, "non-empty"),
        ({"layer": []}, "'layers' list"),
        ({"layers": [{"bits": 4, "rank": 8}], "colour": 1}, "unknown plan keys"),
        ({"layers": [{"bits": "4", "rank": 8}]}, "non-integer"),
        ({"layers": [{"bits": 4, "rank": 8}], "group_size": 0}, "group_size"),
        ({"layers": [{"bits": 4, "rank": 8, "group_size": 0}]}, "layer 0 has group size 0"),
        ({"layers": [{"bits": 4, "rank": 8, "modules": {"k_proj": {"group_size": -32}}}]}, "k_proj has group size -32"),
        ({"layers": [{"bits": 4, "rank": 8, "group_size": "64"}]}, "non-integer"),
    ],
)
def test_bad_plans_are_refused_with_the_cause(tmp_path, obj, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(PlanError) as e:
        Plan.load(path)
    assert needle in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32])
def test_unknown_bits_message_lists_the_allowed_set(bits):
    with pytest.raises(PlanError, match=r"\[2, 3, 4, 5, 6, 7, 8, 16\]") as e:
        Plan([LayerChoice(bits, 8)])
    assert f"{bits}-bit" in str(e.value)


def test_every_bit_width_2_to_8_is_a_valid_plan_entry(tmp_path):
    plan = Plan([LayerChoice(b, 8) for b in range(2, 9)] + [LayerChoice(16, 8)])
    assert Plan.load(plan.save(tmp_path / "p.json")) == plan


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{layers: ")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "broken.json")


def test_layer_count_must_match_the_model(tiny_model):
    with pytest.raises(PlanError, match="3 layers but the model has 4"):
        Plan.uniform(3, 4).check_model(tiny_model)
    with pytest.raises(PlanError, match="target modules"):
        Plan.uniform(4, 4, target_modules=("c_attn",)).check_model(tiny_model)


def test_rank_pattern_keys_are_anchored_layer_1_never_matches_layer_10():
    """PEFT matches pattern keys as regexes ending at the module name: layer 1's key must not select
    layers 10 or 11, whatever the default rank is."""
    from peft import get_peft_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=2, num_key_value_heads=1)
    ranks = [16] * 12
    ranks[1], ranks[10], ranks[11] = 4, 8, 2
    plan = Plan([LayerChoice(16, r) for r in ranks])
    model = get_peft_model(LlamaForCausalLM(config), lora_config(plan, LlamaForCausalLM(config)))
    layers = model.base_model.model.model.layers
    for i, expected in enumerate(ranks):
        for proj in (layers[i].self_attn.q_proj, layers[i].mlp.down_proj):
            assert proj.r["default"] == expected, f"layer {i}"
            assert proj.lora_alpha["default"] == 2 * expected
            assert proj.lora_A["default"].weight.shape[0] == expected


def test_describe_is_compact():
    assert Plan([LayerChoice(4, 16)] * 3 + [LayerChoice(8, 8)]).describe() == "4b×3 8b×1 | r8×1 r16×3"


MODULE_PLAN = {"layers": [{"bits": 4, "rank": 16, "modules": {"k_proj": {"bits": 8}, "down_proj": {"bits": 3, "rank": 32}}},
                          {"bits": 16, "rank": 8, "modules": {"q_proj": {"rank": 4}}},
                          {"bits": 3, "rank": 4},
                          {"bits": 8, "rank": 8, "modules": {"up_proj": {"bits": 16}}}]}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_modules_own_choices_round_trip_and_the_rest_is_the_layers(tmp_path, suffix):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(MODULE_PLAN))
    plan = Plan.load(path)
    first = plan.layers[0]
    assert first.modules == (ModuleChoice("down_proj", 3, 32), ModuleChoice("k_proj", 8, 16))  # sorted, filled in
    assert first.of("self_attn.k_proj") == LayerChoice(8, 16) and first.of("mlp.down_proj") == LayerChoice(3, 32)
    assert first.of("self_attn.q_proj") == LayerChoice(4, 16)
    assert first.bit_widths == (3, 4, 8) and plan.max_rank == 32 and plan.bit_widths == (3, 4, 8, 16)
    again = Plan.load(plan.save(tmp_path / f"again{suffix}"))
    assert again == plan and again.to_dict()["layers"] == MODULE_PLAN["layers"]  # only what differs is written
    # a module given its layer's own choice is no choice of its own: the same plan, file and digest as without it
    same = Plan([LayerChoice(4, 16, (ModuleChoice("k_proj", 4, 16),))])
    assert same == Plan([LayerChoice(4, 16)]) and "modules" not in same.to_dict()["layers"][0]
    assert hash(LayerChoice(4, 16, (("v_proj", 8, 16), ("k_proj", 8, 16)))) == hash(
        LayerChoice(4, 16, (ModuleChoice("k_proj", 8, 16), ModuleChoice("v_proj", 8, 16))))
    with pytest.raises(PlanError, match="'k_proj' twice"):
        LayerChoice(4, 16, (ModuleChoice("k_proj", 8, 16), ModuleChoice("k_proj", 3, 16)))


def test_modules_are_checked_against_the_model(tiny_model):
    Plan.from_dict(MODULE_PLAN).check_model(tiny_model)
    with pytest.raises(PlanError, match="no linear so named") as e:
        Plan([LayerChoice(4, 8, (ModuleChoice("c_attn", 8, 8),))] * 4).check_model(tiny_model)
    assert "q_proj" in e.value.fix
    with pytest.raises(PlanError, match="gets no adapter") as e:
        Plan([LayerChoice(4, 8, (ModuleChoice("k_proj", 8, 32),))] * 4, target_modules=("q_proj", "v_proj")
             ).check_model(tiny_model)
    assert "k_proj" in e.value.fix
    # its bits alone may differ: it is still quantized
    Plan([LayerChoice(4, 8, (ModuleChoice("k_proj", 8, 8),))] * 4, target_modules=("q_proj",)).check_model(tiny_model)


def test_modules_get_their_own_ranks_and_bits_in_the_built_model(tiny_model):
    from peft import get_peft_model

    from qradaptor.backends import get_backend
    from qradaptor.quantize import quantize_model

    plan = Plan.from_dict(MODULE_PLAN)
    quantized = quantize_model(tiny_model, plan, get_backend("hqq"))
    model = get_peft_model(quantized, lora_config(plan, tiny_model))
    layers = model.base_model.model.model.layers
    for i, choice in enumerate(plan.layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            module, own = layers[i].get_submodule(name), choice.of(name)
            assert module.r["default"] == own.rank and module.lora_alpha["default"] == 2 * own.rank, (i, name)
            base = module.base_layer
            assert (getattr(base, "bits", 16) == own.bits) and (type(base) is torch.nn.Linear) == (own.bits == 16)


def test_describe_names_the_modules_own_choices():
    plan = Plan.from_dict(MODULE_PLAN)
    assert plan.describe() == ("3b×1 4b×1 8b×1 16b×1 | r4×1 r8×2 r16×1 | down_proj 3b r32×1, k_proj 8b×1, q_proj r4×1, "
                               "up_proj 16b×1")
    many = Plan([LayerChoice(4, 8, tuple(ModuleChoice(n, b, 8) for n, b in (("a", 2), ("b", 3), ("c", 5), ("d", 6),
                                                                            ("e", 8))))] * 2)
    assert many.describe().endswith("| a 2b×2, b 3b×2, c 5b×2, d 6b×2, +1 more")


def test_memory_refuses_a_plan_naming_a_module_the_model_lacks(tmp_path, tiny_dir, capsys):
    from qradaptor.cli import main

    plan = {"layers": [{"bits": 4, "rank": 8, "modules": {"c_attn": {"bits": 8}}}] * 4}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["memory", "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert "'c_attn'" in err and "q_proj" in err and "Traceback" not in err, err
    plan["layers"] = [{"bits": 4, "rank": 8, "modules": {"k_proj": {"bits": 8}}}] * 4
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["memory", "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json")]) == 0
    assert "k_proj 8b×4" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_group_sizes_of_layers_and_modules_round_trip_and_default_to_the_enclosing_one(tmp_path, suffix):
    obj = {"layers": [{"bits": 4, "rank": 16, "group_size": 128, "modules": {"k_proj": {"group_size": 32}}},
                      {"bits": 3, "rank": 8, "modules": {"down_proj": {"bits": 4, "group_size": 128}}},
                      {"bits": 4, "rank": 8}], "group_size": 64}
    plan = Plan.from_dict(obj)
    assert plan.group_size_of(0, "self_attn.k_proj") == 32 and plan.group_size_of(0, "mlp.up_proj") == 128
    assert plan.group_size_of(1, "mlp.down_proj") == 128 and plan.group_size_of(1, "self_attn.q_proj") == 64
    assert plan.group_size_of(2, "mlp.down_proj") == 64
    again = Plan.load(plan.save(tmp_path / f"plan{suffix}"))
    assert again == plan and again.to_dict()["layers"] == obj["layers"]  # only what is given is written
    # the plan's own group size, or a module's layer's, given explicitly, is no choice of its own
    same = Plan([LayerChoice(4, 16, (ModuleChoice("k_proj", 4, 16, 64),), group_size=64), LayerChoice(3, 8)])
    assert same == Plan([LayerChoice(4, 16), LayerChoice(3, 8)]) and "group_size" not in same.to_dict()["layers"][0]
    inner = Plan([LayerChoice(4, 16, (ModuleChoice("k_proj", 4, 16, 128),), group_size=128)])
    assert inner.layers[0].modules == () and inner.to_dict()["layers"] == [{"bits": 4, "rank": 16, "group_size": 128}]
    # a module back at the plan's size inside a layer of another is its own choice, and stays one
    back = Plan([LayerChoice(4, 16, (ModuleChoice("k_proj", 4, 16, 64),), group_size=128)])
    assert back.group_size_of(0, "k_proj") == 64 and back.group_size_of(0, "q_proj") == 128
    assert Plan.from_dict(back.to_dict()) == back
    assert plan.describe() == "3b×1 4b×2 | r8×2 r16×1 | g64×2 g128×1 | down_proj 4b g128×1, k_proj g32×1"
    # a plan-wide group size other than the default shows too (a uniform plan at g32 is not one at g64)
    assert Plan.uniform(3, 4, 16, group_size=32).describe() == "4b×3 | r16×3 | g32×3"
    assert Plan.uniform(3, 4, 16).describe() == "4b×3 | r16×3"
