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


def batch_seed(seed: int, repeat: int, first_index: int) -> int:
    """Seed of one batch of collection/evaluation: the repeat's seed, offset by the batch's
    first problem index so that a batch comes out the same when it is run alone (resumed
    or in another shard)."""
    return repeat_seed(seed, repeat) + 1_000_003 * first_index
