"""The benchmark scripts' smoke modes, so they cannot rot between the long runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
                          capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "frontier-smoke.json").read_text())
    names = [m["name"] for m in result["methods"]]
    assert names == ["lora16", "uniform4", "uniform3", "greedy", "random",
                     "qradaptor-3bit", "qradaptor-3.5bit", "qradaptor-4bit", "qradaptor-5bit", "qradaptor-4bit-r16"]
    by = {m["name"]: m for m in result["methods"]}
    for m in result["methods"]:
        assert m["memory_bytes"] == m["predicted_bytes"] > 0  # measured on the trained model = the memory model
        assert math.isfinite(m["loss"]) and m["peak_rss_bytes"] > 0 and m["trainable_params"] > 0
        assert m["kl_before"] >= 0
    # the searches and the greedy allocator stay within their budgets; uniform 4-bit is the 4-bit budget
    assert by["greedy"]["memory_bytes"] <= by["uniform4"]["memory_bytes"]
    assert by["random"]["memory_bytes"] <= by["uniform4"]["memory_bytes"]
    assert by["qradaptor-4bit"]["memory_bytes"] <= by["uniform4"]["memory_bytes"]
    assert by["qradaptor-3bit"]["memory_bytes"] <= by["uniform3"]["memory_bytes"]
    assert by["lora16"]["kl_before"] < by["uniform3"]["kl_before"]
    assert {c["rank"] for c in by["qradaptor-4bit-r16"]["plan_layers"]} == {16}
    assert len(result["uniform4_seeds"]) == result["settings"]["seeds"]
    assert by["random"]["search_steps"] <= by["qradaptor-4bit"]["search_steps"] + result["settings"]["search"]["cheap"]["steps"]
    assert (tmp_path / "frontier-smoke.md").is_file() and (tmp_path / "frontier-smoke.png").is_file()
    assert not (ROOT / "benchmarks" / "results" / "frontier-smoke.json").exists()
    # rerunning resumes: every method's result is reused, nothing is trained again
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--smoke", "--work", str(tmp_path)],
                           capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": final fine-tune (" not in again.stdout
    assert json.loads((tmp_path / "frontier-smoke.json").read_text())["methods"][1]["loss"] == by["uniform4"]["loss"]


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
