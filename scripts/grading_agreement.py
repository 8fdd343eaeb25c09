"""How often the original's grader (``--match_fn_type symbolic``) agrees with the project's
former one, on real gold answers.

    python scripts/grading_agreement.py                              # old grader approximated under 0.7.0
    python scripts/grading_agreement.py --old_python /tmp/mv09/bin/python   # old grader exactly

- new: ``symbolic`` = the original's ``numeric_or_symbolic_correctness``, math_verify 0.7.0
  (this interpreter must have it, as requirements.txt pins).
- old: the project's former grader = ``symbolic_normalized`` (normalize_answer, then
  ``verify(gold, pred)``) under math_verify 0.9.0 + latex2sympy2_extended 1.11.0. With
  ``--old_python PY`` it runs in that interpreter (make one with
  ``python -m venv --system-site-packages /tmp/mv09 && /tmp/mv09/bin/pip install
  math-verify==0.9.0 latex2sympy2_extended==1.11.0``); ``symbolic_normalized`` under this
  interpreter's 0.7.0 (an approximation of the old grader) is always reported as well.

Corpus (gold, prediction) pairs, each gold graded against variants of itself:
- MATH500 (shared/datasets/reference/math500_test.jsonl): gold = last box of the
  solution; predictions: the solution itself (graded as a response), ``\\dfrac`` for
  ``\\frac``, ``x = `` + gold, ``, `` for ``,``, ``^\\circ``, the next problem's gold.
- GSM8K (shared/datasets/raw/gsm8k/test.jsonl): gold = the ``#### `` answer, commas
  removed (dataset/prepare_data.py); predictions: gold, ``.0``, ``\\$``, thousands
  separators, `` dollars``, ``\\text{ dollars}``, ``\\%``, gold + 1.
Also: maj@k and per-response grading against shared/golden/accuracy.json for new and old
(old maj@k = the former algorithm: unboxed responses do not vote, relation
match_fn(representative, new)).

Measured (``--old_python`` run, 11,260 pairs, about 3 minutes on 2 cores): new agrees with
the exact old grader on 8,621 (76.6%; MATH 1,893/1,896, GSM8K 6,728/9,364) and with the
0.7.0 approximation on 9,938 (88.3%). Unperturbed golds (MATH500 self, GSM8K exact): 100%.
The disagreements: ``N dollars`` (1,319, old right, new wrong: normalisation), ``N\%``
(1,317, old 0.9.0 right, new wrong: math_verify version) and 3 ``, \!`` spellings. On the
fixture, new agrees on 58/58 gradings, 16/16 partitions and 13/13 deterministic maj@k; the
exact old grader on 56/58 and 10/13.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.data.problems import gsm8k_record  # noqa: E402
from utils.data.answers import equivalence_partition, is_equiv, process_sample, reference_answer  # noqa: E402

SHARED = ROOT.parent / "shared"
MATH500 = SHARED / "datasets" / "reference" / "math500_test.jsonl"
GSM8K = SHARED / "datasets" / "raw" / "gsm8k" / "test.jsonl"
GOLDEN = SHARED / "golden" / "accuracy.json"
DATASET_TYPE = {"GSM8K": "gsm8k", "MATH": "math"}


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def corpus() -> list[tuple[str, str, str]]:
    """(kind, gold, prediction) triples; kind "math:self" grades the whole solution."""
    items: list[tuple[str, str, str]] = []
    solutions = [r["solution"] for r in read_jsonl(MATH500)]
    math = [reference_answer(solution, "math") for solution in solutions]
    for i, gold in enumerate(math):
        items.append(("math:self", gold, process_sample(solutions[i])))
        if "\\frac" in gold:
            items.append(("math:dfrac", gold, gold.replace("\\frac", "\\dfrac")))
        items.append(("math:x=", gold, "x = " + gold))
        if "," in gold:
            items.append(("math:comma-space", gold, gold.replace(",", ", ")))
        if gold.replace(".", "", 1).isdigit():
            items.append(("math:degree", gold, gold + "^\\circ"))
        items.append(("math:next-gold", gold, math[(i + 1) % len(math)]))
    for row in read_jsonl(GSM8K):
        gold = gsm8k_record(row)["answer"]
        items.append(("gsm8k:exact", gold, gold))
        if "." not in gold:
            items.append(("gsm8k:.0", gold, gold + ".0"))
        items.append(("gsm8k:\\$", gold, "\\$" + gold))
        if gold.lstrip("-").isdigit() and abs(int(gold)) >= 1000:
            items.append(("gsm8k:thousands", gold, f"{int(gold):,}"))
        items.append(("gsm8k:dollars", gold, gold + " dollars"))
        items.append(("gsm8k:\\text{dollars}", gold, gold + "\\text{ dollars}"))
        items.append(("gsm8k:\\%", gold, gold + "\\%"))
        if gold.lstrip("-").isdigit():
            items.append(("gsm8k:+1", gold, str(int(gold) + 1)))
    return items


def grades(pairs: list[tuple[str, str]], match_fn_type: str) -> list[bool]:
    return [is_equiv(gold, pred, match_fn_type) for gold, pred in pairs]


def old_grades(pairs: list[tuple[str, str]], old_python: str | None) -> tuple[list[bool], str]:
    """The former grader's verdicts: in ``old_python`` (exact) or here (0.7.0 approximation)."""
    if old_python is None:
        return grades(pairs, "symbolic_normalized"), f"symbolic_normalized, math_verify {version('math-verify')}"
    done = subprocess.run(
        [old_python, str(Path(__file__).resolve()), "--dump_normalized"],
        input=json.dumps(pairs), capture_output=True, text=True, check=True, cwd=ROOT,
    )
    out = json.loads(done.stdout)
    return out["grades"], f"symbolic_normalized, math_verify {out['math_verify']} ({old_python})"


def old_majority_vote(predictions: list[str], gold: str, match_fn) -> bool:
    """The former project maj@k: '' does not vote, relation match_fn(representative, new)."""
    classes: list[list] = []
    for pred in predictions:
        if not pred:
            continue
        for cls in classes:
            if match_fn(cls[0], pred):
                cls[1] += 1
                break
        else:
            classes.append([pred, 1])
    if not classes:
        return False
    top = max(n for _, n in classes)
    tied = [rep for rep, n in classes if n == top]
    return match_fn(gold, random.Random(0).choice(tied))  # its default rng


def fixture_report(old_match) -> dict:
    """Agreement of new and old with the original's values in accuracy.json."""
    fixture = json.loads(GOLDEN.read_text(encoding="utf-8"))
    from utils.data.answers import majority_vote

    new_ok = old_ok = total = 0
    maj_new = maj_old = maj_total = part_ok = 0
    for case in fixture["cases"]:
        mft = case["match_fn_type"]
        preds = case["processed_predictions"]
        for pred, want in zip(preds, case["predictions_correctness"]):
            total += 1
            new_ok += is_equiv(case["gold_processed"], pred, mft) is want
            old_ok += (old_match(case["gold_processed"], pred) if mft == "symbolic" else is_equiv(
                case["gold_processed"], pred, mft)) is want
        part_ok += equivalence_partition(preds, mft) == case["partition"]
        if case["majority_vote_deterministic"]:
            maj_total += 1
            reference, dt = case["gold"], DATASET_TYPE[case["dataset_type"]]
            maj_new += majority_vote(case["responses"], reference, dt, mft) is case["majority_vote_correct"]
            fn = old_match if mft == "symbolic" else (lambda g, p, m=mft: is_equiv(g, p, m))
            maj_old += old_majority_vote(preds, case["gold_processed"], fn) is case["majority_vote_correct"]
    for pair in fixture["pairs"]:
        total += 1
        want = pair["numeric_or_symbolic_correctness"]
        new_ok += is_equiv(pair["answer"], pair["prediction"]) is want
        old_ok += old_match(pair["answer"], pair["prediction"]) is want
    return {
        "per_response_and_pairs": {"n": total, "new_agrees": new_ok, "old_agrees": old_ok},
        "partition": {"n": len(fixture["cases"]), "new_agrees": part_ok},
        "maj_at_k_deterministic_cases": {"n": maj_total, "new_agrees": maj_new, "old_agrees": maj_old},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old_python", default=None, help="interpreter with math_verify 0.9.0 for the exact old grader")
    parser.add_argument("--dump_normalized", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the report (JSON) here")
    args = parser.parse_args()
    if args.dump_normalized:  # child mode: pairs on stdin, verdicts on stdout
        pairs = [tuple(p) for p in json.loads(sys.stdin.read())]
        print(json.dumps({"math_verify": version("math-verify"), "grades": grades(pairs, "symbolic_normalized")}))
        return
    if version("math-verify") != "0.7.0":
        print(f"warning: math_verify {version('math-verify')} here, the original used 0.7.0", file=sys.stderr)
    items = corpus()
    pairs = [(gold, pred) for _, gold, pred in items]
    new = grades(pairs, "symbolic")
    reversed_new = [is_equiv(pred, gold) for gold, pred in pairs]
    approx = grades(pairs, "symbolic_normalized")
    exact, exact_label = old_grades(pairs, args.old_python) if args.old_python else (None, None)
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])  # n, new true, agree approx, agree exact, asym
    for i, (kind, _, _) in enumerate(items):
        row = by_kind[kind]
        row[0] += 1
        row[1] += new[i]
        row[2] += new[i] == approx[i]
        row[3] += exact is not None and new[i] == exact[i]
        row[4] += new[i] != reversed_new[i]
    report = {
        "new": f"symbolic, math_verify {version('math-verify')}",
        "old_approx": f"symbolic_normalized, math_verify {version('math-verify')}",
        "old_exact": exact_label,
        "pairs": len(pairs),
        "agree_new_old_approx": sum(a == b for a, b in zip(new, approx)),
        "agree_new_old_exact": None if exact is None else sum(a == b for a, b in zip(new, exact)),
        "asymmetric_new": sum(a != b for a, b in zip(new, reversed_new)),
        "by_kind": {k: dict(zip(["n", "new_correct", "agree_old_approx", "agree_old_exact", "asymmetric"], v))
                    for k, v in by_kind.items()},
    }
    for ds in ("math", "gsm8k"):
        idx = [i for i, (k, _, _) in enumerate(items) if k.startswith(ds + ":")]
        report[ds] = {
            "pairs": len(idx),
            "agree_new_old_approx": sum(new[i] == approx[i] for i in idx),
            "agree_new_old_exact": None if exact is None else sum(new[i] == exact[i] for i in idx),
        }
    if exact is not None:
        lookup = dict(zip(pairs, exact))
        old_match = lambda g, p: lookup[(g, p)] if (g, p) in lookup else None  # noqa: E731
        fixture_pairs = fixture_pairs_needed()
        child = old_grades(fixture_pairs, args.old_python)[0]
        lookup.update(zip(fixture_pairs, child))
    else:
        old_match = lambda g, p: is_equiv(g, p, "symbolic_normalized")  # noqa: E731
    report["fixture"] = fixture_report(old_match)
    if exact is not None:
        report["fixture_old_approx"] = fixture_report(lambda g, p: is_equiv(g, p, "symbolic_normalized"))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


def fixture_pairs_needed() -> list[tuple[str, str]]:
    """Every (gold, pred) call the fixture report makes with the old matcher."""
    fixture = json.loads(GOLDEN.read_text(encoding="utf-8"))
    needed: set[tuple[str, str]] = set()
    for case in fixture["cases"]:
        preds = case["processed_predictions"]
        needed.update((case["gold_processed"], p) for p in preds)
        needed.update((a, b) for a in preds for b in preds)
    needed.update((p["answer"], p["prediction"]) for p in fixture["pairs"])
    return sorted(needed)


if __name__ == "__main__":
    main()
