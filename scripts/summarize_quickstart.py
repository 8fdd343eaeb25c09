"""Side-by-side table of the quickstart's evaluations.

    python scripts/summarize_quickstart.py --out quickstart_out/summary.json \
        --row reference=PATH/reward_stats_eta_0.0_top_k_20_temp_0.8.json --row cd=... --row qsharp_round1=... --row qsharp_round2=...

Writes ``{"rows": [{"method", "pass_at_1", "maj_at_k", "pass_at_k", "kl_mean"}, ...]}`` (plus each
value's 95% bootstrap interval, ``<key>_ci``, when the stats file has one) and prints the same as a
markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import run  # noqa: E402
from utils.data import read_json, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=str, required=True, help="summary json to write")
    p.add_argument("--row", action="append", required=True, metavar="METHOD=REWARD_STATS_JSON",
                   help="one evaluation: a method name and its reward_stats_*.json (repeatable, in table order)")
    return p.parse_args(argv)


CI_KEYS = {"pass_at_1": "single_sample_accuracy_ci", "maj_at_k": "majority_vote_accuracy_ci",
           "pass_at_k": "pass_k_accuracy_ci", "kl_mean": "kl_ci"}


def cell(row: dict, key: str, digits: int) -> str:
    """``0.443 [0.41, 0.48]``: the value and its 95% interval when the stats file has one."""
    text = f"{row[key]:.{digits}f}"
    interval = row.get(f"{key}_ci")
    return text if interval is None else f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["| method | pass@1 | maj@k | pass@k | KL |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {cell(row, 'pass_at_1', 3)} | {cell(row, 'maj_at_k', 3)} | "
                     f"{cell(row, 'pass_at_k', 3)} | {cell(row, 'kl_mean', 2)} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    rows = []
    for item in args.row:
        method, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--row expects METHOD=PATH, got {item!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{method}: {path} does not exist")
        stats = read_json(path)
        rows.append({
            "method": method,
            "pass_at_1": stats["single_sample_accuracy_mean"],
            "maj_at_k": stats["majority_vote_accuracy_mean"],
            "pass_at_k": stats["pass_k_accuracy_mean"],
            "kl_mean": stats["kl_mean"],
            **{f"{key}_ci": stats[ci] for key, ci in CI_KEYS.items() if ci in stats},
        })
    write_json(args.out, {"rows": rows})
    print(markdown(rows))


if __name__ == "__main__":
    run(main, parse_args())
