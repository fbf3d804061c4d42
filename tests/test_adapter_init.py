"""Quantization-aware adapter starts (qradaptor.adapter_init): the fits are the optimal low-rank corrections they
claim to be, they bring quantized weight + adapter closer to the full model at step 0 without touching the stored
codes, and `train`, `search` and `run` use, record and fingerprint the setting."""

from __future__ import annotations

import json

import pytest
import torch

from qradaptor.adapter_init import (AdapterStart, Factors, adapted_linears, apply_start, balanced,
                                    calibration_subset, input_root, loftq_start, low_rank_fit)
from qradaptor.backends import QuantCache, get_backend
from qradaptor.commands import train_plan
from qradaptor.data import TokenBlocks
from qradaptor.errors import ArtifactError
from qradaptor.plan import LayerChoice, ModuleChoice, Plan
from qradaptor.quantize import add_adapters, quantize_model
from qradaptor.rundir import RUN_FILE

PLAN = Plan([LayerChoice(4, 8), LayerChoice(3, 4), LayerChoice(16, 8), LayerChoice(2, 8)])


def _blocks(n=4, seq=32, seed=0):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(ids, ids.clone())


def _weighted(M, gram):
    return float(torch.trace(M @ gram @ M.T))


def test_the_unweighted_fit_is_the_truncated_svd_split_evenly():
    torch.manual_seed(0)
    E = torch.randn(24, 16)
    fit = low_rank_fit(E, 5)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    assert torch.allclose(fit.B @ fit.A, (U[:, :5] * S[:5]) @ Vh[:5], atol=1e-5)
    # singular values split evenly: both factors have the same column / row norms
    assert torch.allclose(fit.A.norm(dim=1), fit.B.norm(dim=0), atol=1e-5)
    # a truncation is the best fit of that rank too
    assert torch.allclose(fit.truncated(2).B @ fit.truncated(2).A, low_rank_fit(E, 2).B @ low_rank_fit(E, 2).A,
                          atol=1e-5)


def test_the_activation_fit_beats_the_svd_on_the_inputs_and_loses_in_weight_space():
    torch.manual_seed(0)
    E = torch.randn(32, 16)
    X = torch.randn(500, 16) * torch.linspace(0.05, 5.0, 16)  # a few large input channels, as in LLMs
    gram = X.T @ X / len(X)
    weighted, plain = low_rank_fit(E, 4, gram), low_rank_fit(E, 4)
    residual = lambda f: E - f.B @ f.A  # noqa: E731
    assert _weighted(residual(weighted), gram) < 0.8 * _weighted(residual(plain), gram)
    assert residual(weighted).norm() > residual(plain).norm()
    # optimal on the inputs: no random rank-4 perturbation of it does better
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        other = Factors(weighted.A + 0.01 * torch.randn(weighted.A.shape, generator=g),
                        weighted.B + 0.01 * torch.randn(weighted.B.shape, generator=g))
        assert _weighted(residual(other), gram) >= _weighted(residual(weighted), gram) * (1 - 1e-6)
    # with inputs that use every direction alike it is the plain SVD (up to the damping)
    iso = low_rank_fit(E, 4, torch.eye(16))
    assert torch.allclose(iso.B @ iso.A, plain.B @ plain.A, atol=1e-4)


def test_a_root_computed_once_gives_the_fit_the_moment_gives_bitwise():
    # q, k and v (gate and up) share an input: the hook takes its root once and fits each of them from it
    torch.manual_seed(0)
    X = torch.randn(300, 24) * torch.linspace(0.1, 4.0, 24)
    gram = X.T @ X / len(X)
    L = input_root(gram)
    assert torch.allclose(L @ L.T, gram + 0.01 * gram.diagonal().mean() * torch.eye(24), atol=1e-4)
    for rows in (8, 24, 40):
        E = torch.randn(rows, 24)
        from_moment, from_root = low_rank_fit(E, 6, gram), low_rank_fit(E, 6, root=L)
        assert torch.equal(from_moment.A, from_root.A) and torch.equal(from_moment.B, from_root.B)


def test_the_balanced_fit_is_the_same_product_with_a_at_pefts_initial_scale():
    torch.manual_seed(0)
    E = torch.randn(32, 48)
    X = torch.randn(800, 48) * torch.linspace(0.05, 5.0, 48)
    gram = X.T @ X / len(X)
    fit = low_rank_fit(E, 6, gram)
    even = balanced(fit, gram)
    assert even.peft_scale and not fit.peft_scale and even.truncated(3).peft_scale
    assert torch.allclose(even.B @ even.A, fit.B @ fit.A, atol=1e-4)
    # PEFT's own A (Kaiming-uniform, a = √5): E (a x)² per row, the level every balanced row is set to
    peft_A = torch.nn.init.kaiming_uniform_(torch.empty(20000, 48), a=5 ** 0.5)
    peft_energy = float(((peft_A @ gram) * peft_A).sum(1).mean())
    energy = ((even.A @ gram) * even.A).sum(1)
    assert torch.allclose(energy, torch.full_like(energy, peft_energy), rtol=0.05)
    # the even split's rows are far from it here, so the rescaling did something
    before = ((fit.A @ gram) * fit.A).sum(1)
    assert float((before / peft_energy).min()) > 2
    # without inputs, the row norms: PEFT's A rows have norm² 1/3 on average
    plain = balanced(low_rank_fit(E, 6))
    assert torch.allclose(plain.A.norm(dim=1) ** 2, torch.full((6,), 1 / 3), rtol=1e-4)


def _kl(reference, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("method", ["svd", "activation", "balanced"])
def test_a_start_brings_the_quantized_model_closer_to_the_full_one_and_keeps_the_codes(tiny_model, method):
    cache = QuantCache(get_backend("hqq"))
    calibration, held_out = _blocks(), _blocks(seed=1)
    plain = add_adapters(quantize_model(tiny_model, PLAN, cache=cache), PLAN)
    started = add_adapters(quantize_model(tiny_model, PLAN, cache=cache), PLAN)
    factors = AdapterStart(tiny_model, method, cache, blocks=calibration, max_rank=8).factors(PLAN)
    # every adapted linear of the quantized layers, none of the 16-bit layer's
    assert set(factors) == {name for name, *_ in adapted_linears(tiny_model, PLAN)}
    assert len(factors) == 3 * 7 and not any(".layers.2." in n for n in factors)
    assert apply_start(started, factors) == len(factors)
    # the stored codes are those of the plain quantization: the start changes adapters only
    for (name, a), (_, b) in zip(plain.named_buffers(), started.named_buffers()):
        assert torch.equal(a, b), name
    ids = held_out.input_ids
    assert _kl(tiny_model, started, ids) < 0.7 * _kl(tiny_model, plain, ids)
    # each adapter's update is the fit: scaling · B A == the fitted delta, at the plan's rank
    module = started.get_base_model().model.layers[1].self_attn.q_proj
    delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
    fit = factors["model.layers.1.self_attn.q_proj"]
    assert fit.rank == 4 and torch.allclose(delta, fit.B @ fit.A, atol=1e-5)
    # balanced: A is stored as fitted (at PEFT's scale), B carries all of the scaling
    stored_A = module.lora_A["default"].weight
    assert torch.allclose(stored_A, fit.A, atol=1e-6) == (method == "balanced")
    # the 16-bit layer keeps PEFT's start (B = 0)
    assert not started.get_base_model().model.layers[2].self_attn.q_proj.lora_B["default"].weight.any()


def test_fits_are_kept_per_module_and_bits_and_shared_by_plans(tiny_model):
    cache = QuantCache(get_backend("hqq"))
    start = AdapterStart(tiny_model, "activation", cache, blocks=_blocks(), max_rank=8)
    first = start.factors(PLAN)
    fitted = len(start._fits)
    again = start.factors(Plan([LayerChoice(4, 4), LayerChoice(3, 8), LayerChoice(16, 8), LayerChoice(2, 2)]))
    assert len(start._fits) == fitted  # same (module, bits): nothing fitted anew, ranks are truncations
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(again[name].A, first[name].A[:4])
    start.factors(Plan.uniform(4, 5, 8))
    assert len(start._fits) == fitted + 4 * 7
    with pytest.raises(ValueError, match="above the largest rank fitted"):
        start.factors(Plan.uniform(4, 4, 16))
    assert AdapterStart(tiny_model, "zero", cache).factors(PLAN) == {}


def test_a_width_met_in_early_layers_only_stops_the_calibration_forward_there(tiny_model):
    """Fitting linears of the first layers only runs the forward no further than the last of them, and the fits are
    those of a whole forward."""
    cache, blocks = QuantCache(get_backend("hqq")), _blocks()
    layers = tiny_model.model.layers
    calls = {i: 0 for i in range(len(layers))}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        start = AdapterStart(tiny_model, "activation", cache, blocks=blocks, max_rank=8)
        early = start.factors(Plan([LayerChoice(3, 8), LayerChoice(4, 8)] + [LayerChoice(16, 8)] * 2))
        assert calls == {0: 1, 1: 1, 2: 0, 3: 0}
        assert len(early) == 14
        whole = AdapterStart(tiny_model, "activation", QuantCache(get_backend("hqq")), blocks=blocks,
                             max_rank=8).factors(Plan([LayerChoice(3, 8), LayerChoice(4, 8)] + [LayerChoice(2, 8)] * 2))
        assert calls == {0: 2, 1: 2, 2: 1, 3: 1}  # linears in the last layer: the whole forward
        for name, fit in early.items():
            assert torch.equal(fit.A, whole[name].A) and torch.equal(fit.B, whole[name].B)
        # a width in layer 3 only: the first layers run again (their outputs feed it), none is refitted
        fitted = len(start._fits)
        start.factors(Plan([LayerChoice(3, 8), LayerChoice(4, 8), LayerChoice(16, 8), LayerChoice(2, 8)]))
        assert len(start._fits) == fitted + 7 and calls[3] == 2
    finally:
        for hook in hooks:
            hook.remove()


def test_modules_own_bits_and_ranks_are_what_the_start_fits(tiny_model):
    """A module's own bits select the codes fitted against (16 bits: no start) and its own rank the truncation."""
    plan = Plan([LayerChoice(4, 8, (ModuleChoice("k_proj", 16, 8), ModuleChoice("down_proj", 3, 2))),
                 LayerChoice(16, 8, (ModuleChoice("q_proj", 4, 4),)), LayerChoice(3, 4), LayerChoice(2, 8)])
    wanted = {name: (bits, rank) for name, _, bits, rank, _ in adapted_linears(tiny_model, plan)}
    assert "model.layers.0.self_attn.k_proj" not in wanted and wanted["model.layers.0.mlp.down_proj"] == (3, 2)
    assert [n for n in wanted if ".layers.1." in n] == ["model.layers.1.self_attn.q_proj"]
    assert wanted["model.layers.1.self_attn.q_proj"] == (4, 4) and len(wanted) == 6 + 1 + 7 + 7
    cache = QuantCache(get_backend("hqq"))
    factors = AdapterStart(tiny_model, "svd", cache, max_rank=8).factors(plan)
    assert {n: f.rank for n, f in factors.items()} == {n: r for n, (_, r) in wanted.items()}
    started = add_adapters(quantize_model(tiny_model, plan, cache=cache), plan)
    assert apply_start(started, factors) == len(factors)
    # the 3-bit down_proj's fit is against its own 3-bit codes: the same fit as a plan with 3-bit layer 0 gives
    same = AdapterStart(tiny_model, "svd", cache, max_rank=8).factors(Plan([LayerChoice(3, 2)] * 4))
    assert torch.equal(factors["model.layers.0.mlp.down_proj"].A, same["model.layers.0.mlp.down_proj"].A)


def test_a_modules_own_group_size_selects_the_codes_the_start_fits_against(tiny_model):
    plan = Plan([LayerChoice(4, 8, (ModuleChoice("down_proj", 4, 8, 128),), group_size=32)] + [LayerChoice(4, 8)] * 3)
    groups = {name: group for name, _, _, _, group in adapted_linears(tiny_model, plan)}
    assert groups["model.layers.0.mlp.down_proj"] == 128 and groups["model.layers.0.self_attn.q_proj"] == 32
    assert groups["model.layers.1.self_attn.q_proj"] == 64
    cache = QuantCache(get_backend("hqq"))
    factors = AdapterStart(tiny_model, "svd", cache, max_rank=8).factors(plan)
    for group, name in ((128, "model.layers.0.mlp.down_proj"), (32, "model.layers.0.self_attn.q_proj")):
        same = AdapterStart(tiny_model, "svd", cache, max_rank=8).factors(Plan.uniform(4, 4, 8, group_size=group))
        assert torch.equal(factors[name].A, same[name].A)
    other = AdapterStart(tiny_model, "svd", cache, max_rank=8).factors(Plan.uniform(4, 4, 8))
    assert not torch.equal(factors["model.layers.0.mlp.down_proj"].A, other["model.layers.0.mlp.down_proj"].A)


def test_loftq_rewrites_the_codes_and_fits_the_weight_at_least_as_well(tiny_model):
    backend = get_backend("hqq")
    plan = Plan.uniform(4, 3, 8)
    fitted = loftq_start(tiny_model, plan, backend, iterations=3)
    one = loftq_start(tiny_model, plan, backend, iterations=1)
    name = "model.layers.0.mlp.up_proj"
    W = tiny_model.model.layers[0].mlp.up_proj.weight.detach()
    error = lambda m, f: float((W - m.dequantize() - f.B @ f.A).norm())  # noqa: E731
    assert error(*fitted[name]) <= error(*one[name]) * 1.001
    assert not torch.equal(fitted[name][0].packed, one[name][0].packed)
    assert fitted[name][0].held_bytes() == one[name][0].held_bytes()


# ------------------------------------------------------------------------------------------------- train


FAST = dict(seq_len=32, batch_size=2, eval_blocks=0, warmup_steps=0, dtype="float32", progress=False, lr=1e-3)


@pytest.fixture
def inputs(tmp_path, tiny_dir):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(40)))
    return {"model": str(tiny_dir), "data": str(data), "plan": {"layers": [{"bits": 2, "rank": 8}] * 4}}


def test_train_starts_the_adapters_records_it_and_resumes_without_refitting(inputs, tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("qradaptor.train")  # `qradaptor.train` the attribute is the loop function

    zero = train_plan(tmp_path / "zero", steps=4, adapter_init="zero", **inputs, **FAST)
    fitted = train_plan(tmp_path / "fit", steps=4, adapter_init="activation", **inputs, **FAST)
    # step 0 is the quantized model with the adapters the library's start fits (its first training loss is the
    # loss of that model on the first batch), not PEFT's
    from qradaptor.data import load_blocks
    from qradaptor.evaluate import token_nll
    from qradaptor.models import load_model
    from qradaptor.train import batch_order

    base, tokenizer = load_model(inputs["model"], dtype=torch.float32)
    blocks = load_blocks(inputs["data"], tokenizer, "train", seq_len=32, model=base)
    plan, cache = Plan.from_dict(inputs["plan"]), QuantCache(get_backend("hqq"))
    factors = AdapterStart(base, "activation", cache, blocks=calibration_subset(blocks), max_rank=8).factors(plan)
    model = add_adapters(quantize_model(base, plan, cache=cache), plan)
    apply_start(model, factors)
    idx = batch_order(len(blocks), 2, 1, 0)[0]
    with torch.no_grad():
        nll, _ = token_nll(model, blocks.input_ids[idx], blocks.labels[idx])
    tokens = int((blocks.labels[idx][:, 1:] != -100).sum())
    assert fitted.train.losses[0] == pytest.approx(float(nll) / tokens, rel=1e-5)
    assert fitted.train.losses[0] != pytest.approx(zero.train.losses[0], rel=1e-4)
    run = json.loads((tmp_path / "fit" / RUN_FILE).read_text())
    assert run["config"]["adapter_init"] == "activation"
    start = run["adapter_start"]
    assert start["method"] == "activation" and start["modules"] == 4 * 7
    assert 0 < start["calibration_tokens"] <= 4096 and start["calibration_tokens"] % 32 == 0
    # interrupted (Ctrl-C) in step 3, resumed: the losses of the uninterrupted run, the adapters not fitted again
    real = train_module.token_nll
    calls = {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "token_nll", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_plan(tmp_path / "cut", steps=4, adapter_init="activation", checkpoint_every=1, **inputs, **FAST)
    monkeypatch.setattr(train_module, "token_nll", real)
    resumed = train_plan(tmp_path / "cut", resume=True, progress=False)
    assert resumed.resumed_from == 2 and resumed.train.losses == pytest.approx(fitted.train.losses, rel=1e-6)
    log = (tmp_path / "cut" / "train.log").read_text()
    assert log.count("adapters start fitted") == 1 and log.index("adapters start fitted") < log.index("resuming")


def test_a_search_run_continues_into_train_only_with_the_same_start(inputs, tmp_path):
    from qradaptor.commands.train import KeptRunMismatch
    from qradaptor.models import load_model
    from qradaptor.search import FineTuneFitness, SearchConfig
    from qradaptor.search.config import Fidelity

    model, tokenizer = load_model(inputs["model"])
    config = SearchConfig(budget_bytes=1, seq_len=32, ranks=(8,), adapter_init="activation")
    fitness = FineTuneFitness(model, tokenizer, data=inputs["data"], config=config)
    plan = Plan.from_dict(inputs["plan"])
    kept = tmp_path / "kept"
    fitness.trajectory(plan, Fidelity("prefix", steps=2, eval_blocks=4, batch_size=2, schedule_steps=4), [2], keep=kept)
    assert json.loads((kept / "snapshot.json").read_text())["adapter_init"] == "activation"
    common = {**inputs, **FAST, "steps": 4, "lr": 3e-4, "warmup_steps": 5}
    whole = train_plan(tmp_path / "whole", adapter_init="activation", **common)
    continued = train_plan(tmp_path / "continued", adapter_init="activation", init_from=kept, **common)
    assert continued.resumed_from == 2 and continued.train.losses == pytest.approx(whole.train.losses, rel=1e-6)
    with pytest.raises(KeptRunMismatch, match="adapter_init"):
        train_plan(tmp_path / "other", adapter_init="zero", init_from=kept, **common)
    # the start fitted on other calibration tokens is another beginning
    with pytest.raises(KeptRunMismatch, match="start_tokens"):
        train_plan(tmp_path / "fewer", adapter_init="activation", start_tokens=64, init_from=kept, **common)


def test_the_start_fits_on_the_calibration_tokens_asked_for_in_whole_blocks(inputs, tmp_path):
    few = train_plan(tmp_path / "few", steps=1, adapter_init="activation", start_tokens=50, **inputs, **FAST)
    every = train_plan(tmp_path / "every", steps=1, adapter_init="activation", **inputs, **FAST)
    runs = {name: json.loads((tmp_path / name / RUN_FILE).read_text()) for name in ("few", "every")}
    assert runs["few"]["config"]["start_tokens"] == 50
    assert runs["few"]["adapter_start"]["calibration_tokens"] == 64  # two blocks of 32
    assert runs["every"]["config"]["start_tokens"] == 4096
    assert runs["every"]["adapter_start"]["calibration_tokens"] > 64  # the whole (small) training split
    # another fit, so another model at step 0
    assert few.train.losses[0] != pytest.approx(every.train.losses[0], rel=1e-5)


def test_an_unknown_start_is_refused_before_anything_is_written(inputs, tmp_path, capsys):
    from qradaptor.cli import main

    with pytest.raises(ArtifactError, match="unknown adapter start 'pissa'") as e:
        train_plan(tmp_path / "run", steps=1, adapter_init="pissa", **inputs, **FAST)
    assert "--adapter-init activation or balanced or svd or zero" in e.value.fix
    assert not (tmp_path / "run").exists()
    assert main(["train", "--out", str(tmp_path / "run"), "--adapter-init", "pissa"]) == 2
    assert "invalid choice: 'pissa'" in capsys.readouterr().err


def test_a_searchs_first_plans_are_fitted_in_one_forward_exactly_as_one_by_one(tiny_model):
    """`prefit` fits every (module, bits) of several plans (each width of a linear from the same inputs) in one
    calibration forward, and the fits are bitwise those `factors` makes plan by plan: the search's results do not
    change, only its time."""
    blocks = _blocks()
    plans = [Plan.uniform(4, 4, 8), Plan.uniform(4, 5, 4), Plan([LayerChoice(3, 8)] * 2 + [LayerChoice(16, 8)] * 2)]
    forwards = []
    hook = tiny_model.model.layers[0].register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        together = AdapterStart(tiny_model, "activation", QuantCache(get_backend("hqq")), blocks=blocks, max_rank=8)
        assert together.prefit(plans) == 4 * 7 * 2 + 2 * 7
        assert len(forwards) == 1
        assert together.prefit(plans) == 0 and len(forwards) == 1  # nothing left to fit: no forward
        alone = AdapterStart(tiny_model, "activation", QuantCache(get_backend("hqq")), blocks=blocks, max_rank=8)
        for plan in plans:
            one, other = alone.factors(plan), together.factors(plan)
            assert one.keys() == other.keys()
            for name, fit in one.items():
                assert torch.equal(fit.A, other[name].A) and torch.equal(fit.B, other[name].B)
        assert len(forwards) == 1 + 3  # one by one: a forward per plan with new widths
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="above the largest rank fitted"):
        together.prefit([Plan.uniform(4, 4, 16)])
    assert AdapterStart(tiny_model, "zero", QuantCache(get_backend("hqq"))).prefit(plans) == 0
