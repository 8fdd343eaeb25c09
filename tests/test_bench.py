"""The benchmarks run and print what their docstrings promise (tiny budgets; no timing is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ref_hidden", "32", "--ref_layers", "2", "--classifier_hidden", "32", "--classifier_layers", "1"]


def run_json(script: str, *args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--json", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_guidance_overhead_reports_q_and_v():
    results = run_json("guidance_overhead.py", "--repeats", "1", "--max_new_tokens", "4", "--batch_size", "2", *TINY)
    assert [r["classifier_type"] for r in results] == ["Q", "V"]
    for r in results:
        assert r["ratio"] > 0 and 1 < r["limit"] < 2
        assert r["steps"] == [4, 4]
        assert 0 < r["classifier_share"] < r["processor_share"]


def test_eval_kl_online_equals_two_pass():
    (result,) = run_json("eval_kl.py", "--repeats", "1", "--num_problems", "4", "--batch_size", "2",
                         "--max_new_tokens", "6", "--vocab_size", "0", *TINY)
    assert result["speedup"] > 0
    assert result["max_abs_diff"] <= 1e-4
    assert result["kl_mean"] > 0


@pytest.mark.parametrize("eta", ["0", "10"])
def test_collect_throughput_counts_every_file(eta):
    (result,) = run_json("collect_throughput.py", "--repeats", "1", "--num_problems", "4", "--num_samples", "1",
                         "--batch_size", "2", "--max_new_tokens", "6", "--eta", eta)
    assert result["problems_per_min"] > 0 and result["num_problems"] == 4
