"""The search on tiny models: planner (memory, repair, fill), the full search with a fast fitness,
determinism, resume after a killed process, and bad input."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qradaptor.backends import get_backend
from qradaptor.data import TokenBlocks
from qradaptor.errors import BudgetError
from qradaptor.gp import GaussianProcess, expected_improvement
from qradaptor.memory import ModelShapes, predict
from qradaptor.plan import LayerChoice, Plan
from qradaptor.profile import ProfileSettings, profile_model
from qradaptor.commands import search
from qradaptor.search import Planner, PriorCost, SearchConfig, SearchError, bit_widths_tried, pareto_front, plan_key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, words):
    """A tiny model directory, its loaded model, and its real sensitivity profile."""
    from conftest import tiny_profiled

    d, model, prior = tiny_profiled(tmp_path_factory)
    return d, model, prior


def planner_for(model, prior, budget, **kw):
    config = SearchConfig(budget_bytes=budget, **kw)
    return Planner(ModelShapes.from_model(model), get_backend("hqq"), PriorCost(prior, config), config)


def fast_fitness(plan, fidelity):
    """A deterministic stand-in for a fine-tune: quality rises with bits and ranks, layer 0 matters most."""
    weights = [4.0, 1.0, 2.0, 0.5]
    loss = sum(w * 4.0 ** -c.bits + 0.02 * w / c.rank for w, c in zip(weights, plan.layers))
    return loss + (0.01 if fidelity.name == "cheap" else 0.0), fidelity.steps


def budget_of(model, bits, rank=16):
    return predict(ModelShapes.from_model(model), Plan.uniform(4, bits, rank), get_backend("hqq")).total_bytes


def random_plan(rng, bits=(2, 3, 4, 8), ranks=(4, 8, 16, 32)):
    return Plan([LayerChoice(rng.choice(bits), rng.choice(ranks)) for _ in range(4)])


def test_planner_memory_is_the_memory_model(tiny):
    _, model, prior = tiny
    planner = planner_for(model, prior, budget_of(model, 4))
    rng = random.Random(0)
    for _ in range(20):
        plan = random_plan(rng)
        assert planner.memory(plan) == predict(planner.shapes, plan, planner.backend).total_bytes


def test_repair_always_fits_and_is_a_fixed_point_for_feasible_plans(tiny):
    _, model, prior = tiny
    rng = random.Random(1)
    floor, ceiling = budget_of(model, 2, 4), budget_of(model, 8, 32)
    for _ in range(40):
        budget = rng.randint(floor, ceiling)
        planner = planner_for(model, prior, budget)
        plan = random_plan(rng)
        repaired = planner.repair(plan, budget)
        assert planner.memory(repaired) <= budget
        assert plan_key(planner.repair(repaired, budget)) == plan_key(repaired)  # fixed point
        assert plan_key(planner.repair(plan, budget)) == plan_key(repaired)  # deterministic
        if planner.memory(plan) <= budget:
            assert plan_key(repaired) == plan_key(plan)
        # repair only lowers: every layer keeps or drops its bits and rank
        assert all(r.bits <= p.bits and r.rank <= p.rank for r, p in zip(repaired.layers, plan.layers))


def test_repair_lowers_the_least_sensitive_layer_first(tiny):
    _, model, prior = tiny
    budget = budget_of(model, 4)
    planner = planner_for(model, prior, budget, ranks=(16,))
    over = Plan([LayerChoice(8, 16)] * 4)
    repaired = planner.repair(over, budget)
    dropped = [l for l, c in enumerate(repaired.layers) if c.bits < 8]
    least = min(range(4), key=lambda l: prior.kl[l][4])
    assert least in dropped


def test_fill_stays_within_budget_and_buys_more_with_more(tiny):
    _, model, prior = tiny
    small, large = budget_of(model, 3), budget_of(model, 8)
    p_small = planner_for(model, prior, small).fill(small)
    p_large = planner_for(model, prior, large).fill(large)
    planner = planner_for(model, prior, large)
    assert planner.memory(p_small) <= small and planner.memory(p_large) <= large
    assert planner.memory(p_large) > planner.memory(p_small)


def test_search_end_to_end_respects_the_budget_everywhere(tiny, words, tmp_path):
    d, model, prior = tiny
    prior.save(tmp_path)
    budget = budget_of(model, 4)
    result = search(str(d), data=words, budget=budget, out=tmp_path, trials=12, population=4, promote=2, refine=2,
                    progress=False, fitness=fast_fitness, seq_len=32)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["budget_bytes"] == budget and saved["points"]
    assert all(p["memory_bytes"] <= budget for p in saved["points"])
    assert {p["fidelity"] for p in saved["points"]} == {"cheap", "full"}
    assert sum(p["fidelity"] == "cheap" for p in saved["points"]) == 12
    chosen = Plan.load(tmp_path / "plan.json")
    assert planner_for(model, prior, budget).memory(chosen) <= budget
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "study.db").is_file()
    assert result.chosen.fidelity == "full"
    # the fast fitness rewards bits most on layer 0: the chosen plan gives it at least the median bits
    assert chosen.layers[0].bits >= sorted(c.bits for c in chosen.layers)[1]


def test_search_on_a_training_budget_keeps_every_predicted_training_peak_within_it(tiny, words, tmp_path):
    from qradaptor.memory import training_memory

    d, model, prior = tiny
    prior.save(tmp_path)
    shapes, backend = ModelShapes.from_model(model), get_backend("hqq")

    def peak(plan):
        return training_memory(shapes, plan, backend, model.config, batch_size=4, seq_len=32).peak_bytes

    budget = peak(Plan.uniform(4, 4, 16))
    result = search(str(d), data=words, budget=f"train:{budget}", out=tmp_path, trials=10, population=4, promote=2,
                    refine=1, progress=False, fitness=fast_fitness, seq_len=32)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["budget_bytes"] == budget and saved["settings"]["budget_on"] == "training"
    assert saved["points"] and all(peak(Plan.from_dict(p["plan"])) <= p["memory_bytes"] <= budget
                                   for p in saved["points"])
    assert peak(result.chosen.plan) <= budget
    text = (tmp_path / "search-summary.txt").read_text()
    assert "on the predicted training peak" in text
    # the bit-widths its plans stored, each quantized and fitted once: what it spent beyond its steps
    tried = bit_widths_tried([Plan.from_dict(p["plan"]) for p in saved["points"]])
    assert tried and all(f"{b}-bit in {n} of 4 layers" in text for b, n in tried.items())
    # a training budget below the cheapest plan's training peak names that peak
    with pytest.raises(BudgetError, match="training-memory budget") as e:
        search(str(d), data=words, budget=f"train:{peak(Plan.uniform(4, 2, 4)) // 2}", out=tmp_path / "o",
               progress=False, fitness=fast_fitness, seq_len=32)
    assert "smaller batch" in str(e.value) and not (tmp_path / "o").exists()


def test_bit_widths_tried_counts_the_layers_of_each_width():
    mixed = Plan.from_dict({"layers": [{"bits": 4, "rank": 16, "modules": {"k_proj": {"bits": 8}}},
                                       {"bits": 3, "rank": 8}, {"bits": 4, "rank": 16}, {"bits": 16, "rank": 8}]})
    assert bit_widths_tried([mixed]) == {3: 1, 4: 2, 8: 1, 16: 1}
    assert bit_widths_tried([Plan.uniform(4, 4, 16), mixed]) == {3: 1, 4: 4, 8: 1, 16: 1}
    assert bit_widths_tried([]) == {}


def test_same_seed_same_result(tiny, words, tmp_path):
    d, model, prior = tiny
    budget = budget_of(model, 4)
    runs = []
    for name in ("a", "b"):
        prior.save(tmp_path / name)
        r = search(str(d), data=words, budget=budget, out=tmp_path / name, trials=10, population=4, promote=2,
                   refine=1, progress=False, fitness=fast_fitness, seed=3, seq_len=32)
        runs.append([(plan_key(p.plan), p.fidelity, p.loss) for p in r.points])
    assert runs[0] == runs[1]


def test_rerun_reuses_the_study_without_new_evaluations(tiny, words, tmp_path):
    d, model, prior = tiny
    prior.save(tmp_path)
    calls = []

    def counting(plan, fidelity):
        calls.append(fidelity.name)
        return fast_fitness(plan, fidelity)

    kw = dict(data=words, budget=budget_of(model, 4), out=tmp_path, trials=8, population=4, promote=1, refine=1,
              progress=False, seq_len=32)
    first = search(str(d), fitness=counting, **kw)
    n = len(calls)
    again = search(str(d), fitness=counting, **kw)
    assert len(calls) == n  # nothing re-evaluated
    assert plan_key(again.chosen.plan) == plan_key(first.chosen.plan)


def test_the_priors_price_of_rank_follows_the_start_and_a_study_keeps_the_one_it_began_with(tiny, words, tmp_path):
    import optuna

    from qradaptor.search.config import CONFIG_ATTR, STARTED_RANK_VALUE, ZERO_START_RANK_VALUE
    from qradaptor.search.storage import recorded_config

    assert SearchConfig(budget_bytes=1, adapter_init="zero").rank_value == ZERO_START_RANK_VALUE == 1 / 3
    assert SearchConfig(budget_bytes=1).rank_value == STARTED_RANK_VALUE > ZERO_START_RANK_VALUE  # activation
    assert SearchConfig(budget_bytes=1, adapter_init="zero", rank_value=2.0).rank_value == 2.0
    for bad in (0.0, -1.0, float("inf"), True, "1.4"):  # a bool is an int to Python, not a price
        with pytest.raises(SearchError, match="rank_value must be a positive number"):
            SearchConfig(budget_bytes=1, rank_value=bad)
    # pricing rank higher moves the prior's fill of the same budget from bits toward rank
    d, model, prior = tiny
    budget = budget_of(model, 4)
    zero, started = (planner_for(model, prior, budget, adapter_init=a).fill(budget) for a in ("zero", "activation"))
    assert sum(c.rank for c in started.layers) >= sum(c.rank for c in zero.layers)
    assert sum(c.bits for c in started.layers) <= sum(c.bits for c in zero.layers)
    # a study begun under the old price (as before the default changed) resumes with it: nothing evaluated again
    prior.save(tmp_path)
    calls = []

    def counting(plan, fidelity):
        calls.append(fidelity.name)
        return fast_fitness(plan, fidelity)

    kw = dict(data=words, budget=budget, out=tmp_path, trials=8, population=4, promote=1, refine=1, progress=False,
              seq_len=32)
    first = search(str(d), fitness=counting, rank_value=ZERO_START_RANK_VALUE, recovered_bits=8, **kw)
    n = len(calls)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # ... and charged whole KLs, as every study did before recovered_bits was recorded
    study = optuna.load_study(study_name="qradaptor", storage=storage)
    study.set_user_attr(CONFIG_ATTR, {k: v for k, v in study.user_attrs[CONFIG_ATTR].items() if k != "recovered_bits"})
    again = search(str(d), fitness=counting, **kw)
    assert len(calls) == n and plan_key(again.chosen.plan) == plan_key(first.chosen.plan)
    assert recorded_config(storage, "qradaptor")["rank_value"] == ZERO_START_RANK_VALUE
    assert recorded_config(storage, "no such study") is None
    assert recorded_config(f"sqlite:///{tmp_path / 'none.db'}", "qradaptor") is None
    assert not (tmp_path / "none.db").exists()


def test_resume_after_a_killed_process(tiny, words, tmp_path):
    """Kill a real CLI search mid-exploration (SIGKILL, in its 4th trial); the same command finishes it without
    redoing finished trials."""
    import optuna

    d, model, prior = tiny
    prior.save(tmp_path)
    args = ["search", "--model", str(d), "--data", words, "--budget", str(budget_of(model, 4)), "--trials", "14",
            "--population", "4", "--promote", "1", "--refine", "0", "--seq-len", "32", "--out", str(tmp_path), "-q"]
    cmd = [sys.executable, "-m", "qradaptor.cli", *args]
    # The same CLI in a process that kills itself as its 4th trial starts: where it dies does not depend on how
    # fast the machine is (polling the study from outside could miss the window on a fast one).
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from qradaptor.search import loop
        evaluate = loop.Search.objective
        def objective(self, trial):
            if trial.number >= 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return evaluate(self, trial)
        loop.Search.objective = objective
        from qradaptor.cli import main
        sys.exit(main({args!r}))
    """)
    env = dict(os.environ)
    killed = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="qradaptor", storage=url)
    done_before = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done_before) == 3
    assert study.trials[3].state == optuna.trial.TrialState.RUNNING  # the trial it died in
    assert all(t.state == optuna.trial.TrialState.WAITING for t in study.trials[4:])  # the rest of the warm start
    values_before = {t.number: t.values for t in done_before}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = optuna.load_study(study_name="qradaptor", storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 14
    assert all(study.trials[n].values == v for n, v in values_before.items())  # finished trials kept as they were
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_resumed_sampling_continues_instead_of_replaying(tiny, words, tmp_path):
    """A resumed (or extended) study samples new plans: re-seeding the sampler with the bare seed would replay
    the first trials' samples, which then count as duplicates instead of new evaluations."""
    import optuna

    d, model, prior = tiny
    prior.save(tmp_path)
    kw = dict(data=words, budget=budget_of(model, 4), out=tmp_path, population=4, promote=1, refine=0,
              progress=False, fitness=fast_fitness, seq_len=32, sampler="random")
    search(str(d), trials=6, **kw)
    search(str(d), trials=12, **kw)  # the same search, continued to 12 trials
    study = optuna.load_study(study_name="qradaptor", storage=f"sqlite:///{tmp_path / 'study.db'}")
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 12
    assert not set(params[6:]) & set(params[:6])


# --- bad input -----------------------------------------------------------------------------------------


def test_budget_below_the_cheapest_plan(tiny, words, tmp_path):
    d, model, _ = tiny
    with pytest.raises(BudgetError, match="cheapest possible plan"):
        search(str(d), data=words, budget=1000, out=tmp_path / "o", progress=False, fitness=fast_fitness)
    assert not (tmp_path / "o").exists()


def test_budget_above_the_16bit_model(tiny, words, tmp_path):
    d, model, _ = tiny
    with pytest.raises(SearchError, match="nothing to search") as e:
        search(str(d), data=words, budget="10GB", out=tmp_path / "o", progress=False, fitness=fast_fitness)
    assert "4bit" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_a_fitness_that_fine_tunes_otherwise_than_the_search_records_is_refused(tiny, words, tmp_path):
    """A `FineTuneFitness` starts adapters (and seeds, cuts blocks, quantizes) as its own config says: given to a
    search that records other settings, it is refused before any trial; `with_start` gives one that agrees."""
    from qradaptor.models import load_model
    from qradaptor.search import FineTuneFitness
    from qradaptor.search.loop import _check_fitness_config

    d, model, _ = tiny
    zero = FineTuneFitness(model, load_model(str(d))[1], data=words,
                           config=SearchConfig(budget_bytes=1, seq_len=32, adapter_init="zero"))
    kw = dict(data=words, budget="4bit", out=tmp_path / "o", seq_len=32, progress=False)
    with pytest.raises(SearchError, match="adapter_init: fitness 'zero', search 'activation'") as e:
        search(str(d), fitness=zero, **kw)
    assert "with_start" in e.value.fix
    assert not list((tmp_path / "o").glob("*.db"))  # refused before the study was opened
    with pytest.raises(SearchError, match="seed: fitness 0, search 1"):
        search(str(d), fitness=zero.with_start("activation"), seed=1, **{**kw, "out": tmp_path / "p"})

    started = zero.with_start("activation")
    assert zero.with_start("zero") is zero and started is not zero
    assert started.config.adapter_init == "activation" and zero.config.adapter_init == "zero"
    assert started.model is zero.model and started.cache is zero.cache and started.train_blocks is zero.train_blocks
    _check_fitness_config(started, SearchConfig(budget_bytes=1, seq_len=32))  # agrees: nothing raised
    _check_fitness_config(fast_fitness, SearchConfig(budget_bytes=1))  # a plain callable has no settings to compare


def test_unreachable_storage_writes_nothing(tiny, words, tmp_path):
    d, model, _ = tiny
    with pytest.raises(SearchError, match="cannot open the study storage") as e:
        search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path / "o", progress=False,
               fitness=fast_fitness, storage="postgresql+psycopg2://qr:secret@127.0.0.1:1/nowhere")
    assert "secret" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_study_of_another_search_space_is_refused(tiny, words, tmp_path):
    d, model, prior = tiny
    prior.save(tmp_path)
    kw = dict(data=words, budget=budget_of(model, 4), out=tmp_path, trials=4, population=2, promote=1, refine=0,
              progress=False, fitness=fast_fitness, seq_len=32)
    search(str(d), ranks=(4, 8), **kw)
    with pytest.raises(SearchError, match="ranks"):
        search(str(d), ranks=(4, 8, 16), **kw)


def test_sensitivity_of_another_model_is_refused(tiny, words, tmp_path, tiny_model):
    d, model, _ = tiny
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # another model than the one in `d`
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    other = profile_model(tiny_model, None, ProfileSettings(tokens=128, seq_len=32), blocks=TokenBlocks(ids, ids.clone()),
                          use_cache=False, progress=False)
    other.save(tmp_path)
    with pytest.raises(SearchError, match="another model"):
        search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path, progress=False, fitness=fast_fitness,
               seq_len=32)


def test_a_profile_made_by_the_profile_command_serves_a_search_in_its_dtype(tiny, words, tmp_path):
    """`profile` then `search --sensitivity`, both in the machine's default dtype (bf16 where it is fast): the
    profile is of the model in that dtype, so the search finds it; in another dtype the error says which."""
    from qradaptor.commands import profile

    d, model, _ = tiny
    prior = profile(str(d), data=words, out=tmp_path / "p", tokens=128, seq_len=32, bits=(2, 4), dtype="bfloat16",
                    use_cache=False, progress=False)
    assert prior.settings["model_dtype"] == "bfloat16"
    kw = dict(data=words, budget=budget_of(model, 4), sensitivity=str(tmp_path / "p" / "sensitivity.json"), trials=2,
              population=2, promote=0, refine=0, progress=False, fitness=fast_fitness, seq_len=32)
    result = search(str(d), out=tmp_path / "s", dtype="bfloat16", **kw)
    assert result.chosen.memory_bytes <= budget_of(model, 4)
    with pytest.raises(SearchError, match="measured on the model in bfloat16 and this search computes in float32"):
        search(str(d), out=tmp_path / "s32", dtype="float32", **kw)


# --- pieces ----------------------------------------------------------------------------------------------


def test_the_prior_prices_bit_widths_beyond_those_profiled(tiny):
    """A profile of 4 bits only (profile --bits 4) still orders every bit-width a search may choose: fewer bits
    cost more, none divides by zero."""
    import dataclasses

    _, _, prior = tiny
    only4 = dataclasses.replace(prior, bits=[4], kl=[{4: k[4]} for k in prior.kl])
    cost = PriorCost(only4, SearchConfig(budget_bytes=1, recovered_bits=8))  # the whole KL, extrapolated
    started = PriorCost(only4, SearchConfig(budget_bytes=1))  # the default: only what 4 bits would not keep
    for layer in range(len(prior.kl)):
        row = [cost.bits_cost(layer, b) for b in (2, 3, 4, 5, 6, 8)]
        assert all(math.isfinite(c) for c in row)
        assert row == sorted(row, reverse=True) and row[0] > row[2] > row[-1] == 0.0, row
        assert [started.bits_cost(layer, b) for b in (2, 3, 4, 5, 6, 8)] == pytest.approx(
            [c - row[2] for c in row[:3]] + [0.0] * 3)


def test_the_prior_charges_only_the_kl_above_what_the_start_is_counted_on_recovering(tiny):
    """``recovered_bits``: a layer's bits cost their KL less the layer's KL at that width (8 charges all of it; the
    default, 4, with a quantization-aware start); widths at or above it cost nothing, so the prior's fill spends a
    large budget on rank, not bits."""
    from qradaptor.search.config import STARTED_RECOVERED_BITS

    _, model, prior = tiny
    whole = PriorCost(prior, SearchConfig(budget_bytes=1, recovered_bits=8))
    part = PriorCost(prior, SearchConfig(budget_bytes=1, recovered_bits=4))
    # the default follows the start: what a quantization-aware one is counted on recovering, none from zero
    assert SearchConfig(budget_bytes=1).recovered_bits == STARTED_RECOVERED_BITS == 4
    assert SearchConfig(budget_bytes=1, adapter_init="zero").recovered_bits == 8
    for layer in range(len(prior.kl)):
        assert part.bits_cost(layer, 3) == pytest.approx(whole.bits_cost(layer, 3) - whole.bits_cost(layer, 4))
        assert part.bits_cost(layer, 4) == part.bits_cost(layer, 5) == part.bits_cost(layer, 8) == 0.0
        assert whole.bits_cost(layer, 4) > whole.bits_cost(layer, 5) > 0.0
    budget = budget_of(model, 6, 32)  # every plan of the ladders below fits
    fills = {b: planner_for(model, prior, budget, bits=(3, 4, 5, 6), recovered_bits=b).fill(budget) for b in (8, 4)}
    assert {c.bits for c in fills[4].layers} == {4} and {c.rank for c in fills[4].layers} == {32}, fills[4]
    assert {c.bits for c in fills[8].layers} == {6}, fills[8]
    for bad in (1, 9, True, 4.0):
        with pytest.raises(SearchError, match="recovered_bits must be a bit-width from 2 to 8"):
            SearchConfig(budget_bytes=1, recovered_bits=bad)


def test_gaussian_process_interpolates_and_ei_prefers_promising_points():
    rng = np.random.default_rng(0)
    x = rng.random((8, 6))
    y = (x**2).sum(1)
    gp = GaussianProcess().fit(x, y)
    mu, sigma = gp.predict(x)
    assert np.abs(mu - y).max() < 0.1 * (y.max() - y.min())
    ei = expected_improvement(np.array([0.0, 1.0]), np.array([0.1, 0.1]), best=0.5)
    assert ei[0] > ei[1] >= 0


def test_pareto_front_keeps_only_non_dominated_points():
    from qradaptor.search import Evaluated

    plan = Plan([LayerChoice(4, 8)])
    pts = [Evaluated(plan, m, 4.0, loss, "cheap", "") for m, loss in [(10, 3.0), (20, 2.0), (15, 3.5), (30, 2.0), (5, 4.0)]]
    assert [(p.memory_bytes, p.loss) for p in pareto_front(pts)] == [(5, 4.0), (10, 3.0), (20, 2.0)]


def test_study_opens_in_optuna_dashboard(tiny, words, tmp_path):
    """`optuna-dashboard sqlite:///DIR/study.db` serves both studies of a search with every trial."""
    import socket
    import urllib.request

    d, model, prior = tiny
    prior.save(tmp_path)
    result = search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path, trials=6, population=4, promote=1,
                    refine=1, progress=False, fitness=fast_fitness, seq_len=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    proc = subprocess.Popen([dashboard, f"sqlite:///{tmp_path / 'study.db'}", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, studies = time.time() + 60, None
        while studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        by_name = {s["study_name"]: s for s in studies}
        # and the coordinator study: one trial per search run that coordinated the study
        assert set(by_name) == {"qradaptor", "qradaptor:refine", "qradaptor:coordinator"}
        served = 0
        for s in (by_name["qradaptor"], by_name["qradaptor:refine"]):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{s['study_id']}?after=0", timeout=10) as r:
                trials = json.loads(r.read())["trials"]
            served += sum(t["state"] == "Complete" for t in trials)
        assert served == len(result.points)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_uniform_settings_that_fit_start_the_search_and_are_promoted(tiny, words, tmp_path):
    """The warm start holds the uniform settings a user would pick in the budget (the two largest bit-widths that
    fit at some rank, each at the largest rank that fits); all of them and the prior's fill of the budget are
    re-evaluated at the expensive fidelity, where the choice is made, besides the promoted front plan; refinement
    still runs."""
    d, model, prior = tiny
    prior.save(tmp_path)
    budget = budget_of(model, 3)
    planner = planner_for(model, prior, budget)
    config = planner.config
    result = search(str(d), data=words, budget=budget, out=tmp_path, trials=8, population=4, promote=1, refine=1,
                    progress=False, fitness=fast_fitness, seq_len=32)
    cheap = [p for p in result.points if p.fidelity == "cheap" and p.source.startswith("uniform-")]
    fitting = {b: [r for r in config.ranks if planner.memory(Plan.uniform(4, b, r)) <= budget] for b in config.bits}
    widths = sorted((b for b in config.bits if fitting[b]), reverse=True)[:2]
    assert sorted((p.plan.layers[0].bits, p.plan.layers[0].rank) for p in cheap) == \
        sorted((b, max(fitting[b])) for b in widths)
    assert all(len(set(p.plan.layers)) == 1 and p.memory_bytes <= budget for p in cheap)
    full = [p for p in result.points if p.fidelity == "full"]
    promoted = [p for p in full if p.source != "refine"]
    # every uniform setting, not only the best after the cheap fine-tune, the prior's fill of the whole budget,
    # and the front's best plan
    anchors = cheap + [p for p in result.points if p.fidelity == "cheap" and p.source == "prior-1.00"]
    assert plan_key(planner.fill(budget)) in {plan_key(p.plan) for p in anchors}
    assert {plan_key(p.plan) for p in anchors} <= {plan_key(p.plan) for p in promoted}
    assert sum(p.source == "promotion" for p in promoted) <= 1 and len(promoted) == len(anchors) + sum(
        p.source == "promotion" for p in promoted)
    assert sum(p.source == "refine" for p in full) == 1
    assert all(p.memory_bytes <= budget for p in result.points)


def test_refinement_runs_when_uniform_4bit_is_the_promoted_plan(tiny, words, tmp_path):
    """Bits-only search at the 4-bit budget: uniform 4-bit may top the cheap front; promoting it alone
    would leave the surrogate one point, so the next front plan is promoted too."""
    d, model, prior = tiny
    prior.save(tmp_path)

    def uniform_wins(plan, fidelity):  # uniform 4-bit is the best plan there is
        return sum(abs(c.bits - 4) for c in plan.layers) + 0.5, fidelity.steps

    result = search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path, trials=8, population=4, promote=1,
                    refine=1, alpha=1.0, progress=False, fitness=uniform_wins, seq_len=32, ranks=(16,))
    full = [p for p in result.points if p.fidelity == "full"]
    assert sum(p.source != "refine" for p in full) == 2
    assert sum(p.source == "refine" for p in full) == 1


def test_nsga2_breeds_from_the_evaluated_plans(tiny, words, tmp_path):
    """Every COMPLETE trial's params are the plan that was scored (within the budget, its loss recorded under
    them): proposals are repaired before they become params, so NSGA-II breeds only from evaluated plans. An
    over-budget enqueued trial (as an older study's retried trial) is pruned and its repaired plan evaluated."""
    import optuna
    from optuna.trial import TrialState

    d, model, prior = tiny
    prior.save(tmp_path)
    budget = budget_of(model, 3)
    scored = {}

    def fitness(plan, fidelity):
        scored[(plan_key(plan), fidelity.name)] = fast_fitness(plan, fidelity)[0]
        return fast_fitness(plan, fidelity)

    kw = dict(population=4, promote=1, refine=1, progress=False, fitness=fitness, seq_len=32)
    search(str(d), data=words, budget=budget, out=tmp_path, trials=14, **kw)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    over = {k: v for l in range(4) for k, v in ((f"b{l}", 8), (f"r{l}", 32))}
    optuna.load_study(study_name="qradaptor", storage=url).enqueue_trial(over, user_attrs={"source": "old"})
    search(str(d), data=words, budget=budget, out=tmp_path, trials=15, **kw)

    planner = planner_for(model, prior, budget)
    explore = optuna.load_study(study_name="qradaptor", storage=url).trials
    refine = optuna.load_study(study_name="qradaptor:refine", storage=url).trials
    complete = [t for t in explore + refine if t.state == TrialState.COMPLETE]
    assert len(complete) >= 16
    for t in complete:
        plan = Plan([LayerChoice(t.params[f"b{l}"], t.params[f"r{l}"]) for l in range(4)])
        assert planner.memory(plan) <= budget
        assert plan_key(plan) == t.user_attrs["plan_key"]
        assert t.values[0] == scored[(plan_key(plan), t.user_attrs["fidelity"])]
        assert t.values[1] == planner.memory(plan)
    assert any(t.user_attrs.get("repaired") for t in explore)  # NSGA-II's proposals did need repair
    pruned = [t for t in explore if t.state == TrialState.PRUNED]
    assert [t.params for t in pruned] == [over]
    fixed = plan_key(planner.repair(Plan([LayerChoice(8, 32)] * 4), budget))
    assert any(t.user_attrs.get("plan_key") == fixed and t.user_attrs.get("source") == "old" for t in complete)


def test_prefix_fidelity_is_where_the_longer_fine_tune_passes(tiny, words):
    """A prefix fidelity trains the first K steps of the final fine-tune's schedule: one run evaluated at several
    steps gives what separate runs stopped there give (evaluating does not change the run), and K = the schedule's
    length is the whole fine-tune, evaluated the same way."""
    from qradaptor.evaluate import evaluate_loss
    from qradaptor.quantize import prepare_model
    from qradaptor.search import FineTuneFitness
    from qradaptor.search.config import Fidelity
    from qradaptor.train import TrainConfig, train

    from qradaptor.models import load_model

    d, model, _ = tiny
    plan = Plan([LayerChoice(4, 8), LayerChoice(3, 4), LayerChoice(8, 16), LayerChoice(4, 4)])
    # zero-started adapters, as `prepare_model` below gives them (the start's own continuation: test_adapter_init)
    fitness = FineTuneFitness(model, load_model(str(d))[1], data=words,
                              config=SearchConfig(budget_bytes=1, seq_len=32, adapter_init="zero"))
    prefix = Fidelity("prefix", steps=2, eval_blocks=4, schedule_steps=6)
    along = fitness.trajectory(plan, prefix, [2, 4, 6])
    assert sorted(along) == [2, 4, 6] and len(set(along.values())) == 3
    assert fitness(plan, prefix) == (along[2], 2)
    assert fitness(plan, Fidelity("prefix", steps=4, eval_blocks=4, schedule_steps=6))[0] == along[4]
    whole = prepare_model(model, plan, seed=0)
    train(whole, fitness.train_blocks, TrainConfig(steps=6, batch_size=4, seed=0), progress=False)
    assert evaluate_loss(whole, fitness.eval_blocks.subset(4), progress=False).loss == pytest.approx(along[6], abs=1e-6)
    # a prefix is not the short fine-tune with its own schedule (which decays to zero by its last step)
    assert fitness(plan, Fidelity("short", steps=4, eval_blocks=4))[0] != along[4]
    with pytest.raises(ValueError, match="schedule"):
        fitness.trajectory(plan, prefix, [7])


def test_a_study_made_before_prefix_fidelities_still_resumes():
    """Fidelities gained a field (schedule_steps); a study whose stored config predates it is the same search."""
    from qradaptor.search.storage import _config_fingerprint

    config = SearchConfig(budget_bytes=123).to_dict()
    old = {**config, "cheap": {k: v for k, v in config["cheap"].items() if k != "schedule_steps"}}
    assert "schedule_steps" not in old["cheap"]
    assert _config_fingerprint(old) == _config_fingerprint(config)
    other = {**config, "cheap": {**config["cheap"], "schedule_steps": 100}}
    assert _config_fingerprint(other) != _config_fingerprint(config)
    # the dtype of the fine-tunes (and of the plans' pricing): a study from before it was recorded searched in float32
    assert _config_fingerprint({**config, "dtype": "float32"}) == _config_fingerprint(config)
    assert _config_fingerprint({**config, "dtype": "bfloat16"}) != _config_fingerprint(config)
    # the start's calibration tokens: a study from before they were a setting fitted on the default count
    assert _config_fingerprint({k: v for k, v in config.items() if k != "start_tokens"}) == _config_fingerprint(config)
    assert _config_fingerprint({**config, "start_tokens": 512}) != _config_fingerprint(config)
    with pytest.raises(SearchError, match="--start-tokens must be a positive whole number"):
        SearchConfig(budget_bytes=123, start_tokens=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prefix_run_is_the_train_stages_run(tiny, words, tmp_path, dtype):
    """The search's prefix fine-tune of a plan is exactly the fine-tune `qradaptor train` runs on it (same
    quantized layers, data, schedule and evaluation), so a final fine-tune could continue where the search stopped:
    run to the schedule's end, both give the same held-out loss."""
    from qradaptor.commands import train_plan
    from qradaptor.models import load_model
    from qradaptor.search import FineTuneFitness
    from qradaptor.search.config import Fidelity

    d = tiny[0]
    model, tokenizer = load_model(str(d), dtype=getattr(torch, dtype))
    plan = Plan([LayerChoice(4, 8), LayerChoice(3, 4), LayerChoice(8, 16), LayerChoice(4, 4)])
    fitness = FineTuneFitness(model, tokenizer, data=words, config=SearchConfig(budget_bytes=1, seq_len=32))
    along = fitness.trajectory(plan, Fidelity("prefix", steps=6, eval_blocks=16, schedule_steps=6), [6])
    run = train_plan(tmp_path / "run", plan=plan.to_dict(), model=str(d), data=words, steps=6, seq_len=32,
                     batch_size=4, lr=3e-4, seed=0, dtype=dtype, eval_every=0, eval_blocks=16, checkpoint_every=6,
                     progress=False)
    assert along[6] == run.validation["loss"]


def test_a_longer_prefix_continues_the_kept_run(tiny, words, tmp_path):
    """With ``runs``, each plan's prefix run is kept; a longer fidelity of the same schedule continues it, spends
    only the steps it adds, and measures exactly what a run from step 0 measures. A kept run of another schedule,
    or a damaged one, is not continued (the plan is fine-tuned from step 0 instead)."""
    from qradaptor.models import load_model
    from qradaptor.search import FineTuneFitness, run_name
    from qradaptor.search.config import Fidelity

    d, model, _ = tiny
    tokenizer = load_model(str(d))[1]
    plan = Plan([LayerChoice(4, 8), LayerChoice(3, 4), LayerChoice(8, 16), LayerChoice(4, 4)])
    other = Plan.uniform(4, 4, 8)
    config = SearchConfig(budget_bytes=1, seq_len=32)
    fresh = FineTuneFitness(model, tokenizer, data=words, config=config)
    cheap = Fidelity("cheap", steps=2, eval_blocks=4, schedule_steps=6)
    full = Fidelity("full", steps=5, eval_blocks=8, schedule_steps=6)
    expected = fresh(plan, full)[0]

    fitness = FineTuneFitness(model, tokenizer, data=words, config=config, runs=tmp_path / "runs")
    assert fitness.kept_step(plan) == 0
    assert fitness(plan, cheap) == (fresh(plan, cheap)[0], 2)
    assert fitness.kept_step(plan) == 2 and fitness.kept_run(plan) == tmp_path / "runs" / run_name(plan)
    loss, spent = fitness(plan, full)
    assert (loss, spent) == (expected, 3)  # exactly the run from step 0, three steps trained
    assert fitness.kept_step(plan) == 5
    # asked for less than is kept: measured from step 0, the longer run stays
    assert fitness(plan, cheap)[1] == 2 and fitness.kept_step(plan) == 5

    # another schedule's run of the plan is not a beginning of this one
    longer = Fidelity("full", steps=5, eval_blocks=8, schedule_steps=8)
    assert fitness(plan, longer)[1] == 5 and fitness.kept_step(plan) == 5
    snapshot = json.loads((fitness.kept_run(plan) / "snapshot.json").read_text())
    assert snapshot["train_config"]["steps"] == 8

    # a damaged adapter file: warned about, deleted, and the plan fine-tuned from step 0
    fitness(other, cheap)
    (fitness.kept_run(other) / "adapter_model.safetensors").write_bytes(b"garbage")
    assert fitness(other, full) == (fresh(other, full)[0], 5)
    assert fitness.kept_step(other) == 5

    fitness.prune([other])
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_name(other)]


def test_the_search_keeps_only_the_chosen_plans_and_the_uniform_settings_runs(tiny, words, tmp_path):
    """A search on prefix fidelities continues each promoted plan's cheap run (its full fidelity spends only the
    steps it adds), keeps no run but the chosen plan's and the uniform settings' (the baselines), and records them
    in pareto.json for the final fine-tune."""
    from qradaptor.search import kept_run, run_name

    d, model, prior = tiny
    fidelities = {"cheap": {"name": "cheap", "steps": 1, "eval_blocks": 2, "schedule_steps": 4},
                  "full": {"name": "full", "steps": 3, "eval_blocks": 4, "schedule_steps": 4}}
    result = search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path / "s", trials=4, population=2,
                    promote=1, refine=1, warm_start=2, seq_len=32, sensitivity=None, progress=False, **fidelities)
    uniform = {p.source: p.plan for p in result.points if p.source.startswith("uniform-") and p.fidelity == "full"}
    assert len(uniform) == 2  # 4-bit and the next width down, both promoted
    runs = {p.name for p in (tmp_path / "s" / "runs").iterdir()}
    assert result.kept_run is not None
    assert runs == {Path(result.kept_run).name} | {run_name(plan) for plan in uniform.values()}
    assert result.kept_step == (3 if result.chosen.fidelity == "full" else 1)
    assert kept_run(tmp_path / "s") == (Path(result.kept_run), result.kept_step)
    for source, plan in uniform.items():  # every uniform setting's run, at the full fidelity's step
        assert kept_run(tmp_path / "s", uniform=source) == (tmp_path / "s" / "runs" / run_name(plan), 3)
    assert kept_run(tmp_path / "s", uniform="uniform-9bit-r4") is None
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert pareto["kept_run"] == f"runs/{Path(result.kept_run).name}"
    assert set(pareto["uniform_runs"]) == set(uniform)
    # promoted plans continued their cheap runs: their full fidelity cost 2 steps, not 3
    import optuna

    store = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's' / 'study.db'}")
    refine = optuna.load_study(study_name="qradaptor:refine", storage=store)
    promoted = [t for t in refine.trials if t.user_attrs.get("source") != "refine"]
    assert promoted and all(t.user_attrs["fine_tune_steps"] == 2 for t in promoted)
    assert "continues it" in (tmp_path / "s" / "search-summary.txt").read_text()


class KeepingFitness:
    """`fast_fitness` with FineTuneFitness's run-keeping interface: a plan's run exists from its evaluation until a
    prune leaves it out, and a longer fidelity reports only the steps it adds to a run still kept."""

    def __init__(self):
        self.kept: dict[str, int] = {}  # plan key → the step its run is at

    def __call__(self, plan, fidelity):
        loss, steps = fast_fitness(plan, fidelity)
        start = self.kept.get(plan_key(plan), 0)
        self.kept[plan_key(plan)] = steps
        return loss, steps - start

    def prune(self, keep):
        names = {plan_key(p) for p in keep}
        self.kept = {k: v for k, v in self.kept.items() if k in names}

    def kept_run(self, plan):
        return f"runs/{plan_key(plan)}"

    def kept_step(self, plan):
        return self.kept.get(plan_key(plan), 0)


def test_no_run_that_promotion_continues_is_pruned_before(tiny, words, tmp_path):
    """Exploration prunes kept runs after every trial; the order of the cheap front shifts as points arrive, so it
    must keep the whole front (and the uniform settings), not only the plans that would be promoted so far: every
    promoted plan continues its cheap run. Afterwards only the chosen plan's and the uniform settings' runs are left."""
    d, model, prior = tiny
    prior.save(tmp_path)
    fitness = KeepingFitness()
    result = search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path, trials=10, population=4,
                    promote=2, refine=1, progress=False, fitness=fitness, seq_len=32)
    import optuna

    refine = optuna.load_study(study_name="qradaptor:refine", storage=f"sqlite:///{tmp_path / 'study.db'}")
    promoted = [t for t in refine.trials if t.user_attrs["source"] != "refine"]
    assert len(promoted) >= 3
    cheap, full = SearchConfig(budget_bytes=1).cheap.steps, SearchConfig(budget_bytes=1).full.steps
    assert all(t.user_attrs["fine_tune_steps"] == full - cheap for t in promoted)
    uniform = {plan_key(p.plan) for p in result.points if p.source.startswith("uniform-")}
    assert set(fitness.kept) == {plan_key(result.chosen.plan)} | uniform and result.kept_step == full
    assert set(result.uniform_runs) == {p.source for p in result.points if p.source.startswith("uniform-")}


def test_the_warm_start_is_nsga2s_first_generation_and_the_next_trials_its_children(tiny, words, tmp_path):
    """The warm start's plans are enqueued (all params fixed), so Optuna never asks the sampler about them: unless
    they are numbered into NSGA-II's generations, its first generation is the random trials after them, and at the
    default 8 trials with a population of 4 it never breeds. Numbered, the first `population` trials (the warm
    start) are generation 0 and the next ones generation 1, bred from them: their genes come from the warm start's
    plans at the same layer, but for mutations and repair into the budget."""
    import optuna

    d, model, prior = tiny
    prior.save(tmp_path)
    result = search(str(d), data=words, budget=budget_of(model, 4), out=tmp_path, trials=8, population=4, promote=1,
                    refine=1, progress=False, fitness=fast_fitness, seq_len=32)
    study = optuna.load_study(study_name="qradaptor", storage=f"sqlite:///{tmp_path / 'study.db'}")
    numbering = optuna.samplers.NSGAIISampler(population_size=4)
    first, second = numbering.get_population(study, 0), numbering.get_population(study, 1)
    assert [t.number for t in first] == [0, 1, 2, 3] and [t.number for t in second] == [4, 5, 6, 7]
    warm = [p for p in result.points if p.fidelity == "cheap" and p.source != "nsga2"]
    assert {p.trial for p in warm} == {0, 1, 2, 3}
    inherited = [t.params[k] in {p.params[k] for p in first} for t in second for k in t.params]
    assert sum(inherited) >= 0.8 * len(inherited), inherited  # 29 of 32 here; random children: 9


def test_the_search_rate_is_the_final_one_unless_given():
    from qradaptor.search import SearchError, search_rate

    # the search's runs are the final's first steps, at any rate (results/search_lr.md: at 3e-3 a lower search rate
    # ranked plans against the final loss)
    assert search_rate(3e-4) == 3e-4 and search_rate(3e-3) == 3e-3 and search_rate(1) == 1.0
    assert search_rate(3e-3, given=1e-3) == 1e-3 and search_rate(3e-4, given=1e-4) == 1e-4
    for bad in (0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(SearchError, match="--search-lr"):
            search_rate(3e-4, given=bad)


def test_the_search_rate_reaches_every_fidelity_and_a_given_one_wins():
    from qradaptor.commands.search import prefix_fidelities, rated_fidelities

    settings = prefix_fidelities({}, steps=100, batch_size=2, lr=1e-3)
    for key in ("cheap", "full"):
        assert settings[key]["lr"] == 1e-3 and settings[key]["schedule_steps"] == 100
        assert settings[key]["batch_size"] == 2
    # a fidelity longer than the final fine-tune is a fine-tune of its own, at the search's rate all the same
    short = prefix_fidelities({}, steps=10, batch_size=4, lr=1e-3)
    assert short["cheap"]["schedule_steps"] == 10 and short["full"]["schedule_steps"] == 0
    assert short["full"]["lr"] == 1e-3
    given = prefix_fidelities({"full": {"lr": 5e-4}, "trials": 3}, steps=100, batch_size=4, lr=1e-3)
    assert given["full"]["lr"] == 5e-4 and given["cheap"]["lr"] == 1e-3 and given["trials"] == 3
    own = rated_fidelities({"cheap": {"steps": 2}}, 2e-3)
    assert (own["cheap"]["steps"], own["cheap"]["lr"], own["cheap"]["schedule_steps"]) == (2, 2e-3, 0)
    assert own["full"]["lr"] == 2e-3


def test_the_warm_starts_adapter_starts_are_fitted_up_front_once(tiny, words, tmp_path):
    """A fitness that can fit its plans' adapter starts ahead (`FineTuneFitness.prefit`) is handed the warm start's
    plans before the first trial, so every bit-width among them shares one calibration forward; a resumed search
    (its trials enqueued before) hands it nothing again."""
    d, model, prior = tiny
    prior.save(tmp_path)
    handed = []

    class Fitness:
        def __call__(self, plan, fidelity):
            return fast_fitness(plan, fidelity)

        def prefit(self, plans):
            handed.append([plan_key(p) for p in plans])
            return 0

    kw = dict(data=words, budget=budget_of(model, 4), out=tmp_path, trials=6, population=4, promote=1, refine=1,
              progress=False, fitness=Fitness(), seq_len=32)
    result = search(str(d), **kw)
    warm = {plan_key(p.plan) for p in result.points if p.fidelity == "cheap" and p.source != "nsga2"}
    assert len(handed) == 1 and set(handed[0]) == warm and len(handed[0]) == len(warm) >= 2
    search(str(d), **{**kw, "trials": 8})  # resumed: two more trials, the warm start is not enqueued again
    assert len(handed) == 1
