"""scripts/summarize_quickstart.py: the table shows each value's 95% interval when the stats have one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.stages import REPO


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


def test_steps_and_seed_tables(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import summarize_quickstart as summarize

    (tmp_path / "ref.json").write_text(json.dumps(stats(True)))
    (tmp_path / "steps.tsv").write_text("0\tdataset\n2\tpretraining\n185\tround 1\n430\tsummary (7 min 10 s)\n")
    summarize.main(summarize.parse_args(["--out", str(tmp_path / "s.json"), "--row", f"reference={tmp_path / 'ref.json'}",
                                         "--seed", "3", "--steps", str(tmp_path / "steps.tsv")]))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["seed"] == 3 and summary["wall_s"] == 430
    assert summary["steps"] == [{"step": "dataset", "seconds": 2}, {"step": "pretraining", "seconds": 183},
                                {"step": "round 1", "seconds": 245}]
    capsys.readouterr()
    summarize.main(summarize.parse_args(["--seeds", str(tmp_path / "s.json")]))
    report = capsys.readouterr().out
    assert report.startswith("**seed 3**, 7 min 10 s\n")
    assert "| reference | 0.500 [0.400, 0.600] |" in report
    assert "dataset: 2 s; pretraining: 183 s; round 1: 245 s" in report


def test_malformed_steps_file_names_its_line(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import summarize_quickstart as summarize

    (tmp_path / "steps.tsv").write_text("0\tdataset\nsoon\tpretraining\n")
    with pytest.raises(ValueError, match="steps.tsv:2: "):
        summarize.read_steps(str(tmp_path / "steps.tsv"))
