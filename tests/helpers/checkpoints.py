"""The checkpoints of a training run: the worked example of the original's notes (world_size 2,
accumulation 2, 10 batches, ckpt_freq 2; ``test_ckpt_steps.py`` derives it, ``test_accelerate.py``
runs it on 2 processes) and what a test reads from a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch

import train_classifier

# The worked example: checkpoint names after batches 1..10 (the original's) and the optimizer
# steps done by then, here (one after batches 2, 4, ...) and in the original (after 1, 3, ...).
EXAMPLE_NAMES = ["ckpt_2", "ckpt_4", "ckpt_6", "ckpt_8", "ckpt_10", "ckpt_12", "ckpt_14", "ckpt_16", "ckpt_18", "ckpt_20"]
EXAMPLE_STEPS_DONE = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
ORIGINAL_STEPS_DONE = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def optimizer_states_steps(checkpoint: Path) -> int:
    """Optimizer steps done at ``checkpoint`` (AdamW's step count in its ``optimizer.pt``)."""
    state = torch.load(checkpoint / train_classifier.OPTIMIZER_FILE, map_location="cpu", weights_only=False)["state"]
    counts = {int(s["step"]) for s in state.values()}
    assert len(counts) <= 1, counts
    return counts.pop() if counts else 0


def checkpoint_names(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("ckpt_*")), key=lambda name: int(name.split("_")[1]))
