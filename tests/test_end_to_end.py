"""The four stages as a user runs them (subprocesses, seed README flags, local tiny models,
a dozen GSM8K problems, short generations): round 1 with a V/bce and a Q/mle classifier,
then a second round; every file handed between stages is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.stages import REPO, SHARED, check_collected, check_eval, check_original_globs, read_jsonl, stage
from utils.data.problems import COLLECTED_FIELDS
from utils.data.splits import build_split_map, write_split_map
from utils.demo.tiny_models import write_tiny_models

NUM_PROBLEMS, NUM_SAMPLES, MAX_NEW_TOKENS, NUM_TEST = 12, 3, 24, 6
COMMON = ["--max_new_tokens", str(MAX_NEW_TOKENS), "--dtype", "float32"]

pytestmark = pytest.mark.skipif(not (SHARED / "raw").is_dir(), reason="shared datasets not available")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """dataset/ built by prepare_data from the shared raw files, tiny models, a 6-problem test set."""
    root = tmp_path_factory.mktemp("e2e")
    stage(root, "dataset/prepare_data.py", "--raw_dir", str(SHARED / "raw"), "--splits_dir", str(SHARED / "splits"),
          "--datasets", "gsm8k", "--out_dir", "dataset")
    test = read_jsonl(root / "dataset" / "gsm8k_test.jsonl")[:NUM_TEST]
    (root / "dataset" / "gsm8k_test_small.jsonl").write_text("\n".join(json.dumps(r) for r in test))
    write_split_map(root / "dataset" / "gsm8k_test_small_eval.json", build_split_map([r["problem"] for r in test], None))
    write_tiny_models(root / "tiny", arch="llama")
    return root


def collect(workdir, output_dir, *extra):
    return stage(
        workdir, "collect_training_data.py", "--start_index", "0", "--end_index", str(NUM_PROBLEMS),
        "--num_samples", str(NUM_SAMPLES), "--batch_size", "4", "--output_dir", output_dir, *COMMON, *extra,
    )


def round1_collect_args():
    return [
        "--is_first_round", "1", "--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier",
        "--classifier_type", "V", "--inference_mode", "bernoulli", "--loss_type", "bce", "--use_bias", "0",
        "--data_path", "dataset/gsm8k_train.jsonl", "--train_eval_save_path", "dataset/gsm8k_train_eval.json",
        "--use_chat_template", "1", "--eta", "0", "--temperature", "0.8", "--top_p", "0.9", "--match_fn_type", "symbolic",
    ]


def combine(workdir, folder):
    stage(workdir, "combine_training_data.py", "--data_template_path", folder,
          "--data_path", "dataset/gsm8k_train.jsonl", "--train_eval_save_path", "dataset/gsm8k_train_eval.json")
    return read_jsonl(workdir / folder / "all_train_data.jsonl")


def train(workdir, output_dir, data_paths, *extra):
    stage(
        workdir, "train_classifier.py", "--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier",
        "--original_problems_path", "dataset/gsm8k_train.jsonl", "--train_eval_save_path", "dataset/gsm8k_train_eval.json",
        "--init_mode", "reuse", "--inference_mode", "bernoulli", "--dataset_type", "gsm8k", "--data_paths", *data_paths,
        "--drop_no_variation", "0", "--eta", "1", "--output_dir", output_dir, "--num_epochs", "1", "--batch_size", "8",
        "--dtype", "float32", "--ckpt_freq", "3", "--eval_freq", "3", *extra,
    )
    checkpoints = sorted((workdir / output_dir).glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
    return checkpoints


def evaluate(workdir, checkpoint, eta, *extra):
    return stage(
        workdir, "eval_ckpt.py", "--classifier_ckpt_path", str(checkpoint), "--eta", str(eta),
        "--data_path", "dataset/gsm8k_test_small.jsonl", "--train_eval_save_path", "dataset/gsm8k_test_small_eval.json",
        "--num_samples", "2", "--batch_size", "4", "--max_new_tokens", str(MAX_NEW_TOKENS), *extra,
    )


def test_two_rounds_v_bce_and_q_mle(workdir):
    records = read_jsonl(workdir / "dataset" / "gsm8k_train.jsonl")

    # ---- round 1: collect with the reference policy, combine, train V/bce and Q/mle, evaluate
    out = collect(workdir, "collected_data/tiny_gsm8k/", *round1_collect_args())
    assert "eta=0.0" in out
    check_collected(workdir / "collected_data" / "tiny_gsm8k", records, NUM_PROBLEMS, NUM_SAMPLES, MAX_NEW_TOKENS)
    combined = combine(workdir, "collected_data/tiny_gsm8k")  # no trailing slash: same output place
    assert [r["problem"] for r in combined] == [r["problem"] for r in records[:NUM_PROBLEMS]]
    assert all(len(r[field]) == NUM_SAMPLES for r in combined for field in COLLECTED_FIELDS)

    round1_data = ["collected_data/tiny_gsm8k/all_train_data.jsonl"]
    v_checkpoints = train(workdir, "checkpoints/tiny_v/", round1_data, "--classifier_type", "V", "--loss_type", "bce")
    assert v_checkpoints[0].name == "ckpt_0" and len(v_checkpoints) >= 2
    args = json.loads((workdir / "checkpoints" / "tiny_v" / "args.json").read_text())
    assert args["classifier_type"] == "V" and args["eta"] == 1.0 and args["original_problems_path"] == "dataset/gsm8k_train.jsonl"
    config = json.loads((v_checkpoints[-1] / "config.json").read_text())
    assert config["qsharp_classifier"]["classifier_type"] == "V" and config["qsharp_classifier"]["loss_type"] == "bce"

    q_checkpoints = train(workdir, "checkpoints/tiny_q/", round1_data, "--classifier_type", "Q", "--loss_type", "mle",
                          "--num_atoms", "5")
    assert json.loads((q_checkpoints[-1] / "config.json").read_text())["qsharp_classifier"]["num_atoms"] == 5

    out = evaluate(workdir, v_checkpoints[-1], 10)
    assert "eta=10.0" in out
    guided = check_eval(v_checkpoints[-1], "eta_10.0_top_k_20_temp_0.8", NUM_TEST, 2)
    assert guided["kl_mean"] > 0
    check_original_globs(workdir / "collected_data" / "tiny_gsm8k",
                         v_checkpoints[-1] / "individual_eval_inference_eta_10.0_top_k_20_temp_0.8", 2)
    evaluate(workdir, v_checkpoints[-1], 0)  # the reference policy
    reference = check_eval(v_checkpoints[-1], "eta_0.0_top_k_20_temp_0.8", NUM_TEST, 2)
    assert reference["kl_before_top_p_mean"] == 0.0 and reference["kl_mean"] > 0  # top-p's -log(nucleus mass)
    evaluate(workdir, v_checkpoints[-1], 10, "--cd_baseline", "1")
    check_eval(v_checkpoints[-1], "eta_10.0_top_k_20_temp_0.8_cd", NUM_TEST, 2)
    evaluate(workdir, q_checkpoints[-1], 5, "--top_k", "8")
    check_eval(q_checkpoints[-1], "eta_5.0_top_k_8_temp_0.8", NUM_TEST, 2)

    # ---- round 2: collect guided by the round-1 V classifier (settings from its args.json)
    out = collect(workdir, "collected_data/tiny_gsm8k_r2/", "--is_first_round", "0",
                  "--classifier_ckpt_path", str(v_checkpoints[-1]))
    assert "eta=1.0 (args.json)" in out
    check_collected(workdir / "collected_data" / "tiny_gsm8k_r2", records, NUM_PROBLEMS, NUM_SAMPLES, MAX_NEW_TOKENS)
    combine(workdir, "collected_data/tiny_gsm8k_r2/")
    both = [*round1_data, "collected_data/tiny_gsm8k_r2/all_train_data.jsonl"]
    round2 = train(workdir, "checkpoints/tiny_v_r2/", both, "--classifier_type", "V", "--loss_type", "bce")
    evaluate(workdir, round2[-1], 10)
    check_eval(round2[-1], "eta_10.0_top_k_20_temp_0.8", NUM_TEST, 2)

    # ---- a re-run resumes: nothing left to do, the files stay as they are
    before = {p.name: p.read_bytes() for p in (workdir / "collected_data" / "tiny_gsm8k_r2").glob("*_r*.json")}
    out = collect(workdir, "collected_data/tiny_gsm8k_r2/", "--is_first_round", "0",
                  "--classifier_ckpt_path", str(v_checkpoints[-1]))
    assert f"{NUM_PROBLEMS * NUM_SAMPLES} of {NUM_PROBLEMS * NUM_SAMPLES} files already done" in out
    after = {p.name: p.read_bytes() for p in (workdir / "collected_data" / "tiny_gsm8k_r2").glob("*_r*.json")}
    assert before == after


def test_bad_input_is_one_line_error(workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "collect_training_data.py"), *round1_collect_args(), "--end_index", "99999",
         "--output_dir", "collected_data/bad/"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --end_index 99999") and "Traceback" not in result.stderr
    assert not (workdir / "collected_data" / "bad").exists() or not any((workdir / "collected_data" / "bad").iterdir())
