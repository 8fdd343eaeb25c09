"""Tests for utils/metrics.py against naive loop-based references written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.metrics import (
    binary_accuracy,
    eval_metrics,
    explained_variance,
    r2_score,
    roc_auc,
    to_numpy,
)

# ---------------------------------------------------------------- naive references


def naive_mean(xs):
    return sum(xs) / len(xs)


def naive_var(xs):
    m = naive_mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def naive_explained_variance(pred, target):
    residual = [t - p for p, t in zip(pred, target)]
    return 1.0 - naive_var(residual) / naive_var(target)


def naive_r2(pred, target):
    m = naive_mean(target)
    ss_res = sum((t - p) ** 2 for p, t in zip(pred, target))
    ss_tot = sum((t - m) ** 2 for t in target)
    return 1.0 - ss_res / ss_tot


def naive_accuracy(pred, target, threshold=0.5):
    hits = 0
    for p, t in zip(pred, target):
        if (p > threshold) == (t > threshold):  # strictly greater, as the original
            hits += 1
    return hits / len(pred)


def naive_auc(pred, target):
    """P(positive scores higher than negative) over all pairs, ties counting 1/2."""
    positives = [p for p, t in zip(pred, target) if t >= 0.5]
    negatives = [p for p, t in zip(pred, target) if t < 0.5]
    total = 0.0
    for sp in positives:
        for sn in negatives:
            if sp > sn:
                total += 1.0
            elif sp == sn:
                total += 0.5
    return total / (len(positives) * len(negatives))


# ---------------------------------------------------------------- data

HAND_CASES = [
    # (pred, target)
    ([0.1, 0.4, 0.35, 0.8], [0.0, 0.0, 1.0, 1.0]),
    ([0.9, 0.2, 0.6, 0.6, 0.3, 0.7], [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
    ([0.5, 0.5, 0.5, 0.1, 0.9], [1.0, 0.0, 1.0, 0.0, 1.0]),  # tied scores across classes
    ([0.7, 0.1, 0.6, 0.3, 0.2], [0.0, 1.0, 0.0, 1.0, 1.0]),  # worse than chance
    ([0.25, 0.75, 0.5, 1.0, 0.0, 0.5, 0.5], [0.3, 0.6, 0.5, 0.9, 0.1, 0.4, 0.8]),  # soft targets
]


def random_case(seed=0, n=200):
    """Scores on a coarse grid (many ties) correlated with binary labels, and soft targets."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    scores = np.clip(np.round((0.3 * labels + rng.random(n) * 0.7) * 10) / 10, 0.0, 1.0)
    soft = np.clip(labels * 0.6 + rng.random(n) * 0.4, 0.0, 1.0)
    return scores, labels, soft


def all_cases():
    scores, labels, soft = random_case()
    return HAND_CASES + [(scores.tolist(), labels.tolist()), (scores.tolist(), soft.tolist())]


CASE_IDS = [f"hand{i}" for i in range(len(HAND_CASES))] + ["random_binary", "random_soft"]


def test_random_case_has_ties_and_both_classes():
    scores, labels, _ = random_case()
    assert len(np.unique(scores)) < len(scores) // 5
    assert 0 < labels.sum() < len(labels)


# ---------------------------------------------------------------- values vs references


@pytest.mark.parametrize("pred,target", all_cases(), ids=CASE_IDS)
def test_explained_variance_matches_reference(pred, target):
    assert explained_variance(pred, target) == pytest.approx(naive_explained_variance(pred, target), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("pred,target", all_cases(), ids=CASE_IDS)
def test_r2_matches_reference(pred, target):
    assert r2_score(pred, target) == pytest.approx(naive_r2(pred, target), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("pred,target", all_cases(), ids=CASE_IDS)
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_accuracy_matches_reference(pred, target, threshold):
    assert binary_accuracy(pred, target, threshold=threshold) == pytest.approx(naive_accuracy(pred, target, threshold))


@pytest.mark.parametrize("pred,target", all_cases(), ids=CASE_IDS)
def test_roc_auc_matches_pairwise_reference(pred, target):
    assert roc_auc(pred, target) == pytest.approx(naive_auc(pred, target), rel=1e-12, abs=1e-12)


def test_hand_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5, 0.1, 0.9], [1, 0, 1, 0, 1]) == pytest.approx(5 / 6)
    assert binary_accuracy([0.2, 0.5, 0.49, 0.9], [0, 1, 1, 0]) == pytest.approx(0.25)  # 0.5 is not > 0.5
    assert binary_accuracy([0.5, 0.51], [0, 1]) == 1.0
    # pred = target + 1: explained variance ignores the bias, R^2 does not.
    target = [0.0, 1.0, 2.0, 3.0]
    pred = [1.0, 2.0, 3.0, 4.0]
    assert explained_variance(pred, target) == pytest.approx(1.0)
    assert r2_score(pred, target) == pytest.approx(1.0 - 4.0 / 5.0)
    assert r2_score(target, target) == 1.0


def test_roc_auc_edge_orders():
    target = [0, 0, 1, 1, 1]
    assert roc_auc([0.1, 0.2, 0.3, 0.4, 0.5], target) == 1.0
    assert roc_auc([0.5, 0.4, 0.3, 0.2, 0.1], target) == 0.0
    assert roc_auc([0.3] * 5, target) == 0.5


def test_roc_auc_invariant_to_monotone_transform():
    scores, labels, _ = random_case(seed=3)
    base = roc_auc(scores, labels)
    assert roc_auc(np.exp(3 * scores) - 7, labels) == pytest.approx(base, rel=1e-12)
    assert roc_auc(-scores, labels) == pytest.approx(1.0 - base, rel=1e-12)


def test_roc_auc_soft_targets_split_at_half():
    pred = [0.1, 0.2, 0.3, 0.4]
    assert roc_auc(pred, [0.49, 0.2, 0.5, 0.9]) == 1.0
    assert roc_auc(pred, [0.5, 0.2, 0.4, 0.9]) == pytest.approx(naive_auc(pred, [1, 0, 0, 1]))


# ---------------------------------------------------------------- nan cases


@pytest.mark.parametrize("fn", [explained_variance, r2_score])
@pytest.mark.parametrize("target", [[0.3] * 5, [1.0] * 3, [0.1]])
def test_constant_target_is_nan(fn, target):
    pred = [0.1 * i for i in range(len(target))]
    assert math.isnan(fn(pred, target))


@pytest.mark.parametrize("target", [[1, 1, 1], [0, 0, 0], [0.2, 0.49, 0.0], [0.5, 0.7, 1.0]])
def test_roc_auc_single_class_is_nan(target):
    assert math.isnan(roc_auc([0.1, 0.5, 0.9], target))


def test_nan_not_returned_when_defined():
    assert not math.isnan(explained_variance([0, 0, 0], [0, 1, 0]))
    assert not math.isnan(r2_score([0, 0, 0], [0, 1, 0]))
    assert not math.isnan(roc_auc([0.4, 0.4], [0, 1]))


# ---------------------------------------------------------------- input types


def as_type(values, kind):
    if kind == "list":
        return list(values)
    if kind == "numpy":
        return np.asarray(values, dtype=np.float32)
    if kind == "torch":
        return torch.tensor(values, dtype=torch.float32)
    if kind == "torch_grad":
        return torch.tensor(values, dtype=torch.float64, requires_grad=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "torch_grad"])
@pytest.mark.parametrize("fn", [explained_variance, r2_score, binary_accuracy, roc_auc])
def test_input_types_agree(fn, kind):
    # Values exactly representable in float32, so every container gives the same answer.
    pred = [0.125, 0.5, 0.25, 0.75, 0.5, 0.875]
    target = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    expected = fn(np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64))
    result = fn(as_type(pred, kind), as_type(target, kind))
    assert isinstance(result, float)
    torch.testing.assert_close(result, expected)


def test_mixed_input_types_and_int_labels():
    pred = torch.tensor([0.2, 0.8, 0.6, 0.4])
    target = np.array([0, 1, 1, 0])
    assert roc_auc(pred, target) == 1.0
    assert binary_accuracy(pred.tolist(), torch.tensor([0, 1, 1, 0])) == 1.0


def test_to_numpy_converts_to_float64():
    for values in ([1, 2], np.array([1, 2], dtype=np.int32), torch.tensor([1.0, 2.0], dtype=torch.bfloat16)):
        array = to_numpy(values)
        assert isinstance(array, np.ndarray) and array.dtype == np.float64
        np.testing.assert_array_equal(array, [1.0, 2.0])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        r2_score([0.1, 0.2, 0.3], [0.0, 1.0])


# ---------------------------------------------------------------- eval_metrics

BASE_KEYS = [
    "Eval Loss",
    "Eval Explained Variance",
    "Eval R^2",
    "Eval Prediction Min",
    "Eval Prediction Max",
    "Eval Prediction Mean",
]
BERNOULLI_KEYS = ["Eval Accuracy", "Eval ROC-AUC"]


@pytest.mark.parametrize("prefix", ["ID ", "OOD "])
@pytest.mark.parametrize("bernoulli", [True, False])
def test_eval_metrics_keys(prefix, bernoulli):
    pred, target = HAND_CASES[1]
    metrics = eval_metrics(torch.tensor(pred), torch.tensor(target), loss=0.6, bernoulli=bernoulli, prefix=prefix)
    names = BASE_KEYS + (BERNOULLI_KEYS if bernoulli else [])
    assert set(metrics) == {prefix + name for name in names}
    assert all(type(value) is float for value in metrics.values())


def test_eval_metrics_values():
    pred, target = HAND_CASES[1]
    metrics = eval_metrics(pred, target, loss=np.float32(0.25), bernoulli=True, prefix="OOD ")
    assert metrics == pytest.approx(
        {
            "OOD Eval Loss": 0.25,
            "OOD Eval Explained Variance": naive_explained_variance(pred, target),
            "OOD Eval R^2": naive_r2(pred, target),
            "OOD Eval Prediction Min": min(pred),
            "OOD Eval Prediction Max": max(pred),
            "OOD Eval Prediction Mean": naive_mean(pred),
            "OOD Eval Accuracy": naive_accuracy(pred, target),
            "OOD Eval ROC-AUC": naive_auc(pred, target),
        },
        rel=1e-10,
    )


def test_eval_metrics_loss_from_tensor_and_nan_passthrough():
    metrics = eval_metrics([0.2, 0.4], [1.0, 1.0], loss=torch.tensor(1.5), bernoulli=True, prefix="ID ")
    assert metrics["ID Eval Loss"] == 1.5
    assert math.isnan(metrics["ID Eval R^2"])
    assert math.isnan(metrics["ID Eval ROC-AUC"])
    assert metrics["ID Eval Accuracy"] == 0.0


# ---------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("empty", [[], np.array([]), torch.tensor([])], ids=["list", "numpy", "torch"])
def test_eval_metrics_empty_raises(empty):
    with pytest.raises(ValueError, match="empty"):
        eval_metrics(empty, empty, loss=0.0, bernoulli=True, prefix="ID ")


@pytest.mark.parametrize("fn", [explained_variance, r2_score, binary_accuracy, roc_auc])
def test_metrics_empty_raise(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
