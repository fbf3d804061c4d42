"""The search's genes (search/genes.py) and the planner on finer units: a layer's blocks or its linears, each with
its own bits and rank. Units, round trips between plans and Optuna parameters, exact memory, repair and fill
driven by the per-linear prior, and a whole search that chooses per linear."""

from __future__ import annotations

import json
import random

import pytest

from qradaptor.backends import get_backend
from qradaptor.commands import search
from qradaptor.memory import ModelShapes, predict, training_memory
from qradaptor.plan import Plan
from qradaptor.search import (GENE_LAYOUTS, Genes, Planner, PriorCost, SearchConfig, SearchError, group_error_ratios,
                              plan_key)
from qradaptor.search.genes import layers_from_key

LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama directory, the loaded model, and its real profile with per-linear estimates."""
    from conftest import tiny_profiled

    return tiny_profiled(tmp_path_factory, modules=True)


def planner_for(model, prior, budget, **kw):
    config = SearchConfig(budget_bytes=budget, **kw)
    return Planner(ModelShapes.from_model(model), get_backend("hqq"), PriorCost(prior, config), config)


def budget_of(model, bits, rank=16):
    return predict(ModelShapes.from_model(model), Plan.uniform(4, bits, rank), get_backend("hqq")).total_bytes


def random_values(rng, planner):
    """Gene values from random Optuna parameters (an unadapted unit has no rank gene: it takes its layer's rank)."""
    space = planner.genes.space(planner.config.bits, planner.config.ranks)
    return planner.genes.values_of({name: rng.choice(d.choices) for name, d in space.items()})


def test_units_of_each_layout(tiny):
    _, model, _ = tiny
    shapes = ModelShapes.from_model(model)
    by = {layout: Genes(layout, shapes, target_modules=LLAMA) for layout in GENE_LAYOUTS}
    assert [len(by[k].units) for k in GENE_LAYOUTS] == [4, 8, 28]
    assert all(u.whole_layer and u.primary for u in by["layer"].units)
    groups = [(u.label, u.names, u.primary) for u in by["groups"].units if u.layer == 0]
    # the MLP holds more weights (3 × 64×128) than attention (2 × 64×64 + 2 × 64×32): it is the layer's own choice
    assert groups == [("self_attn", LLAMA[:4], False), ("mlp", LLAMA[4:], True)]
    module = [u for u in by["module"].units if u.layer == 2]
    assert [u.names for u in module] == [(n,) for n in LLAMA] and [u.primary for u in module].count(True) == 1
    # shares: of the layer's weights, and of its adapter parameters at one rank
    for genes in by.values():
        for l in range(4):
            units = [u for u in genes.units if u.layer == l]
            assert sum(u.weight_share for u in units) == pytest.approx(1.0)
            assert sum(u.adapter_share for u in units) == pytest.approx(1.0)
    assert by["module"].units[1].weight_share == pytest.approx(64 * 32 / (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128))
    assert "b3.k_proj" in by["module"].space((2, 4), (4, 8)) and "r0" in by["layer"].space((2, 4), (4, 8))


GROUPS = (16, 32, 64, 128)  # the tiny model's rows are 64 wide, down_proj's 128


@pytest.mark.parametrize("group_sizes", ((), GROUPS), ids=("one-group", "group-genes"))
@pytest.mark.parametrize("layout", GENE_LAYOUTS)
def test_plans_values_and_params_round_trip_and_price_exactly(tiny, layout, group_sizes):
    _, model, prior = tiny
    rng = random.Random(0)
    for budget_on in ("stored", "training", "gguf"):
        planner = planner_for(model, prior, budget_of(model, 4), genes=layout, budget_on=budget_on,
                              group_sizes=group_sizes)
        genes = planner.genes
        for _ in range(15):
            values = random_values(rng, planner)
            plan = planner.plan_of(values)
            assert genes.values(plan) == values
            assert genes.values_of(genes.params(values)) == values
            assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).layers == plan.layers
            assert layers_from_key(plan_key(plan)) == plan.layers
            # a layer's bytes are its units' sum: the planner's running total is the memory model's
            assert planner.values_memory(values) == planner.memory(plan)
            if budget_on == "stored":
                assert planner.memory(plan) == predict(planner.shapes, plan, planner.backend).total_bytes
            plan.check_model(model)  # names the model's linears; ranks only where adapters are
        if layout == "layer":  # per-layer genes write per-layer plans: no modules, the keys they always had
            assert all(not c.modules for c in plan.layers) and "+" not in plan_key(plan)
        if not group_sizes:  # one group size: plans, params and keys as before group sizes were genes
            assert all(c.group_size is None for c in plan.layers) and "g" not in plan_key(plan)
            assert not any(name.startswith("g") for name in genes.space(planner.config.bits, planner.config.ranks))


def test_group_size_genes_take_only_sizes_that_divide_the_rows(tiny):
    _, model, _ = tiny
    shapes = ModelShapes.from_model(model)
    module = Genes("module", shapes, target_modules=LLAMA, group_sizes=GROUPS)
    assert {u.names[0]: u.groups for u in module.units if u.layer == 0} == {
        **{n: (16, 32, 64) for n in LLAMA[:6]}, "down_proj": GROUPS}
    # a unit holding a 64-wide linear cannot take 128 (a group would straddle two rows, which GGUF cannot store)
    assert all(u.groups == (16, 32, 64) for u in Genes("layer", shapes, target_modules=LLAMA, group_sizes=GROUPS).units)
    assert "g0.down_proj" in module.space((2, 4), (4, 8)) and module.space((2, 4), (4, 8))["g0.down_proj"].choices == GROUPS
    assert all(u.groups == (64,) for u in Genes("module", shapes, target_modules=LLAMA).units)
    with pytest.raises(SearchError, match="group-sizes"):
        SearchConfig(budget_bytes=1, group_sizes=(32, 128))  # the plans' 64 must be one of them
    with pytest.raises(SearchError, match="positive"):
        SearchConfig(budget_bytes=1, group_sizes=(0, 64))


def test_group_error_ratios_order_sizes_as_hqq_errors_do(tiny):
    """The group-size prior (mean squared group range relative to the profile's size) is 1 at that size, never
    smaller for larger groups, and orders each linear's sizes as HQQ's measured weight error at 3 bits does."""
    from qradaptor.architecture import decoder_layers, layer_linears

    _, model, _ = tiny
    ratios = group_error_ratios(model, GROUPS, 64)
    assert len(ratios) == 4 and set(ratios[0]) == {f"{p}.{n}" for p, names in (("self_attn", LLAMA[:4]),
                                                                               ("mlp", LLAMA[4:])) for n in names}
    backend = get_backend("hqq")
    for (_, layer), by_name in zip(decoder_layers(model)[:2], ratios[:2]):
        for name, linear in layer_linears(layer):
            r = by_name[name]
            assert r[64] == pytest.approx(1.0) and r[16] <= r[32] <= r[64] <= r[128]
            errors = {}
            for g in GROUPS:
                q = backend.quantize(linear, 3, g)
                errors[g] = float((q.dequantize().float() - linear.weight.detach().float()).pow(2).sum())
            assert sorted(GROUPS, key=errors.get) == sorted(GROUPS, key=r.get), (name, errors, r)


def test_the_fill_buys_small_groups_only_where_the_prior_says_they_pay(tiny):
    _, model, prior = tiny
    shapes = ModelShapes.from_model(model)
    budget = budget_of(model, 4, 8)
    flat = [{name: {g: 1.0 for g in GROUPS} for name in layer} for layer in group_error_ratios(model, GROUPS, 64)]
    config = SearchConfig(budget_bytes=budget, genes="module", group_sizes=GROUPS)
    for ratios in (flat, None):
        planner = Planner(shapes, get_backend("hqq"), PriorCost(prior, config, shapes=shapes, group_ratios=ratios),
                          config)
        plan = planner.fill(budget)
        assert planner.memory(plan) <= budget
        # no benefit priced: every linear keeps its largest valid group, the cheapest (down_proj 128, others 64)
        assert all(plan.group_size_of(l, n) == (128 if n == "down_proj" else 64) for l in range(4) for n in LLAMA)
    # a linear whose error falls 100-fold at group 16 gets it once the ladder's bits and ranks are bought (at most 4
    # bits here: from 8 bits up a linear has no KL left for a smaller group to remove)
    steep = [{name: dict(r) for name, r in layer.items()} for layer in flat]
    steep[2]["self_attn.v_proj"] = {16: 0.01, 32: 0.5, 64: 1.0, 128: 1.0}
    # (the whole KL charged: with the start's default, recovered_bits 4, a 4-bit linear's KL below its 4-bit g64 KL is
    # counted as recovered, so no smaller group is worth buying at 4 bits)
    config = SearchConfig(budget_bytes=budget, genes="module", group_sizes=GROUPS, bits=(2, 3, 4), ranks=(4, 8),
                          recovered_bits=8)
    planner = Planner(shapes, get_backend("hqq"), PriorCost(prior, config, shapes=shapes, group_ratios=steep), config)
    plan = planner.fill(budget)
    assert planner.memory(plan) <= budget and plan.group_size_of(2, "v_proj") == 16
    assert plan_key(plan).count("g16") == 1  # no other linear is priced as gaining from it


def test_the_training_budget_prices_a_per_linear_plan_as_training_memory_does(tiny):
    _, model, prior = tiny
    shapes, backend = ModelShapes.from_model(model), get_backend("hqq")
    config = SearchConfig(budget_bytes=10**9, genes="module", budget_on="training", seq_len=32)
    from qradaptor.search import training_fixed_bytes

    config.training_fixed_bytes = training_fixed_bytes(shapes, backend, model.config, config)
    planner = Planner(shapes, backend, PriorCost(prior, config), config)
    rng = random.Random(3)
    for _ in range(10):
        plan = planner.plan_of(random_values(rng, planner))
        peak = training_memory(shapes, plan, backend, model.config, batch_size=4, seq_len=32).peak_bytes
        assert peak <= planner.memory(plan)  # activations priced at the largest rank: a bound that holds


@pytest.mark.parametrize("layout", ("groups", "module"))
def test_repair_fits_only_lowers_and_is_a_fixed_point(tiny, layout):
    _, model, prior = tiny
    rng = random.Random(1)
    floor, ceiling = budget_of(model, 2, 4), budget_of(model, 8, 32)
    for _ in range(20):
        budget = rng.randint(floor, ceiling)
        planner = planner_for(model, prior, budget, genes=layout)
        plan = planner.plan_of(random_values(rng, planner))
        repaired = planner.repair(plan, budget)
        assert planner.memory(repaired) <= budget
        assert plan_key(planner.repair(repaired, budget)) == plan_key(repaired)
        if planner.memory(plan) <= budget:
            assert plan_key(repaired) == plan_key(plan)
        for r, p in zip(repaired.layers, plan.layers):  # every linear keeps or drops its bits and rank
            assert all(r.of(n).bits <= p.of(n).bits and r.of(n).rank <= p.of(n).rank for n in LLAMA)


def test_fill_gives_bits_to_the_linear_the_per_linear_prior_calls_sensitive(tiny):
    """The per-linear estimates drive the fill: make k_proj of layer 1 by far the most sensitive linear and it is
    the one linear of its layer given more bits than the rest."""
    import copy

    _, model, prior = tiny
    prior = copy.deepcopy(prior)
    budget = budget_of(model, 3, 4) + (budget_of(model, 4, 4) - budget_of(model, 3, 4)) // 20
    for layer in prior.module_kl:
        for row in layer.values():
            row.update({b: 1e-3 * 4.0 ** (4 - b) for b in row})  # every linear alike ...
    prior.module_kl[1]["k_proj"] = {b: 10.0 * 4.0 ** (4 - b) for b in prior.module_kl[1]["k_proj"]}  # ... but one
    # the whole KL charged (with the default, recovered_bits 4, no width above 4 is worth a byte)
    planner = planner_for(model, prior, budget, genes="module", ranks=(4,), bits=(3, 4, 5, 6, 8), recovered_bits=8)
    plan = planner.fill(budget)
    assert planner.memory(plan) <= budget
    k = plan.layers[1].of("k_proj").bits
    assert k >= 5 and all(plan.layers[l].of(n).bits < k for l in range(4) for n in LLAMA if (l, n) != (1, "k_proj"))
    # per-layer genes cannot: layer 1 as a whole is priced by its layer KL, not by one linear's estimate
    layer_plan = planner_for(model, prior, budget, genes="layer", ranks=(4,), bits=(3, 4, 5, 6, 8),
                             recovered_bits=8).fill(budget)
    assert all(not c.modules for c in layer_plan.layers)


def test_unadapted_linears_get_no_rank_gene(tiny):
    _, model, prior = tiny
    planner = planner_for(model, prior, budget_of(model, 4), genes="module", target_modules=("q_proj", "v_proj"))
    space = planner.genes.space(planner.config.bits, planner.config.ranks)
    assert "r0.q_proj" in space and "r0.v_proj" in space and "r0.k_proj" not in space and "b0.k_proj" in space
    # q_proj, the larger adapted linear, is the layer's own choice; the unadapted ones take its rank
    assert [u.names for u in planner.genes.units if u.primary and u.layer == 0] == [("q_proj",)]
    rng = random.Random(5)
    for _ in range(10):
        params = {name: rng.choice(d.choices) for name, d in space.items()}
        plan = planner.plan_of(planner.genes.values_of(params))
        plan.check_model(model)
        assert planner.memory(plan) == predict(planner.shapes, plan, planner.backend).total_bytes
        assert planner.genes.params(planner.genes.values(plan)) == params


def test_a_search_chooses_per_linear_within_the_budget(tiny, words, tmp_path):
    """genes=module end to end: it profiles per linear (no profile given), every trial fits, the plan it writes has
    per-linear choices that `memory` prices as the search did, and a rerun with other genes is refused."""
    d, model, _ = tiny
    budget = budget_of(model, 4)

    def fitness(plan, fidelity):  # stands in for a fine-tune: bits on the attention linears of layer 0 matter most
        weights = {("q_proj", 0): 8.0, ("k_proj", 0): 8.0}
        loss = sum(weights.get((n, l), 0.5) * 4.0 ** -c.of(n).bits + 0.01 / c.of(n).rank
                   for l, c in enumerate(plan.layers) for n in LLAMA)
        return loss, fidelity.steps

    kw = dict(data=words, budget=budget, out=tmp_path, trials=10, population=4, promote=1, refine=1, progress=False,
              fitness=fitness, seq_len=32)
    result = search(str(d), genes="module", **kw)
    assert json.loads((tmp_path / "sensitivity.json").read_text())["module_kl"]  # profiled per linear
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["settings"]["genes"] == "module"
    assert all(p["memory_bytes"] <= budget for p in saved["points"])
    plans = [Plan.from_dict(p["plan"]) for p in saved["points"]]
    assert any(c.modules for p in plans for c in p.layers)  # the trials differ within layers
    chosen = Plan.load(tmp_path / "plan.json")
    assert chosen.layers == result.chosen.plan.layers
    assert predict(ModelShapes.from_model(model), chosen, get_backend("hqq")).total_bytes <= budget
    with pytest.raises(SearchError, match="genes"):
        search(str(d), genes="groups", **kw)


def test_a_search_chooses_group_sizes_within_the_budget(tiny, words, tmp_path):
    """--group-sizes end to end: the study records them, every trial fits, trials take smaller groups where the
    fitness rewards them, the written plan is priced by `memory` as the search did; a rerun with other sizes is
    refused."""
    d, model, _ = tiny
    budget = budget_of(model, 4)

    def fitness(plan, fidelity):  # stands in for a fine-tune: layer 0's error grows with its group size
        loss = sum(4.0 ** -c.of(n).bits * (plan.group_size_of(l, n) / 16 if l == 0 else 1.0) + 0.01 / c.of(n).rank
                   for l, c in enumerate(plan.layers) for n in LLAMA)
        return loss, fidelity.steps

    # at most 4 bits: the budget leaves room for smaller groups, and they still matter (to the prior too: it charges
    # the whole KL here; with the start's default a 4-bit linear's KL below its g64 KL counts as recovered, and the
    # repair gives smaller groups back first)
    kw = dict(data=words, budget=budget, out=tmp_path, trials=10, population=4, promote=1, refine=1, progress=False,
              fitness=fitness, seq_len=32, bits=(2, 3, 4), ranks=(4, 8, 16), recovered_bits=8)
    result = search(str(d), group_sizes=GROUPS, **kw)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["settings"]["group_sizes"] == list(GROUPS)
    assert all(p["memory_bytes"] <= budget for p in saved["points"])
    plans = [Plan.from_dict(p["plan"]) for p in saved["points"]]
    assert any(p.group_size_of(0, "q_proj") < 64 for p in plans)  # the trials tried smaller groups where they pay
    chosen = Plan.load(tmp_path / "plan.json")
    assert chosen.layers == result.chosen.plan.layers
    assert predict(ModelShapes.from_model(model), chosen, get_backend("hqq")).total_bytes == result.chosen.memory_bytes
    with pytest.raises(SearchError, match="group_sizes"):
        search(str(d), group_sizes=(32, 64), **kw)


def test_unknown_layout_is_refused():
    with pytest.raises(SearchError, match="gene layout"):
        SearchConfig(budget_bytes=1, genes="tensor")


def test_the_cli_offers_the_layouts_the_search_has():
    from qradaptor import cli

    assert cli.GENE_LAYOUTS == GENE_LAYOUTS
