"""Tests for utils/data/answers.py: box extraction, normalisation, matching, voting.

``symbolic`` and ``strict`` are the original's graders (its box extraction, as is;
math_verify 0.7.0, no normalisation; the golden fixture cases are in
test_golden_accuracy.py); ``symbolic_normalized`` adds the project's tolerant extraction
and :func:`normalize_answer`.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from utils.data.answers import (
    DATASET_TYPES,
    MATCH_FNS,
    equivalence_partition,
    extract_boxed,
    extract_boxed_tolerant,
    grade,
    is_equiv,
    majority_vote,
    normalize_answer,
    pass_at_k,
    process_sample,
    reference_answer,
)

MATH500_PATH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raw" / "math" / "test.jsonl"


def respond(answer: str) -> str:
    """A short model-like response whose final answer is boxed."""
    return f"Let me compute step by step.\nSo the final answer is $\\boxed{{{answer}}}$."


def check_table(gold: str, prediction: str, expected: bool, match_fn_type: str = "symbolic") -> None:
    assert grade(respond(prediction), gold, "gsm8k", match_fn_type) is expected


def _ids(table: list[tuple[str, str, bool]]) -> list[str]:
    return [f"{g}|{p}|{'T' if e else 'F'}" for g, p, e in table]


# ---------------------------------------------------------------------------
# Symbolic grading tables, one per phenomenon: (gold, prediction, expected).
# Each holds for ``symbolic`` and ``symbolic_normalized`` alike (see SYMBOLIC_TABLES);
# what only normalisation accepts is in NORMALISATION_ONLY.
# ---------------------------------------------------------------------------

INTEGERS = [
    ("18", "18", True),
    ("0", "0", True),
    ("18", "18.0", True),
    ("18", "17", False),
    ("100", "1000", False),
    ("7", "0.7", False),
]

FRACTIONS = [
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{1}{2}", r"\frac{2}{4}", True),
    ("0.5", r"\frac12", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    (r"\frac{1}{3}", "0.33", False),
    (r"\frac{1}{2}", "2", False),
]

DFRAC_TFRAC = [
    (r"\frac{3}{4}", r"\dfrac{3}{4}", True),
    (r"\frac{3}{4}", r"\tfrac{3}{4}", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\frac{3}{4}", r"\dfrac{4}{3}", False),
    (r"\dfrac{3}{4}", r"\tfrac{3}{5}", False),
]

THOUSANDS = [
    ("1450000", "1,450,000", True),
    ("1450000", "1{,}450{,}000", True),
    ("1450000", r"1,\!450,\!000", True),
    ("1450000", r"\$1,450,000", True),
    ("1,450,000", "1450000", True),
    ("1450000", "1,450,001", False),
    # Malformed groups are not read as one number: "1,45" is the set {1, 45}.
    ("145", "1,45", False),
    ("145000", "1,450,00", False),
    # Tuples / intervals / sets keep their commas.
    ("(1,234)", "1234", False),
    ("(1,234)", "(1,234)", True),
    (r"\{1,2,3\}", r"\{3,2,1\}", True),
    (r"\{1,2,3\}", "123", False),
]

UNITS = [
    ("18", r"\$18", True),
    ("18", r"\$18.00", True),
    ("18", "18 dollars.", True),
    ("18", r"18\text{ dollars}", True),
    ("18", r"18 \text{dollars per hour}", True),
    ("18", r"18 \mbox{ dollars}", True),
    ("90", r"90^\circ", True),
    ("90", r"90^{\circ}", True),
    ("18", r"\$17", False),
    ("18", "17 dollars", False),
    ("18", r"19\text{ dollars}", False),
    ("18", "180 dollars", False),
    ("18", r"81\%", False),
    ("90", r"45^\circ", False),
]

# math_verify 0.7.0 reads "50\%" as 0.5 only (0.9.0 also accepted 50).
PERCENT = [
    ("18", r"18\%", False),
    (r"18\%", "18", False),
    (r"18\%", "0.18", True),
    ("0.18", r"18\%", True),
    (r"50\%", "0.5", True),
    (r"50\%", "50", False),
    (r"50\%", r"50\%", True),
]

# Single calls of the original in both orders (shared/golden/accuracy.json "pairs"):
# verify(gold, target) is not symmetric.
ORDER = [
    (r"(-\infty,2)", "x<2", False),
    ("x<2", r"(-\infty,2)", True),
    ("[1,2]", r"1\le x\le 2", False),
    (r"1\le x\le 2", "[1,2]", True),
    ("72", "72.0", True),
    ("2", "x=2", True),
    ("x=2", "2", True),
    ("3,4", "3", False),
    ("5", "", False),
    ("", "5", False),
    ("", "", False),
]

# (gold, prediction): wrong under ``symbolic`` (the original), right under ``symbolic_normalized``.
NORMALISATION_ONLY = [
    ("1450000", "1,450,000 dollars"),
    ("18", "18 dollars"),
    ("18", r"\text{18 dollars}"),
    ("18", "18 percent"),
    ("12", "12 square feet"),
    ("5", "5 cm^2"),
]

NEGATIVES = [
    ("-3", "-3", True),
    ("-3", "-3.0", True),
    (r"-\frac{1}{2}", "-0.5", True),
    ("-3", "3", False),
    ("3", "-3", False),
    (r"-\frac{1}{2}", "0.5", False),
]

INTERVALS = [
    (r"(-\infty,2]", r"(-\infty, 2]", True),
    (r"[2,5)", r"[2, 5)", True),
    (r"(-\infty,2] \cup [3,\infty)", r"(-\infty, 2]\cup[3, \infty)", True),
    (r"(-\infty,2]", r"(-\infty, 2)", False),
    (r"[2,5)", r"(2,5)", False),
    (r"(-\infty,2] \cup [3,\infty)", r"(-\infty, 2]", False),
]

NESTED_BRACES = [
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True),
    (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt{3}}{2}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{3}", False),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{2}", False),
]


@pytest.mark.parametrize("gold, prediction, expected", INTEGERS, ids=_ids(INTEGERS))
def test_integers(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", FRACTIONS, ids=_ids(FRACTIONS))
def test_fractions(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", DFRAC_TFRAC, ids=_ids(DFRAC_TFRAC))
def test_dfrac_tfrac(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", THOUSANDS, ids=_ids(THOUSANDS))
def test_thousands_separators(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", UNITS, ids=_ids(UNITS))
def test_units_dollars_percent_degrees(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", NEGATIVES, ids=_ids(NEGATIVES))
def test_negatives(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", INTERVALS, ids=_ids(INTERVALS))
def test_intervals(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", NESTED_BRACES, ids=_ids(NESTED_BRACES))
def test_nested_braces(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", PERCENT, ids=_ids(PERCENT))
def test_percent(gold, prediction, expected):
    check_table(gold, prediction, expected)


@pytest.mark.parametrize("gold, prediction, expected", ORDER, ids=_ids(ORDER))
def test_argument_order_as_original(gold, prediction, expected):
    assert is_equiv(gold, prediction) is expected
    check_table(gold, prediction, expected)


SYMBOLIC_TABLES = INTEGERS + FRACTIONS + DFRAC_TFRAC + THOUSANDS + UNITS + NEGATIVES + INTERVALS + NESTED_BRACES + PERCENT


@pytest.mark.parametrize("gold, prediction, expected", SYMBOLIC_TABLES, ids=_ids(SYMBOLIC_TABLES))
def test_symbolic_normalized_agrees_on_tables(gold, prediction, expected):
    check_table(gold, prediction, expected, "symbolic_normalized")


@pytest.mark.parametrize("gold, prediction", NORMALISATION_ONLY, ids=[f"{g}|{p}" for g, p in NORMALISATION_ONLY])
def test_normalisation_only_under_symbolic_normalized(gold, prediction):
    check_table(gold, prediction, False)
    check_table(gold, prediction, True, "symbolic_normalized")
    assert is_equiv(gold, prediction) is False
    assert is_equiv(gold, prediction, "symbolic_normalized") is True


# ---------------------------------------------------------------------------
# Box extraction inside responses
# ---------------------------------------------------------------------------

RESPONSES = [
    ("18", r"First I guessed $\boxed{18}$, but actually it is $\boxed{17}$.", False),
    ("18", r"First I guessed $\boxed{17}$, but actually it is $\boxed{18}$.", True),
    ("18", "The answer is 18.", False),
    ("18", "", False),
    ("12", r"So the answer is $\boxed{12", False),
    ("12", r"Maybe $\boxed{12}$. No wait, it is $\boxed{12", False),
    ("18", r"The answer is $\boxed{}$.", False),
]


@pytest.mark.parametrize(
    "gold, response, expected",
    RESPONSES,
    ids=[
        "first-right-last-wrong",
        "first-wrong-last-right",
        "no-box",
        "empty-response",
        "truncated-box",
        "complete-box-then-truncated-box",
        "empty-box",
    ],
)
@pytest.mark.parametrize("match_fn_type", list(MATCH_FNS))
def test_grade_uses_last_complete_box(gold, response, expected, match_fn_type):
    assert grade(response, gold, "gsm8k", match_fn_type) is expected


# Box forms, graded per matcher: (dataset_type, reference, response, then the expected grade
# under symbolic, strict, symbolic_normalized). symbolic and strict extract as the original
# (the text between the braces of the last "\boxed{", as is), for the MATH gold too;
# symbolic_normalized also reads \fbox, "\boxed {", "\boxed 5", and strips.
CENTS = r"5.4 \text{ cents}"
BOX_FORMS = [
    ("gsm8k", CENTS, r"It costs $\boxed{5.4 \text{ cents}}$.", True, True, True),
    # math_verify 0.7.0 drops the unit only at the very end: " 5.4 \text{ cents} " is 5.4*cents.
    ("gsm8k", CENTS, r"It costs $\boxed{ 5.4 \text{ cents} }$.", False, False, True),
    ("gsm8k", CENTS, r"It costs $\boxed{5.4 \text{ cents} }$.", False, False, True),
    ("gsm8k", CENTS, r"It costs $\boxed{ 5.4 \text{ cents}}$.", True, False, True),
    ("gsm8k", "18", r"So $\boxed{ 18 }$.", True, False, True),
    ("gsm8k", "18", r"So $\boxed{ 18}$.", True, False, True),
    ("gsm8k", "18", r"So $\boxed{18 }$.", True, False, True),
    ("gsm8k", "18", r"So $\fbox{18}$.", False, False, True),
    ("gsm8k", "18", r"So $\boxed 18$.", False, False, True),
    ("gsm8k", "18", r"So $\boxed18$.", False, False, True),
    ("gsm8k", "18", r"So $\boxed {18}$.", False, False, True),
    ("gsm8k", "18", r"First $\boxed{17}$, then $\fbox{18}$.", False, False, True),
    ("gsm8k", "18", r"First $\boxed{18}$, then $\fbox{17}$.", True, True, False),
    ("gsm8k", r"\{1,2\}", r"So $\boxed{\{1,2\}}$.", True, True, True),
    ("math", r"So it is $\boxed{ 5.4 \text{ cents} }$.", r"It costs $\boxed{5.4 \text{ cents}}$.", False, False, True),
    ("math", r"So $60-16-7-20=\boxed{ 17}$ students.", r"So $\boxed{17}$.", True, False, True),
    ("math", r"Our answer is $\boxed 2$.", r"So $\boxed{2}$.", False, False, True),
    ("math", r"So it is $\fbox{7}$.", r"So $\boxed{7}$.", False, False, True),
]
BOX_CASES = [
    (dataset_type, reference, response, match_fn_type, expected)
    for dataset_type, reference, response, *grades in BOX_FORMS
    for match_fn_type, expected in zip(("symbolic", "strict", "symbolic_normalized"), grades)
]


@pytest.mark.parametrize(
    "dataset_type, reference, response, match_fn_type, expected",
    BOX_CASES,
    ids=[f"{d}|{ref}|{resp}|{m}|{'T' if e else 'F'}" for d, ref, resp, m, e in BOX_CASES],
)
def test_box_forms_per_matcher(dataset_type, reference, response, match_fn_type, expected):
    assert grade(response, reference, dataset_type, match_fn_type) is expected
    assert pass_at_k([response], reference, dataset_type, match_fn_type) is expected
    assert majority_vote([response] * 2, reference, dataset_type, match_fn_type) is expected


# The original's extraction (symbolic, strict): the last "\boxed{", content as is, every
# brace counted (escaped ones too).
EXTRACT = [
    (r"\boxed{5}", "5"),
    (r"\boxed{ 5 }", " 5 "),
    (r"\boxed{}", ""),
    (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\left\{ 1 \right\}}", r"\left\{ 1 \right\}"),
    (r"\boxed{\left\{ 1 \right.}", None),
    (r"\boxed{a\}b}", "a\\"),
    (r"\boxed{1} and \boxed{2}", "2"),
    (r"\boxed{5}}", "5"),
    (r"\fbox{7}", None),
    (r"\boxed{1} then \fbox{7}", "1"),
    (r"$\boxed 5$", None),
    (r"\boxed {5}", None),
    (r"\boxed5", None),
    (r"\boxed{\boxed{3}}", "3"),
    ("no box here", None),
    (r"\boxed{12", None),
    (r"\boxed{1} \boxed{\frac{1}{2}", None),
    (r"\boxed", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT, ids=[t for t, _ in EXTRACT])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# The project's extraction (symbolic_normalized): \fbox, "\boxed {", "\boxed 5", stripped.
EXTRACT_TOLERANT = [
    (r"\boxed{5}", "5"),
    (r"\boxed{ 5 }", "5"),
    (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\left\{ 1 \right\}}", r"\left\{ 1 \right\}"),
    (r"\boxed{\left\{ 1 \right.}", r"\left\{ 1 \right."),
    (r"\boxed{a\}b}", r"a\}b"),
    (r"\boxed{1} and \boxed{2}", "2"),
    (r"\fbox{7}", "7"),
    (r"\boxed{1} then \fbox{7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed 5 apples", "5"),
    (r"\boxed {5}", "5"),
    (r"\boxed{\boxed{3}}", "3"),
    ("no box here", None),
    (r"\boxed{12", None),
    (r"\boxed{1} \boxed{\frac{1}{2}", None),
    (r"\boxed", None),
    (r"\boxed$ 5$", None),
    (r"\boxed5", "5"),
    (r"\boxedx", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT_TOLERANT, ids=[t for t, _ in EXTRACT_TOLERANT])
def test_extract_boxed_tolerant(text, expected):
    assert extract_boxed_tolerant(text) == expected


# ---------------------------------------------------------------------------
# normalize_answer (symbolic_normalized mode only)
# ---------------------------------------------------------------------------

NORMALIZE = [
    (r"\$1,450,000", "1450000"),
    ("1,450,000.25", "1450000.25"),
    ("-1,000", "-1000"),
    ("1,45", "1,45"),
    ("(1,234)", "(1,234)"),
    (r"\{1,2,3\}", r"\{1,2,3\}"),
    ("18 dollars", "18"),
    (r"18 \text{ dollars}", "18"),
    (r"\text{18 dollars}", "18"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac{1}{2}", r"\frac{1}{2}"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    (r"11,\! 111,\! 100", "11111100"),
    ("3 x", "3 x"),
    (r"\text{Monday}", r"\text{Monday}"),
    (r"18\%", r"18\%"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZE, ids=[r for r, _ in NORMALIZE])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------------------
# Strict matching, robustness
# ---------------------------------------------------------------------------

STRICT = [
    ("18", " 18 ", False),  # the original strips nothing
    ("18", "18 ", False),
    ("18", "18", True),
    (r"\frac{1}{2}", r"\frac{1}{2}", True),
    ("18", "18.0", False),
    (r"\frac{1}{2}", "0.5", False),
    ("18", r"\$18", False),
    ("", "", False),  # an empty gold box (two MATH train solutions) matches nothing
]


@pytest.mark.parametrize("gold, prediction, expected", STRICT, ids=_ids(STRICT))
def test_strict_mode(gold, prediction, expected):
    assert is_equiv(gold, prediction, "strict") is expected
    assert grade(respond(prediction), gold, "gsm8k", "strict") is expected


GARBAGE = ["", "}{", r"\frac{", r"\sqrt", "$$", r"\left(", "a" * 300, "((((((((("]


@pytest.mark.parametrize("garbage", GARBAGE, ids=[g if len(g) < 20 else f"{g[:5]}...x{len(g)}" for g in GARBAGE])
def test_symbolic_never_raises_on_garbage(garbage):
    assert is_equiv("18", garbage) is False
    assert is_equiv(garbage, "18") is False


def test_math_verify_timeouts_only_in_main_thread(monkeypatch):
    import utils.data.answers as answers

    seen: list[tuple[str, object]] = []

    def fake_parse(text, parsing_timeout=5):
        seen.append(("parse", parsing_timeout))
        return [text]

    def fake_verify(gold, target, timeout_seconds=5):
        seen.append(("verify", timeout_seconds))
        return gold == target

    monkeypatch.setattr(answers, "parse", fake_parse)
    monkeypatch.setattr(answers, "verify", fake_verify)
    assert is_equiv("main-thread-42", "main-thread-42") is True
    assert seen and all(isinstance(timeout, int) and timeout > 0 for _, timeout in seen)
    seen.clear()
    thread = threading.Thread(target=lambda: is_equiv("worker-thread-42", "worker-thread-42"))
    thread.start()
    thread.join(timeout=30)
    assert seen and all(timeout is None for _, timeout in seen)


def test_symbolic_works_outside_main_thread():
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(is_equiv(r"\frac{1}{2}", "0.5")))
    thread.start()
    thread.join(timeout=30)
    assert results == [True]


# ---------------------------------------------------------------------------
# Reference handling
# ---------------------------------------------------------------------------

MATH_SOLUTION = r"First we try $\boxed{3}$, which fails. Hence the answer is $\boxed{\frac{5}{2}}$."


def test_gsm8k_reference_is_the_answer_as_is():
    for match_fn_type in MATCH_FNS:
        assert reference_answer(" 18\n", "gsm8k", match_fn_type) == " 18\n"
    assert grade(respond("18"), " 18\n", "gsm8k", "strict") is False
    assert grade(respond("18"), " 18\n", "gsm8k") is True


def test_math_reference_is_last_box_of_solution():
    assert reference_answer(MATH_SOLUTION, "math") == r"\frac{5}{2}"
    assert grade(respond("2.5"), MATH_SOLUTION, "math") is True
    assert grade(respond("3"), MATH_SOLUTION, "math") is False


# MATH: the gold answer is the last box of the solution (rows from MATH500 and MATH train).
# (solution, prediction, expected), graded with dataset_type "math" by both matchers.
MATH_POLAR = r"Therefore, the polar coordinates are $\boxed{\left( 3, \frac{\pi}{2} \right)}.$"
MATH_EMPTY = r"Therefore there are $\boxed{}$ primes in that range."
MATH_TABLE = [
    (MATH_POLAR, r"\left( 3, \frac{\pi}{2} \right)", True),
    (MATH_POLAR, r"(3, \pi)", False),
    (r"The center is $\boxed{(3, -1)}$.", "(3, -1)", True),
    (r"We get $\boxed{[0,3)}$.", "[0,3)", True),
    (r"We get $\boxed{[0,3)}$.", "[0,3]", False),
    (MATH_EMPTY, "", False),
    (MATH_EMPTY, "0", False),
]


@pytest.mark.parametrize("match_fn_type", ["symbolic", "strict", "symbolic_normalized"])
@pytest.mark.parametrize("solution, prediction, expected", MATH_TABLE, ids=_ids(MATH_TABLE))
def test_math_table(solution, prediction, expected, match_fn_type):
    assert grade(respond(prediction), solution, "math", match_fn_type) is expected
    assert pass_at_k([respond(prediction)] * 2, solution, "math", match_fn_type) is expected
    assert majority_vote([respond(prediction)] * 2, solution, "math", match_fn_type) is expected


def test_math_reference_uses_the_matchers_extractor():
    for solution in (r"So it is $\fbox{7}$.", r"So it is $\boxed 7$.", r"So it is $\boxed{ 7 }$."):
        assert reference_answer(solution, "math", "symbolic_normalized") == "7"
    assert reference_answer(r"So it is $\fbox{7}$.", "math") == ""
    assert reference_answer(r"So it is $\boxed 7$.", "math", "strict") == ""
    assert reference_answer(r"So it is $\boxed{ 7 }$.", "math") == " 7 "


def test_math_reference_without_box_is_empty_and_matches_nothing():
    """As the original: the gold is '' and no response grades correct against it."""
    assert reference_answer("The answer is 7.", "math") == ""
    assert not grade(r"\boxed{7}", "The answer is 7.", "math") and not grade("7", "The answer is 7.", "math")


def test_gsm8k_reference_is_not_box_extracted():
    # A gsm8k reference is taken literally, never searched for a box.
    assert reference_answer(r"\boxed{5}", "gsm8k") == r"\boxed{5}"


# ---------------------------------------------------------------------------
# Unknown names
# ---------------------------------------------------------------------------


def test_registries():
    assert sorted(MATCH_FNS) == ["strict", "symbolic", "symbolic_normalized"]
    assert MATCH_FNS["symbolic"].extract is MATCH_FNS["strict"].extract is extract_boxed
    assert MATCH_FNS["symbolic_normalized"].extract is extract_boxed_tolerant
    assert sorted(DATASET_TYPES) == ["gsm8k", "math"]


@pytest.mark.parametrize(
    "call",
    [
        lambda: is_equiv("1", "1", "fuzzy"),
        lambda: grade(respond("1"), "1", "gsm8k", "fuzzy"),
        lambda: grade("no box", "1", "gsm8k", "fuzzy"),
        lambda: majority_vote(["no box"], "1", "gsm8k", "fuzzy"),
        lambda: pass_at_k([], "1", "gsm8k", "fuzzy"),
        lambda: process_sample(r"\boxed{1}", "fuzzy"),
        lambda: reference_answer("1", "gsm8k", "fuzzy"),
    ],
    ids=["is_equiv", "grade", "grade-no-box", "majority_vote", "pass_at_k", "process_sample", "reference_answer"],
)
def test_unknown_match_fn_type(call):
    with pytest.raises(ValueError, match=r"unknown match_fn_type 'fuzzy'; valid values: strict, symbolic, symbolic_normalized"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: reference_answer("1", "aime"),
        lambda: grade(respond("1"), "1", "aime"),
        lambda: grade("no box", "1", "aime"),
        lambda: majority_vote(["no box"], "1", "aime"),
        lambda: pass_at_k([], "1", "aime"),
    ],
    ids=["reference_answer", "grade", "grade-no-box", "majority_vote", "pass_at_k"],
)
def test_unknown_dataset_type(call):
    with pytest.raises(ValueError, match=r"unknown dataset_type 'aime'; valid values: gsm8k, math"):
        call()


# ---------------------------------------------------------------------------
# maj@k and pass@k
# ---------------------------------------------------------------------------


def test_majority_clear_right():
    assert majority_vote([respond("18"), respond("17"), respond("18")], "18", "gsm8k") is True


def test_majority_clear_wrong():
    assert majority_vote([respond("17"), respond("18"), respond("17")], "18", "gsm8k") is False


def test_majority_merges_equivalent_answers():
    responses = [respond("0.5"), respond(r"\frac{1}{2}"), respond(r"\dfrac{2}{4}"), respond("3"), respond("3")]
    assert majority_vote(responses, r"\frac{1}{2}", "gsm8k") is True
    # Under strict matching the three spellings are three classes and "3" wins.
    assert majority_vote(responses, r"\frac{1}{2}", "gsm8k", "strict") is False


def test_majority_unboxed_responses_are_singleton_empty_classes():
    # As the original: no box gives '', which joins no class (not even another '').
    responses = ["I think 17.", respond("18"), "Probably 17.", respond("18.0"), r"\boxed{}"]
    assert process_sample(responses[0]) == "" and process_sample(responses[4]) == ""
    assert equivalence_partition([process_sample(r) for r in responses]) == [[""], ["18", "18.0"], [""], [""]]
    assert majority_vote(responses, "18", "gsm8k") is True
    # One boxed answer against one unboxed response is a tie the rng decides.
    tied = ["I think 18.", respond("18")]
    assert {majority_vote(tied, "18", "gsm8k", rng=random.Random(s)) for s in range(32)} == {True, False}
    assert majority_vote(tied, "18", "gsm8k", strict_tie_breaking=True) is False


def test_majority_all_unboxed_is_false():
    assert majority_vote(["18", "The answer is 18.", r"\boxed{18"], "18", "gsm8k") is False
    assert majority_vote([], "18", "gsm8k") is False


def test_majority_tie_is_broken_by_rng_deterministically():
    responses = [respond("17"), respond("18")]
    outcomes = [majority_vote(responses, "18", "gsm8k", rng=random.Random(seed)) for seed in range(32)]
    again = [majority_vote(responses, "18", "gsm8k", rng=random.Random(seed)) for seed in range(32)]
    assert outcomes == again
    assert set(outcomes) == {True, False}  # the rng really decides
    default = majority_vote(responses, "18", "gsm8k")
    assert default is majority_vote(responses, "18", "gsm8k")
    assert default is majority_vote(responses, "18", "gsm8k", rng=random.Random(0))


def test_majority_tie_only_among_largest_classes():
    # 18 has two votes, 17 and 16 one each: no tie, the rng must not matter.
    responses = [respond("17"), respond("18"), respond("16"), respond("18.0")]
    assert all(majority_vote(responses, "18", "gsm8k", rng=random.Random(s)) for s in range(16))


def test_partition_relation_is_gold_new_target_representative():
    # relation(rep, new) = verify(gold=new, target=rep): x<2 joins (-inf,2), not the reverse.
    assert equivalence_partition([r"(-\infty,2)", "x<2", "x<2"]) == [[r"(-\infty,2)", "x<2", "x<2"]]
    assert equivalence_partition(["x<2", "x<2", r"(-\infty,2)"]) == [["x<2", "x<2"], [r"(-\infty,2)"]]
    assert equivalence_partition(["72", "72.0", "70", "72"], "strict") == [["72", "72"], ["72.0"], ["70"]]
    assert equivalence_partition([]) == []
    with pytest.raises(ValueError, match="unknown match_fn_type"):
        equivalence_partition(["1"], "fuzzy")
    # The winner's representative is graded: (-inf,2) wins and is right, x<2 wins and is wrong.
    gold = r"(-\infty,2)"
    assert majority_vote([respond(gold), respond("x<2"), respond("x<2")], gold, "gsm8k") is True
    assert majority_vote([respond("x<2"), respond("x<2"), respond(gold)], gold, "gsm8k") is False


def test_strict_tie_breaking():
    responses = [respond("18"), respond("17")]
    assert majority_vote(responses, "18", "gsm8k", strict_tie_breaking=True) is False
    assert majority_vote(responses + [respond("18")], "18", "gsm8k", strict_tie_breaking=True) is True


def test_majority_with_math_reference():
    responses = [respond("2.5"), respond(r"\frac{5}{2}"), respond("3")]
    assert majority_vote(responses, MATH_SOLUTION, "math") is True


def test_pass_at_k():
    assert pass_at_k([respond("17"), "no box", respond("18")], "18", "gsm8k") is True
    assert pass_at_k([respond("17"), "18", respond("16")], "18", "gsm8k") is False
    assert pass_at_k([], "18", "gsm8k") is False
    assert pass_at_k([respond("2.5")], MATH_SOLUTION, "math") is True
    assert pass_at_k([respond("2.5")], "2.50", "gsm8k", "strict") is False


# ---------------------------------------------------------------------------
# MATH500: every solution grades correct against itself
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math500() -> list[dict]:
    if not MATH500_PATH.is_file():
        pytest.skip(f"MATH500 not found at {MATH500_PATH}")
    with MATH500_PATH.open(encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    assert len(records) == 500
    return records


def test_math500_reference_answer_matches_answer_field(math500):
    failures = [
        (i, record["answer"], reference_answer(record["solution"], "math"))
        for i, record in enumerate(math500)
        if reference_answer(record["solution"], "math") != record["answer"]
    ]
    assert failures == []


def test_math500_solutions_grade_correct_against_themselves(math500):
    failures = [
        (i, record["answer"])
        for i, record in enumerate(math500)
        if not grade(record["solution"], record["solution"], "math")
    ]
    assert failures == []


def test_math500_answer_field_grades_correct(math500):
    failures = [
        (i, record["answer"])
        for i, record in enumerate(math500)
        if not grade(respond(record["answer"]), record["solution"], "math")
    ]
    assert failures == []
