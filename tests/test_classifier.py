"""The classifier: losses against naive formulas, init modes, checkpoints (own and original layout)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoModelForCausalLM

from utils.classifier import (
    ClassifierSpec,
    QSharpClassifier,
    atom_index,
    expected_reward,
    per_position_loss,
    reduce_loss,
)
from utils.models import tokenize_prompts

# ----------------------------------------------------------------------------- losses

LOGITS = torch.tensor([[[0.3], [-1.2], [2.0]], [[0.0], [4.0], [-0.7]]])  # [2, 3, 1]
TARGETS = torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 1.0]])  # [2, 3]
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])
WEIGHTS = torch.tensor([[2.0, 0.5, 9.0], [9.0, 1.0, 3.0]])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def naive_reduce(losses, mask, weights=None):
    """Mean over each row's masked positions, then over rows that have any."""
    rows = []
    for b in range(len(losses)):
        terms = [losses[b][t] * (1 if weights is None else weights[b][t]) for t in range(len(losses[b])) if mask[b][t]]
        if terms:
            rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


def naive_bce(logit, y):
    p = sigmoid(logit)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def naive_mse(logit, y):
    return (sigmoid(logit) - y) ** 2


@pytest.mark.parametrize("loss_type,naive", [("bce", naive_bce), ("mse", naive_mse)])
@pytest.mark.parametrize("use_weights", [False, True])
def test_scalar_losses_equal_naive_formula(loss_type, naive, use_weights):
    spec = ClassifierSpec("V", loss_type)
    per_pos = per_position_loss(LOGITS, TARGETS, spec)
    expected_per_pos = [[naive(LOGITS[b, t, 0].item(), TARGETS[b, t].item()) for t in range(3)] for b in range(2)]
    torch.testing.assert_close(per_pos, torch.tensor(expected_per_pos))
    weights = WEIGHTS if use_weights else None
    loss = reduce_loss(per_pos, MASK, weights)
    expected = naive_reduce(expected_per_pos, MASK.tolist(), None if weights is None else weights.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mle_loss_is_negative_log_prob_of_nearest_atom():
    spec = ClassifierSpec("V", "mle", num_atoms=5, V_min=0.0, V_max=1.0)  # atoms 0, .25, .5, .75, 1
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0.0, 0.3, 1.0], [0.62, 0.74, 0.1]])
    nearest = [[0, 1, 4], [2, 3, 0]]
    assert atom_index(targets, spec).tolist() == nearest
    per_pos = per_position_loss(logits, targets, spec)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            assert per_pos[b, t].item() == pytest.approx(log_z - row[nearest[b][t]], rel=1e-5)
    loss = reduce_loss(per_pos, MASK)
    assert loss.item() == pytest.approx(naive_reduce(per_pos.tolist(), MASK.tolist()), rel=1e-6)


def test_masked_positions_do_not_matter_and_empty_rows_are_skipped():
    spec = ClassifierSpec("V", "bce")
    logits = LOGITS.clone()
    base = reduce_loss(per_position_loss(logits, TARGETS, spec), MASK)
    logits[0, 2, 0] = 50.0  # masked position: any value
    logits[1, 0, 0] = -50.0
    assert reduce_loss(per_position_loss(logits, TARGETS, spec), MASK).item() == pytest.approx(base.item())
    mask = MASK.clone()
    mask[1] = 0  # a row without targets does not count in the batch mean
    per_pos = per_position_loss(LOGITS, TARGETS, spec)
    assert reduce_loss(per_pos, mask).item() == pytest.approx((per_pos[0, 0] + per_pos[0, 1]).item() / 2)


def test_per_example_weights_scale_each_example_and_weight_0_still_counts():
    spec = ClassifierSpec("V", "bce")
    per_pos = per_position_loss(LOGITS, TARGETS, spec)
    weights = torch.tensor([2.0, 0.0])
    row = [(per_pos[b] * MASK[b]).sum().item() / MASK[b].sum().item() for b in range(2)]
    assert reduce_loss(per_pos, MASK, weights).item() == pytest.approx((2.0 * row[0] + 0.0 * row[1]) / 2)  # mean over 2
    torch.testing.assert_close(reduce_loss(per_pos, MASK, weights), reduce_loss(per_pos, MASK, weights[:, None].expand(2, 3)))


def test_expected_reward():
    scalar = ClassifierSpec("V", "bce")
    torch.testing.assert_close(expected_reward(torch.tensor([[0.0], [2.0]]), scalar), torch.sigmoid(torch.tensor([0.0, 2.0])))
    dist = ClassifierSpec("V", "mle", num_atoms=3, V_min=-1.0, V_max=1.0)
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    assert expected_reward(logits, dist).item() == pytest.approx(-0.2 + 0.5)


def test_classifier_loss_method_matches_functions(make_classifier, tokenizer):
    classifier = make_classifier("Q", "mle", num_atoms=4)
    batch = tokenize_prompts(tokenizer, ["a b c d", "one two"], use_chat_template=False)
    logits = classifier(batch["input_ids"], batch["attention_mask"])
    targets = torch.rand(logits.shape[:2])
    mask = batch["attention_mask"][:, 1:]
    expected = reduce_loss(per_position_loss(logits, targets, classifier.spec), mask)
    torch.testing.assert_close(classifier.loss(logits, targets, mask), expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"classifier_type": "W"}, "valid values: Q, V"),
        ({"loss_type": "ce"}, "valid values: bce, mse, mle"),
        ({"loss_type": "mle", "num_atoms": 1}, "num_atoms"),
        ({"loss_type": "mle", "V_min": 1.0, "V_max": 0.0}, "V_max"),
    ],
)
def test_spec_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierSpec(**kwargs)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
def test_forward_scores_each_next_token(make_classifier, tokenizer, classifier_type):
    """forward()[:, t] is the value of token t+1 after prefix [:t+1] (Q: full projection at t; V: head at t+1)."""
    classifier = make_classifier(classifier_type, "bce", use_bias=True)
    batch = tokenize_prompts(tokenizer, ["x = 6, y = 4", "Problem: 2 + 3 ="], use_chat_template=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        values = classifier(ids, mask)  # [2, T-1, 1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = classifier.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        if classifier_type == "V":
            expected = classifier.score(hidden[:, 1:])
        else:
            full = classifier.score(hidden[:, :-1])  # [2, T-1, vocab]
            expected = full.gather(-1, ids[:, 1:, None])
    assert values.shape == (2, ids.shape[1] - 1, 1)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_is_batch_invariant(make_classifier, tokenizer, arch):
    """Training values of a left-padded sequence equal those computed alone."""
    classifier = make_classifier("V", "bce", arch=arch)
    short = "Problem: 2 + 3 ="
    alone = tokenize_prompts(tokenizer, [short], use_chat_template=False)
    mixed = tokenize_prompts(tokenizer, ["a much longer first sequence with many tokens in it", short], use_chat_template=False)
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        a = classifier(**alone)[0]
        b = classifier(**mixed)[1, -(n - 1) :]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- init modes


def test_init_modes(tiny_dir):
    path = str(tiny_dir() / "classifier")
    lm = AutoModelForCausalLM.from_pretrained(path)
    lm_head = lm.get_output_embeddings().weight.detach()

    zero = QSharpClassifier.from_causal_lm(path, ClassifierSpec("V"), "zero")
    assert torch.count_nonzero(zero.score.weight) == 0

    random = QSharpClassifier.from_causal_lm(path, ClassifierSpec("V"), "random", seed=0)
    assert torch.count_nonzero(random.score.weight) == random.score.weight.numel()

    reuse_q = QSharpClassifier.from_causal_lm(path, ClassifierSpec("Q", "bce", use_bias=True), "reuse")
    torch.testing.assert_close(reuse_q.score.weight, lm_head)
    assert torch.count_nonzero(reuse_q.score.bias) == 0

    reuse_q_mle = QSharpClassifier.from_causal_lm(path, ClassifierSpec("Q", "mle", num_atoms=3), "reuse")
    torch.testing.assert_close(reuse_q_mle.score.weight.view(-1, 3, lm_head.shape[1])[:, 1], lm_head)

    # the original applies --init_mode to Q heads only: a V head keeps the default normal init
    reuse_v = QSharpClassifier.from_causal_lm(path, ClassifierSpec("V", use_bias=True), "reuse", seed=0)
    random_v = QSharpClassifier.from_causal_lm(path, ClassifierSpec("V", use_bias=True), "random", seed=0)
    torch.testing.assert_close(reuse_v.score.weight, random_v.score.weight, rtol=0, atol=0)
    assert torch.count_nonzero(reuse_v.score.weight) == reuse_v.score.weight.numel()
    assert torch.count_nonzero(reuse_v.score.bias) == 0
    torch.manual_seed(0)
    expected = torch.empty_like(random.score.weight).normal_(0.0, lm.config.initializer_range)
    torch.testing.assert_close(random.score.weight, expected, rtol=0, atol=0)  # seed 0 * 42 + rank 0
    seeded = QSharpClassifier.from_causal_lm(path, ClassifierSpec("V"), "random", seed=1, rank=1)
    torch.manual_seed(1 * 42 + 1 * 100003)
    torch.testing.assert_close(seeded.score.weight, torch.empty_like(expected).normal_(0.0, lm.config.initializer_range))

    with pytest.raises(ValueError, match="valid values: zero, random, reuse"):
        QSharpClassifier.from_causal_lm(path, ClassifierSpec("V"), "warm")


def test_reuse_copies_instead_of_tying(tiny_dir):
    model = QSharpClassifier.from_causal_lm(str(tiny_dir("gpt2") / "classifier"), ClassifierSpec("Q"), "reuse")
    embedding = model.model.get_input_embeddings().weight  # gpt2 ties lm_head to the embedding
    torch.testing.assert_close(model.score.weight, embedding)
    assert model.score.weight.data_ptr() != embedding.data_ptr()


# ----------------------------------------------------------------------------- checkpoints


def values_of(classifier, batch):
    with torch.no_grad():
        return classifier(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize(
    "spec",
    [ClassifierSpec("V", "bce"), ClassifierSpec("Q", "mle", num_atoms=4, V_min=-1.0, V_max=2.0, use_bias=True)],
    ids=["V-bce", "Q-mle-bias"],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_round_trip_describes_itself(tmp_path, make_classifier, tokenizer, spec, arch):
    classifier = make_classifier(arch=arch, **spec.to_dict())
    classifier.save_pretrained(tmp_path / "ckpt_10", tokenizer=tokenizer)
    config = json.loads((tmp_path / "ckpt_10" / "config.json").read_text())
    assert config["qsharp_classifier"] == spec.to_dict()
    assert not [p.name for p in tmp_path.iterdir() if p.name != "ckpt_10"], "temporary files left behind"

    loaded = QSharpClassifier.from_pretrained(tmp_path / "ckpt_10")
    assert loaded.spec == spec
    batch = tokenize_prompts(tokenizer, ["x = 6, y = 4", "2 + 3 = 5"], use_chat_template=False)
    torch.testing.assert_close(values_of(loaded, batch), values_of(classifier, batch))

    classifier.save_pretrained(tmp_path / "ckpt_10")  # overwriting an existing checkpoint works
    assert QSharpClassifier.from_pretrained(tmp_path / "ckpt_10").spec == spec


def write_original_layout(classifier, path, max_shard_size="5GB"):
    """What the original code saved: a Llama config.json without head settings,
    backbone weights under ``model.*`` and the head under ``score.*``."""
    path.mkdir()
    config = classifier.config.to_dict()
    config.pop("qsharp_classifier")
    config["architectures"] = ["CustomLlamaForSequenceClassification"]
    (path / "config.json").write_text(json.dumps(config))
    state = {f"model.{k}": v for k, v in classifier.model.state_dict().items()}
    state.update({f"score.{k}": v for k, v in classifier.score.state_dict().items()})
    save_torch_state_dict(state, str(path), max_shard_size=max_shard_size)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize(
    "spec",
    [ClassifierSpec("V", "bce"), ClassifierSpec("Q", "bce"), ClassifierSpec("V", "mle", num_atoms=11)],
    ids=["V-bce", "Q-bce", "V-mle"],
)
def test_original_layout_checkpoint_loads_with_same_values(tmp_path, make_classifier, tokenizer, spec, sharded):
    classifier = make_classifier(**spec.to_dict())
    write_original_layout(classifier, tmp_path / "ckpt", max_shard_size="20KB" if sharded else "5GB")
    if sharded:
        assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    batch = tokenize_prompts(tokenizer, ["Problem: 2 + 3 =", "x = 6"], use_chat_template=False)
    expected = values_of(classifier, batch)

    from_args = QSharpClassifier.from_pretrained(tmp_path / "ckpt", spec=spec.to_dict())  # settings from args.json
    assert from_args.spec == spec
    torch.testing.assert_close(values_of(from_args, batch), expected)

    inferred = QSharpClassifier.from_pretrained(tmp_path / "ckpt")  # settings from the head's shape
    assert (inferred.spec.classifier_type, inferred.spec.num_outputs) == (spec.classifier_type, spec.num_outputs)
    torch.testing.assert_close(values_of(inferred, batch), expected)


def test_checkpoint_errors(tmp_path, make_classifier):
    with pytest.raises(ValueError, match="no config.json"):
        QSharpClassifier.from_pretrained(tmp_path)
    classifier = make_classifier("V", "bce")
    classifier.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not fit a Q/bce head"):
        QSharpClassifier.from_pretrained(tmp_path / "ckpt", spec={"classifier_type": "Q"})
