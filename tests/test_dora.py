"""DoRA adapters (a plan's ``dora``; `train --dora`): priced exactly, trained, started from the quantization-aware
fit with their magnitudes right, exported so that stock PEFT and `qradaptor.load` compute what was trained, and
refused where they cannot go (llama.cpp)."""

from __future__ import annotations

import json

import pytest
import torch

from qradaptor.adapter_init import AdapterStart, apply_start
from qradaptor.backends import QuantCache, get_backend
from qradaptor.commands import train_plan
from qradaptor.data import TokenBlocks
from qradaptor.errors import ArtifactError
from qradaptor.memory import ModelShapes, measured_bytes, predict
from qradaptor.plan import LayerChoice, Plan
from qradaptor.quantize import add_adapters, quantize_model
from qradaptor.rundir import RUN_FILE

PLAN = Plan([LayerChoice(4, 8), LayerChoice(3, 4), LayerChoice(16, 8), LayerChoice(2, 8)])
FAST = dict(seq_len=32, batch_size=2, eval_blocks=0, warmup_steps=0, dtype="float32", progress=False, lr=1e-3)


def test_a_dora_plan_is_priced_exactly_and_round_trips():
    dora = Plan.from_dict({**PLAN.to_dict(), "dora": True})
    assert dora.dora and dora.to_dict()["dora"] is True and "dora" not in PLAN.to_dict()  # old digests kept
    assert dora.describe().endswith("| DoRA")
    with pytest.raises(Exception, match="dora must be true or false"):
        Plan.from_dict({**PLAN.to_dict(), "dora": "yes"})


def test_dora_memory_is_predicted_exactly_and_its_start_keeps_the_fit(tiny_model):
    dora = Plan.from_dict({**PLAN.to_dict(), "dora": True})
    cache = QuantCache(get_backend("hqq"))
    model = add_adapters(quantize_model(tiny_model, dora, cache=cache), dora)
    report, plain = (predict(ModelShapes.from_model(tiny_model), p, get_backend("hqq")) for p in (dora, PLAN))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable_params
    # one magnitude per output row of every adapted linear: 4 layers × (q 64 + k 32 + v 32 + o 64 + gate, up 128 + down 64)
    assert report.trainable_params - plain.trainable_params == 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert measured_bytes(model) == report.total_bytes
    # the quantization-aware start: with DoRA's magnitudes reset to the adapted rows' norms the model computes what
    # plain LoRA with the same start computes
    blocks = TokenBlocks(*(torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)),) * 2)
    start = AdapterStart(tiny_model, "activation", cache, blocks=blocks, max_rank=8)
    lora = add_adapters(quantize_model(tiny_model, PLAN, cache=cache), PLAN)
    apply_start(model, start.factors(dora))
    apply_start(lora, start.factors(PLAN))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.fixture
def inputs(tmp_path, tiny_dir):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(40)))
    return {"model": str(tiny_dir), "data": str(data), "plan": {"layers": [{"bits": 4, "rank": 8}] * 4}}


def test_train_dora_exports_what_it_trained_and_llama_cpp_is_refused(inputs, tmp_path):
    from peft import AutoPeftModelForCausalLM

    import qradaptor
    from qradaptor.commands import export

    result = train_plan(tmp_path / "run", steps=4, dora=True, **inputs, **FAST)
    assert all(torch.isfinite(torch.tensor(result.train.losses)))
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert run["plan"]["dora"] is True
    magnitudes = [m for n, m in result.model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 4 * 7 and all(m.requires_grad for m in magnitudes)
    # resuming (as if interrupted) with plain LoRA is a changed setting
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    (tmp_path / "cut" / RUN_FILE).write_text(json.dumps({**run, "status": "running"}))
    with pytest.raises(ArtifactError, match="dora True → False"):
        train_plan(tmp_path / "cut", resume=True, dora=False, progress=False)
    out = tmp_path / "export"
    export(tmp_path / "run", out)
    ids = torch.arange(2, 30)[None]
    stock = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    ours = qradaptor.load(out)
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(stock(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
    with pytest.raises(ArtifactError, match="DoRA") as e:
        export(tmp_path / "run", tmp_path / "gguf", gguf=True)
    assert "--no-dora" in e.value.fix and not (tmp_path / "gguf").exists()


def test_a_dora_search_prices_and_makes_dora_plans(tiny_model):
    from qradaptor.memory import parse_budget
    from qradaptor.search import SearchConfig
    from qradaptor.search.planner import Planner, config_plan, plan_from_key

    shapes, backend = ModelShapes.from_model(tiny_model), get_backend("hqq")
    budget = parse_budget("4bit", shapes, backend, dora=True)
    assert budget - parse_budget("4bit", shapes, backend) == 4 * 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    config = SearchConfig(budget_bytes=budget, dora=True)
    planner = Planner(shapes, backend, None, config)
    plan = plan_from_key("4/16,5/8,3/4,4/32", config)
    assert plan.dora and config_plan(config, 4, 4, 16).dora and planner.plan(plan.layers).dora
    assert planner.memory(plan) == predict(shapes, plan, backend).total_bytes
    assert planner.memory(config_plan(config, 4, 4, 16)) == budget  # uniform 4-bit r16 DoRA is the 4bit budget
