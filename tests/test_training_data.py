"""Training data of the classifier: examples, targets, batches, rounds merged by problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.classifier import ClassifierSpec
from utils.problems import COLLECTED_FIELDS, resolve_range
from utils.training import (
    TokenBudgetBatchSampler,
    build_examples,
    collate,
    merge_rounds,
    reward_targets,
    split_examples,
)

PROMPT = [1, 5, 6, 7]  # prompt ids


def record(problem: str, partials, rollouts, rewards):
    """A combined record with the collected lists (only the fields training reads are meaningful)."""
    n = len(rewards)
    return {
        "problem": problem,
        "fully_guided_predictions": ["x"] * n,
        "fully_guided_predictions_correctness": list(rewards),
        "partial_guided_prompts": ["x"] * n,
        "partial_guided_prompts_tokenized": partials,
        "num_response_tokens_in_partial_guided_prompts": [len(p) - len(PROMPT) for p in partials],
        "partial_guided_responses_tokenized": rollouts,
        "partial_guided_predictions": ["x"] * n,
        "partial_guided_predictions_correctness": list(rewards),
    }


def test_labels_cover_the_cut_token_and_the_rollout():
    rec = record("p", [PROMPT + [20, 21]], [[30, 31, 2]], [True])
    (example,) = build_examples([rec], [np.array([1.0])], use_all_ref_tokens=True)
    assert example.input_ids == PROMPT + [20, 21, 30, 31, 2]
    batch = collate([example], pad_token_id=0)
    # entry t scores token t + 1: labelled tokens are 21 (the cut token), 30, 31, 2
    labelled_tokens = batch["input_ids"][0, 1:][batch["loss_mask"][0].bool()].tolist()
    assert labelled_tokens == [21, 30, 31, 2]
    (only_cut,) = build_examples([rec], [np.array([1.0])], use_all_ref_tokens=False)
    batch = collate([only_cut], pad_token_id=0)
    assert batch["input_ids"][0, 1:][batch["loss_mask"][0].bool()].tolist() == [21]


def test_collate_pads_right_and_fills_targets():
    rec = record("p", [PROMPT + [20], PROMPT + [20, 21, 22]], [[30], []], [True, False])
    examples = build_examples([rec], [np.array([1.0, 0.0])], use_all_ref_tokens=True)
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 7) and batch["loss_mask"].shape == (2, 6)
    assert batch["attention_mask"].sum(-1).tolist() == [6, 7]
    assert batch["loss_mask"].sum(-1).tolist() == [2, 1]
    assert batch["targets"][0].unique().tolist() == [1.0] and batch["targets"][1].unique().tolist() == [0.0]
    assert not (batch["loss_mask"].bool() & ~batch["attention_mask"][:, 1:].bool()).any(), "a pad is labelled"


def test_max_length_truncates_and_drops():
    rec = record("p", [PROMPT + [20], PROMPT + [20, 21, 22, 23]], [[30, 31, 32], []], [True, True])
    examples = build_examples([rec], [np.array([1.0, 1.0])], use_all_ref_tokens=True, max_length=7)
    assert [len(e.input_ids) for e in examples] == [7]  # the second partial alone is 8 > 7 tokens: dropped


@pytest.mark.parametrize(
    "inference_mode,loss_type,shift,scale,eta,expected",
    [
        ("bernoulli", "bce", 0.0, 1.0, 1.0, [0.0, 1.0]),
        ("bernoulli", "mse", 0.5, 0.5, 1.0, [0.5, 1.0]),
        ("expectation", "mse", -1.0, 1.0, 2.0, [np.exp(-2.0), 1.0]),
        ("bernoulli", "mle", 0.0, 2.0, 1.0, [0.0, 2.0]),
    ],
)
def test_reward_targets(inference_mode, loss_type, shift, scale, eta, expected):
    spec = ClassifierSpec("V", loss_type, num_atoms=5, V_min=0.0, V_max=2.0)
    targets = reward_targets(np.array([0.0, 1.0]), inference_mode, eta, shift, scale, spec)
    np.testing.assert_allclose(targets, expected)


@pytest.mark.parametrize(
    "inference_mode,loss_type,shift,eta,message",
    [
        ("expectation", "bce", 0.0, 1.0, r"exp\(eta \* R\) span \[1, 2.71828\], outside \[0, 1\]"),
        ("bernoulli", "bce", 1.0, 1.0, r"R span \[1, 2\], outside \[0, 1\]"),
        ("bernoulli", "mle", -1.0, 1.0, r"outside \[0, 1\] required by --loss_type mle"),
    ],
)
def test_reward_targets_out_of_range_is_a_clear_error(inference_mode, loss_type, shift, eta, message):
    spec = ClassifierSpec("V", loss_type)
    with pytest.raises(ValueError, match=message):
        reward_targets(np.array([0.0, 1.0]), inference_mode, eta, shift, 1.0, spec)


def test_merge_rounds_concatenates_per_problem(tmp_path):
    round1 = [record("a", [PROMPT + [20]], [[]], [True]), record("b", [PROMPT + [21]], [[]], [False])]
    round2 = [record("b", [PROMPT + [22], PROMPT + [23]], [[], []], [True, True])]
    for name, records in (("r1.jsonl", round1), ("r2.jsonl", round2)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in records))
    merged = merge_rounds([tmp_path / "r1.jsonl", tmp_path / "r2.jsonl"])
    assert [m["problem"] for m in merged] == ["a", "b"]
    assert merged[1]["partial_guided_predictions_correctness"] == [False, True, True]
    assert all(len(merged[1][f]) == 3 for f in COLLECTED_FIELDS)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        merge_rounds([tmp_path / "missing.jsonl"])


def test_token_budget_batches_respect_the_budget_and_cover_everything():
    lengths = [5, 40, 12, 7, 33, 18, 3, 60, 25, 9]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=64, seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) * max(lengths[i] for i in b) <= 64 for b in batches)
        assert len(sampler) == len(batches)
    loader = torch.utils.data.DataLoader(list(range(10)), batch_sampler=sampler)  # works with torch's DataLoader
    assert sum(len(batch) for batch in loader) == 10


def test_split_examples():
    kept, held = split_examples(20, 0.1, seed=47)
    assert len(held) == 2 and len(kept) == 18 and set(kept) | set(held) == set(range(20))
    assert split_examples(20, 0.1, seed=47)[1].tolist() == held.tolist()


@pytest.mark.parametrize(
    "start,end,message",
    [(-1, 5, "--start_index -1 is out of range"), (10, -1, "out of range"), (3, 3, "--end_index 3"), (0, 11, "--end_index 11")],
)
def test_resolve_range_errors(start, end, message):
    with pytest.raises(ValueError, match=message):
        resolve_range(start, end, 10)
    assert list(resolve_range(2, -1, 5)) == [2, 3, 4]
