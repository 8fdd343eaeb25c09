"""Side-by-side table of the quickstart's evaluations.

    python scripts/summarize_quickstart.py --out quickstart_out/summary.json [--seed 0 --steps quickstart_out/steps.tsv] \
        --row reference=PATH/reward_stats_eta_0.0_top_k_20_temp_0.8.json --row cd=... --row qsharp_round1=... --row qsharp_round2=...
    python scripts/summarize_quickstart.py --seeds quickstart_seeds/seed_*/summary.json

Writes ``{"rows": [{"method", "pass_at_1", "maj_at_k", "pass_at_k", "kl_mean"}, ...]}`` (plus each
value's 95% bootstrap interval, ``<key>_ci``, when the stats file has one; with ``--steps``, also
``"seed"``, ``"wall_s"`` and ``"steps": [{"step", "seconds"}]``) and prints the same as a markdown
table. ``--seeds`` prints one table per summary, with its seed, wall time and step times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import ArgumentParser, nonneg_int, run  # noqa: E402
from utils.data.io import read_json, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=str, help="summary json to write")
    p.add_argument("--row", action="append", metavar="METHOD=REWARD_STATS_JSON",
                   help="one evaluation: a method name and its reward_stats_*.json (repeatable, in table order)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="the run's seed, recorded in the summary")
    p.add_argument("--steps", type=str, default=None,
                   help="the quickstart's steps.tsv (start second <TAB> step name, the last line the summary's)")
    p.add_argument("--seeds", nargs="+", metavar="SUMMARY_JSON", default=None,
                   help="instead: print a table per summary written before (seed, wall time, step times)")
    args = p.parse_args(argv)
    if args.seeds is None and (args.out is None or not args.row):
        p.error("--out and --row are required (or --seeds)")
    return args


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


def read_steps(path: str) -> tuple[list[dict], int]:
    """``steps.tsv`` -> ``[{"step", "seconds"}]`` (each step's duration) and the wall time so far
    (the last line's start)."""
    starts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        second, sep, name = line.partition("\t")
        if not sep or not second.isdigit():
            raise ValueError(f"{path}:{number}: expected 'SECONDS<TAB>STEP', got {line!r}")
        starts.append((int(second), name))
    steps = [{"step": name, "seconds": end - start} for (start, name), (end, _) in zip(starts, starts[1:])]
    return steps, starts[-1][0] if starts else 0


def seed_report(summary: dict) -> str:
    """A summary's markdown table under a heading with its seed and wall time, then its step times."""
    wall = summary.get("wall_s")
    head = f"**seed {summary.get('seed', '?')}**" + (f", {wall // 60} min {wall % 60} s" if wall is not None else "")
    lines = [head, "", markdown(summary["rows"])]
    if summary.get("steps"):
        lines += ["", "; ".join(f"{s['step']}: {s['seconds']} s" for s in summary["steps"])]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.seeds is not None:
        print("\n\n".join(seed_report(read_json(path)) for path in args.seeds))
        return
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
    summary = {"rows": rows}
    if args.seed is not None:
        summary["seed"] = args.seed
    if args.steps is not None:
        summary["steps"], summary["wall_s"] = read_steps(args.steps)
    write_json(args.out, summary)
    print(markdown(rows))


if __name__ == "__main__":
    run(main, parse_args())
