"""All seeding in one place."""

from __future__ import annotations

import hashlib
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


REQUEST_STAGES = ("roll_in", "cut", "roll_out", "eval")


def request_seed(seed: int, repeat: int, index: int, stage: str) -> int:
    """Seed of one request of the continuous engine: a hash of (seed, repeat, problem index,
    stage), so that a request samples the same tokens whatever batch, shard, process count or
    restart it runs in. ``stage``: ``roll_in``, ``cut`` (the random cut), ``roll_out`` or ``eval``."""
    from utils.registry import choose

    choose("request stage", stage, REQUEST_STAGES)
    digest = hashlib.blake2b(f"{seed}/{repeat}/{index}/{stage}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
