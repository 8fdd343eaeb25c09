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
