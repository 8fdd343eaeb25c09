"""Tests for utils/training/metrics.py against naive loop-based references written out here."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from utils.training.metrics import (
    PROBLEM_MEAN,
    SAMPLE_MEAN,
    binary_accuracy,
    bootstrap_ci,
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


# ---------------------------------------------------------------- bootstrap_ci


def naive_quantile(values, q):
    """Linear interpolation between the order statistics (numpy's default method)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def naive_bootstrap_ci(per_problem, statistic, num_resamples=1000, seed=0, level=0.95):
    """One resample at a time: draw problems (indices of size P from the same generator), keep
    each drawn problem's samples together, compute the statistic with python sums."""
    rng = np.random.default_rng(seed)
    problems = [[float(x) for x in values] for values in per_problem]
    resampled = []
    for _ in range(num_resamples):
        drawn = [problems[int(i)] for i in rng.integers(0, len(problems), size=len(problems))]
        if statistic == PROBLEM_MEAN:
            resampled.append(naive_mean([naive_mean(values) for values in drawn]))
        else:
            resampled.append(naive_mean([x for values in drawn for x in values]))
    tail = (1.0 - level) / 2.0
    return naive_quantile(resampled, tail), naive_quantile(resampled, 1.0 - tail)


def ragged_problems(seed=0, num_problems=30):
    """Per-problem KL-like values, 1 to 7 samples each (the sample-mean weighting matters)."""
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.0 + p % 3, size=int(rng.integers(1, 8))).tolist() for p in range(num_problems)]


def correctness_problems(seed=0, num_problems=60, num_samples=8):
    """0/1 correctness, each problem with its own difficulty: [problems, samples]."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(num_problems)
    return (rng.random((num_problems, num_samples)) < difficulty[:, None]).astype(np.float64)


@pytest.mark.parametrize("statistic", [PROBLEM_MEAN, SAMPLE_MEAN])
@pytest.mark.parametrize("seed, level, num_resamples", [(0, 0.95, 500), (7, 0.8, 333), (123, 0.99, 50)])
def test_bootstrap_matches_naive_loop(statistic, seed, level, num_resamples):
    for per_problem in (ragged_problems(seed), correctness_problems(seed).tolist()):
        result = bootstrap_ci(per_problem, statistic, num_resamples=num_resamples, seed=seed, level=level)
        expected = naive_bootstrap_ci(per_problem, statistic, num_resamples=num_resamples, seed=seed, level=level)
        assert isinstance(result, tuple) and all(type(bound) is float for bound in result)
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_bootstrap_statistics_weight_problems_differently():
    """Unequal sample counts: the sample mean weighs a problem by its count, the problem mean does not;
    equal counts: the two agree."""
    problems = [[0.0], [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0], [1.0, 3.0], [2.0]]
    torch.testing.assert_close(bootstrap_ci(problems, SAMPLE_MEAN),
                               naive_bootstrap_ci(problems, SAMPLE_MEAN), rtol=1e-12, atol=1e-12)
    assert bootstrap_ci(problems, SAMPLE_MEAN) != bootstrap_ci(problems, PROBLEM_MEAN)
    equal = correctness_problems(1)
    torch.testing.assert_close(bootstrap_ci(equal, SAMPLE_MEAN), bootstrap_ci(equal, PROBLEM_MEAN),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("statistic", [PROBLEM_MEAN, SAMPLE_MEAN])
def test_bootstrap_keeps_samples_of_a_problem_together(statistic):
    # One problem: every resample is that problem, whatever its samples: a degenerate interval.
    assert bootstrap_ci([[0.0, 1.0, 1.0, 0.0, 1.0]], statistic) == (0.6, 0.6)
    # Problems whose samples are all equal: the interval is that of one value per problem
    # (exactly: same draws), wider than treating the 8 samples of each as 8 problems.
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    constant = np.repeat(values[:, None], 8, axis=1)  # [10 problems, 8 samples]
    per_problem = bootstrap_ci(values, statistic, seed=3)
    assert bootstrap_ci(constant, statistic, seed=3) == per_problem
    low, high = per_problem
    sample_low, sample_high = bootstrap_ci(constant.reshape(-1), statistic, seed=3)  # 80 "problems"
    assert high - low > 1.5 * (sample_high - sample_low)


def test_bootstrap_input_types_agree():
    data = correctness_problems(2, num_problems=20, num_samples=4)
    expected = bootstrap_ci(data.tolist(), seed=5)
    for per_problem in (data, data.astype(np.float32), torch.tensor(data), list(torch.tensor(data)),
                        [row.astype(bool) for row in data]):
        assert bootstrap_ci(per_problem, seed=5) == expected
    # 1-D: one value per problem, as a list (of bools) or an array
    wins = data[:, 0]
    assert bootstrap_ci(wins.astype(bool).tolist(), seed=5) == bootstrap_ci(wins[:, None], seed=5)


def test_bootstrap_deterministic_under_seed():
    data = ragged_problems(4)
    for statistic in (PROBLEM_MEAN, SAMPLE_MEAN):
        first = bootstrap_ci(data, statistic, seed=11)
        assert bootstrap_ci(data, statistic, seed=11) == first
        assert bootstrap_ci(data, statistic, seed=12) != first
    assert bootstrap_ci(data) == bootstrap_ci(data, PROBLEM_MEAN, num_resamples=1000, seed=0, level=0.95)


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_interval_contains_point_estimate(seed):
    correctness = correctness_problems(seed, num_problems=100)
    low, high = bootstrap_ci(correctness, PROBLEM_MEAN, seed=seed)
    assert low < correctness.mean(axis=1).mean() < high
    kls = ragged_problems(seed, num_problems=80)
    low, high = bootstrap_ci(kls, SAMPLE_MEAN, seed=seed)
    assert low < np.mean(np.concatenate(kls)) < high
    # a narrower level gives a nested interval
    inner_low, inner_high = bootstrap_ci(kls, SAMPLE_MEAN, seed=seed, level=0.5)
    assert low < inner_low < inner_high < high


@pytest.mark.parametrize("kwargs, message", [
    ({"per_problem": []}, "at least one problem"),
    ({"per_problem": [[0.5], []]}, "at least one sample"),
    ({"per_problem": np.zeros((3, 0))}, "at least one sample"),
    ({"per_problem": np.zeros((2, 2, 2))}, "1-D .* or 2-D"),
    ({"per_problem": [[1.0]], "statistic": "median"}, "statistic must be one of"),
    ({"per_problem": [[1.0]], "level": 1.0}, "level"),
    ({"per_problem": [[1.0]], "num_resamples": 0}, "num_resamples"),
    ({"per_problem": [[1.0]], "num_resamples": 2.5}, "num_resamples"),
])
def test_bootstrap_bad_input_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


def test_bootstrap_nan_propagates():
    assert all(math.isnan(bound) for bound in bootstrap_ci([[0.1, float("nan")], [0.3]], SAMPLE_MEAN))


# ---------------------------------------------------------------- the intervals of eval_ckpt.py's reward stats


def test_eval_aggregate_writes_intervals(tmp_path):
    """``eval_ckpt.aggregate``: each ``*_ci`` is the bootstrap of its point estimate's statistic
    (problem means for pass@1, maj@k, pass@k; all samples for KL), seeded with --seed."""
    import eval_ckpt
    from utils.cli import problem_file_name
    from utils.data.io import read_json, read_jsonl, write_json

    rng = np.random.default_rng(0)
    num_problems, num_samples = 12, 4
    records = [{"problem": f"p{i}", "prompt": f"p{i}", "answer": f"#### {i}"} for i in range(num_problems)]
    sample_dir = tmp_path / "samples"
    for i in range(num_problems):
        for r in range(num_samples):
            guess = i if rng.random() < i / num_problems else i + 1
            write_json(sample_dir / problem_file_name(i, r), {
                "prediction": f"\\boxed{{{guess}}}", "correctness": guess == i, "num_response_tokens": 10,
                "traj_kl": float(rng.gamma(2.0)), "traj_kl_before_top_p": 0.0})
    args = argparse.Namespace(num_samples=num_samples, seed=47, match_fn_type="symbolic", eta=1.0, top_k=20,
                              temperature=0.8, cd_baseline=0, inference_mode="bernoulli")
    stats = eval_ckpt.aggregate(args, records, "gsm8k", list(range(num_problems)), sample_dir, "tag", tmp_path)
    assert read_json(tmp_path / "reward_stats_tag.json") == stats
    assert (stats["ci_level"], stats["ci_resamples"], stats["ci_seed"]) == (0.95, 1000, 47)
    results = read_jsonl(tmp_path / "inference_eval_results_tag.jsonl")
    expected = {
        "single_sample_accuracy": ([r["predictions_correctness"] for r in results], PROBLEM_MEAN),
        "majority_vote_accuracy": ([[r["majority_vote_correct"]] for r in results], PROBLEM_MEAN),
        "pass_k_accuracy": ([[r["pass_at_k"]] for r in results], PROBLEM_MEAN),
        "kl": ([r["traj_kl"] for r in results], SAMPLE_MEAN),
    }
    for name, (per_problem, statistic) in expected.items():
        interval = stats[f"{name}_ci"]
        assert isinstance(interval, list) and len(interval) == 2
        torch.testing.assert_close(tuple(interval), naive_bootstrap_ci(per_problem, statistic, seed=47),
                                   rtol=1e-12, atol=1e-12)
        assert interval[0] <= stats[f"{name}_mean"] <= interval[1]
    for name in expected:  # the data vary: no degenerate interval
        assert 0 < stats[f"{name}_ci"][0] < stats[f"{name}_ci"][1]
