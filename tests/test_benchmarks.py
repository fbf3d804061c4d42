"""The benchmark scripts' smoke modes, so they cannot rot between the long runs."""

from __future__ import annotations

import json
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
