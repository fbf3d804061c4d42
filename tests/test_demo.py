"""The demo's comparison: which uniform setting it trains beside the found plan. (The demo itself runs on the
embedded SmolLM2 in `fresh-clone-check`, minutes long; `run`, which it wraps, is tested in test_run_reliability.)"""

from __future__ import annotations

import json

import pytest

from qradaptor.commands.demo import _label, best_uniform
from qradaptor.errors import ArtifactError
from qradaptor.plan import Plan


def point(plan: Plan, loss: float, fidelity: str, source: str) -> dict:
    return {"plan": plan.to_dict(), "memory_bytes": 1, "avg_bits": 4.0, "loss": loss, "fidelity": fidelity,
            "source": source, "trial": 0}


def write_pareto(directory, points) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pareto.json").write_text(json.dumps({"points": points}))


def test_the_baseline_is_the_uniform_setting_best_at_the_full_fidelity(tmp_path):
    four, three = Plan.uniform(4, 4, 8), Plan.uniform(4, 3, 16)
    write_pareto(tmp_path, [
        point(four, 3.0, "cheap", "uniform-4bit-r8"), point(three, 2.9, "cheap", "uniform-3bit-r16"),
        # the cheap fidelity ranks them the other way: the full one decides
        point(four, 2.5, "full", "uniform-4bit-r8"), point(three, 2.6, "full", "uniform-3bit-r16"),
        point(Plan.uniform(4, 5, 4), 2.0, "full", "refine"),  # a better plan, but not a uniform setting's point
    ])
    source, plan = best_uniform(tmp_path)
    assert source == "uniform-4bit-r8" and plan.to_dict() == four.to_dict()
    assert _label(source) == "uniform 4b r8"


def test_a_search_without_a_uniform_setting_at_full_fidelity_is_named(tmp_path):
    write_pareto(tmp_path, [point(Plan.uniform(4, 4, 8), 3.0, "cheap", "uniform-4bit-r8")])
    with pytest.raises(ArtifactError, match="no uniform setting") as e:
        best_uniform(tmp_path)
    assert "budget" in e.value.fix
