"""``scripts/real_model_demo.sh``: a bad ``DEMO_*`` setting ends with one ``error:`` line before
anything is built or written (the demo itself runs for half an hour: the README gives its figures)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers.stages import REPO


@pytest.mark.parametrize("env, message", [
    ({"DEMO_ENGINE": "vlm"}, "error: DEMO_ENGINE=vlm; valid: continuous, generate, vllm"),
    ({"DEMO_DATA": "math"}, "error: DEMO_DATA=math; valid: synthetic, gsm8k"),
    ({"DEMO_ETAS": "1 3", "DEMO_ETA": "10"}, 'error: DEMO_ETAS="1 3" must include DEMO_ETA=10'),
    ({"DEMO_ENGINE": "vllm", "DEMO_ETA": "5"}, 'error: DEMO_ETAS="1 3 10 30" must include DEMO_ETA=5'),
])
def test_bad_setting_is_one_line_and_writes_nothing(tmp_path, env, message):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO / "scripts" / "real_model_demo.sh")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DEMO_OUT": str(out),
                                                        "DEMO_MODELS": str(tmp_path / "models"), **env})
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert not out.exists() and not (tmp_path / "models").exists()
