"""The compute dtype ``auto`` resolves to: by the device's capability (CPUs simulated through PyTorch's own
instruction-set queries), by a micro-benchmark cached per machine where that is unclear, or pinned by the
environment; and every command takes that one default, so a plan that `memory` says fits a budget is accepted by
`search` and `train` with that budget."""

from __future__ import annotations

import json

import pytest
import torch

from qradaptor import precision
from qradaptor.commands import plan_memory, search, train_plan
from qradaptor.errors import QRAdaptorError
from qradaptor.plan import Plan
from qradaptor.precision import ENV, PROBE_FILE, default_dtype, resolve_dtype


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """``cpu(*flags)`` makes PyTorch's CPU queries answer as a CPU with those instruction sets would; no pin."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path / "cache"))
    precision.probe_cpu.cache_clear()

    def simulate(*flags: str, machine: str = "x86_64") -> None:
        for name in ("avx2", "avx512", "avx512_bf16", "amx_tile"):
            monkeypatch.setattr(torch.cpu, f"_is_{name}_supported", lambda n=name: n in flags, raising=False)
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)

    yield simulate
    precision.probe_cpu.cache_clear()


@pytest.fixture
def probe_times(monkeypatch):
    """Replace the micro-benchmark's timings: ``probe_times(bf16=..., fp32=...)``; returns the calls made from
    then on."""

    def use(*, bf16: float, fp32: float) -> list:
        calls: list[torch.dtype] = []

        def timed(dtype, repeats=3, enough=float("inf")):
            calls.append(dtype)
            return bf16 if dtype == torch.bfloat16 else fp32

        monkeypatch.setattr(precision, "_time_products", timed)
        return calls

    return use


def _no_probe(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the capability was clear: nothing should have been measured")

    monkeypatch.setattr(precision, "_time_products", fail)


def test_a_cpu_without_native_bf16_defaults_to_float32(cpu, monkeypatch):
    cpu("avx2")  # Zen 3 and older, Intel client chips
    _no_probe(monkeypatch)
    choice = default_dtype("cpu")
    assert choice.dtype == "float32" and "AVX2" in choice.reason
    assert resolve_dtype("auto", "cpu") == resolve_dtype(None, "cpu") == "float32"


@pytest.mark.parametrize("native", ["avx512_bf16", "amx_tile"])
def test_a_cpu_with_native_bf16_defaults_to_bfloat16(cpu, monkeypatch, native):
    cpu("avx2", "avx512", native)
    _no_probe(monkeypatch)
    choice = default_dtype("cpu")
    assert choice.dtype == "bfloat16" and "native bf16" in choice.reason


def test_an_unclear_cpu_is_measured_once_and_the_answer_cached(cpu, probe_times, tmp_path):
    cpu("avx2", "avx512")  # AVX-512 without BF16: oneDNN emulates bf16, its speed is unclear
    calls = probe_times(bf16=0.5, fp32=0.01)
    choice = default_dtype("cpu")
    assert choice.dtype == "float32" and "50.00× fp32's time" in choice.reason
    assert calls == [torch.float32, torch.bfloat16]
    cached = json.loads((tmp_path / "cache" / PROBE_FILE).read_text())
    (entry,) = cached.values()
    assert entry["bfloat16_seconds"] == 0.5 and entry["float32_seconds"] == 0.01
    # a new process on the same machine reads the cache, even where the timings would now say otherwise
    precision.probe_cpu.cache_clear()
    calls = probe_times(bf16=0.001, fp32=0.01)
    assert default_dtype("cpu").dtype == "float32" and calls == []


def test_a_fast_bf16_measurement_chooses_bfloat16_and_a_damaged_cache_is_measured_again(cpu, probe_times, tmp_path):
    cpu("avx2", machine="aarch64")  # not x86: the instruction-set queries say nothing about bf16 there
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / PROBE_FILE).write_text("{not json")
    calls = probe_times(bf16=0.004, fp32=0.01)
    choice = default_dtype("cpu")
    assert choice.dtype == "bfloat16" and "0.40×" in choice.reason and len(calls) == 2
    assert len(json.loads((tmp_path / "cache" / PROBE_FILE).read_text())) == 1


def test_a_capped_onednn_is_measured_whatever_the_cpu_has(cpu, probe_times, monkeypatch):
    cpu("avx2", "avx512", "avx512_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # bf16 instructions present but not used by oneDNN
    probe_times(bf16=1.0, fp32=0.02)
    choice = default_dtype("cpu")
    assert choice.dtype == "float32" and "ONEDNN_MAX_CPU_ISA=AVX2" in choice.reason


def test_the_probe_measures_this_cpu_for_real(cpu, tmp_path):
    cpu("avx2", "avx512")
    measured = precision.probe_cpu()
    assert measured["bfloat16_seconds"] > 0 and measured["float32_seconds"] > 0
    fast = measured["bfloat16_seconds"] <= measured["float32_seconds"]
    assert default_dtype("cpu").dtype == ("bfloat16" if fast else "float32")


@pytest.mark.parametrize("gpu", ["native bf16", "emulated bf16", "no bf16"])
def test_a_gpu_computes_in_bfloat16_when_it_has_it_natively(cpu, monkeypatch, gpu):
    """An Ampere or newer GPU has bf16; a V100 or T4 only emulates it (PyTorch's query says yes unless asked about
    native support), which is slow: float32 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu == "native bf16" or (
        gpu == "emulated bf16" and including_emulation))
    choice = default_dtype("cuda")
    assert choice.dtype == ("bfloat16" if gpu == "native bf16" else "float32") and choice.device == "cuda"


def test_the_environment_pins_auto_and_a_bad_pin_or_name_is_refused(cpu, monkeypatch):
    cpu("avx2", "avx512", "avx512_bf16")
    monkeypatch.setenv(ENV, "float32")
    assert default_dtype("cpu").dtype == "float32" and ENV in default_dtype("cpu").reason
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # a named dtype is never overridden
    monkeypatch.setenv(ENV, "fp16")
    with pytest.raises(QRAdaptorError, match=ENV) as e:
        default_dtype("cpu")
    assert "unset it" in e.value.fix
    with pytest.raises(QRAdaptorError, match="unknown dtype 'float16'") as e:
        resolve_dtype("float16", "cpu")
    assert "auto" in e.value.fix


# ------------------------------------------------------------------ one default across the commands


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    return str(path)


def _fast_fitness(plan, fidelity):
    return sum(4.0 ** -c.bits + 0.02 / c.rank for c in plan.layers), fidelity.steps


@pytest.mark.parametrize("flags, dtype", [(("avx2",), "float32"), (("avx2", "avx512", "avx512_bf16"), "bfloat16")])
def test_a_budget_memory_says_a_plan_fits_is_accepted_by_search_and_train(cpu, tiny_dir, words, tmp_path, flags,
                                                                          dtype):
    """`memory`, `search` and `train` price a plan in the same default dtype (the one this CPU gets), so the
    plan's price from `memory` is a budget the others accept for it."""
    cpu(*flags)
    plan = Plan.uniform(4, 3, 8)
    report = plan_memory(str(tiny_dir), plan)
    assert report["dtype"] == dtype
    budget = report["predicted_bytes"]

    result = search(str(tiny_dir), data=words, budget=budget, out=tmp_path / "search", trials=4, population=4,
                    promote=1, refine=0, progress=False, fitness=_fast_fitness, seq_len=32)
    pareto = json.loads((tmp_path / "search" / "pareto.json").read_text())
    assert pareto["settings"]["dtype"] == dtype and pareto["budget_bytes"] == budget
    assert plan_memory(str(tiny_dir), result.chosen.plan)["predicted_bytes"] <= budget

    run = train_plan(tmp_path / "train", plan=plan, model=str(tiny_dir), data=words, budget=budget, steps=1,
                     seq_len=32, batch_size=2, eval_blocks=0, progress=False)
    record = json.loads((tmp_path / "train" / "run.json").read_text())
    assert run.config.dtype == record["config"]["dtype"] == record["dtype_choice"]["dtype"] == dtype
    assert run.metrics["memory"]["predicted_bytes"] == run.metrics["memory"]["measured_bytes"] == budget
    # one byte less is refused by both, naming the budget
    with pytest.raises(QRAdaptorError, match="over the budget"):
        train_plan(tmp_path / "train2", plan=plan, model=str(tiny_dir), data=words, budget=budget - 1, steps=1,
                   seq_len=32, batch_size=2, eval_blocks=0, progress=False)


def test_a_resumed_run_keeps_the_dtype_it_recorded_on_another_cpu(cpu, tiny_dir, words, tmp_path):
    from qradaptor.cli import main

    cpu("avx2", "avx512", "avx512_bf16")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--data", words, "--steps", "2", "--seq-len", "32", "--batch-size",
            "2", "--eval-blocks", "0", "--out", str(out), "-q"]
    plan = tmp_path / "plan.json"
    Plan.uniform(4, 4, 8).save(plan)
    assert main([*args, "--plan", str(plan)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["dtype"] == "bfloat16" and "native bf16" in record["dtype_choice"]["reason"]
    # interrupted after step 1 and resumed on an AVX2-only machine: still bf16, and --dtype auto is no change
    record["status"] = "running"
    (out / "run.json").write_text(json.dumps(record))
    cpu("avx2")
    assert main([*args, "--resume", "--dtype", "auto"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["dtype"] == "bfloat16"
    assert main([*args[:-3], "--out", str(tmp_path / "other"), "--plan", str(plan), "-q"]) == 0
    assert json.loads((tmp_path / "other" / "run.json").read_text())["config"]["dtype"] == "float32"


def test_a_continued_study_keeps_the_dtype_it_recorded(tiny_dir, words, tmp_path):
    """A search begun in bf16 and continued where `auto` means float32 (the tests' pin) goes on in bf16, instead of
    being refused as a study of another search."""
    kw = dict(data=words, budget="4bit", out=tmp_path / "s", population=4, promote=1, refine=0, progress=False,
              fitness=_fast_fitness, seq_len=32)
    search(str(tiny_dir), trials=4, dtype="bfloat16", **kw)
    assert default_dtype("cpu").dtype == "float32"
    result = search(str(tiny_dir), trials=6, **kw)  # dtype auto, two more trials
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert pareto["settings"]["dtype"] == "bfloat16"
    assert sum(p["fidelity"] == "cheap" for p in pareto["points"]) == 6 and result.chosen is not None
