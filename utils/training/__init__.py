"""Training the classifier: examples and batches, targets, the resumable training state, metrics."""

from utils.training.targets import reward_targets

__all__ = ["reward_targets"]
