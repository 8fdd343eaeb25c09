"""MATH through the four stages as a user runs them: prepare_data builds math_train.jsonl and
math500_test.jsonl from the shared raw files, then collect (round 1), combine, train and
evaluate with ``--dataset_type math`` on tiny local models. The gold answer of a MATH record
is the content of the last ``\\boxed{}`` of its ``solution`` (the files have no answer field)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.stages import SHARED, check_collected, check_eval, read_jsonl, stage
from utils.data.answers import grade, reference_answer
from utils.data.problems import COLLECTED_FIELDS, reference_of
from utils.demo.tiny_models import write_tiny_models

NUM_PROBLEMS, NUM_SAMPLES, MAX_NEW_TOKENS, NUM_TEST = 8, 2, 8, 3
TAG = "eta_10.0_top_k_20_temp_0.8"
DATA = ["--data_path", "dataset/math_train.jsonl", "--train_eval_save_path", "dataset/math_train_eval.json"]

pytestmark = pytest.mark.skipif(not (SHARED / "raw").is_dir(), reason="shared datasets not available")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """dataset/ built by prepare_data (MATH only) from the shared raw files, and tiny models."""
    root = tmp_path_factory.mktemp("math_e2e")
    stage(root, "dataset/prepare_data.py", "--raw_dir", str(SHARED / "raw"), "--splits_dir", str(SHARED / "splits"),
          "--datasets", "math", "--out_dir", "dataset")
    write_tiny_models(root / "tiny", arch="llama")
    return root


def gold(record: dict) -> str:
    return reference_answer(reference_of(record, "math"), "math")


def respond(answer: str) -> str:
    return f"We simplify step by step. The final answer is $\\boxed{{{answer}}}$."


def test_references_are_the_last_box_of_the_solution(workdir):
    train = read_jsonl(workdir / "dataset" / "math_train.jsonl")
    test = read_jsonl(workdir / "dataset" / "math500_test.jsonl")
    assert all("answer" not in record for record in train + test)
    assert gold(test[0]) == r"\left( 3, \frac{\pi}{2} \right)"  # MATH500 "Convert the point $(0,3)$ ..."
    assert gold(train[5]) == "(3, -1)"  # "Find the center of the circle with equation $x^2 - 6x + y^2 ..."
    raw = read_jsonl(SHARED / "raw" / "math" / "test.jsonl")
    assert [gold(record) for record in test] == [row["answer"] for row in raw]  # upstream's answer field
    for record in train[:NUM_PROBLEMS] + test[:NUM_TEST]:
        assert grade(respond(gold(record)), record["solution"], "math") is True
        assert grade(respond(gold(record)), record["solution"], "math", "strict") is True
        assert grade(respond("1234567"), record["solution"], "math") is False


def test_math_four_stages(workdir):
    train_records = read_jsonl(workdir / "dataset" / "math_train.jsonl")
    test_records = read_jsonl(workdir / "dataset" / "math500_test.jsonl")
    split_map = json.loads((workdir / "dataset" / "math_train_eval.json").read_text())

    # ---- collect with the reference policy on the first problems (two of them are OOD eval)
    stage(
        workdir, "collect_training_data.py", "--start_index", "0", "--end_index", str(NUM_PROBLEMS), "--is_first_round", "1",
        "--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier", "--classifier_type", "V",
        "--inference_mode", "bernoulli", "--loss_type", "bce", "--use_bias", "0", *DATA, "--use_chat_template", "1",
        "--eta", "0", "--temperature", "0.8", "--top_p", "0.9", "--max_new_tokens", str(MAX_NEW_TOKENS), "--dtype", "float32",
        "--match_fn_type", "symbolic", "--dataset_type", "math", "--num_samples", str(NUM_SAMPLES), "--batch_size", "8",
        "--output_dir", "collected_data/tiny_math/",
    )
    folder = workdir / "collected_data" / "tiny_math"
    check_collected(folder, train_records, NUM_PROBLEMS, NUM_SAMPLES, MAX_NEW_TOKENS)
    assert json.loads((folder / ".run_settings.json").read_text())["dataset_type"] == "math"
    for path in folder.glob("*_r*.json"):
        data = json.loads(path.read_text())
        for prediction, correct in zip(data["partial_guided_predictions"], data["partial_guided_predictions_correctness"]):
            assert correct is grade(prediction, data["solution"], "math")

    # ---- combine
    stage(workdir, "combine_training_data.py", "--data_template_path", "collected_data/tiny_math/", *DATA)
    combined = read_jsonl(folder / "all_train_data.jsonl")
    assert [r["problem"] for r in combined] == [r["problem"] for r in train_records[:NUM_PROBLEMS]]
    assert all(r["solution"] == t["solution"] for r, t in zip(combined, train_records))
    assert all(len(r[field]) == NUM_SAMPLES for r in combined for field in COLLECTED_FIELDS)

    # ---- train one epoch
    out = stage(
        workdir, "train_classifier.py", "--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier",
        "--original_problems_path", "dataset/math_train.jsonl", "--train_eval_save_path", "dataset/math_train_eval.json",
        "--init_mode", "reuse", "--inference_mode", "bernoulli", "--loss_type", "bce", "--dataset_type", "math",
        "--data_paths", "collected_data/tiny_math/all_train_data.jsonl", "--drop_no_variation", "0", "--eta", "1",
        "--output_dir", "checkpoints/tiny_math/", "--num_epochs", "1", "--batch_size", "8", "--dtype", "float32",
    )
    num_ood = sum(split_map[r["problem"]]["split"] == "eval" for r in train_records[:NUM_PROBLEMS])
    assert num_ood >= 1 and f"{num_ood} OOD eval" in out
    run_dir = workdir / "checkpoints" / "tiny_math"
    args = json.loads((run_dir / "args.json").read_text())
    assert args["dataset_type"] == "math" and args["original_problems_path"] == "dataset/math_train.jsonl"
    checkpoints = sorted(run_dir.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
    assert checkpoints[0].name == "ckpt_0" and len(checkpoints) == 2
    checkpoint = checkpoints[-1]
    assert json.loads((checkpoint / "config.json").read_text())["qsharp_classifier"]["classifier_type"] == "V"

    # ---- evaluate on the first MATH500 problems (a shard); dataset_type is inherited from args.json
    eval_args = ["--classifier_ckpt_path", str(checkpoint), "--eta", "10", "--data_path", "dataset/math500_test.jsonl",
                 "--train_eval_save_path", "dataset/math500_test_eval.json", "--end_index", str(NUM_TEST),
                 "--num_samples", "2", "--batch_size", str(NUM_TEST), "--max_new_tokens", str(MAX_NEW_TOKENS)]
    stage(workdir, "eval_ckpt.py", *eval_args)
    check_eval(checkpoint, TAG, NUM_TEST, 2)
    sample_dir = checkpoint / f"individual_eval_inference_{TAG}"
    assert json.loads((sample_dir / ".run_settings.json").read_text())["dataset_type"] == "math"
    for path in sample_dir.glob("*_r*.json"):
        sample = json.loads(path.read_text())
        record = test_records[int(path.name.split("_")[0])]
        assert {key: sample[key] for key in record} == record
        assert sample["correctness"] is grade(sample["prediction"], record["solution"], "math")

    # ---- the per-problem results grade the samples against the solution's last box: give the
    # samples known answers, re-run (nothing left to sample) and read the re-aggregated results
    answers = {0: [r"(3, \frac{\pi}{2})", gold(test_records[0])], 1: [gold(test_records[1]), "q - p"], 2: ["3/14", "14"]}
    for problem_id, predictions in answers.items():
        for repeat, answer in enumerate(predictions):
            path = sample_dir / f"{problem_id}_r{repeat}.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "prediction": respond(answer)}))
    stage(workdir, "eval_ckpt.py", *eval_args)
    results = {r["eval_id"]: r for r in read_jsonl(checkpoint / f"inference_eval_results_{TAG}.jsonl")}
    assert [results[i]["predictions"] for i in range(NUM_TEST)] == [[respond(a) for a in answers[i]] for i in range(NUM_TEST)]
    assert [results[i]["pass_at_k"] for i in range(NUM_TEST)] == [True, True, False]
    assert results[0]["majority_vote_correct"] is True and results[2]["majority_vote_correct"] is False
    assert check_eval(checkpoint, TAG, NUM_TEST, 2)["pass_k_accuracy_mean"] == pytest.approx(2 / 3)
