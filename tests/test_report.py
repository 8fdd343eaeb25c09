"""``python -m utils.demo.report``: the table of reward_stats files, results.csv, the pass@1-vs-KL PNG, and bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils.demo import report
from utils.cli import eval_tag, run
from utils.data.io import write_json

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stats(eta: float, pass1: float, kl: float, cd: int = 0, k: int = 4, problems: int = 10) -> dict:
    """A reward_stats document as eval_ckpt.py writes it."""
    return {
        "single_sample_accuracy_mean": pass1,
        "majority_vote_accuracy_mean": pass1 + 0.05,
        "pass_k_accuracy_mean": pass1 + 0.1,
        "kl_mean": kl,
        "kl_per_token_mean": kl / 50,
        "num_problems": problems,
        "num_samples": k,
        "eta": eta,
        "top_k": 20,
        "temperature": 0.8,
        "cd_baseline": cd,
        "inference_mode": "bernoulli",
    }


def write_stats(folder: Path, doc: dict) -> Path:
    tag = eval_tag(doc["eta"], doc["top_k"], doc["temperature"], bool(doc["cd_baseline"]))
    path = folder / f"reward_stats_{tag}.json"
    write_json(path, doc)
    return path


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """``exp/ckpt_100`` (eta 10, cd, eta 0, written in that order) and ``exp/ckpt_20`` (eta 10),
    plus an unrelated json; the current directory is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QSHARP_DEBUG", raising=False)
    ckpt_100, ckpt_20 = tmp_path / "exp" / "ckpt_100", tmp_path / "exp" / "ckpt_20"
    write_stats(ckpt_100, stats(10.0, 0.7, 0.5))
    write_stats(ckpt_100, stats(10.0, 0.75, 0.9, cd=1))
    write_stats(ckpt_100, stats(0.0, 0.4, 0.0))
    write_stats(ckpt_20, stats(10.0, 0.6, 0.3, k=8, problems=12))
    write_json(ckpt_20 / "args.json", {"eta": 10.0})  # not a stats file: ignored
    return tmp_path


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``main`` as ``python -m utils.demo.report`` does; returns (exit code, stdout, stderr)."""
    try:
        run(report.main, report.parse_args(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_table_rows_columns_values_and_order(tree):
    df = report.collect_stats(["exp"])
    assert list(df.columns) == report.COLUMNS
    # runs in natural order (ckpt_20 before ckpt_100), then eta, then method (cd < qsharp)
    assert list(zip(df["run"], df["method"], df["eta"])) == [
        ("exp/ckpt_20", "qsharp", 10.0),
        ("exp/ckpt_100", "reference", 0.0),
        ("exp/ckpt_100", "cd", 10.0),
        ("exp/ckpt_100", "qsharp", 10.0),
    ]
    first = df.iloc[0]
    assert (first["k"], first["problems"], first["top_k"], first["temperature"]) == (8, 12, 20, 0.8)
    assert first["pass@1"] == pytest.approx(0.6)
    assert first["maj@k"] == pytest.approx(0.65)
    assert first["pass@k"] == pytest.approx(0.7)
    assert first["kl"] == pytest.approx(0.3)
    assert first["kl_per_token"] == pytest.approx(0.006)
    cd = df[df["method"] == "cd"].iloc[0]
    assert (cd["pass@1"], cd["kl"]) == (0.75, 0.9)


def test_checkpoint_dirs_and_overlapping_paths(tree):
    """A checkpoint folder alone gives its rows; a file found through two arguments counts once."""
    assert len(report.collect_stats(["exp/ckpt_20"])) == 1
    df = report.collect_stats(["exp", "exp/ckpt_100", str(tree / "exp" / "ckpt_20")])
    assert len(df) == 4
    assert set(df["run"]) == {"exp/ckpt_20", "exp/ckpt_100"}


def test_run_outside_current_directory_is_absolute(tree, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    df = report.collect_stats([tree / "exp" / "ckpt_20"])
    assert df["run"].tolist() == [(tree / "exp" / "ckpt_20").as_posix()]


def test_missing_kl_per_token_and_cd_flag_from_name(tree):
    """Older stats files: no kl_per_token_mean (empty cell) and no cd_baseline (the ``_cd`` suffix decides)."""
    doc = stats(5.0, 0.5, 0.2, cd=1)
    del doc["kl_per_token_mean"], doc["cd_baseline"]
    (tree / "old").mkdir()
    write_json(tree / "old" / "reward_stats_eta_5.0_top_k_20_temp_0.8_cd.json", doc)
    row = report.collect_stats(["old"]).iloc[0]
    assert row["method"] == "cd"
    assert math.isnan(row["kl_per_token"])


def test_main_prints_markdown_and_writes_csv_and_png(tree, capsys):
    code, out, err = run_main(["exp", "--out_dir", "report"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == report.COLUMNS
    assert set(lines[1]) <= set("|-:") and lines[1].count("|") == len(report.COLUMNS) + 1
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:6]]
    assert body[0][:3] == ["exp/ckpt_20", "qsharp", "10"]
    assert body[1][1:3] == ["reference", "0"]
    assert body[2][header.index("pass@1")] == "0.7500"

    csv = tree / "report" / "results.csv"
    assert "results.csv" in out and "pass1_vs_kl.png" in out
    pd.testing.assert_frame_equal(pd.read_csv(csv), report.collect_stats(["exp"]), check_dtype=False)

    png = (tree / "report" / "pass1_vs_kl.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert not [p for p in (tree / "report").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_default_out_dir_is_current_directory(tree, capsys):
    code, _, err = run_main(["exp/ckpt_100"], capsys)
    assert code == 0, err
    assert len(pd.read_csv(tree / "results.csv")) == 3
    assert (tree / "pass1_vs_kl.png").read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_escapes_pipes_and_blanks_nan():
    df = pd.DataFrame({"run": ["a|b"], "eta": [2.5], "kl": [math.nan]})
    lines = report.to_markdown(df).splitlines()
    assert "a\\|b" in lines[2] and "2.5" in lines[2]
    assert lines[2].rstrip("| ").endswith("2.5")  # empty kl cell


def one_error(code: int, out: str, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_path(tree, capsys):
    line = one_error(*run_main(["exp", "nowhere"], capsys))
    assert "nowhere does not exist" in line
    assert not (tree / "results.csv").exists()


def test_no_stats_file(tree, capsys):
    (tree / "empty" / "ckpt_1").mkdir(parents=True)
    line = one_error(*run_main(["exp", "empty"], capsys))
    assert "no reward_stats_*.json file under empty" in line
    assert not (tree / "results.csv").exists()


def test_malformed_stats_json(tree, capsys):
    bad = tree / "exp" / "ckpt_100" / "reward_stats_eta_1.0_top_k_20_temp_0.8.json"
    bad.write_text('{"eta": 1.0, ')
    line = one_error(*run_main(["exp"], capsys))
    assert str(bad.relative_to(tree)) in line and "not valid JSON" in line


@pytest.mark.parametrize("change, message", [
    ({"kl_mean": None}, "missing kl_mean"),
    ({"num_samples": "four"}, "num_samples is 'four', expected an integer"),
    ({"single_sample_accuracy_mean": [0.5]}, "expected a number"),
])
def test_bad_stats_fields(tree, capsys, change, message):
    doc = stats(1.0, 0.5, 0.1)
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    path = write_stats(tree / "exp" / "ckpt_100", doc)
    line = one_error(*run_main(["exp"], capsys))
    assert path.name in line and message in line


def test_command_line(tree):
    """The real command: table on stdout, exit 0; a bad path: one error line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("QSHARP_DEBUG", None)
    ok = subprocess.run([sys.executable, "-m", "utils.demo.report", "exp", "--out_dir", "out"],
                        check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("| run ") and (tree / "out" / "pass1_vs_kl.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "utils.demo.report", "missing"],
                         check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: missing does not exist"]
    usage = subprocess.run([sys.executable, "-m", "utils.demo.report"],
                           check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    assert usage.stderr.startswith("error: ")


def test_point_labels_merge_coinciding_points_of_one_run():
    """A saturated sweep (eta 10 and 30 at the same place) gets one label; other runs keep theirs."""
    df = pd.DataFrame({"run": ["a", "a", "a", "b"], "eta": [3.0, 10.0, 30.0, 10.0],
                       "kl": [0.43, 0.5157, 0.51571, 0.5157], "pass@1": [0.82, 0.8237, 0.8237, 0.8237]})
    labels = report._point_labels(df)
    assert [label for label, _, _ in labels] == ["eta=3 (a)", "eta=10, 30 (a)", "eta=10 (b)"]
    assert [(x, y) for _, x, y in labels][1] == (0.5157, 0.8237)
    one_run = report._point_labels(df[df["run"] == "a"])
    assert [label for label, _, _ in one_run] == ["eta=3", "eta=10, 30"]


# ---------------------------------------------------------------- confidence intervals


def stats_with_ci(eta: float, pass1: float, kl: float, cd: int = 0) -> dict:
    """A reward_stats document with the bootstrap intervals eval_ckpt.py writes."""
    return {**stats(eta, pass1, kl, cd=cd),
            "single_sample_accuracy_ci": [pass1 - 0.03, pass1 + 0.04],
            "majority_vote_accuracy_ci": [pass1 + 0.01, pass1 + 0.09],
            "pass_k_accuracy_ci": [pass1 + 0.05, pass1 + 0.15],
            "kl_ci": [kl * 0.8, kl * 1.25],
            "ci_level": 0.95, "ci_resamples": 1000, "ci_seed": 47}


def table_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = markdown.splitlines()
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


@pytest.fixture
def ci_tree(tmp_path, monkeypatch):
    """``new/ckpt_1``: eta 0 and eta 10 with intervals; ``old/ckpt_1``: eta 5 without."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QSHARP_DEBUG", raising=False)
    write_stats(tmp_path / "new" / "ckpt_1", stats_with_ci(0.0, 0.443, 0.2))
    write_stats(tmp_path / "new" / "ckpt_1", stats_with_ci(10.0, 0.7, 0.5))
    write_stats(tmp_path / "old" / "ckpt_1", stats(5.0, 0.6, 0.3))
    return tmp_path


def test_intervals_in_table_and_csv(ci_tree, capsys):
    df = report.collect_stats(["new", "old"])
    assert list(df.columns) == report.COLUMNS + report.CI_COLUMNS
    reference = df[df["eta"] == 0].iloc[0]
    assert (reference["pass@1_ci_low"], reference["pass@1_ci_high"]) == pytest.approx((0.413, 0.483))
    assert (reference["kl_ci_low"], reference["kl_ci_high"]) == pytest.approx((0.16, 0.25))
    old = df[df["run"] == "old/ckpt_1"].iloc[0]
    assert all(math.isnan(old[column]) for column in report.CI_COLUMNS)

    header, body = table_rows(report.to_markdown(df))
    assert header == report.COLUMNS  # the bounds are shown in their metric's cells, not as columns
    cells = {row[header.index("eta")] + row[header.index("run")]: dict(zip(header, row)) for row in body}
    new_reference, new_guided, old_row = cells["0new/ckpt_1"], cells["10new/ckpt_1"], cells["5old/ckpt_1"]
    assert new_reference["pass@1"] == "0.4430 [0.4130, 0.4830]"
    assert new_reference["maj@k"] == "0.4930 [0.4530, 0.5330]"
    assert new_reference["pass@k"] == "0.5430 [0.4930, 0.5930]"
    assert new_reference["kl"] == "0.2000 [0.1600, 0.2500]"
    assert new_reference["kl_per_token"] == "0.0040"  # no interval for it
    assert new_guided["pass@1"] == "0.7000 [0.6700, 0.7400]"
    assert old_row["pass@1"] == "0.6000" and old_row["kl"] == "0.3000"  # an older file: no interval

    code, out, err = run_main(["new", "old", "--out_dir", "report"], capsys)
    assert code == 0, err
    assert "| 0.4430 [0.4130, 0.4830] |" in out
    csv = pd.read_csv(ci_tree / "report" / "results.csv")
    assert list(csv.columns) == report.COLUMNS + report.CI_COLUMNS
    pd.testing.assert_frame_equal(csv, df, check_dtype=False)


def test_old_files_only_keep_the_table_of_before(tree):
    """Without any interval: no CI columns, no brackets in the table."""
    df = report.collect_stats(["exp"])
    assert list(df.columns) == report.COLUMNS
    assert "[" not in report.to_markdown(df)


def test_one_missing_bound_column_shows_no_interval():
    df = pd.DataFrame({"run": ["a", "b"], "kl": [0.5, 0.25], "kl_ci_low": [0.4, math.nan], "kl_ci_high": [0.6, 0.3]})
    header, body = table_rows(report.to_markdown(df))
    assert header == ["run", "kl"]
    assert [row[1] for row in body] == ["0.5000 [0.4000, 0.6000]", "0.2500"]
    header, _ = table_rows(report.to_markdown(df.drop(columns=["kl_ci_high"])))
    assert header == ["run", "kl", "kl_ci_low"]  # no pair: an ordinary column


def record_error_bars(monkeypatch) -> list[dict]:
    """Calls of ``Axes.errorbar`` (still drawn), with their x, y and errors as arrays."""
    from matplotlib.axes import Axes

    calls, original = [], Axes.errorbar

    def errorbar(self, x, y, *args, **kwargs):
        calls.append({"x": np.asarray(x, dtype=float), "y": np.asarray(y, dtype=float),
                      **{axis: np.asarray(kwargs[axis], dtype=float) for axis in ("xerr", "yerr") if axis in kwargs}})
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", errorbar)
    return calls


def test_plot_draws_error_bars(ci_tree, monkeypatch):
    calls = record_error_bars(monkeypatch)
    df = report.collect_stats(["new", "old"])
    report.plot_pass1_vs_kl(df, ci_tree / "plot.png")
    png = (ci_tree / "plot.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    vertical = sorted((tuple(c["x"]), tuple(c["y"]), tuple(map(tuple, c["yerr"].T))) for c in calls if "yerr" in c)
    horizontal = sorted((tuple(c["x"]), tuple(c["y"]), tuple(map(tuple, c["xerr"].T))) for c in calls if "xerr" in c)
    # one call per method with intervals (reference, qsharp) and axis; the old file's point has none
    assert len(vertical) == 2 and len(horizontal) == 2 and len(calls) == 4
    assert [point[:2] for point in vertical] == [((0.2,), (0.443,)), ((0.5,), (0.7,))]
    np.testing.assert_allclose([point[2][0] for point in vertical], [(0.03, 0.04), (0.03, 0.04)])
    np.testing.assert_allclose([point[2][0] for point in horizontal], [(0.04, 0.05), (0.1, 0.125)])


def test_plot_without_intervals_draws_no_error_bars(tree, monkeypatch):
    calls = record_error_bars(monkeypatch)
    report.plot_pass1_vs_kl(report.collect_stats(["exp"]), tree / "plot.png")
    assert calls == [] and (tree / "plot.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_point_outside_its_interval_gets_no_negative_bar(tmp_path, monkeypatch):
    calls = record_error_bars(monkeypatch)
    df = pd.DataFrame({"run": ["a"], "method": ["qsharp"], "eta": [1.0], "top_k": [20], "temperature": [0.8],
                       "pass@1": [0.5], "kl": [0.3], "pass@1_ci_low": [0.55], "pass@1_ci_high": [0.6],
                       "kl_ci_low": [0.1], "kl_ci_high": [0.2]})
    report.plot_pass1_vs_kl(df, tmp_path / "plot.png")
    errors = {axis: call[axis][:, 0].tolist() for call in calls for axis in ("xerr", "yerr") if axis in call}
    assert errors == {"yerr": pytest.approx([0.0, 0.1]), "xerr": pytest.approx([0.2, 0.0])}


@pytest.mark.parametrize("value", [[0.1], [0.1, "0.2"], 0.5, [True, 0.2], {"low": 0.1}])
def test_bad_interval_raises(tree, capsys, value):
    doc = {**stats(1.0, 0.5, 0.1), "kl_ci": value}
    path = write_stats(tree / "exp" / "ckpt_100", doc)
    line = one_error(*run_main(["exp"], capsys))
    assert path.name in line and "kl_ci is" in line and "expected [low, high]" in line
