"""Every backbone family through the stages: tiny Llama, Qwen2, Qwen3, Mistral and GPT-2
models written by the ``utils.tiny_models`` command line, then (in-process) round-1
collection, combine, a V/bce and a Q/mle classifier, and a guided step with each checkpoint
(round-2 collection with V, evaluation with Q). Also: a reference and a classifier of
different families on one tokenizer, and a classifier of another vocabulary refused.

Needs no ``../shared``: the problems come from ``dataset/synthetic.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import collect_training_data
import combine_training_data
import eval_ckpt
import train_classifier
from utils.demo.synthetic import write_synthetic_dataset
from tests.helpers.models import ARCHS
from utils.classifier import QSharpClassifier
from utils.cli import eval_tag, run
from utils.models import format_prompts, load_tokenizer
from utils.data.problems import COLLECTED_FIELDS
from utils.demo.tiny_models import SIZES, build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
NUM_PROBLEMS, NUM_SAMPLES, MAX_NEW_TOKENS, GUIDED_PROBLEMS = 6, 2, 16, 3
COMMON = ["--max_new_tokens", str(MAX_NEW_TOKENS), "--dtype", "float32", "--batch_size", "3"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """6 training and 2 test problems in the GSM8K format, with their split maps."""
    paths = write_synthetic_dataset(tmp_path_factory.mktemp("archs_data"), NUM_PROBLEMS, 2, seed=0)
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """``cli_models(arch)`` -> folder written by ``python -m utils.tiny_models --arch arch``.

    All builds start at once (each is mostly imports, one thread each) and are awaited on first use.
    """
    root = tmp_path_factory.mktemp("archs_models")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-m", "utils.tiny_models", "--out_dir", str(root / arch), "--arch", arch],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arch in ARCHS
    }

    def get(arch: str) -> Path:
        stdout, stderr = procs[arch].communicate(timeout=300)
        assert procs[arch].returncode == 0, stderr[-3000:]
        out = root / arch
        assert f"ref: {out / 'ref'}" in stdout and f"classifier: {out / 'classifier'}" in stdout, stdout
        for name in ("ref", "classifier"):
            config = json.loads((out / name / "config.json").read_text())
            assert config["model_type"] == arch and (out / name / "model.safetensors").is_file()
            assert (out / name / "tokenizer_config.json").is_file()
        return out

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def round1(cli_models, data, tmp_path_factory):
    """``round1(arch)`` -> (collected folder, all_train_data.jsonl) of a round-1 collection (eta 0), built once."""
    done = {}

    def get(arch: str):
        if arch not in done:
            models = cli_models(arch)
            folder = tmp_path_factory.mktemp(f"collected_{arch}")
            collect_training_data.main(collect_training_data.parse_args([
                "--is_first_round", "1", "--ref_model_id", str(models / "ref"),
                "--classifier_model_id", str(models / "classifier"), "--classifier_type", "V",
                "--inference_mode", "bernoulli", "--loss_type", "bce", "--data_path", data["train"],
                "--train_eval_save_path", data["train_eval"], "--use_chat_template", "1", "--eta", "0",
                "--temperature", "0.8", "--top_p", "0.9", "--num_samples", str(NUM_SAMPLES),
                "--output_dir", str(folder), *COMMON,
            ]))
            combine_training_data.main(combine_training_data.parse_args([
                "--data_template_path", str(folder), "--data_path", data["train"],
                "--train_eval_save_path", data["train_eval"],
            ]))
            done[arch] = folder, folder / "all_train_data.jsonl"
        return done[arch]

    return get


# ---------------------------------------------------------------- helpers


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_collected(folder: Path, records: list[dict], tokenizer, problems: int, samples: int) -> dict[str, dict]:
    """Every ``<id>_r<repeat>.json`` holds its problem and one entry per collected list; the
    tokenized partial prompt is the chat-formatted prompt plus the kept response tokens."""
    files = {p.name: json.loads(p.read_text()) for p in folder.glob("*_r*.json")}
    assert sorted(files) == sorted(f"{i}_r{r}.json" for i in range(problems) for r in range(samples))
    for name, item in files.items():
        record = records[int(name.split("_")[0])]
        assert item["problem"] == record["problem"] and item["answer"] == record["answer"]
        assert all(len(item[field]) == 1 for field in COLLECTED_FIELDS), name
        partial = item["partial_guided_prompts_tokenized"][0]
        kept = item["num_response_tokens_in_partial_guided_prompts"][0]
        rollout = item["partial_guided_responses_tokenized"][0]
        assert 1 <= kept <= MAX_NEW_TOKENS and len(rollout) <= MAX_NEW_TOKENS  # a fresh roll-out budget
        assert all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in partial + rollout)
        prompt = format_prompts(tokenizer, [record["prompt"]], use_chat_template=True)[0]
        assert partial[:-kept] == tokenizer(prompt, add_special_tokens=False).input_ids, name
        assert isinstance(item["partial_guided_predictions_correctness"][0], bool)
        assert isinstance(item["fully_guided_predictions"][0], str)
    return files


def train(ref: Path, classifier: Path, data: dict, combined: Path, output_dir: Path, *extra: str) -> list[Path]:
    """One epoch of train_classifier.py; returns the checkpoints, oldest first."""
    train_classifier.main(train_classifier.parse_args([
        "--ref_model_id", str(ref), "--classifier_model_id", str(classifier),
        "--original_problems_path", data["train"], "--train_eval_save_path", data["train_eval"], "--init_mode", "reuse",
        "--inference_mode", "bernoulli", "--dataset_type", "gsm8k", "--data_paths", str(combined),
        "--drop_no_variation", "0", "--eta", "5", "--num_epochs", "1", "--batch_size", "4", "--lr", "1e-3",
        "--dtype", "float32", "--ckpt_freq", "100", "--eval_freq", "100", "--output_dir", str(output_dir), *extra,
    ]))
    return sorted(output_dir.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))


def check_checkpoint(checkpoints: list[Path], arch: str, classifier_type: str, loss_type: str) -> QSharpClassifier:
    """ckpt_0 and a trained checkpoint: args.json next to them, backbone + head weights, the
    family and head settings kept, and a head that training moved."""
    assert [c.name for c in checkpoints][0] == "ckpt_0" and len(checkpoints) == 2, checkpoints
    args = json.loads((checkpoints[0].parent / "args.json").read_text())
    assert (args["classifier_type"], args["loss_type"]) == (classifier_type, loss_type)
    heads = []
    for ckpt in checkpoints:
        classifier = QSharpClassifier.from_pretrained(ckpt)
        assert classifier.config.model_type == arch
        assert (classifier.spec.classifier_type, classifier.spec.loss_type) == (classifier_type, loss_type)
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as handle:
            prefixes = {key.split(".")[0] for key in handle.keys()}
        assert prefixes == {classifier.model.base_model_prefix, "score"}, prefixes
        heads.append(classifier.score.weight.detach().clone())
    assert not torch.equal(heads[0], heads[1]), "training left the head unchanged"
    return classifier


def guided_collect(checkpoint: Path, data: dict, output_dir: Path) -> dict:
    """Round-2 collection guided by ``checkpoint`` (models, head and eta 5 from its args.json),
    3 problems x 1 sample; returns the folder's run_settings.json."""
    collect_training_data.main(collect_training_data.parse_args([
        "--is_first_round", "0", "--classifier_ckpt_path", str(checkpoint), "--data_path", data["train"],
        "--train_eval_save_path", data["train_eval"], "--start_index", "0", "--end_index", str(GUIDED_PROBLEMS),
        "--num_samples", "1", "--output_dir", str(output_dir), *COMMON,
    ]))
    settings = json.loads((output_dir / ".run_settings.json").read_text())
    assert settings["eta"] == 5.0 and settings["classifier_ckpt_path"] == str(checkpoint), settings
    return settings


def check_guided_differs(round1_files: dict, guided_files: dict) -> None:
    """The guided roll-ins differ from the reference roll-ins drawn with the same seeds."""
    names = [f"{i}_r0.json" for i in range(GUIDED_PROBLEMS)]
    plain = [round1_files[n]["fully_guided_predictions"][0] for n in names]
    guided = [guided_files[n]["fully_guided_predictions"][0] for n in names]
    assert plain != guided, "guidance (eta 5) changed no roll-in"


# ---------------------------------------------------------------- one test per family


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_on_every_family(arch, cli_models, round1, data, tmp_path):
    models = cli_models(arch)
    tokenizer = load_tokenizer(str(models / "ref"))
    records = read_jsonl(data["train"])

    # round 1: the reference policy, combined
    folder, combined = round1(arch)
    round1_files = check_collected(folder, records, tokenizer, NUM_PROBLEMS, NUM_SAMPLES)
    merged = read_jsonl(combined)
    assert [m["problem"] for m in merged] == [r["problem"] for r in records]
    assert all(len(m[field]) == NUM_SAMPLES for m in merged for field in COLLECTED_FIELDS)

    # V/bce and Q/mle heads
    ref, classifier = models / "ref", models / "classifier"
    v_ckpts = train(ref, classifier, data, combined, tmp_path / "v", "--classifier_type", "V", "--loss_type", "bce")
    check_checkpoint(v_ckpts, arch, "V", "bce")
    q_ckpts = train(ref, classifier, data, combined, tmp_path / "q", "--classifier_type", "Q", "--loss_type", "mle",
                    "--num_atoms", "3")
    assert check_checkpoint(q_ckpts, arch, "Q", "mle").spec.num_atoms == 3

    # V guides a round-2 collection (settings from args.json)
    guided_collect(v_ckpts[-1], data, tmp_path / "r2")
    guided_files = check_collected(tmp_path / "r2", records, tokenizer, GUIDED_PROBLEMS, 1)
    check_guided_differs(round1_files, guided_files)

    # Q guides an evaluation on the test split
    eval_ckpt.main(eval_ckpt.parse_args([
        "--classifier_ckpt_path", str(q_ckpts[-1]), "--eta", "5", "--data_path", data["test"],
        "--train_eval_save_path", data["test_eval"], "--num_samples", "1", "--batch_size", "2",
        "--max_new_tokens", str(MAX_NEW_TOKENS), "--output_dir", str(tmp_path / "eval"),
    ]))
    tag = eval_tag(5, 20, 0.8)
    assert len(list((tmp_path / "eval" / f"individual_eval_inference_{tag}").glob("*_r0.json"))) == 2
    results = read_jsonl(tmp_path / "eval" / f"inference_eval_results_{tag}.jsonl")
    assert len(results) == 2 and all(len(r["predictions"]) == len(r["traj_kl"]) == 1 for r in results)
    stats = json.loads((tmp_path / "eval" / f"reward_stats_{tag}.json").read_text())
    assert stats["kl_mean"] > 0, "the Q head did not change the policy"


# ---------------------------------------------------------------- families mixed


@pytest.fixture(scope="module")
def other_family(tmp_path_factory) -> dict[str, Path]:
    """Classifier LMs for the Llama reference: qwen2, mistral and gpt2 on its tokenizer, and gpt2
    on two other vocabularies (3 tokens added: 403; a 300-token BPE)."""
    root = tmp_path_factory.mktemp("other_family")
    hidden, layers, heads = SIZES["classifier"]
    added = build_tokenizer()
    added.add_tokens(["<step>", "<think>", "</think>"])
    made = {}
    for name, arch, tokenizer in (
        ("qwen2", "qwen2", build_tokenizer()), ("mistral", "mistral", build_tokenizer()),
        ("gpt2", "gpt2", build_tokenizer()), ("gpt2_added", "gpt2", added),
        ("gpt2_small", "gpt2", build_tokenizer(vocab_size=300)),
    ):
        build_model(arch, tokenizer, hidden, layers, heads, seed=3).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        made[name] = root / name
    return made


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2"])
def test_llama_reference_with_classifier_of_another_family(family, cli_models, round1, other_family, data, tmp_path):
    """A Llama reference's data trains a Qwen2 / Mistral / GPT-2 classifier on the same tokenizer,
    which then guides the Llama reference's round-2 collection."""
    ref = cli_models("llama") / "ref"
    tokenizer = load_tokenizer(str(ref))
    records = read_jsonl(data["train"])
    folder, combined = round1("llama")
    ckpts = train(ref, other_family[family], data, combined, tmp_path / "ckpt", "--classifier_type", "V",
                  "--loss_type", "bce")
    check_checkpoint(ckpts, family, "V", "bce")
    assert guided_collect(ckpts[-1], data, tmp_path / "r2")["ref_model_id"] == str(ref)
    guided = check_collected(tmp_path / "r2", records, tokenizer, GUIDED_PROBLEMS, 1)
    check_guided_differs(check_collected(folder, records, tokenizer, NUM_PROBLEMS, NUM_SAMPLES), guided)


def refusal(capsys, module, argv: list[str]) -> str:
    """Run a stage as its command line does; it must exit 2 with one ``error:`` line. Returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(module.main, module.parse_args(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def names_both_vocabularies(message: str, ref: Path, size: int) -> bool:
    """The refusal names the reference tokenizer's size and the classifier's."""
    ref_size = len(load_tokenizer(str(ref)))
    return "incompatible vocabularies" in message and f"has {ref_size} tokens" in message and f" {size} " in message


OTHER_VOCABULARIES = [("gpt2_added", 403), ("gpt2_small", 300)]


@pytest.mark.parametrize("classifier,size", OTHER_VOCABULARIES)
def test_collect_refuses_classifier_of_another_vocabulary(classifier, size, cli_models, other_family, data, tmp_path,
                                                          capsys):
    """A GPT-2 classifier whose vocabulary differs from the Llama reference's is refused before any
    weights are read, naming both sizes; nothing is collected."""
    ref = cli_models("llama") / "ref"
    message = refusal(capsys, collect_training_data, [
        "--is_first_round", "1", "--ref_model_id", str(ref),
        "--classifier_model_id", str(other_family[classifier]), "--eta", "2", "--data_path", data["train"],
        "--train_eval_save_path", data["train_eval"], "--num_samples", "1", "--output_dir", str(tmp_path / "out"),
        *COMMON,
    ])
    assert names_both_vocabularies(message, ref, size), message
    assert not list((tmp_path / "out").glob("*_r*.json"))


@pytest.mark.parametrize("classifier,size", OTHER_VOCABULARIES)
def test_train_refuses_classifier_of_another_vocabulary(classifier, size, cli_models, round1, other_family, data,
                                                        tmp_path, capsys):
    """The same classifiers are refused by training, before anything is written."""
    ref = cli_models("llama") / "ref"
    _, combined = round1("llama")
    message = refusal(capsys, train_classifier, [
        "--ref_model_id", str(ref), "--classifier_model_id", str(other_family[classifier]),
        "--original_problems_path", data["train"], "--train_eval_save_path", data["train_eval"], "--init_mode", "zero",
        "--inference_mode", "bernoulli", "--dataset_type", "gsm8k", "--data_paths", str(combined),
        "--drop_no_variation", "0", "--dtype", "float32", "--output_dir", str(tmp_path / "out"),
    ])
    assert names_both_vocabularies(message, ref, size), message
    assert not (tmp_path / "out").exists()
