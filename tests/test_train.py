from __future__ import annotations

import math

import pytest
import torch

from qradaptor.data import TokenBlocks
from qradaptor.evaluate import evaluate_loss
from qradaptor.plan import LayerChoice, Plan
from qradaptor.quantize import prepare_model, quantize_model
from qradaptor.train import TrainConfig, lr_lambda, train


def _blocks(n=16, seq=32, vocab=128, seed=0):
    # A learnable sequence: each block counts upward modulo the vocabulary from a random start.
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=gen)
    ids = (starts + torch.arange(seq)) % vocab
    return TokenBlocks(input_ids=ids, labels=ids.clone())


def _train(tiny_model, plan, seed=0, steps=12, **kw):
    model = prepare_model(tiny_model, plan, "hqq", seed=seed)
    result = train(model, _blocks(), TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, seed=seed, **kw),
                   progress=False)
    return model, result


def test_training_lowers_held_out_loss(tiny_model):
    plan = Plan([LayerChoice(4, 8), LayerChoice(2, 4), LayerChoice(8, 16), LayerChoice(3, 8)])
    model = prepare_model(tiny_model, plan, "hqq")
    held_out = _blocks(n=8, seed=1)
    before = evaluate_loss(model, held_out, progress=False)
    train(model, _blocks(), TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=2), progress=False)
    after = evaluate_loss(model, held_out, progress=False)
    assert after.loss < before.loss - 0.3
    assert after.tokens == 8 * 31 and math.isclose(after.perplexity, math.exp(after.loss))


def test_only_adapters_train_and_the_quantized_base_is_frozen(tiny_model):
    plan = Plan.uniform(4, 4, 8)
    model = prepare_model(tiny_model, plan, "hqq")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, _blocks(), TrainConfig(steps=3, batch_size=4), progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_same_seed_same_losses_other_seed_other_losses(tiny_model):
    plan = Plan.uniform(4, 4, 8)
    _, a = _train(tiny_model, plan, seed=0)
    _, b = _train(tiny_model, plan, seed=0)
    _, c = _train(tiny_model, plan, seed=1)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_gradient_accumulation_equals_a_big_batch(tiny_model):
    plan = Plan.uniform(4, 16, 8)
    _, one = _train(tiny_model, plan, steps=4, max_grad_norm=0.0)
    model = prepare_model(tiny_model, plan, "hqq", seed=0)
    two = train(model, _blocks(), TrainConfig(steps=4, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2,
                                              max_grad_norm=0.0), progress=False)
    assert two.losses == pytest.approx(one.losses, rel=1e-4)


def test_bf16_base_trains(tiny_model):
    plan = Plan.uniform(4, 4, 8)
    model = prepare_model(tiny_model, plan, "hqq", dtype=torch.bfloat16)
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    res = train(model, _blocks(), TrainConfig(steps=10, batch_size=4, lr=1e-2, warmup_steps=2), progress=False)
    assert res.losses[-1] < res.losses[0]


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1))
    values = [f(s) for s in range(11)]
    assert values[0] == 0.5 and values[1] == 1.0
    assert values[2:] == sorted(values[2:], reverse=True)
    assert values[10] == pytest.approx(0.1)


def test_periodic_evaluation_is_recorded(tiny_model):
    model = prepare_model(tiny_model, Plan.uniform(4, 4, 8), "hqq")
    res = train(model, _blocks(), TrainConfig(steps=4, batch_size=4, eval_every=2), eval_blocks=_blocks(4, seed=3),
                progress=False)
    assert [s for s, _ in res.evals] == [2, 4]


def test_quantize_model_leaves_the_source_intact(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    quantize_model(tiny_model, Plan.uniform(4, 2, 8), "hqq")
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_stop_after_is_the_longer_runs_beginning_and_resume_finishes_it(tiny_model):
    """``stop_after=K`` trains the first K steps of the whole schedule; resuming from a snapshot taken there ends
    exactly where the uninterrupted run ends."""
    plan = Plan.uniform(4, 4, 8)
    _, whole = _train(tiny_model, plan, steps=6)
    model = prepare_model(tiny_model, plan, "hqq", seed=0)
    config = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, seed=0)
    states = []
    first = train(model, _blocks(), config, progress=False, stop_after=4,
                  on_step=lambda step, result, snapshot: states.append(snapshot()) if step == 4 else None)
    assert first.losses == whole.losses[:4] and len(states) == 1
    rest = train(model, _blocks(), config, progress=False, resume=states[0])
    assert rest.losses == whole.losses
