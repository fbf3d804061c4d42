"""The benchmark scripts' smoke modes, so they cannot rot between the long runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_search_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "search-smoke.json").read_text())
    assert [m["method"] for m in result["methods"]] == ["qradaptor", "nsga2", "random"]
    assert all(m["chosen"]["memory_bytes"] <= result["settings"]["budget_bytes"] for m in result["methods"])
    assert all(m["hypervolume"] >= 0 and m["fine_tune_steps"] > 0 for m in result["methods"])
    assert not (ROOT / "benchmarks" / "results" / "search-smoke.json").exists()


def test_frontier_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "frontier-smoke.json").read_text())
    names = [m["name"] for m in result["methods"]]
    plain = [f"uniform{b}-r{r}" for b in (3, 4, 8) for r in (4, 16)]
    # the other group sizes: for each budget and bit-width, the largest rank that fits (at least 3-bit r4 at g32 fits
    # the 3bit budget: uniform 3-bit g32 r4 costs less than uniform 3-bit g64 r16)
    sized = [n for n in names if n.endswith("-g32")]
    grid = plain + sized
    assert names == ["lora16", "qlora4-r16", "qdora4-r16", *plain, "greedy", *sized, "random", "qradaptor-3bit",
                     "qradaptor-3.5bit", "qradaptor-4bit", "qradaptor-5bit", "qradaptor-4bit-r16"]
    by = {m["name"]: m for m in result["methods"]}
    assert sized and all("| g32×" in by[n]["plan"] for n in sized)
    budgets = [t["budget_bytes"] for t in result["targets"]["budgets"].values()]
    for name in sized:  # each fits a budget and costs more than the same bits and rank at group size 64
        bits, rank = (int(x) for x in re.fullmatch(r"uniform(\d+)-r(\d+)-g32", name).groups())
        assert any(by[name]["memory_bytes"] <= b for b in budgets)
        assert by[name]["memory_bytes"] > by[f"uniform{bits}-r{rank}"]["memory_bytes"]
    for m in result["methods"]:
        assert m["memory_bytes"] == m["predicted_bytes"] > 0  # measured on the trained model = the memory model
        assert math.isfinite(m["loss"]) and m["peak_rss_bytes"] > 0 and m["trainable_params"] > 0
        assert m["kl_before"] >= 0
    # the searches and the greedy allocator stay within their budgets; uniform 4-bit r16 is the 4-bit budget
    u4 = by["uniform4-r16"]
    assert by["greedy"]["memory_bytes"] <= u4["memory_bytes"]
    for name in ("random", "qradaptor-3bit", "qradaptor-3.5bit", "qradaptor-4bit", "qradaptor-5bit"):
        assert by[name]["memory_bytes"] <= by[name]["budget_bytes"]
    assert by["qradaptor-4bit"]["memory_bytes"] <= u4["memory_bytes"]
    assert by["lora16"]["kl_before"] < by["uniform3-r16"]["kl_before"]
    assert {c["rank"] for c in by["qradaptor-4bit-r16"]["plan_layers"]} == {16}
    assert by["random"]["search_steps"] <= by["qradaptor-4bit"]["search_steps"] + result["settings"]["search"]["cheap"]["steps"]
    # the searches run on the final fine-tune's first steps and its final continues the chosen plan's run: the
    # search cost counts only the steps the final does not reuse
    ours = by["qradaptor-4bit"]
    assert ours["search_steps_reused"] in (result["settings"]["search"]["cheap"]["steps"],
                                           result["settings"]["search"]["full"]["steps"])
    assert result["targets"]["search_cost_in_final_fine_tunes"]["qradaptor-4bit"] == pytest.approx(
        (ours["search_steps"] - ours["search_steps_reused"]) / result["settings"]["steps"])
    # the gap's reference is QLoRA as run today: uniform 4-bit r16 with the zero start, every seed; the grid and the
    # searches' plans start as `train` does (here the activation fit), so the two 4-bit r16 rows differ
    reference = by["qlora4-r16"]
    assert result["targets"]["reference"] == "qlora4-r16" and len(reference["seeds"]) == result["settings"]["seeds"]
    assert reference["memory_bytes"] == u4["memory_bytes"] and reference["seeds"][0] != u4["seeds"][0]
    starts = {(e["plan"], e.get("adapter_init", "zero"))
              for e in json.loads((tmp_path / "finals-ledger.json").read_text())["finals"].values()}
    assert {(u4["plan"], "zero"), (u4["plan"], "activation")} <= starts
    # QDoRA: uniform 4-bit r16 with DoRA's magnitudes (more trainable parameters, more bytes), every seed
    qdora = by["qdora4-r16"]
    assert len(qdora["seeds"]) == result["settings"]["seeds"] and qdora["memory_bytes"] > u4["memory_bytes"]
    assert qdora["trainable_params"] > u4["trainable_params"]
    # the best-uniform front: every setting on it ran every seed, its loss is their mean; the others ran one, unless
    # they were on the front before it was taken again on seed means
    front = result["best_uniform_front"]
    assert front and set(front) <= set(grid)
    for name in grid:
        m = by[name]
        seeds, every = len(m["seeds"]), result["settings"]["seeds"]
        assert (seeds == every) if name in front else (seeds in (1, every))
        assert m["loss"] == pytest.approx(sum(m["seeds"]) / len(m["seeds"]))
        assert ("loss_spread" in m) == (len(m["seeds"]) > 1)
        # nothing on the front is beaten by a uniform setting that needs no more memory
        if name in front:
            assert not any(by[o]["memory_bytes"] <= m["memory_bytes"] and by[o]["loss"] < m["loss"] for o in grid)
    for budget, t in result["targets"]["budgets"].items():
        fits = [by[n] for n in grid if by[n]["memory_bytes"] <= t["budget_bytes"]]
        assert t["best_uniform"] == min(fits, key=lambda m: m["loss"])["name"]
        ours = by[f"qradaptor-{budget}"]
        assert t["delta"] == pytest.approx(ours["loss"] - t["best_uniform_loss"])
        # the searched plan ran every seed too; "beyond the spread" is beyond the larger of the two
        assert len(ours["seeds"]) == result["settings"]["seeds"] and t["loss_spread"] == ours["loss_spread"]
        assert t["better_beyond_spread"] == (-t["delta"] > max(t["loss_spread"], t["best_uniform_spread"]))
    assert (tmp_path / "frontier-smoke.md").is_file() and (tmp_path / "frontier-smoke.png").is_file()
    assert not (ROOT / "benchmarks" / "results" / "frontier-smoke.json").exists()
    # rerunning resumes: every method's result is reused, nothing is trained again, even with the store of
    # training runs gone (a fresh clone): the ledger lists every fine-tune's result
    ledger = json.loads((tmp_path / "finals-ledger.json").read_text())["finals"]
    assert {e["result"]["loss"] for e in ledger.values()} == {x for m in result["methods"] for x in m["seeds"]}
    shutil.rmtree(tmp_path / "finals")
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--smoke", "--work", str(tmp_path)],
                           capture_output=True, text=True, env=dict(os.environ), timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": final fine-tune (" not in again.stdout
    rerun = {m["name"]: m for m in json.loads((tmp_path / "frontier-smoke.json").read_text())["methods"]}
    assert rerun["uniform4-r16"]["seeds"] == u4["seeds"]

    # a frontier that spans sessions: `--partial` reports what is measured, training nothing. Take the greedy plan's
    # seed 0 and the 5bit plan's seed 1 out of the ledger (fine-tunes with the benchmark's start) and un-finish the
    # random search
    complete = (tmp_path / "frontier-smoke.json").read_text()
    dropped = {(by["greedy"]["plan"], 0), (by["qradaptor-5bit"]["plan"], 1)}
    ledger_file = tmp_path / "finals-ledger.json"
    kept = {k: e for k, e in ledger.items()
            if (e["plan"], e["seed"]) not in dropped or e.get("adapter_init", "zero") == "zero"}
    ledger_file.write_text(json.dumps({"finals": kept}))
    (tmp_path / "random" / "search" / "plan.json").unlink()
    partial = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--smoke", "--partial",
                              "--work", str(tmp_path)], capture_output=True, text=True, env=dict(os.environ),
                             timeout=1800)
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert ": final fine-tune (" not in partial.stdout
    assert not (tmp_path / "random" / "search" / "plan.json").exists()  # no search ran
    assert (tmp_path / "frontier-smoke.json").read_text() == complete  # the complete report is left as it was
    report = json.loads((tmp_path / "frontier-smoke-partial.json").read_text())
    missing, rows = report["not_measured"], {m["name"]: m for m in report["methods"]}
    assert report["settings"]["partial"] and missing["searches"] == ["random"]
    assert "greedy" in missing["finals"] and all(by[n]["plan"] == by["greedy"]["plan"] for n in missing["finals"])
    assert set(rows) == set(rerun) - {"random", *missing["finals"]}
    five = rows["qradaptor-5bit"]
    assert missing["seeds"]["qradaptor-5bit"] == 1 and five["seeds"] == by["qradaptor-5bit"]["seeds"][:1]
    assert five["loss"] == five["seeds"][0] and "loss_spread" not in five
    assert rows["qradaptor-3bit"]["seeds"] == by["qradaptor-3bit"]["seeds"]
    md = (tmp_path / "frontier-smoke-partial.md").read_text()
    assert "**Partial**" in md and "searches not finished: random" in md and "qradaptor-5bit (1 of 2)" in md
    # without the gap's ends there is no report: it says so before measuring any row
    ledger_file.write_text(json.dumps({"finals": {k: e for k, e in kept.items() if e["plan"] != by["lora16"]["plan"]}}))
    (tmp_path / "frontier-smoke-partial.json").unlink()
    endless = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--smoke", "--partial",
                              "--work", str(tmp_path)], capture_output=True, text=True, env=dict(os.environ),
                             timeout=1800)
    assert endless.returncode != 0 and "needs the qlora4-r16 and lora16 finals" in endless.stderr, endless.stderr[-2000:]
    assert "frontier: " not in endless.stdout and not (tmp_path / "frontier-smoke-partial.json").exists()


def test_memory_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "memory.json").read_text())
    names = [c["name"] for c in result["cases"]]
    assert names == ["tiny/bf16-lora/bfloat16/ckpt/2x32", "tiny/uniform4/bfloat16/ckpt/2x32",
                     "tiny/uniform4/float32/no-ckpt/2x32"]
    repeated = result["cases"][1]  # ran twice, each in its own process: the median run, with both listed
    assert [r["training_memory"] for r in repeated["runs"]] == sorted(r["training_memory"] for r in repeated["runs"])
    assert len(repeated["runs"]) == 2 and repeated["training_memory"] in [r["training_memory"] for r in repeated["runs"]]
    assert "runs" not in result["cases"][0]
    for case in result["cases"]:
        # a fresh process per case: imports, then the model, then training; every figure from that process
        assert 0 < case["rss_after_imports"] <= case["rss_before_training"] <= case["peak_training"]
        assert case["peak_process"] >= case["peak_training"] and case["predicted_peak"] > 0
        assert len(case["step_seconds"]) == 2 and all(t > 0 for t in case["step_seconds"])
    assert not (ROOT / "benchmarks" / "results" / "memory-smoke.json").exists()


def test_dtype_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dtype.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "dtype.json").read_text())
    assert set(result["dtypes"]) == {"float32", "bfloat16"}
    for d in result["dtypes"].values():
        assert len(d["losses"]) == 3 and d["step_seconds"] > 0 and d["spread"] >= 0
    assert result["verdict"]["default"] in ("float32", "bfloat16")
    assert not (ROOT / "benchmarks" / "results" / "dtype-smoke.json").exists()


def test_cpu_dtype_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_dtype.py"), "--smoke", "--work",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "cpu_dtype.json").read_text())
    cases = {(c["mode"], c["variant"]): c for c in result["cases"]}
    assert set(cases) == {(m, v) for m in ("native", "fp32-only") for v in
                          ("float32", "bfloat16", "auto", "bf16-fp32-products")}
    # the mode reached the child: oneDNN capped at AVX2 there, so auto measured the CPU and chose float32
    assert cases[("fp32-only", "auto")]["dtype"] == "float32"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in cases[("fp32-only", "auto")]["reason"]
    assert cases[("fp32-only", "bf16-fp32-products")]["products_upcast"] > 0  # forward and backward products
    for c in result["cases"]:
        assert c["step_time"] > 0 and len(c["step_seconds"]) == 3 and c["training_memory"] > 0
    assert len(cases[("fp32-only", "float32")]["runs"]) == 2 and "runs" not in cases[("fp32-only", "bfloat16")]
    assert result["environment"]["cpu_capability"] and result["environment"]["auto_dtype"] in ("float32", "bfloat16")
    assert not (ROOT / "benchmarks" / "results" / "cpu_dtype-smoke.json").exists()


def test_gpu_check_smoke_on_the_cpu(tmp_path):
    """The GPU check's every case on a tiny model on the CPU: the script works where no GPU is."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu", "--work", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [c["name"] for c in result["cases"]] == [f"{m}/{c}" for m in ("bf16-lora", "uniform4", "uniform4-native",
                                                                        "mixed") for c in ("ckpt", "no-ckpt")]
    for case in result["cases"]:
        assert case["device"] == "cpu" and case["peak_bytes"] > 0 and case["predicted_peak_bytes"] > 0
        assert len(case["step_seconds"]) == case["steps"] and case["step_time"] > 0
        assert (case["quantize_seconds"] is None) == (case["method"] == "bf16-lora")
    assert result["ratios"]["step_mixed_over_uniform4"] > 0
    from benchmarks.gpu import cases

    case = next(c for c in cases(smoke=True) if c["name"] == "mixed/ckpt")  # on a GPU each case is a child process
    child = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--case", json.dumps(case),
                            "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    alone = json.loads(child.stdout.strip().splitlines()[-1])
    assert alone["name"] == "mixed/ckpt" and alone["peak_bytes"] > 0 and len(alone["step_seconds"]) == case["steps"]
    committed = ROOT / "benchmarks" / "results" / "gpu.json"  # a smoke run never writes into results/
    assert not committed.exists() or not json.loads(committed.read_text())["smoke"]
    import torch

    if not torch.cuda.is_available():  # without a GPU the full check refuses, naming the smoke run
        full = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--work", str(tmp_path / "x")],
                              capture_output=True, text=True, timeout=300)
        assert full.returncode != 0 and "needs a CUDA GPU" in full.stderr and "--smoke" in full.stderr


def test_fidelity_study_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--smoke", "--work", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "fidelity.json").read_text())
    assert result["plans_done"] == result["plans_planned"] >= 6
    names = [s["name"] for s in result["signals"]]
    assert names[:4] == ["kl_before", "loss@1", "loss@2", "loss@3"] and "surrogate" in names
    assert names[4:7] == ["prefix@1", "prefix@2", "prefix@3"]
    assert "extrapolated" in names and result["best"] in names
    assert result["chosen"] == "prefix@2"  # the smoke frontier searches' full fidelity: 2 steps of the final schedule
    for s in result["signals"]:
        assert -1 <= s["spearman"] <= 1 and s["top3"] in (0, 1 / 3, 2 / 3, 1)
    plans = result["plans"]
    assert len({p["id"] for p in plans}) == len(plans)  # no plan measured twice
    assert any(p["name"].startswith("uniform") for p in plans) and any(p["name"].startswith("random") for p in plans)
    assert all(math.isfinite(p["final"]) and p["kl_before"] >= 0 for p in plans)
    assert sum(len(p["final_seeds"]) > 1 for p in plans) == result["plans_with_seeds"] >= 1
    committed = ROOT / "benchmarks" / "results" / "fidelity.json"  # a smoke run never writes into results/
    assert not committed.exists() or not json.loads(committed.read_text())["smoke"]
    # a rerun measures nothing again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "fidelity: plan " not in again.stdout
    assert json.loads((tmp_path / "fidelity.json").read_text())["signals"] == result["signals"]


def test_fidelity_rows_taken_on_other_held_out_text_are_measured_again(tmp_path):
    """The study's committed rows come back into a fresh work directory, and its kept measurements are reused, only
    where they were taken on today's held-out splits (the default corpus's splits changed once: results/overlap.md)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.fidelity import cached, done_rows, restore_rows

    settings = {"short_steps": (1, 2)}
    signals = {"kl_before": 0.1, "final": 2.5, "loss@1": 3.0, "loss@2": 2.9, "prefix@1": 3.1, "prefix@2": 2.8}
    rows = [{"id": "a", "held_out": "today", **signals}, {"id": "b", "held_out": "before", **signals},
            {"id": "c", **signals}]  # a row from before rows recorded their held-out text
    results = tmp_path / "results"
    results.mkdir()
    (results / "fidelity.json").write_text(json.dumps({"plans": rows}))
    work = tmp_path / "work"
    assert restore_rows(work, results, "today") == (1, 2)
    assert sorted(p.name for p in (work / "rows").iterdir()) == ["a.json"]
    assert restore_rows(work, results, "today") == (0, 2)  # what is already there stays
    (work / "rows" / "b.json").write_text(json.dumps(rows[1]))  # a stale row left in the work directory
    assert [r["id"] for r in done_rows(work, settings, "today")] == ["a"]
    calls = []
    value = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert cached(tmp_path / "kl.json", value, "before") == 1
    assert cached(tmp_path / "kl.json", value, "before") == 1  # kept
    assert cached(tmp_path / "kl.json", value, "today") == 2  # taken on other held-out text: measured again
    assert cached(tmp_path / "kl.json", value, "today") == 2 and len(calls) == 2


def test_fidelity_statistics():
    sys.path.insert(0, str(ROOT))
    from benchmarks.fidelity import extrapolate, ranks, ridge_loo, spearman, top3

    assert ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert abs(spearman([1, 2, 3, 4], [10, 20, 30, 40]) - 1) < 1e-12
    assert abs(spearman([1, 2, 3, 4], [4, 3, 2, 1]) + 1) < 1e-12 and spearman([1, 1, 1], [1, 2, 3]) is None
    assert top3([1, 2, 3, 9, 9], [1, 2, 3, 0.5, 9]) == 2 / 3
    steps = [8, 12, 24, 48]
    curve = [2.0 + 3.0 * k ** -0.5 for k in steps]
    assert abs(extrapolate(steps, curve, 100) - (2.0 + 3.0 * 100 ** -0.5)) < 1e-3
    x = [[float(i), float(i % 3)] for i in range(12)]
    y = [2 * a - b + 1 for a, b in x]
    assert max(abs(p - t) for p, t in zip(ridge_loo(x, y, alpha=1e-9), y)) < 1e-4


def test_final_fine_tunes_are_kept_by_what_decides_their_result():
    """The store of final fine-tunes shared by the benchmarks: where a run was written or what it was called does
    not change its key; every setting that changes its result does."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.frontier import final_key

    spec = {"plan": {"layers": [{"bits": 4, "rank": 16}]}, "model": None, "data": None, "steps": 100, "seq_len": 128,
            "batch_size": 4, "lr": 3e-4, "seed": 0, "dtype": "bfloat16"}
    key = final_key(spec)
    assert final_key({**spec, "run_dir": "/a", "result": "/a/final.json", "label": "uniform4-r16"}) == key
    for field, other in [("plan", {"layers": [{"bits": 5, "rank": 4}]}), ("steps", 50), ("seed", 1),
                         ("dtype", "float32"), ("lr", 1e-4), ("model", "other"), ("batch_size", 8),
                         ("adapter_init", "activation")]:
        assert final_key({**spec, field: other}) != key, field
    # a warm-up other than the recipe's is part of the key; the recipe's is left out, so earlier keys stay valid
    from benchmarks.frontier import final_spec
    from qradaptor.plan import Plan

    plan, recipe = Plan.uniform(1, 4, 16), {k: spec[k] for k in ("steps", "seq_len", "batch_size", "lr")}
    plain = final_spec(plan, recipe, None, None, seed=0, dtype="bfloat16")
    assert "warmup_steps" not in plain
    assert final_spec(plan, {**recipe, "warmup_steps": 5}, None, None, seed=0, dtype="bfloat16") == plain
    longer = final_spec(plan, {**recipe, "warmup_steps": 20}, None, None, seed=0, dtype="bfloat16")
    assert longer["warmup_steps"] == 20 and final_key(longer) != final_key(plain)


def test_a_final_fine_tune_and_a_peak_rss_measurement_each_run_in_a_child_process(tmp_path):
    """Outside smoke runs (which call their code in-process: `children_in_process`), each final fine-tune and each
    peak-RSS measurement is a fresh child process; its result comes back through its file, and the final's through
    the ledger too."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import frontier
    from benchmarks.search import smoke_model
    from qradaptor.plan import Plan

    assert not frontier.CHILDREN_IN_PROCESS
    model, words = smoke_model(tmp_path)
    plan, settings = Plan.uniform(4, 4, 4), {**frontier.SMOKE, "steps": 2}
    final = frontier.run_final(tmp_path / "finals", "child", plan, settings, model, words, seed=0)
    assert math.isfinite(final["loss"]) and final["memory_bytes"] == final["predicted_bytes"] > 0
    assert [e["result"] for e in frontier.read_ledger(tmp_path / "finals-ledger.json").values()] == [
        {k: v for k, v in final.items() if k != "run_dir"}]
    rss = frontier.measure_rss(tmp_path, "child", plan, settings, model, words, dtype="float32")
    assert rss["peak_rss_bytes"] >= rss["rss_before_training_bytes"] > 0 and rss["steps"] == settings["rss_steps"]


def test_a_kept_final_judged_on_other_held_out_text_is_judged_again_not_reused(tmp_path):
    """A final's losses taken on held-out splits that have changed since (the default corpus's lost the paragraphs
    training holds) are stale: a kept run is evaluated again in a child process, not trained again, and gives the
    same losses where the text is the same; a ledger entry whose run is not on this machine is trained again."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import frontier
    from benchmarks.search import smoke_model
    from qradaptor.io import atomic_write_json
    from qradaptor.plan import Plan

    model, words = smoke_model(tmp_path)
    store, ledger = tmp_path / "finals", tmp_path / "finals-ledger.json"
    plan, settings = Plan.uniform(4, 4, 4), {**frontier.SMOKE, "steps": 2}
    frontier.children_in_process()
    try:
        first = frontier.run_final(store, "stale", plan, settings, model, words, seed=0)
    finally:
        frontier.CHILDREN_IN_PROCESS = False
    assert first["held_out"] == frontier.held_out_fingerprint(words, settings["seq_len"])
    assert first["validation_tokens"] >= first["test_tokens"] > 0 and math.isfinite(first["validation_all_loss"])
    (key,) = frontier.read_ledger(ledger)
    kept = json.loads((store / key / "final.json").read_text())
    atomic_write_json(store / key / "final.json", {**kept, "held_out": "earlier", "loss": 99.0})
    frontier.add_to_ledger(ledger, key, {**frontier.read_ledger(ledger)[key],
                                         "result": {**kept, "held_out": "earlier", "loss": 99.0}})
    run_json = (store / key / "train" / "run.json").stat().st_mtime_ns
    again = frontier.run_final(store, "stale", plan, settings, model, words, seed=0)  # a child evaluates it
    assert (store / key / "train" / "run.json").stat().st_mtime_ns == run_json  # not trained again
    assert again["earlier_held_out"]["loss"] == 99.0 and again["earlier_held_out"]["held_out"] == "earlier"
    assert again["held_out"] == first["held_out"] and again["train_seconds"] == first["train_seconds"]
    for k in ("loss", "validation_loss", "validation_all_loss"):  # the same model on the same text
        assert again[k] == pytest.approx(first[k], rel=1e-5), k
    assert frontier.read_ledger(ledger)[key]["result"] == {k: v for k, v in again.items() if k != "run_dir"}
    shutil.rmtree(store / key)  # the run is not on this machine, and the ledger's losses are stale: train again
    frontier.add_to_ledger(ledger, key, {**frontier.read_ledger(ledger)[key],
                                         "result": {**kept, "held_out": "earlier"}})
    frontier.children_in_process()
    try:
        retrained = frontier.run_final(store, "stale", plan, settings, model, words, seed=0)
    finally:
        frontier.CHILDREN_IN_PROCESS = False
    assert (store / key / "train" / "run.json").is_file() and "earlier_held_out" not in retrained
    assert retrained["loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_the_ledger_notice_says_which_finals_this_machine_cannot_reuse():
    """A benchmark on a CPU without native bf16 trains its quantized plans in float32: the ledger's bf16 finals are
    other fine-tunes to it, and it says so before spending hours training them again."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.frontier import ledger_notice

    finals = {"a": {"dtype": "bfloat16"}, "b": {"dtype": "bfloat16"}, "c": {"dtype": "float32"}}
    native = ledger_notice(finals, "bfloat16")
    assert "2 finals in bfloat16" in native and "1 in float32" in native and "no native bf16" not in native
    avx2 = ledger_notice(finals, "float32")
    assert "1 finals in float32" in avx2 and "2 in bfloat16" in avx2 and "no native bf16" in avx2
    assert "and" not in ledger_notice({"a": {"dtype": "bfloat16"}}, "bfloat16").split("finals in")[1]


def test_frontier_first_rows_take_seeds_and_refuse_what_the_run_lacks():
    """`frontier.py --first ROW[:SEEDS],...`: the rows in the order given, with their seeds to train first; a row the
    run lacks or a seed count out of range ends the run with one message before anything trains."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.frontier import first_rows

    rows = ["lora16", "uniform4-r4", "uniform4-r16-g32"]
    assert list(first_rows("uniform4-r16-g32,uniform4-r4:3", rows, 3).items()) == [("uniform4-r16-g32", 1),
                                                                                    ("uniform4-r4", 3)]
    assert first_rows("", rows, 3) == {}
    with pytest.raises(SystemExit, match="does not have: uniform9-r4"):
        first_rows("uniform9-r4", rows, 3)
    for bad in ("uniform4-r4:4", "uniform4-r4:0", "uniform4-r4:x"):
        with pytest.raises(SystemExit, match="from 1 to 3"):
            first_rows(bad, rows, 3)


def test_frontier_reads_every_kept_seed_before_it_trains_one():
    """The best-uniform front is taken on seed means: a row that is on it at seed 0 alone (uniform5-r16-g128 here)
    gets no seed trained once the kept seeds of the others take it off (a full run once trained such a row)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.frontier import fill_seeds

    def rows():
        return [{"name": "uniform4-r16", "memory_bytes": 100, "loss": 2.70, "seeds": [2.70], "dtype": "bfloat16"},
                {"name": "uniform5-r16-g128", "memory_bytes": 110, "loss": 2.69, "seeds": [2.69], "dtype": "bfloat16"}]

    def finals(kept):
        trained = []

        def final(row, seed, fine_tune):
            if (row["name"], seed) in kept:
                return {"loss": kept[row["name"], seed], "train_seconds": 1.0}
            if not fine_tune:
                return None
            trained.append((row["name"], seed))
            return {"loss": 2.66, "train_seconds": 1.0}
        return final, trained

    table = rows()
    final, trained = finals({("uniform4-r16", 1): 2.66})
    fill_seeds(table, "front", 3, final, train=True)
    assert trained == [("uniform4-r16", 2)]  # not uniform5-r16-g128: behind 4-bit r16's mean (2.673) in more memory
    assert table[0]["seeds"] == [2.70, 2.66, 2.66] and table[0]["loss"] == pytest.approx(2.6733, abs=1e-4)
    assert table[0]["loss_spread"] == pytest.approx(0.04) and table[1]["seeds"] == [2.69]
    table = rows()
    final, trained = finals({("uniform4-r16", 1): 2.66})
    fill_seeds(table, "front", 3, final, train=False)  # --partial: kept seeds only
    assert trained == [] and table[0]["seeds"] == [2.70, 2.66] and table[1]["seeds"] == [2.69]


def test_frontier_takes_a_committed_rows_kl_and_rss_only_for_the_same_plan_settings_and_split(tmp_path):
    """A fresh checkout's frontier does not measure again the KL and peak RSS its committed results hold for a row,
    where the plan, dtype, settings and held-out split agree; a row measured here keeps its own measurement."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.frontier import _drop_if_stale, _rss_spec, committed_rows, reuse_measurement
    from qradaptor.plan import Plan

    settings = {"rss_steps": 5, "seq_len": 128, "batch_size": 4, "lr": 3e-4, "kl_blocks": 16}
    plan = Plan.uniform(2, 4, 16)
    row = {"name": "uniform4-r16", "dtype": "bfloat16", "plan_layers": plan.to_dict()["layers"], "held_out": "abc",
           "peak_rss_bytes": 123, "rss_before_training_bytes": 100, "kl_before": 0.25}
    results, older = tmp_path / "frontier-partial.json", tmp_path / "frontier.json"
    for path, rows in ((results, [row]), (older, [{**row, "held_out": None, "kl_before": 9.0}])):  # an older split
        path.write_text(json.dumps({"settings": {**settings, "model": "smollm2-135m", "data": "pydoc-topics"},
                                    "methods": rows}))
    assert committed_rows([tmp_path / "none.json", results], {**settings, "lr": 1e-3}, None, None) == {}
    kept = committed_rows([tmp_path / "none.json", older, results], settings, None, None)
    work = tmp_path / "work"
    row, name = kept["uniform4-r16"], "uniform4-r16"  # both files' rows: the one measured on this split is taken
    # another split, another dtype, another plan: measured again
    assert not reuse_measurement(work, row, name, plan, {"held_out": "xyz"}, settings, None, None, "bfloat16")
    assert not reuse_measurement(work, row, name, plan, {"held_out": "abc"}, settings, None, None, "float32")
    assert not reuse_measurement(work, row, name, Plan.uniform(2, 4, 8), {"held_out": "abc"}, settings,
                                 None, None, "bfloat16")
    assert not (work / "uniform4-r16").exists()
    assert reuse_measurement(work, row, name, plan, {"held_out": "abc"}, settings, None, None, "bfloat16")
    rss, kl = work / "uniform4-r16" / "rss.json", work / "uniform4-r16" / "kl-fp32.json"
    assert json.loads(kl.read_text()) == {"kl_before": 0.25} and json.loads(rss.read_text())["peak_rss_bytes"] == 123
    _drop_if_stale(rss, work / name / "rss-spec.json", _rss_spec(rss, plan, settings, None, None, "bfloat16"))
    assert rss.is_file()  # what measure_rss would read instead of measuring
    rss.write_text(json.dumps({"peak_rss_bytes": 456}))  # measured here: kept
    assert not reuse_measurement(work, row, name, plan, {"held_out": "abc"}, settings, None, None, "bfloat16")
    assert json.loads(rss.read_text())["peak_rss_bytes"] == 456


def test_adapter_init_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapter_init.py"), "--smoke", "--work",
                           str(tmp_path), "--plans", "uniform4-r16", "--seeds", "2"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "adapter_init-smoke.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["zero", "svd", "loftq", "activation"]
    assert len(rows["zero"]["seeds"]) == len(rows["activation"]["seeds"]) == 2 and len(rows["svd"]["seeds"]) == 1
    # every start that fits the quantization error is closer to the full model at step 0 than B = 0
    assert all(rows[m]["kl_before"] < rows["zero"]["kl_before"] for m in ("svd", "loftq", "activation"))
    assert not (ROOT / "benchmarks" / "results" / "adapter_init-smoke.json").exists()


def test_contention_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "contention.py"), "--smoke", "--only", "profile",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "contention-smoke.json").read_text())
    cases = {c["mode"]: c for c in result["cases"]}
    assert set(cases) == {"alone", "all", "auto"}
    assert [len(cases[m]["seconds"]) for m in ("alone", "all", "auto")] == [1, 2, 2]
    assert all(s > 0 for c in cases.values() for s in c["seconds"])
    assert result["targets"]["worst_ratio_auto"] > 0 and "| profile |" in (tmp_path / "contention-smoke.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "contention-smoke.json").exists()


def test_module_profile_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "module_profile.py"), "--smoke", "--work",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "module_profile-smoke.json").read_text())
    for bits in ("2", "4"):
        agreement = result["agreement"][bits]
        assert -1 <= agreement["spearman"] <= 1 and len(agreement["measured"]) == 2
        assert set(agreement["measured"][0]) == set(agreement["estimated"][0]) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert result["seconds"]["layers"] > 0 and result["seconds"]["with_modules"] > 0
    assert not (ROOT / "benchmarks" / "results" / "module_profile-smoke.json").exists()


def test_ablation_benchmark_smoke(tmp_path):
    from benchmarks import ablation

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--smoke", "--work", str(tmp_path),
                           "--lr", "1e-3"], capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ablation-smoke.json").read_text())
    assert result["settings"]["lr"] == 1e-3
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["qlora4-r16", "start", "balanced", "dora", "search", "search+module", "search+groups", "search+start",
                          "all", "lora16"]
    ref, ceiling = rows["qlora4-r16"]["loss"], rows["lora16"]["loss"]
    for r in rows.values():
        assert len(r["seeds"]) == result["settings"]["seeds"] and math.isfinite(r["loss"])
        assert r["delta_vs_reference"] == pytest.approx(r["loss"] - ref)
        assert r["gap_recovered"] == pytest.approx((ref - r["loss"]) / (ref - ceiling))
        # the training curve by step window, from the finals' own per-step losses (kept in their results)
        assert len(r["train_loss_by_window"]) == len(ablation.step_windows(result["settings"]["steps"]))
        assert all(math.isfinite(v) for v in r["train_loss_by_window"])
        if r["searched"]:
            assert r["memory_bytes"] <= r["budget_bytes"]
    # one lever at a time: the uniform rows share the plan's bytes but for DoRA's magnitudes, and differ in loss
    assert rows["start"]["memory_bytes"] == rows["qlora4-r16"]["memory_bytes"] < rows["dora"]["memory_bytes"]
    assert rows["lora16"]["memory_bytes"] > rows["qlora4-r16"]["memory_bytes"] and rows["lora16"]["plan"].startswith("16b")
    assert rows["start"]["seeds"][0] != rows["qlora4-r16"]["seeds"][0]
    assert rows["balanced"]["adapter_init"] == "balanced" and rows["start"]["adapter_init"] == "activation"
    assert rows["balanced"]["memory_bytes"] == rows["start"]["memory_bytes"]
    assert rows["search"]["adapter_init"] == "zero" and rows["search+start"]["adapter_init"] != "zero"
    assert rows["search+groups"]["group_sizes"] == [32, 64, 128] and rows["all"]["dora"]
    assert rows["all"]["genes"] == "module" and rows["qlora4-r16"]["linears_with_their_own_choice"] == 0
    assert (tmp_path / "ablation-smoke.md").is_file()
    assert not (ROOT / "benchmarks" / "results" / "ablation-smoke.json").exists()


def test_rank_value_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rank_value.py"), "--smoke", "--work", str(tmp_path),
           "--budgets", "4bit", "--value", "2.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "rank_value-smoke.json").read_text())
    c = result["calibration"]
    rows = c["rows"]
    assert set(rows) == {"uniform4-r16", "uniform4-r4", "uniform3-r16"} and (c["rank_high"], c["rank_low"]) == (16, 4)
    # the price is read from those rows and the profile, by the docstring's formula (none where a step gained)
    assert c["per_halving"] == pytest.approx((rows["uniform4-r4"] - rows["uniform4-r16"]) / 2)
    assert c["three_bit_step"] == pytest.approx(rows["uniform3-r16"] - rows["uniform4-r16"])
    kl3, kl4 = c["kl_sum"]["3"], c["kl_sum"]["4"]
    assert kl3 > kl4 > 0
    if c["per_halving"] > 0 and c["three_bit_step"] > 0:
        assert c["measured"] == pytest.approx(c["per_halving"] / c["three_bit_step"] * (kl3 - kl4) / kl4)
    else:
        assert c["measured"] is None
    assert result["settings"]["value"] == 2.0 and [b["budget"] for b in result["budgets"]] == ["4bit"]
    row = result["budgets"][0]
    ours, old = row["ours"], row["old"]
    assert ours["rank_value"] == 2.0 and old["rank_value"] == pytest.approx(1 / 3)
    for r in (ours, old):
        assert len(r["seeds"]) == result["settings"]["seeds"] and r["memory_bytes"] <= r["budget_bytes"]
    # each search records the price it ran with: the two are separate studies
    import optuna

    for name, value in (("rank-value-2-4bit", 2.0), ("rank-value-0.333-4bit", 1 / 3)):
        study = optuna.load_study(study_name="qradaptor", storage=f"sqlite:///{tmp_path / name / 'search' / 'study.db'}")
        assert study.user_attrs["qradaptor_config"]["rank_value"] == pytest.approx(value)
    # the uniform rows trained for the calibration are among the best-uniform candidates
    assert row["best_uniform"] is not None and row["best_uniform"]["name"].startswith("uniform")
    assert (tmp_path / "rank_value-smoke.md").is_file()
    assert not (ROOT / "benchmarks" / "results" / "rank_value-smoke.json").exists()
    bad = subprocess.run(cmd[:-4] + ["--budgets", "7bit"], capture_output=True, text=True, env=dict(os.environ))
    assert bad.returncode != 0 and "--budgets: choose among" in bad.stderr
    # --recovered-bits: the same price with bits at and above 4 free, beside the search above (resumed, not rerun)
    proc = subprocess.run(cmd + ["--recovered-bits", "4"], capture_output=True, text=True, env=dict(os.environ),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "rank_value-rb4-smoke.json").read_text())
    ours, beside = result["budgets"][0]["ours"], result["budgets"][0]["old"]
    assert (ours["rank_value"], ours["recovered_bits"], beside["rank_value"], beside["recovered_bits"]) == (2.0, 4, 2.0, 8)
    assert beside["seeds"] == row["ours"]["seeds"]  # the search at 2.0 above, its finals from the store
    study = optuna.load_study(study_name="qradaptor",
                              storage=f"sqlite:///{tmp_path / 'rank-value-2-rb4-4bit' / 'search' / 'study.db'}")
    assert study.user_attrs["qradaptor_config"]["recovered_bits"] == 4
    assert "recovered_bits 4" in (tmp_path / "rank_value-rb4-smoke.md").read_text()


def test_step_windows_double_in_length_and_cover_every_step():
    from benchmarks import ablation

    assert ablation.step_windows(100) == [(1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 100)]
    for steps in (1, 4, 7, 400):
        windows = ablation.step_windows(steps)
        assert windows[0][0] == 1 and windows[-1][1] == steps
        assert all(b[0] == a[1] + 1 for a, b in zip(windows, windows[1:]))
    # 4 steps: windows 1, 2–3 and 4; each mean over the window, then over the seeds
    assert ablation.window_means([[1.0, 3.0, 5.0, 7.0], [3.0, 5.0, 7.0, 9.0]], 4) == [2.0, 5.0, 8.0]
    assert ablation.window_means([[1.0] * 4, None], 4) is None


def test_the_ablation_names_its_rows_when_asked_for_an_unknown_one(capsys):
    from benchmarks import ablation

    with pytest.raises(SystemExit) as stop:
        ablation.main(["--rows", "qlora4-r16,serach"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown serach" in err and "search+start" in err
    # a warm-up of the finals only: a search's fine-tunes would not have it, so searched rows are refused
    with pytest.raises(SystemExit) as stop:
        ablation.main(["--warmup", "20", "--rows", "start,search+start"])
    assert stop.value.code == 2 and "uniform rows only (not search+start)" in capsys.readouterr().err


def test_run_stages_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_stages.py"), "--smoke", "--work",
                           str(tmp_path)], capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run_stages-smoke.json").read_text())
    seconds = result["stage_seconds"]
    assert list(seconds) == ["profile", "search", "train", "metrics", "export"] and all(s > 0 for s in seconds.values())
    # the stages happen within the process's wall time; their shares are of it
    assert 0 <= result["outside_stages_seconds"] < result["wall_seconds"]
    assert result["share"]["profile"] == pytest.approx(seconds["profile"] / result["wall_seconds"])
    assert result["targets"]["met"] == (result["share"]["profile"] <= 0.25)
    assert math.isfinite(result["test_loss_after"]) and result["plan"]["layers"]
    # the search's cost beyond the steps the final continues, in steps and priced at the final's pace
    cost = result["search"]
    assert cost["fine_tune_steps"] >= cost["reused_steps"] >= 0 and sum(cost["evaluations"].values()) >= 2
    assert cost["final_steps"] == 4 and cost["cost_in_steps"] == pytest.approx(
        (cost["fine_tune_steps"] - cost["reused_steps"]) / cost["final_steps"])
    assert cost["cost_in_seconds"] == pytest.approx(
        (seconds["search"] - cost["reused_steps"] * cost["final_seconds_per_step"])
        / (cost["final_steps"] * cost["final_seconds_per_step"]))
    assert cost["met_in_steps"] == (cost["cost_in_steps"] <= 0.5)
    assert "Search cost:" in (tmp_path / "run_stages-smoke.md").read_text()
    # the bit-widths its plans stored (each a one-time cost of the search), counted over its evaluated plans
    pareto = json.loads((tmp_path / "run" / "search" / "pareto.json").read_text())
    widths = {layer["bits"] for point in pareto["points"] for layer in point["plan"]["layers"]}
    tried = {int(b): n for b, n in result["search"]["bit_widths"].items()}
    assert set(tried) >= widths and all(1 <= n <= len(result["plan"]["layers"]) for n in tried.values())
    lowest = min(widths)
    assert f"{lowest}-bit in {tried[lowest]} of " in (tmp_path / "run_stages-smoke.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "run_stages-smoke.json").exists()
    assert "seeds" not in result  # one seed: the run alone
    # --report rebuilds the results from the kept run, with its recorded wall time, without rerunning it; --seeds
    # adds the chosen plan at seed 1 and the gap's two ends at seeds 0 and 1 (trained: the smoke's store is empty)
    (tmp_path / "run.log").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_stages.py"), "--smoke", "--report",
                           "--seeds", "2", "--work", str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "run_stages-smoke.json").read_text())
    assert not (tmp_path / "run.log").exists()
    assert again["wall_seconds"] == result["wall_seconds"] and again["search"] == result["search"]
    seeds = again["seeds"]
    assert seeds["seeds"] == [0, 1] and seeds["losses"]["run"][0] == result["test_loss_after"]
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in seeds["losses"].values())
    mean = {name: sum(v) / 2 for name, v in seeds["losses"].items()}
    assert seeds["mean"] == pytest.approx(mean) and seeds["settings"]["adapter_init"] == "activation"
    gap = mean["qlora4-r16"] - mean["lora16"]
    assert seeds["gap_recovered"] == (pytest.approx((mean["qlora4-r16"] - mean["run"]) / gap) if gap > 0 else None)
    assert "Across seeds 0, 1" in (tmp_path / "run_stages-smoke.md").read_text()
    ledger = json.loads((tmp_path / "finals-ledger.json").read_text())["finals"]
    assert len(ledger) == 5  # seed 0 of the chosen plan is the run's own final: not trained again
    # a second report takes every seed from the ledger (the seeds recorded: no --seeds needed)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_stages.py"), "--smoke", "--report",
                           "--work", str(tmp_path)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0 and "frontier: run_stages" not in proc.stdout, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run_stages-smoke.json").read_text())["seeds"] == seeds


def test_trial_cost_benchmark_smoke(tmp_path):
    from benchmarks import trial_cost

    assert trial_cost.main(["--smoke", "--work", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "trial_cost-smoke.json").read_text())
    first, second, mixed, full = result["trials"]
    # the parts are the trial's: none outlasts it, and training's steps are what is left of it besides them
    for trial in result["trials"]:
        parts = trial["parts"]
        assert 0 < parts["steps"] <= trial["seconds"] and trial["beyond_steps"] == pytest.approx(
            trial["seconds"] - parts["steps"])
        assert parts.get("fit: SVD", 0) <= parts.get("start: fit", 0) <= trial["seconds"]
    # a new bit-width fits starts (SVDs); a plan of widths already seen fits none; the promoted plan continues
    assert first["parts"]["fit: SVD"] > 0 and second["parts"]["fit: SVD"] > 0 and "fit: SVD" not in mixed["parts"]
    assert full["steps"] == first["steps"] and full["fidelity"] == "full" and full["parts"]["save"] > 0
    # the wrapped library functions are restored
    import torch

    from qradaptor import quantize
    assert torch.linalg.svd.__name__ == "linalg_svd" and quantize.quantize_model.__name__ == "quantize_model"
    assert "Where a search trial's seconds go" in (tmp_path / "trial_cost-smoke.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "trial_cost-smoke.json").exists()


def test_run_stages_refuses_a_corpus_with_smoke(capsys):
    from benchmarks import run_stages

    with pytest.raises(SystemExit) as stop:
        run_stages.main(["--smoke", "--corpus", "code"])
    assert stop.value.code == 2 and "leave out --corpus" in capsys.readouterr().err


def test_genes_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "genes.py"), "--smoke", "--work", str(tmp_path),
                           "--layouts", "groups,module,module-g"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "genes-smoke.json").read_text())
    rows = result["rows"]
    assert [(r["budget"], r["genes"]) for r in rows] == [("4bit", g) for g in ("layer", "groups", "module", "module-g")]
    assert rows[-1]["group_sizes"] == [32, 64, 128] and rows[0]["linears_with_their_own_group"] == 0
    for r in rows:
        assert r["memory_bytes"] <= r["budget_bytes"] and len(r["seeds"]) == result["settings"]["seeds"]
        assert r["loss"] == pytest.approx(sum(r["seeds"]) / len(r["seeds"])) and math.isfinite(r["loss"])
        assert r["delta_vs_layer"] == pytest.approx(r["loss"] - rows[0]["loss"])
    assert rows[0]["linears_with_their_own_choice"] == 0  # per-layer genes write per-layer plans
    # the finer searches read a profile with per-linear estimates
    [profile] = tmp_path.glob("profile-*-modules")
    assert json.loads((profile / "sensitivity.json").read_text())["module_kl"]
    assert (tmp_path / "genes-smoke.md").is_file()
    assert not (ROOT / "benchmarks" / "results" / "genes-smoke.json").exists()


def test_the_code_corpus_cuts_source_at_top_level_lines_and_keeps_it_whole(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.corpus import build_code_corpus, code_records

    source = (ROOT / "benchmarks" / "corpus.py").read_text()
    records = code_records(source, "corpus", min_chars=500)
    assert "".join(r["text"] for r in records) == source and len(records) > 3
    assert all(len(r["text"]) >= 500 for r in records)
    # each starts a line in column 0 or a method (a def, class or decorator at one indent)
    assert all(r["text"][0] not in " \t)" or re.match(r"    (def |async def |class |@)", r["text"]) for r in records)
    assert any(r["text"].startswith("    def ") for r in records)  # main's nested functions are cut at too
    corpus = build_code_corpus(tmp_path / "code.jsonl", modules=("textwrap", "shlex"))
    again = build_code_corpus(tmp_path / "code.jsonl", modules=("textwrap", "shlex"))
    lines = (tmp_path / "code.jsonl").read_text().splitlines()
    assert corpus == again and corpus["records"] == len(lines) >= 5
    assert {json.loads(line)["source"] for line in lines} == {"textwrap", "shlex"}


def test_corpus_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpus.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "corpus-smoke.json").read_text())
    by = {r["name"]: r for r in result["rows"]}
    assert {"lora16", "qlora4-r16", "uniform4-r16", "qradaptor-3.5bit", "qradaptor-4bit"} <= set(by)
    for name in ("qradaptor-3.5bit", "qradaptor-4bit", "qlora4-r16"):
        assert len(by[name]["seeds"]) == result["settings"]["seeds"]
    for budget, t in result["targets"]["budgets"].items():
        assert by[f"qradaptor-{budget}"]["memory_bytes"] <= t["budget_bytes"]
        assert len(by[t["best_uniform"]]["seeds"]) == result["settings"]["seeds"]
    assert result["pending"] == [] and result["settings"]["budgets"] == ["3.5bit", "4bit"]
    assert "Partial" not in (tmp_path / "corpus-smoke.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "corpus-smoke.json").exists()


def test_corpus_results_written_midway_say_what_is_not_run_yet():
    import argparse

    from benchmarks.corpus import _budgets, _results_name, report

    settings = {"budgets": ["4bit"], "steps": 100, "batch_size": 4, "seq_len": 128, "lr": 3e-4,
                "adapter_init": "activation"}
    row = lambda name, loss: {"name": name, "memory_bytes": 2**27, "seeds": [loss], "loss": loss, "plan": "p"}  # noqa: E731
    md = report([row("lora16", 2.5)], None, settings, None, True, ["qlora4-r16", "uniform4-r8"])
    assert "**Partial results**" in md and "qlora4-r16, uniform4-r8" in md and "## Targets" not in md
    assert "| lora16 | 128.0 | 2.5000 | 1 | — |" in md  # no gap without its reference row
    goals = {"gap_recovered_at_4bit": 0.5}
    md = report([row("lora16", 2.5), row("qlora4-r16", 2.7), row("qradaptor-4bit", 2.6)], goals, settings, None, True,
                ["uniform4-r8"])
    assert "| qradaptor-4bit | 128.0 | 2.6000 | 1 | 50% |" in md and "recovered at the 4-bit budget so far: 50%" in md
    assert _budgets("4bit,3.5bit") == ("3.5bit", "4bit") and _results_name(("4bit",)) == "corpus-4bit"
    assert _results_name(("3.5bit", "4bit")) == "corpus"
    with pytest.raises(argparse.ArgumentTypeError, match="3.5bit,4bit"):
        _budgets("5bit")


def test_long_run_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_run.py"), "--smoke", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "long_run-smoke.json").read_text())
    short, long = result["settings"]["steps"], result["settings"]["long_steps"]
    assert long == 4 * short
    rows = {(r["name"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {(n, s) for n in ("lora16", "qlora4-r16", "start", "qradaptor-4bit") for s in (short, long)}
    for steps in (short, long):
        ref, ceiling = rows["qlora4-r16", steps], rows["lora16", steps]
        assert ref["adapter_init"] == "zero" and rows["start", steps]["adapter_init"] != "zero"
        assert ref["memory_bytes"] == rows["start", steps]["memory_bytes"] < ceiling["memory_bytes"]
        assert rows["start", steps]["loss"] != ref["loss"] and ref["gap_recovered"] == 0
        for r in (rows[n, steps] for n in ("start", "qradaptor-4bit")):
            assert r["gap_recovered"] == pytest.approx((ref["loss"] - r["loss"]) / (ref["loss"] - ceiling["loss"]))
    # the longer fine-tunes are other runs than the short ones (not ledger hits of them)
    assert rows["qlora4-r16", long]["loss"] != rows["qlora4-r16", short]["loss"]
    assert result["gaps"][str(long)]["qradaptor_recovered"] == rows["qradaptor-4bit", long]["gap_recovered"]
    assert (tmp_path / "long_run-smoke.md").is_file()
    assert not (ROOT / "benchmarks" / "results" / "long_run-smoke.json").exists()


def test_learning_rate_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning_rate.py"), "--smoke", "--work",
                           str(tmp_path), "--lrs", "3e-4,3e-3"], capture_output=True, text=True, env=dict(os.environ),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "learning_rate-smoke.json").read_text())
    assert result["settings"]["lrs"] == [3e-4, 3e-3]
    rows = {(r["name"], r["lr"]): r for r in result["rows"]}
    assert set(rows) == {(n, lr) for n in ("lora16", "qlora4-r16", "start") for lr in (3e-4, 3e-3)}
    for lr in (3e-4, 3e-3):
        ref, start, ceiling = rows["qlora4-r16", lr], rows["start", lr], rows["lora16", lr]
        assert ref["adapter_init"] == "zero" and start["adapter_init"] != "zero"
        assert ref["memory_bytes"] == start["memory_bytes"] < ceiling["memory_bytes"]
        gap = ref["loss"] - ceiling["loss"]  # on a random model it may not be a gap at all: then no share is given
        expected = (ref["loss"] - start["loss"]) / gap if gap > 0 else None
        got = result["summary"]["recovered_at"][f"{lr:g}"]
        assert got is None if expected is None else got == pytest.approx(expected)
    # each learning rate is its own fine-tune (not a ledger hit of another)
    assert rows["qlora4-r16", 3e-3]["loss"] != rows["qlora4-r16", 3e-4]["loss"]
    best = result["summary"]["best_lr"]
    assert all(rows[n, best[n]]["loss"] == min(rows[n, lr]["loss"] for lr in (3e-4, 3e-3)) for n in best)
    # the fitted starts move the adapters' outputs, PEFT's does not start with any (B = 0)
    scales = result["factor_scales"]
    assert scales and all(r["zero_ax"] > 0 and r["activation_ax"] > 0 and r["activation_b"] > 0 for r in scales)
    assert (tmp_path / "learning_rate-smoke.md").is_file()
    assert not (ROOT / "benchmarks" / "results" / "learning_rate-smoke.json").exists()


def test_recipe_benchmark_smoke(tmp_path):
    import inspect

    import qradaptor
    from qradaptor.rundir import RunConfig

    run = [sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--smoke", "--work", str(tmp_path)]
    proc = subprocess.run(run + ["--recipes", "3e-4:5,3e-3:2", "--seeds", "2"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((tmp_path / "recipe-smoke.json").read_text())
    assert [(r["name"], r["lr"], r["warmup_steps"]) for r in first["rows"]] == [("start", 3e-4, 5), ("start", 3e-3, 2)]
    for r in first["rows"]:  # two seeds each: their mean and spread
        assert r["seeds"] == [0, 1] and r["loss"] == pytest.approx(sum(r["seed_losses"]) / 2)
        assert r["seed_losses"][0] != r["seed_losses"][1] and r["loss_spread"] > 0
    loss = {r["lr"]: r["loss"] for r in first["rows"]}
    assert loss[3e-4] != loss[3e-3]  # each recipe is its own fine-tune
    summary = first["summary"]
    assert summary["default"] == {"lr": RunConfig.lr, "warmup_steps": RunConfig.warmup_steps, "loss": loss[3e-4]}
    assert summary["gain_over_default"]["0.003:2"] == pytest.approx(loss[3e-4] - loss[3e-3])
    assert summary["best"]["start"]["loss"] == min(loss.values()) and summary["recovered_tuned"] is None
    assert first["settings"]["steps"] == 4 and first["settings"]["seq_len"] == 32
    assert first["settings"]["run_steps"] == inspect.signature(qradaptor.run).parameters["steps"].default
    # a second run with the references at one recipe trains only those, and reports the earlier recipe too
    proc = subprocess.run(run + ["--recipes", "3e-3:2", "--rows", "qlora4-r16,lora16,start"], capture_output=True,
                          text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final fine-tune") == 2
    second = json.loads((tmp_path / "recipe-smoke.json").read_text())
    rows = {(r["name"], r["lr"]): r for r in second["rows"]}
    assert set(rows) == {("start", 3e-4), ("start", 3e-3), ("qlora4-r16", 3e-3), ("lora16", 3e-3)}
    assert rows["qlora4-r16", 3e-3]["seeds"] == [0] and rows["start", 3e-3]["seeds"] == [0, 1]
    assert rows["start", 3e-3]["loss"] == loss[3e-3] and rows["qlora4-r16", 3e-3]["adapter_init"] == "zero"
    assert all(math.isfinite(r["validation_all_loss"]) for r in second["rows"])
    # the gap is of the seed all three rows ran (seed 0), not of the start's two-seed mean
    ref, start, ceiling = (rows[n, 3e-3]["seed_losses"][0] for n in ("qlora4-r16", "start", "lora16"))
    assert rows["start", 3e-3]["loss"] != start
    expected = (ref - start) / (ref - ceiling) if ref > ceiling else None  # a random model may have no gap
    got = second["summary"]["recovered_at"].get("0.003:2")
    assert got is None if expected is None else got == pytest.approx(expected)
    assert second["summary"]["recovered_seeds"]["0.003:2"] == [0]
    best = second["summary"]["best"]  # each row at its best recipe: again of seed 0, the one all three ran
    ref, start, ceiling = (rows[n, best[n]["lr"]]["seed_losses"][0] for n in ("qlora4-r16", "start", "lora16"))
    tuned = second["summary"]["recovered_tuned"]
    assert tuned is None if ref <= ceiling else tuned == pytest.approx((ref - start) / (ref - ceiling))
    if got is not None:
        assert "(seed 0: those all three rows ran)" in (tmp_path / "recipe-smoke.md").read_text()
    assert "| row | lr | warm-up |" in (tmp_path / "recipe-smoke.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "recipe-smoke.json").exists()
    for bad in ("3e-3", "x:5", "3e-3:-1", "0:5"):
        proc = subprocess.run(run + ["--recipes", bad], capture_output=True, text=True, env=dict(os.environ))
        assert proc.returncode == 2 and "LR:WARMUP" in proc.stderr
    for flag in ("--steps", "--seeds"):
        proc = subprocess.run(run + [flag, "0"], capture_output=True, text=True, env=dict(os.environ))
        assert proc.returncode == 2 and flag in proc.stderr
    proc = subprocess.run(run + ["--corpus", "code"], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2 and "--corpus" in proc.stderr  # the smoke run has its own data
    assert second["settings"]["corpus"] == "pydoc" and second["settings"]["corpus_source"] is None
    assert "on Python source" not in (tmp_path / "recipe-smoke.md").read_text()
    sys.path.insert(0, str(ROOT))
    from benchmarks.recipe import report

    on_code = report({**second, "settings": {**second["settings"], "corpus": "code"}})
    assert "on Python source" in on_code.splitlines()[0] and "searches its own plan" in on_code


def test_search_lr_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_lr.py"), "--smoke", "--work", str(tmp_path),
                           "--search-lrs", "1e-4,3e-3"], capture_output=True, text=True, env=dict(os.environ),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "search_lr-smoke.json").read_text())
    assert result["final_lr"] == 3e-3 and result["search_lrs"] == [1e-4, 3e-3]
    plans, ks = result["plans"], result["steps_ranked"]
    assert len(plans) == 4 and ks == [1, 2]  # the smoke frontier searches' cheap and full fidelities
    finals = [p["final"] for p in plans]
    assert all(math.isfinite(v) for v in finals)
    # each rate's prefix is its own run: a higher peak rate moves the adapters elsewhere
    assert all(p["prefix@2 lr 0.0001"] != p["prefix@2 lr 0.003"] for p in plans)
    assert [(s["search_lr"], s["k"]) for s in result["signals"]] == [(lr, k) for lr in (1e-4, 3e-3) for k in ks]
    for s in result["signals"]:
        first = next(p for p in plans if p["name"] == s["first"])
        assert first[f"prefix@{s['k']} lr {s['search_lr']:g}"] == min(p[f"prefix@{s['k']} lr {s['search_lr']:g}"]
                                                                      for p in plans)
        assert s["regret"] == pytest.approx(first["final"] - min(finals)) and s["regret"] >= 0
    assert "| search rate | K |" in (tmp_path / "search_lr-smoke.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "search_lr-smoke.json").exists()


def test_search_lr_results_are_named_by_the_final_rate():
    """A study at another final rate (the recipe's 3e-4: the fidelity check with the start) does not overwrite the
    one at 3e-3."""
    from benchmarks.search_lr import FINAL_LR, results_name

    assert results_name(FINAL_LR) == "search_lr" and results_name(FINAL_LR, smoke=True) == "search_lr-smoke"
    assert results_name(3e-4) == "search_lr-lr0.0003" and results_name(1e-3, smoke=True) == "search_lr-lr0.001-smoke"


def test_overlap_benchmark_smoke(tmp_path):
    """The default corpus split by topic alone shares most of its test text with training; as loaded, almost none."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overlap.py"), "--smoke", "--work",
                           str(tmp_path)], capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["corpus"]: r for r in json.loads((tmp_path / "overlap-smoke.json").read_text())["rows"]}
    assert rows["pydoc-topics, by topic"]["overlap"]["13"]["test"] > 0.5
    assert rows["pydoc-topics"]["overlap"]["13"]["test"] < 0.01
    loaded, by_topic = rows["pydoc-topics"]["sizes"], rows["pydoc-topics, by topic"]["sizes"]
    assert loaded["train"] == by_topic["train"] and 0 < loaded["test"]["tokens"] < by_topic["test"]["tokens"]
    assert "| corpus | split |" in (tmp_path / "overlap-smoke.md").read_text()
