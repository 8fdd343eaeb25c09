"""The classifier's regression targets from 0/1 correctness, as the original computes them."""

from __future__ import annotations

import numpy as np

from utils.classifier import ClassifierSpec


def reward_targets(
    correctness: np.ndarray,
    inference_mode: str,
    eta: float,
    shift_reward: float,
    scale_reward: float,
    spec: ClassifierSpec,
    cd_baseline: bool = False,
) -> np.ndarray:
    """Regression targets from 0/1 correctness, as the original computes them.

    The reward is ``R = correctness - shift_reward`` (the shift is subtracted); the target
    is ``exp(eta * R)`` with ``--inference_mode expectation`` and ``--cd_baseline 0``, else R
    itself (also expectation with cd_baseline). ``scale_reward`` is accepted and ignored,
    as in the original, which parses ``--scale_reward`` but never uses it. bce/mse targets
    must lie in [0, 1] and mle targets in [V_min, V_max] (the original asserts [0, 1]);
    anything else is a configuration error (ValueError).
    """
    del scale_reward  # unused, as in the original
    reward = correctness.astype(np.float64) - shift_reward
    exponentiate = inference_mode == "expectation" and not cd_baseline
    target = np.exp(eta * reward) if exponentiate else reward
    low, high = (spec.V_min, spec.V_max) if spec.loss_type == "mle" else (0.0, 1.0)
    if target.size and (target.min() < low - 1e-9 or target.max() > high + 1e-9):
        what = "exp(eta * R)" if exponentiate else "R"
        raise ValueError(
            f"targets {what} span [{target.min():g}, {target.max():g}], outside [{low:g}, {high:g}] required by "
            f"--loss_type {spec.loss_type} (R = correctness - {shift_reward:g}, eta {eta:g}, inference_mode "
            f"{inference_mode}, cd_baseline {int(bool(cd_baseline))}); the recipes: expectation with --shift_reward 1 (targets exp(-eta) and 1), "
            "bernoulli or expectation with --cd_baseline 1 with --shift_reward 0"
        )
    return target
