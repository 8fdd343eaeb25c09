"""Training data of the classifier: examples, targets, batches, rounds merged by problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.classifier import ClassifierSpec
from utils.data.problems import COLLECTED_FIELDS, resolve_range
from utils.training.examples import TokenBudgetBatchSampler, build_examples, collate, merge_rounds, split_examples
from utils.training.targets import reward_targets

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


def test_max_length_boundary_keeps_a_sequence_of_exactly_max_length():
    rec = record("p", [PROMPT + [20, 21], PROMPT + [20, 21, 22]], [[30], []], [True, True])  # 7 tokens, 7 tokens
    examples = build_examples([rec], [np.array([1.0, 1.0])], use_all_ref_tokens=True, max_length=7)
    assert [e.input_ids for e in examples] == [PROMPT + [20, 21, 30], PROMPT + [20, 21, 22]]
    assert collate(examples, 0)["loss_mask"].sum(-1).tolist() == [2, 1]
    partial_of_max_length = build_examples([rec], [np.array([1.0, 1.0])], use_all_ref_tokens=True, max_length=6)
    assert [e.input_ids for e in partial_of_max_length] == [PROMPT + [20, 21]]  # truncated; 7-token partial dropped


@pytest.mark.parametrize(
    "inference_mode,loss_type,shift,scale,eta,cd_baseline,expected",
    [
        ("bernoulli", "bce", 0.0, 1.0, 1.0, False, [0.0, 1.0]),
        ("bernoulli", "mse", 0.0, 0.5, 1.0, False, [0.0, 1.0]),  # scale_reward is unused
        ("expectation", "mse", 1.0, 1.0, 2.0, False, [np.exp(-2.0), 1.0]),  # R = correctness - shift
        ("expectation", "bce", 1.0, 3.0, 10.0, False, [np.exp(-10.0), 1.0]),
        ("expectation", "bce", 0.0, 1.0, 10.0, True, [0.0, 1.0]),  # cd_baseline trains on R itself
        ("bernoulli", "mle", -1.0, 2.0, 1.0, False, [1.0, 2.0]),
    ],
)
def test_reward_targets(inference_mode, loss_type, shift, scale, eta, cd_baseline, expected):
    spec = ClassifierSpec("V", loss_type, num_atoms=5, V_min=0.0, V_max=2.0)
    targets = reward_targets(np.array([0.0, 1.0]), inference_mode, eta, shift, scale, spec, cd_baseline=cd_baseline)
    np.testing.assert_allclose(targets, expected)


@pytest.mark.parametrize(
    "inference_mode,loss_type,shift,eta,cd_baseline,message",
    [
        ("expectation", "bce", 0.0, 1.0, False, r"exp\(eta \* R\) span \[1, 2.71828\], outside \[0, 1\]"),
        ("bernoulli", "bce", 1.0, 1.0, False, r"R span \[-1, 0\], outside \[0, 1\]"),
        ("expectation", "bce", 1.0, 1.0, True, r"R span \[-1, 0\], outside \[0, 1\].*cd_baseline 1"),
        ("bernoulli", "mle", 1.0, 1.0, False, r"outside \[0, 1\] required by --loss_type mle"),
    ],
)
def test_reward_targets_out_of_range_is_a_clear_error(inference_mode, loss_type, shift, eta, cd_baseline, message):
    spec = ClassifierSpec("V", loss_type)
    with pytest.raises(ValueError, match=message):
        reward_targets(np.array([0.0, 1.0]), inference_mode, eta, shift, 1.0, spec, cd_baseline=cd_baseline)


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


def test_token_budget_batches_are_capped_at_max_rows():
    lengths = [2] * 10  # the budget alone would put 8 in a batch
    assert [len(b) for b in TokenBudgetBatchSampler(lengths, max_tokens=16, seed=0)] == [8, 2]
    capped = list(TokenBudgetBatchSampler(lengths, max_tokens=16, seed=0, max_rows=3))
    assert [len(b) for b in capped] == [3, 3, 3, 1]
    assert sorted(i for b in capped for i in b) == list(range(10))


@pytest.mark.parametrize("n,ratio,held", [(20, 0.1, 2), (10, 0.1, 1), (3, 0.3, 1), (19, 0.1, 2), (1, 0.1, 1), (9, 0.0, 0)])
def test_split_examples(n, ratio, held):
    """The original holds out n - int(n * (1 - ratio)) examples (about ceil(ratio * n))."""
    kept, held_out = split_examples(n, ratio, seed=47)
    assert len(held_out) == held and len(kept) == n - held and set(kept) | set(held_out) == set(range(n))
    assert split_examples(n, ratio, seed=47)[1].tolist() == held_out.tolist()


@pytest.mark.parametrize(
    "start,end,message",
    [(-1, 5, "--start_index -1 is out of range"), (10, -1, "out of range"), (3, 3, "--end_index 3"), (0, 11, "--end_index 11")],
)
def test_resolve_range_errors(start, end, message):
    with pytest.raises(ValueError, match=message):
        resolve_range(start, end, 10)
    assert list(resolve_range(2, -1, 5)) == [2, 3, 4]


# ----------------------------------------------------------------------------- train_classifier's data pieces


def train_args(tmp_path, records, splits, *extra):
    import train_classifier

    data = tmp_path / "all_train_data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    split_map = tmp_path / "split.json"
    split_map.write_text(json.dumps({r["problem"]: {"split": s, "id": i} for i, (r, s) in enumerate(zip(records, splits))}))
    return train_classifier.parse_args([
        "--original_problems_path", str(data), "--train_eval_save_path", str(split_map), "--init_mode", "zero",
        "--inference_mode", "bernoulli", "--dataset_type", "gsm8k", "--data_paths", str(data), "--drop_no_variation", "0",
        "--id_eval_ratio", "0", *extra])


def test_ood_set_labels_every_rollout_token_whatever_use_all_ref_tokens(tmp_path):
    import train_classifier

    records = [record("a", [PROMPT + [20, 21]], [[30, 31]], [True]), record("b", [PROMPT + [22, 23]], [[32, 33]], [False])]
    args = train_args(tmp_path, records, ["train", "eval"], "--use_all_ref_tokens", "0")
    train, _, ood = train_classifier.prepare_data(args, ClassifierSpec("V", "bce"), log=lambda *a: None)
    assert [e.input_ids for e in train] == [PROMPT + [20, 21]]  # the cut token only
    assert [e.input_ids for e in ood] == [PROMPT + [22, 23, 32, 33]]  # cut token and the roll-out


def test_prepare_data_targets_follow_the_original_recipe(tmp_path):
    import train_classifier

    records = [record("a", [PROMPT + [20], PROMPT + [21]], [[], []], [False, True])]
    args = train_args(tmp_path, records, ["train"], "--inference_mode", "expectation", "--shift_reward", "1", "--eta", "2",
                      "--scale_reward", "5")
    train, _, _ = train_classifier.prepare_data(args, ClassifierSpec("V", "bce"), log=lambda *a: None)
    np.testing.assert_allclose([e.target for e in train], [np.exp(-2.0), 1.0])
    args = train_args(tmp_path, records, ["train"], "--inference_mode", "expectation", "--cd_baseline", "1")
    train, _, _ = train_classifier.prepare_data(args, ClassifierSpec("V", "bce"), log=lambda *a: None)
    assert [e.target for e in train] == [0.0, 1.0]


@pytest.mark.parametrize(
    "n,batch_size,world_size,sizes",
    [(27, 2, 1, [2] * 13), (28, 2, 1, [2] * 14), (3, 4, 1, [3]), (4, 4, 1, [4]), (7, 4, 2, [4, 3]), (9, 4, 2, [4, 4])],
)
def test_train_loader_drops_the_last_partial_batch(tmp_path, n, batch_size, world_size, sizes):
    """As the original: 27 examples in batches of 2 give 13 steps, not 14; examples that do not fill
    one batch per process are all kept (the original would train no step)."""
    import train_classifier

    args = train_args(tmp_path, [record("a", [PROMPT], [[]], [True])], ["train"], "--batch_size", str(batch_size),
                      "--world_size", str(world_size))
    loader = train_classifier.make_train_loader(args, list(range(n)), lambda batch: batch)
    batches = list(loader)
    assert [len(b) for b in batches] == sizes and len(loader) == len(sizes)
    assert len(set(i for b in batches for i in b)) == sum(sizes)


def test_token_budget_train_loader_is_capped_at_batch_size(tmp_path):
    from types import SimpleNamespace

    import train_classifier

    args = train_args(tmp_path, [record("a", [PROMPT], [[]], [True])], ["train"], "--batch_size", "3",
                      "--max_batch_num_tokens", "64")
    examples = [SimpleNamespace(index=i, input_ids=[0] * 4) for i in range(10)]  # the budget alone: 10 rows of 4
    batches = list(train_classifier.make_train_loader(args, examples, lambda batch: [e.index for e in batch]))
    assert [len(b) for b in batches] == [3, 3, 3, 1]  # a partial token-budget batch is kept


def test_mle_head_with_bernoulli_logs_accuracy_and_roc_auc(tmp_path, tiny_dir, capsys):
    """The original logs Eval Accuracy / ROC-AUC with --inference_mode bernoulli for an mle head too."""
    import train_classifier

    records = [record(f"p{i}", [PROMPT + [20 + i, 21], PROMPT + [22, 23 + i]], [[30], [31]], [True, False]) for i in range(4)]
    models = tiny_dir()
    args = train_args(tmp_path, records, ["train", "train", "eval", "eval"], "--loss_type", "mle", "--batch_size", "2",
                      "--num_epochs", "1", "--dtype", "float32", "--ref_model_id", str(models / "ref"),
                      "--classifier_model_id", str(models / "classifier"), "--output_dir", str(tmp_path / "out"))
    capsys.readouterr()
    train_classifier.main(args)
    evals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ") and "Eval Loss" in line]
    assert evals and all("OOD Eval Accuracy" in line and "OOD Eval ROC-AUC" in line for line in evals)
