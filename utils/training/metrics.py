"""Evaluation metrics the classifier training script logs for its ID and OOD eval sets.

Every metric takes ``pred`` (the classifier's predicted E[R] at each labelled position)
and ``target`` (the label at that position). Both may be lists, NumPy arrays or torch
tensors (any dtype, any device, with or without grad); they are converted to float64
NumPy arrays, must have the same shape and are flattened. Empty inputs raise
``ValueError``.

- :func:`explained_variance`: ``1 - Var(target - pred) / Var(target)`` (ignores a constant bias).
- :func:`r2_score`: ``1 - SS_res / SS_tot`` (penalises a constant bias).
- :func:`binary_accuracy`: agreement of ``pred > threshold`` and ``target > threshold`` (strict, as the original).
- :func:`roc_auc`: Mann-Whitney U from average ranks (ties count 1/2), targets ``>= 0.5`` positive.
- :func:`eval_metrics`: the dict of ``"<prefix>Eval ..."`` scalars that gets logged.

Undefined metrics (constant target, a single class for ROC-AUC) are ``float("nan")``.

:func:`bootstrap_ci` is the confidence interval ``eval_ckpt.py`` reports with each evaluation
metric: a seeded percentile bootstrap that resamples *problems* (all samples of a problem
stay together), with the statistic ``PROBLEM_MEAN`` (pass@1, maj@k, pass@k: the mean of
per-problem means) or ``SAMPLE_MEAN`` (KL: the mean over every sample of the resampled problems).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # list / tuple / np.ndarray / torch.Tensor of numbers

POSITIVE_THRESHOLD = 0.5


def to_numpy(values: ArrayLike) -> np.ndarray:
    """Convert a list, NumPy array or torch tensor to a float64 NumPy array (shape kept)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(pred, target)``: same shape, non-empty; returns flat float64 arrays."""
    p, t = to_numpy(pred), to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("metrics need at least one (pred, target) pair, got empty inputs")
    return p.reshape(-1), t.reshape(-1)


def _is_constant(values: np.ndarray) -> bool:
    """True when every element equals the first (exact test, immune to rounding in ``var``)."""
    return bool(np.all(values == values[0]))


def explained_variance(pred: ArrayLike, target: ArrayLike) -> float:
    """``1 - Var(target - pred) / Var(target)`` (population variances); nan for a constant target."""
    p, t = _pair(pred, target)
    if _is_constant(t):
        return float("nan")
    return float(1.0 - np.var(t - p) / np.var(t))


def r2_score(pred: ArrayLike, target: ArrayLike) -> float:
    """Coefficient of determination ``1 - sum((t - p)^2) / sum((t - mean(t))^2)``; nan for a constant target."""
    p, t = _pair(pred, target)
    if _is_constant(t):
        return float("nan")
    ss_res = np.sum((t - p) ** 2)
    ss_tot = np.sum((t - t.mean()) ** 2)
    return float(1.0 - ss_res / ss_tot)


def binary_accuracy(pred: ArrayLike, target: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of positions where ``pred > threshold`` agrees with ``target > threshold``.

    Strictly greater, as the original (a prediction of exactly 0.5 counts as 0)."""
    p, t = _pair(pred, target)
    return float(np.mean((p > threshold) == (t > threshold)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they occupy."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts).astype(np.float64)  # rank of the last member of each tie group
    group_rank = last_rank - (counts - 1) / 2.0  # mean of (last - count + 1) .. last
    return group_rank[inverse.reshape(-1)]


def roc_auc(pred: ArrayLike, target: ArrayLike) -> float:
    """ROC-AUC of scores ``pred`` for binary labels ``target >= 0.5``; nan with only one class.

    Equals P(score of a random positive > score of a random negative), ties counting 1/2,
    computed in O(n log n) as the Mann-Whitney U statistic over average ranks.
    """
    p, t = _pair(pred, target)
    positive = t >= POSITIVE_THRESHOLD
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(p)
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def eval_metrics(pred: ArrayLike, target: ArrayLike, loss: float, bernoulli: bool, prefix: str) -> dict[str, float]:
    """All eval scalars of one eval set, keyed ``f"{prefix}Eval ..."`` (prefix ``"ID "`` or ``"OOD "``).

    Keys: ``Eval Loss``, ``Eval Explained Variance``, ``Eval R^2``, ``Eval Prediction Min``,
    ``Eval Prediction Max``, ``Eval Prediction Mean``; with ``bernoulli`` also
    ``Eval Accuracy`` (pred > 0.5) and ``Eval ROC-AUC`` (training passes ``bernoulli`` for any head, mle too).
    """
    p, t = _pair(pred, target)
    metrics = {
        "Eval Loss": float(loss),
        "Eval Explained Variance": explained_variance(p, t),
        "Eval R^2": r2_score(p, t),
        "Eval Prediction Min": float(p.min()),
        "Eval Prediction Max": float(p.max()),
        "Eval Prediction Mean": float(p.mean()),
    }
    if bernoulli:
        metrics["Eval Accuracy"] = binary_accuracy(p, t)
        metrics["Eval ROC-AUC"] = roc_auc(p, t)
    return {f"{prefix}{name}": value for name, value in metrics.items()}


# ---------------------------------------------------------------- bootstrap over problems

PROBLEM_MEAN = "problem_mean"  # mean over problems of each problem's mean (every problem weighs the same)
SAMPLE_MEAN = "sample_mean"  # mean over all samples of the problems (a problem weighs its sample count)
STATISTICS = (PROBLEM_MEAN, SAMPLE_MEAN)


def _per_problem_arrays(per_problem: Any) -> list[np.ndarray]:
    """``per_problem`` as one flat float64 array per problem; a 1-D input is one value per problem."""
    if isinstance(per_problem, (np.ndarray, torch.Tensor)):
        array = to_numpy(per_problem)
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2:
            raise ValueError(f"per_problem must be 1-D (one value per problem) or 2-D [problems, samples], "
                             f"got shape {array.shape}")
        problems = list(array)
    else:
        problems = [to_numpy(values).reshape(-1) for values in per_problem]
    if not problems:
        raise ValueError("bootstrap_ci needs at least one problem, got none")
    empty = [i for i, values in enumerate(problems) if values.size == 0]
    if empty:
        raise ValueError(f"every problem needs at least one sample; problem(s) {empty[:5]} have none")
    return problems


def bootstrap_ci(
    per_problem: Any,
    statistic: str = PROBLEM_MEAN,
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of a mean over problems.

    ``per_problem`` holds each problem's values: a sequence of per-problem sequences (lists,
    arrays or tensors; lengths may differ), a 2-D array or tensor ``[problems, samples]``, or a
    1-D one (one value per problem, e.g. maj@k correctness). Each of ``num_resamples``
    resamples draws as many problems as there are, with replacement, keeping all samples of a
    drawn problem together (row ``r`` of the indices is ``rng.integers(0, P, size=P)``, the
    ``r``-th such draw of ``rng = np.random.default_rng(seed)``), and computes ``statistic``:

    - ``PROBLEM_MEAN`` (``"problem_mean"``): the mean of the drawn problems' means (pass@1);
    - ``SAMPLE_MEAN`` (``"sample_mean"``): the mean of every sample of the drawn problems (KL);
      the two coincide when every problem has the same number of samples.

    The interval holds the central ``level`` of the resampled statistics (``np.quantile``'s
    linear interpolation at ``(1 - level) / 2`` and ``(1 + level) / 2``). The same seed and
    problem count give the same resamples, so metrics of one evaluation are resampled jointly.
    A single problem gives the degenerate interval ``(x, x)``. NaN values make the interval NaN.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if isinstance(num_resamples, bool) or int(num_resamples) != num_resamples or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    problems = _per_problem_arrays(per_problem)
    num_problems = len(problems)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, num_problems, size=(int(num_resamples), num_problems))  # [resamples, problems]
    if statistic == PROBLEM_MEAN:
        means = np.array([values.mean() for values in problems])
        resampled = means[indices].mean(axis=1)
    else:
        sums = np.array([values.sum() for values in problems])
        counts = np.array([values.size for values in problems], dtype=np.float64)
        resampled = sums[indices].sum(axis=1) / counts[indices].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)
