"""All seeding in one place."""

from __future__ import annotations

import random

import numpy as np
import torch

REPEAT_SEED_STRIDE = 50


def repeat_seed(seed: int, repeat: int) -> int:
    """Seed of repeat ``repeat`` of a problem, as in the original code: ``seed + 50 * repeat``."""
    return seed + REPEAT_SEED_STRIDE * repeat


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
