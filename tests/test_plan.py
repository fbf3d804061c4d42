from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from qradaptor.errors import PlanError
from qradaptor.plan import DEFAULT_TARGET_MODULES, LayerChoice, Plan, lora_config


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
        ({"layers": [{"bits": 4}]}, "exactly 'bits' and 'rank'"),
        ({"layers": []}, "non-empty"),
        ({"layer": []}, "'layers' list"),
        ({"layers": [{"bits": 4, "rank": 8}], "colour": 1}, "unknown plan keys"),
        ({"layers": [{"bits": "4", "rank": 8}]}, "non-integer"),
        ({"layers": [{"bits": 4, "rank": 8}], "group_size": 0}, "group_size"),
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
