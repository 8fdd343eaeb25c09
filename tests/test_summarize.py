"""scripts/summarize_quickstart.py: the table shows each value's 95% interval when the stats have one."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.stages import REPO


def stats(ci: bool) -> dict:
    values = {"single_sample_accuracy_mean": 0.5, "majority_vote_accuracy_mean": 0.25, "pass_k_accuracy_mean": 0.75,
              "kl_mean": 1.5}
    if ci:
        values.update({"single_sample_accuracy_ci": [0.4, 0.6], "majority_vote_accuracy_ci": [0.1, 0.4],
                       "pass_k_accuracy_ci": [0.6, 0.9], "kl_ci": [1.25, 1.75]})
    return values


def test_intervals_in_table_and_summary(tmp_path):
    (tmp_path / "new.json").write_text(json.dumps(stats(True)))
    (tmp_path / "old.json").write_text(json.dumps(stats(False)))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize_quickstart.py"), "--out", str(tmp_path / "s.json"),
                          "--row", f"new={tmp_path / 'new.json'}", "--row", f"old={tmp_path / 'old.json'}"],
                         capture_output=True, text=True, check=True).stdout
    assert "| new | 0.500 [0.400, 0.600] | 0.250 [0.100, 0.400] | 0.750 [0.600, 0.900] | 1.50 [1.25, 1.75] |" in out
    assert "| old | 0.500 | 0.250 | 0.750 | 1.50 |" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows[0]["kl_mean_ci"] == [1.25, 1.75] and "kl_mean_ci" not in rows[1]
