"""Training examples of the classifier: rounds merged by problem, examples, batches, evaluation."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from utils.classifier import ClassifierSpec, per_position_loss
from utils.data.io import read_jsonl
from utils.data.problems import COLLECTED_FIELDS, check_collected


def merge_rounds(paths: list[str | os.PathLike]) -> list[dict]:
    """Problems of several ``all_train_data.jsonl`` files (rounds), lists concatenated per problem.

    Problems keep the order of their first appearance.
    """
    merged: dict[str, dict] = {}
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data_paths: {path} does not exist")
        for line, record in read_jsonl(path, line_numbers=True):
            check_collected(record, f"{path}:{line}")
            if record["problem"] not in merged:
                merged[record["problem"]] = {**record, **{f: list(record[f]) for f in COLLECTED_FIELDS}}
            else:
                for field in COLLECTED_FIELDS:
                    merged[record["problem"]][field].extend(record[field])
    return list(merged.values())


@dataclass
class Example:
    """One (problem, repeat): the sequence, the first labelled value entry, and its target."""

    input_ids: list[int]
    label_start: int  # entry t of the classifier's output scores token t + 1
    target: float


def build_examples(
    records: list[dict], targets_of: list[np.ndarray], use_all_ref_tokens: bool, max_length: int = -1
) -> list[Example]:
    """Examples of every repeat of ``records``.

    Input = roll-in ids without their last token; labelled tokens = that last token, plus
    the roll-out ids with ``use_all_ref_tokens``. ``max_length`` (> 0) truncates the
    sequence; an example whose labelled tokens all fall beyond it (partial prompt longer than
    ``max_length``) is dropped, so a sequence of exactly ``max_length`` tokens is kept whole.
    """
    examples = []
    for record, targets in zip(records, targets_of):
        for partial, rollout, target in zip(
            record["partial_guided_prompts_tokenized"], record["partial_guided_responses_tokenized"], targets
        ):
            sequence = list(partial) + (list(rollout) if use_all_ref_tokens else [])
            if max_length > 0:
                if len(partial) > max_length:
                    continue
                sequence = sequence[:max_length]
            examples.append(Example(sequence, len(partial) - 2, float(target)))
    return examples


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``/``attention_mask`` [B, T], ``loss_mask``/``targets`` [B, T-1]."""
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width - 1), dtype=torch.long)
    targets = torch.zeros((batch, width - 1), dtype=torch.float32)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        loss_mask[row, example.label_start : n - 1] = 1
        targets[row] = example.target
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "targets": targets}


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Batches whose padded size (rows x longest sequence) stays within ``max_tokens`` and,
    with ``max_rows`` (the original's ``--batch_size`` cap), that have at most ``max_rows`` rows.

    Examples are shuffled each epoch (``set_epoch``) and then grouped greedily; a single
    sequence longer than the budget forms a batch of its own.
    """

    def __init__(self, lengths: list[int], max_tokens: int, shuffle: bool = True, seed: int = 0,
                 max_rows: int | None = None):
        self.lengths, self.max_tokens, self.shuffle, self.seed, self.epoch = lengths, max_tokens, shuffle, seed, 0
        self.max_rows = max_rows
        self._batches = self._make()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._batches = self._make()

    def _make(self) -> list[list[int]]:
        order = np.arange(len(self.lengths))
        if self.shuffle:
            order = np.random.RandomState(self.seed + self.epoch).permutation(len(self.lengths))
        batches, current, longest = [], [], 0
        for index in order.tolist():
            longest_if_added = max(longest, self.lengths[index])
            full = self.max_rows is not None and len(current) >= self.max_rows
            if current and (full or longest_if_added * (len(current) + 1) > self.max_tokens):
                batches.append(current)
                current, longest_if_added = [], self.lengths[index]
            current.append(index)
            longest = longest_if_added
        if current:
            batches.append(current)
        return batches

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def split_examples(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): ``n - int(n * (1 - ratio))`` held out at random (the original's
    count; it can exceed ``int(ratio * n)`` by one through float rounding, e.g. n 3, ratio 0.3)."""
    order = np.random.RandomState(seed).permutation(n)
    held = n - int(n * (1 - ratio))
    return np.sort(order[held:]), np.sort(order[:held])


@torch.no_grad()
def predict_dataset(model, loader, spec: ClassifierSpec, device) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss (per-sequence mean over labelled positions, averaged over sequences) and the
    flattened predictions E[R] and targets of every labelled position."""
    was_training = model.training
    model.eval()
    sequence_losses, predictions, targets = [], [], []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(batch["input_ids"], batch["attention_mask"])  # [B, T-1, A]
        mask = batch["loss_mask"].bool()
        losses = per_position_loss(logits, batch["targets"], spec)  # [B, T-1]
        sequence_losses.append(((losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).float().cpu())
        predictions.append(model.predict(logits)[mask].float().cpu())
        targets.append(batch["targets"][mask].float().cpu())
    model.train(was_training)
    loss = float(torch.cat(sequence_losses).mean())
    return loss, torch.cat(predictions).numpy(), torch.cat(targets).numpy()
