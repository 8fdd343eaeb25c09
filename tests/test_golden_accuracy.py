"""Grading, partition, maj@k and pass@k against the original's values.

``shared/golden/accuracy.json`` (README section 5) was computed by the original
``accuracy_utils.py`` with math_verify 0.7.0. Every value is checked exactly, through the
project's public functions (``utils.data.answers``). The module is skipped when the fixture
is absent.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.helpers.golden import load_fixtures
from utils.data.answers import (
    equivalence_partition,
    grade,
    is_equiv,
    majority_vote,
    pass_at_k,
    process_sample,
    reference_answer,
)

(FIXTURE,) = load_fixtures("accuracy")
CASES = FIXTURE["cases"]
PAIRS = FIXTURE["pairs"]
DATASET_TYPE = {"GSM8K": "gsm8k", "MATH": "math"}


def args(case: dict) -> tuple[str, str, str]:
    """(reference, dataset_type, match_fn_type) of a case, in the project's names."""
    return case["gold"], DATASET_TYPE[case["dataset_type"]], case["match_fn_type"]


class NumpySeed0:
    """``rng.choice`` as the original's ``np.random.choice`` after ``np.random.seed(0)``."""

    def choice(self, seq):
        return seq[np.random.RandomState(0).choice(len(seq))]


def test_fixture_covers_what_is_checked():
    assert len(CASES) == 16 and len(PAIRS) == 11
    assert {case["match_fn_type"] for case in CASES} == {"symbolic", "strict"}
    assert any(not case["majority_vote_deterministic"] for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_case(case):
    reference, dataset_type, match_fn_type = args(case)
    responses = case["responses"]
    assert reference_answer(reference, dataset_type) == case["gold_processed"]
    predictions = [process_sample(response) for response in responses]
    assert predictions == case["processed_predictions"]
    correctness = [is_equiv(case["gold_processed"], p, match_fn_type) for p in predictions]
    assert correctness == case["predictions_correctness"]
    # collection (utils/decoding/rollout.py) grades each response with grade()
    assert [grade(r, reference, dataset_type, match_fn_type) for r in responses] == case["quick_evaluate_single"]
    assert equivalence_partition(predictions, match_fn_type) == case["partition"]
    assert pass_at_k(responses, reference, dataset_type, match_fn_type) is case["pass_at_k"]
    assert majority_vote(
        responses, reference, dataset_type, match_fn_type, strict_tie_breaking=True
    ) is case["majority_vote_correct_strict_ties"]
    assert majority_vote(
        responses, reference, dataset_type, match_fn_type, rng=NumpySeed0()
    ) is case["majority_vote_correct_np_seed0"]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_majority_vote(case):
    reference, dataset_type, match_fn_type = args(case)
    responses = case["responses"]
    outcomes = {
        majority_vote(responses, reference, dataset_type, match_fn_type, rng=random.Random(seed)) for seed in range(16)
    }
    if case["majority_vote_deterministic"]:
        assert outcomes == {case["majority_vote_correct"]}
        return
    # A random tie: the result is the correctness of one of the tied classes.
    classes = case["partition"]
    top = max(len(cls) for cls in classes)
    tied = {is_equiv(case["gold_processed"], cls[0], match_fn_type) for cls in classes if len(cls) == top}
    assert len(classes) > 1 and outcomes <= tied
    assert outcomes == tied  # 16 seeds reach every outcome on these small ties


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{p['answer']}|{p['prediction']}" for p in PAIRS])
def test_pair(pair):
    expected = pair["numeric_or_symbolic_correctness"]
    assert is_equiv(pair["answer"], pair["prediction"]) is expected
    assert is_equiv(pair["answer"], pair["prediction"], "symbolic") is expected
    assert grade(f"so \\boxed{{{pair['prediction']}}}", pair["answer"], "gsm8k") is expected
