"""A reduced quickstart (tiny pretraining, a few problems, short generations) runs end to end
and writes a summary with the four methods and values in range."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["reference", "cd", "qsharp_round1", "qsharp_round2"]
REDUCED = {
    "QS_NUM_TRAIN": "16",
    "QS_NUM_TEST": "6",
    "QS_COLLECT_SAMPLES": "2",
    "QS_EVAL_SAMPLES": "2",
    "QS_MAX_NEW_TOKENS": "24",
    "QS_DROP_NO_VARIATION": "0",  # a barely trained reference may solve nothing
    "QS_EPOCHS": "1",
    "QS_PRETRAIN_ARGS": "--ref_hidden 32 --ref_layers 2 --ref_heads 2 --ref_max_steps 20 --stop_target 0 "
    "--stop_decay_steps 5 --cls_layers 1 --log_every 0",
}


def test_reduced_quickstart_writes_summary(tmp_path):
    env = {**os.environ, **REDUCED, "QS_OUT": str(tmp_path / "quickstart_out")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "quickstart_out" / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == METHODS
    for row in summary["rows"]:
        for key in ("pass_at_1", "maj_at_k", "pass_at_k"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert row["kl_mean"] >= 0.0
        assert row["pass_at_k"] >= row["pass_at_1"]
    assert summary["rows"][0]["kl_mean"] > 0.0  # the reference (eta 0): top-p's -log(nucleus mass), as the original
    assert "| qsharp_round2 |" in result.stdout  # the markdown table is printed
    assert summary["seed"] == 0 and summary["wall_s"] > 0
    assert [s["step"] for s in summary["steps"]][:2] == ["synthetic dataset: 16 train / 6 test problems",
                                                         "pretraining the reference and the classifier LM"]
