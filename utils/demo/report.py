"""Tabulate every evaluation's ``reward_stats_*.json`` and plot pass@1 against KL.

    python -m utils.demo.report checkpoints/llama_3_8b_instruct_gsm8k/ [checkpoints/other/ckpt_100/ ...] --out_dir report

Each argument is a checkpoint folder, an experiment folder holding several ``ckpt_*/``, or a
stats file itself; ``reward_stats_*.json`` files are searched recursively under each folder.
Prints one markdown row per stats file (run, method, eta, top_k, temperature, k, problems,
pass@1, maj@k, pass@k, mean KL per trajectory, mean KL per token) and writes
``OUT_DIR/results.csv`` (full precision) and ``OUT_DIR/pass1_vs_kl.png``. ``method`` is
``reference`` for eta 0, ``cd`` for the Controlled-Decoding baseline, ``qsharp`` otherwise.

Stats files with bootstrap confidence intervals (``*_ci``: ``[low, high]``, written by
eval_ckpt.py) show them next to pass@1, maj@k, pass@k and KL (``0.4430 [0.4100, 0.4800]``);
the CSV then has ``<column>_ci_low`` / ``<column>_ci_high`` columns and the plot draws them as
error bars (pass@1 vertically, KL horizontally). Older files without intervals show none.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from utils.cli import ArgumentParser, run
from utils.data.io import atomic_open, read_json

STATS_GLOB = "reward_stats_*.json"
CSV_NAME = "results.csv"
PNG_NAME = "pass1_vs_kl.png"
COLUMNS = ["run", "method", "eta", "top_k", "temperature", "k", "problems",
           "pass@1", "maj@k", "pass@k", "kl", "kl_per_token"]
# column -> (key in reward_stats json, type); kl_per_token may be absent (NaN).
FIELDS = {
    "eta": ("eta", float),
    "top_k": ("top_k", int),
    "temperature": ("temperature", float),
    "k": ("num_samples", int),
    "problems": ("num_problems", int),
    "pass@1": ("single_sample_accuracy_mean", float),
    "maj@k": ("majority_vote_accuracy_mean", float),
    "pass@k": ("pass_k_accuracy_mean", float),
    "kl": ("kl_mean", float),
    "kl_per_token": ("kl_per_token_mean", float),
}
OPTIONAL_FIELDS = {"kl_per_token"}
# column -> key of its confidence interval ([low, high]) in reward_stats json; absent in older files.
CI_FIELDS = {
    "pass@1": "single_sample_accuracy_ci",
    "maj@k": "majority_vote_accuracy_ci",
    "pass@k": "pass_k_accuracy_ci",
    "kl": "kl_ci",
}
CI_SUFFIXES = ("_ci_low", "_ci_high")
CI_COLUMNS = [column + suffix for column in CI_FIELDS for suffix in CI_SUFFIXES]
METHOD_STYLES = {"reference": ("o", "tab:gray"), "qsharp": ("^", "tab:blue"), "cd": ("s", "tab:orange")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="checkpoint or experiment folders (searched recursively), or stats files")
    p.add_argument("--out_dir", type=str, default=".", help=f"where {CSV_NAME} and {PNG_NAME} go (default: .)")
    return p.parse_args(argv)


def find_stats_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every ``reward_stats_*.json`` under ``paths`` (each path once, in the order found).

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` for one
    that holds no stats file.
    """
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_file():
            if not path.match(STATS_GLOB):
                raise ValueError(f"{path} is neither a folder nor a {STATS_GLOB} file")
            files = [path]
        else:
            files = sorted(p for p in path.rglob(STATS_GLOB) if p.is_file())
            if not files:
                raise ValueError(f"no {STATS_GLOB} file under {path} (run eval_ckpt.py on a checkpoint first)")
        for file in files:
            found.setdefault(file.resolve(), file)
    return list(found.values())


def run_name(folder: Path) -> str:
    """``folder`` relative to the current directory when it lies below it, else absolute."""
    absolute = Path(os.path.abspath(folder))
    try:
        return absolute.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return absolute.as_posix()


def method_of(eta: float, cd_baseline: bool) -> str:
    """``reference`` (eta 0), ``cd`` (Controlled-Decoding baseline) or ``qsharp``."""
    if eta == 0:
        return "reference"
    return "cd" if cd_baseline else "qsharp"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_stats(path: Path) -> dict[str, Any]:
    """One table row from a stats file; a missing or non-numeric field raises ``ValueError`` naming the file.

    The row has ``COLUMNS`` and ``CI_COLUMNS`` (NaN where the file has no interval)."""
    stats = read_json(path)
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(stats).__name__}")
    missing = [key for column, (key, _) in FIELDS.items() if key not in stats and column not in OPTIONAL_FIELDS]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (not a reward_stats file of eval_ckpt.py?)")
    row: dict[str, Any] = {"run": run_name(path.parent)}
    for column, (key, type_) in FIELDS.items():
        value = stats.get(key)
        if value is None and column in OPTIONAL_FIELDS:
            row[column] = math.nan
            continue
        try:
            if isinstance(value, (bool, str)) or (type_ is int and float(value) != int(value)):
                raise TypeError
            row[column] = type_(value)
        except (TypeError, ValueError, OverflowError):
            expected = "an integer" if type_ is int else "a number"
            raise ValueError(f"{path}: {key} is {value!r}, expected {expected}") from None
    for column, key in CI_FIELDS.items():
        interval = stats.get(key)
        if interval is None:
            interval = [math.nan, math.nan]
        elif not (isinstance(interval, list) and len(interval) == 2 and all(map(_is_number, interval))):
            raise ValueError(f"{path}: {key} is {interval!r}, expected [low, high]")
        for suffix, bound in zip(CI_SUFFIXES, interval):
            row[column + suffix] = float(bound)
    cd_baseline = bool(stats.get("cd_baseline", path.name.endswith("_cd.json")))
    row["method"] = method_of(row["eta"], cd_baseline)
    return row


def _natural_key(text: str) -> tuple:
    """``ckpt_99`` before ``ckpt_100``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def collect_stats(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per ``reward_stats_*.json`` under ``paths`` (columns ``COLUMNS``, then ``CI_COLUMNS``
    when any file has intervals), sorted by run, eta, method (an eta sweep reads top to bottom,
    the reference at eta 0 first)."""
    rows = [read_stats(file) for file in find_stats_files(paths)]
    df = pd.DataFrame(rows, columns=COLUMNS + CI_COLUMNS)
    if df[CI_COLUMNS].isna().all().all():  # only older files: the table of before
        df = df.drop(columns=CI_COLUMNS)
    df = df.sort_values(
        ["run", "eta", "method", "top_k", "temperature", "k"],
        key=lambda column: column.map(_natural_key) if column.name == "run" else column,
        kind="stable",
    )
    return df.reset_index(drop=True)


def _cell(column: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if column in ("eta", "temperature"):
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _intervals(columns: list[str]) -> dict[str, tuple[str, str]]:
    """``column -> (low column, high column)`` for the columns of ``columns`` with an interval."""
    intervals = {}
    for column in columns:
        bounds = tuple(column + suffix for suffix in CI_SUFFIXES)
        if all(bound in columns for bound in bounds):
            intervals[column] = bounds
    return intervals


def _interval_cell(column: str, value: Any, low: Any, high: Any) -> str:
    """``0.4430 [0.4100, 0.4800]``; the point alone when either bound (or the point) is missing."""
    text = _cell(column, value)
    if text and all(not (isinstance(bound, float) and math.isnan(bound)) for bound in (low, high)):
        text += f" [{_cell(column, low)}, {_cell(column, high)}]"
    return text


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` (numbers right-aligned, metrics with 4 decimals); a column
    with ``<column>_ci_low`` and ``<column>_ci_high`` columns shows its interval in its own cells
    (``0.4430 [0.4100, 0.4800]``, none where missing) instead of as columns of their own."""
    all_columns = list(df.columns)
    intervals = _intervals(all_columns)
    merged = {bound for bounds in intervals.values() for bound in bounds}
    shown = [i for i, column in enumerate(all_columns) if column not in merged]
    columns = [all_columns[i] for i in shown]
    cells = []
    for row in df.itertuples(index=False):
        record = dict(zip(all_columns, row))
        cells.append([_interval_cell(column, row[i], *(record[bound] for bound in intervals[column]))
                      if column in intervals else _cell(column, row[i]) for i, column in zip(shown, columns)])
    widths = [max([len(column), 3, *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    numeric = [pd.api.types.is_numeric_dtype(df[column]) for column in columns]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), rule, *(line(row) for row in cells)])


def _point_labels(df: pd.DataFrame) -> list[tuple[str, float, float]]:
    """One ``(label, kl, pass@1)`` per drawn position: ``eta=10``, plus the run's folder name
    when the table holds several runs. Points of one run that coincide (to 3 decimals, e.g. a
    saturated eta sweep) share one label: ``eta=10, 30``."""
    runs = df["run"].unique()
    short = {name: Path(name).name or name for name in runs}
    if len(set(short.values())) < len(runs):
        short = {name: name for name in runs}
    positions: dict[tuple, tuple[float, float, list[float]]] = {}  # (run, kl, pass@1 rounded) -> (kl, pass@1, etas)
    for run_name, eta, x, y in zip(df["run"], df["eta"], df["kl"], df["pass@1"]):
        positions.setdefault((run_name, round(float(x), 3), round(float(y), 3)), (x, y, []))[2].append(eta)
    return [("eta=" + ", ".join(f"{eta:g}" for eta in etas) + (f" ({short[run_name]})" if len(runs) > 1 else ""), x, y)
            for (run_name, _, _), (x, y, etas) in positions.items()]


def _error_bars(ax, df: pd.DataFrame, colour: str) -> None:
    """The pass@1 intervals of ``df``'s rows as vertical error bars, the KL intervals as horizontal
    ones, where the rows have them (a point outside its percentile interval gets no bar on that side)."""
    for column, axis in (("pass@1", "y"), ("kl", "x")):
        low, high = (column + suffix for suffix in CI_SUFFIXES)
        if low not in df or high not in df:
            continue
        rows = df[df[low].notna() & df[high].notna()]
        if rows.empty:
            continue
        value = rows[column].to_numpy(dtype=float)
        error = np.maximum([value - rows[low].to_numpy(dtype=float), rows[high].to_numpy(dtype=float) - value], 0.0)
        ax.errorbar(rows["kl"], rows["pass@1"], **{f"{axis}err": error}, fmt="none", ecolor=colour,
                    elinewidth=1, capsize=2, alpha=0.6)


def plot_pass1_vs_kl(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Scatter pass@1 against mean KL per trajectory, one marker per method, points labelled with eta; atomic PNG.

    The guided points of one run, method, top-k and temperature (an eta sweep) are joined in
    eta order, starting from the run's reference (eta 0) when it is there. Rows with intervals
    (``pass@1_ci_low`` ... ``kl_ci_high``) get error bars: pass@1 vertical, KL horizontal.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    try:
        for method in [m for m in METHOD_STYLES if m in set(df["method"])]:
            rows = df["method"] == method
            marker, colour = METHOD_STYLES[method]
            ax.scatter(df.loc[rows, "kl"], df.loc[rows, "pass@1"], marker=marker, color=colour, s=50, label=method)
            _error_bars(ax, df[rows], colour)
        guided = df[df["method"] != "reference"]
        for (run_name, method, _, _), sweep in guided.groupby(["run", "method", "top_k", "temperature"], sort=False):
            reference = df[(df["run"] == run_name) & (df["method"] == "reference")]
            points = pd.concat([reference.iloc[:1], sweep.sort_values("eta")])
            if len(points) > 1:
                ax.plot(points["kl"], points["pass@1"], color=METHOD_STYLES[method][1], alpha=0.5, linewidth=1)
        for label, x, y in _point_labels(df):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_title("pass@1 vs KL(guided || reference)")
        ax.set_xlabel("mean KL per trajectory")
        ax.set_ylabel("pass@1")
        ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
        ax.legend(title="method")
        fig.tight_layout()
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        plt.close(fig)


def main(args: argparse.Namespace) -> pd.DataFrame:
    df = collect_stats(args.paths)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {out_dir} is not a directory")
    print(to_markdown(df))
    csv_path, png_path = out_dir / CSV_NAME, out_dir / PNG_NAME
    with atomic_open(csv_path) as handle:
        df.to_csv(handle, index=False)
    plot_pass1_vs_kl(df, png_path)
    print(f"\nreport: {len(df)} rows -> {csv_path}, {png_path}")
    return df


if __name__ == "__main__":
    run(main, parse_args())
