"""Synthetic word problems (utils/demo/synthetic.py) and the tiny-LM pretraining (utils/demo/pretrain.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.data.problems import PROMPT
from utils.demo.synthetic import (
    TEMPLATES,
    first_equation,
    generate_problems,
    pretraining_records,
    sample_problems,
    took_wrong_branch,
    write_synthetic_dataset,
)
from utils.data.answers import extract_boxed, grade
from utils.models import get_stop_ids, load_causal_lm, load_tokenizer, tokenize_prompts
from utils.demo.pretrain import (
    encode_examples,
    make_batch,
    measure_pass_at_1,
    pretrain,
    probe_records,
    train_lm,
    wsd_lr,
)
from utils.data.splits import build_split_map, load_split_map
from utils.demo.tiny_models import END

REPO = Path(__file__).resolve().parents[1]
KEYS = {"problem", "solution", "answer", "prompt"}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, num_train=60, num_test=30, seed=5)
    return out


@pytest.fixture(scope="module")
def models_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    torch.set_num_threads(2)
    pretrain(
        data_dir, out, seed=1, batch_size=4, num_examples=64, tokenizer_examples=64, log_every=0,
        ref={"hidden": 32, "layers": 2, "heads": 2, "max_steps": 3}, stop={"target": 0, "decay_steps": 1}, cls_layers=1,
    )
    return out


# --------------------------------------------------------------------------- dataset


def test_generation_is_deterministic_by_seed():
    assert generate_problems(40, seed=3) == generate_problems(40, seed=3)
    assert generate_problems(40, seed=3) != generate_problems(40, seed=4)


def test_records_have_the_gsm8k_format():
    records = generate_problems(300, seed=0)
    assert len({r["problem"] for r in records}) == 300
    for record in records:
        assert set(record) == KEYS
        assert record["answer"].isdigit() and str(int(record["answer"])) == record["answer"]
        assert extract_boxed(record["solution"]) == record["answer"]
        assert record["solution"].endswith(f"The answer is \\boxed{{{record['answer']}}}.")
        assert record["prompt"] == PROMPT.format(problem=record["problem"])
        assert grade(record["solution"], record["answer"], "gsm8k")


def test_every_template_is_used_and_multi_step():
    problems = sample_problems(300, seed=0)
    assert {p.template for p in problems} == set(TEMPLATES)
    for p in problems:
        assert len(p.steps) >= 2 and len(p.steps) == len(p.wrong_steps)
        assert 0 <= p.answer < 200


def test_trapped_solution_branches_at_the_first_equation():
    for p in sample_problems(300, seed=2):
        right, wrong = p.solution(), p.solution(wrong=True)
        assert extract_boxed(wrong) == str(p.wrong_answer) != str(p.answer)
        assert p.wrong_answer >= 0
        assert not grade(wrong, str(p.answer), "gsm8k")
        (a, op, b), (wa, wop, wb) = first_equation(right), first_equation(wrong)
        assert (a, b) == (wa, wb) and op != wop  # same operands, wrong operator
        assert right.split(op, 1)[0] == wrong.split(wop, 1)[0]  # identical text before the decision token
        assert took_wrong_branch(wrong, right) and not took_wrong_branch(right, right)
    assert took_wrong_branch("no equation here", sample_problems(1, seed=0)[0].solution())


def test_pretraining_records_mix_in_traps_and_exclude_problems():
    held_out = [r["problem"] for r in generate_problems(200, seed=9)]
    examples = pretraining_records(400, seed=0, wrong_rate=0.5, exclude=held_out)
    assert not {r["problem"] for r, _ in examples} & set(held_out)
    share = sum(wrong for _, wrong in examples) / len(examples)
    assert 0.4 < share < 0.6
    for record, wrong in examples:
        assert set(record) == KEYS
        assert grade(record["solution"], record["answer"], "gsm8k") != wrong
    assert examples == pretraining_records(400, seed=0, wrong_rate=0.5, exclude=held_out)
    assert all(not wrong for _, wrong in pretraining_records(50, seed=0, wrong_rate=0.0))


def test_written_files_are_deterministic_and_disjoint(data_dir, tmp_path):
    again = tmp_path / "again"
    write_synthetic_dataset(again, num_train=60, num_test=30, seed=5)
    names = ["synth_train.jsonl", "synth_test.jsonl", "synth_train_eval.json", "synth_test_eval.json"]
    for name in names:
        assert (again / name).read_bytes() == (data_dir / name).read_bytes(), name
    text = (data_dir / "synth_train.jsonl").read_text(encoding="utf-8")
    assert not text.endswith("\n")
    train, test = read_records(data_dir / "synth_train.jsonl"), read_records(data_dir / "synth_test.jsonl")
    assert len(train) == 60 and len(test) == 30
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    # the test set of a seed does not depend on the size of the training set
    other = tmp_path / "other"
    write_synthetic_dataset(other, num_train=7, num_test=30, seed=5)
    assert (other / "synth_test.jsonl").read_bytes() == (data_dir / "synth_test.jsonl").read_bytes()


def test_split_maps(data_dir):
    train, test = read_records(data_dir / "synth_train.jsonl"), read_records(data_dir / "synth_test.jsonl")
    train_map = load_split_map(data_dir / "synth_train_eval.json")
    test_map = load_split_map(data_dir / "synth_test_eval.json")
    assert list(train_map) == [r["problem"] for r in train]
    assert train_map == build_split_map([r["problem"] for r in train], 0.1, seed=47)
    assert sum(v["split"] == "eval" for v in train_map.values()) == 6
    assert list(test_map) == [r["problem"] for r in test]
    assert all(v["split"] == "eval" for v in test_map.values())
    assert (data_dir / "synth_test_eval.json").read_text(encoding="utf-8") == json.dumps(test_map, indent=4)


def test_cli_writes_the_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "dataset" / "synthetic.py"), "--out_dir", str(tmp_path), "--num_train", "12",
         "--num_test", "5", "--seed", "5"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(read_records(tmp_path / "synth_train.jsonl")) == 12
    assert read_records(tmp_path / "synth_test.jsonl") == generate_problems(5, seed=5 * 7919 + 1_000_003)


# --------------------------------------------------------------------------- pretraining


def test_batches_put_the_loss_on_the_response_only():
    batch = make_batch([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 4, 5], [-100, 7, 8, 9, -100]]


def test_pretrained_dirs_load_and_share_the_tokenizer(models_dir, data_dir):
    ref_tok, cls_tok = load_tokenizer(str(models_dir / "ref")), load_tokenizer(str(models_dir / "classifier"))
    assert ref_tok.get_vocab() == cls_tok.get_vocab()
    ref = load_causal_lm(str(models_dir / "ref"), dtype="float32", device="cpu")
    cls = load_causal_lm(str(models_dir / "classifier"), dtype="float32", device="cpu")
    n_ref, n_cls = (sum(p.numel() for p in m.parameters()) for m in (ref, cls))
    assert n_cls < n_ref
    assert cls.config.num_hidden_layers < ref.config.num_hidden_layers
    # the classifier LM is the reference's first layers: same embeddings, same first layer
    ref_state, cls_state = ref.state_dict(), cls.state_dict()
    assert all(torch.equal(cls_state[k], ref_state[k]) for k in cls_state)
    assert ref.config.model_type == cls.config.model_type == "llama"
    end_id = ref_tok.convert_tokens_to_ids(END)
    for model in (ref, cls):
        assert get_stop_ids(model, ref_tok) == sorted({ref_tok.eos_token_id, end_id})
        assert model.get_input_embeddings().num_embeddings == len(ref_tok)


def test_tokenizer_round_trips_and_splits_digits(models_dir, data_dir):
    tokenizer = load_tokenizer(str(models_dir / "ref"))
    records = read_records(data_dir / "synth_test.jsonl")
    for record in records:
        for text in (record["prompt"], record["solution"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in tokenizer("Mia has 123 apples.", add_special_tokens=False)["input_ids"]]
    assert {"1", "2", "3"} <= set(pieces)


def test_training_prefix_matches_inference_tokenisation(models_dir, data_dir):
    tokenizer = load_tokenizer(str(models_dir / "ref"))
    records = read_records(data_dir / "synth_train.jsonl")[:8]
    encoded = encode_examples(tokenizer, records)
    end_id = tokenizer.convert_tokens_to_ids(END)
    for record, (prompt_ids, response_ids) in zip(records, encoded):
        assert tokenize_prompts(tokenizer, [record["prompt"]], use_chat_template=True)["input_ids"][0].tolist() == prompt_ids
        assert response_ids[-1] == end_id
        assert tokenizer.decode(response_ids, skip_special_tokens=True) == record["solution"]


def test_pretraining_is_deterministic_and_trains(models_dir, data_dir, tmp_path):
    pretrain(
        data_dir, tmp_path, seed=1, batch_size=4, num_examples=64, tokenizer_examples=64, log_every=0,
        ref={"hidden": 32, "layers": 2, "heads": 2, "max_steps": 3}, stop={"target": 0, "decay_steps": 1}, cls_layers=1,
    )
    for name in ("ref", "classifier"):
        a = load_causal_lm(str(models_dir / name), dtype="float32", device="cpu").state_dict()
        b = load_causal_lm(str(tmp_path / name), dtype="float32", device="cpu").state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert (models_dir / name / "tokenizer.json").read_bytes() == (tmp_path / name / "tokenizer.json").read_bytes()
    # the weights moved away from the seeded initialisation
    from utils.demo.tiny_models import build_model

    init = build_model("llama", load_tokenizer(str(tmp_path / "ref")), 32, 2, 2, seed=1).state_dict()
    trained = load_causal_lm(str(tmp_path / "ref"), dtype="float32", device="cpu").state_dict()
    assert not torch.equal(init["lm_head.weight"], trained["lm_head.weight"])


def test_measure_reports_pass_at_1(models_dir, data_dir):
    records = read_records(data_dir / "synth_test.jsonl")[:3]
    result = measure_pass_at_1(models_dir / "ref", records, num_samples=2, max_new_tokens=6, batch_size=4)
    assert result["num_problems"] == 3 and result["num_samples"] == 2
    assert 0.0 <= result["pass@1"] <= 1.0 and 0.0 <= result["wrong_branch_rate"] <= 1.0
    assert 1 <= result["max_response_tokens"] <= 6


def test_wsd_schedule():
    lr = [wsd_lr(step, 1.0, warmup=4, decay_start=10, decay_steps=5) for step in range(16)]
    torch.testing.assert_close(lr[:4], [0.25, 0.5, 0.75, 1.0])
    assert lr[4:10] == [1.0] * 6  # stable until the decay starts
    torch.testing.assert_close(lr[10:], [0.82, 0.64, 0.46, 0.28, 0.1, 0.1])
    assert wsd_lr(10_000, 1.0, warmup=4, decay_start=None, decay_steps=5) == 1.0  # not decided yet


class Scalar(torch.nn.Module):
    """A one-parameter 'model' with a loss."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return type("Out", (), {"loss": (self.w * x).square().mean()})()


def run_rule(ready_at: int | None, max_steps: int = 40):
    model, asked = Scalar(), []

    def ready(step):
        asked.append(step)
        return ready_at is not None and step >= ready_at

    losses = train_lm(model, 10, lambda idx: {"x": torch.tensor(idx, dtype=torch.float)}, max_steps, 2, 0.1, 0,
                      decay_steps=5, ready=ready, check_every=4, min_steps=8, log_every=0)
    return len(losses), asked


def test_stopping_rule_decays_after_the_probe_holds():
    steps, asked = run_rule(ready_at=16)
    assert asked == [8, 12, 16]  # from min_steps on, every check_every steps, until it holds
    assert steps == 16 + 5  # then decay_steps more


def test_stopping_rule_gives_up_at_max_steps():
    steps, asked = run_rule(ready_at=None)
    assert asked == [8, 12, 16, 20, 24, 28, 32]  # the last check before max_steps - decay_steps
    assert steps == 40


def test_probe_problems_are_held_out(data_dir):
    seen = [r["problem"] for r in read_records(data_dir / "synth_test.jsonl")]
    probe = probe_records(20, seed=5, exclude=seen)
    assert len(probe) == 20 and not {r["problem"] for r in probe} & set(seen)
    assert probe == probe_records(20, seed=5, exclude=seen)
    assert all(grade(r["solution"], r["answer"], "gsm8k") for r in probe)  # correct solutions (took_wrong_branch's gold)
