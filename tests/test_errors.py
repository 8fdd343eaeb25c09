"""Bad input: one ``error:`` line on stderr, exit code 2, no traceback, nothing overwritten.

(Progress bars of work done before the error, such as combine's, may precede that line.)

Each case runs a stage's ``main`` in-process through ``utils.cli.run`` (what ``python
script.py`` does); two cases also run the real command line. Cases are grouped by what is
wrong: paths, file contents, ranges and values, unknown names, incompatible settings,
checkpoints, output folders, and what ``combine_training_data.py`` merges.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

import collect_training_data
import combine_training_data
import eval_ckpt
import train_classifier
from utils.demo.synthetic import write_synthetic_dataset
from utils.classifier import ClassifierSpec, QSharpClassifier
from utils.cli import ArgumentParser, int01, run
from utils.models import load_tokenizer
from utils.demo.tiny_models import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir):
    """Synthetic problems, tiny models, a 4-problem collection with its combined file, and a
    classifier checkpoint with args.json."""
    os.environ.pop("QSHARP_DEBUG", None)
    root = tmp_path_factory.mktemp("errors")
    data = write_synthetic_dataset(root / "data", 8, 4, seed=0)
    models = tiny_dir("llama")
    e = {"root": root, **{k: str(v) for k, v in data.items()}, "ref": str(models / "ref"), "cls": str(models / "classifier")}
    e["collected"] = str(root / "collected")
    run(collect_training_data.main, collect_training_data.parse_args(collect_argv(e)))
    run(combine_training_data.main, combine_training_data.parse_args(combine_argv(e)))
    e["combined"] = str(root / "collected" / "all_train_data.jsonl")
    exp = root / "exp"
    classifier = QSharpClassifier.from_causal_lm(e["cls"], ClassifierSpec("V", "bce"), init_mode="random", dtype="float32", seed=0)
    classifier.save_pretrained(exp / "ckpt_0", tokenizer=load_tokenizer(e["ref"]))
    saved = {"ref_model_id": e["ref"], "classifier_model_id": e["cls"], "classifier_type": "V", "inference_mode": "bernoulli",
             "loss_type": "bce", "use_bias": 0, "original_problems_path": e["train"], "train_eval_save_path": e["train_eval"],
             "dataset_type": "gsm8k", "use_chat_template": 0, "eta": 1.0, "temperature": 0.8, "top_p": 0.9,
             "dtype": "float32", "match_fn_type": "symbolic", "num_atoms": 11, "V_min": 0.0, "V_max": 1.0}
    (exp / "args.json").write_text(json.dumps(saved))
    e["ckpt"] = str(exp / "ckpt_0")
    return e


def collect_argv(e, *extra, output=None):
    return ["--is_first_round", "1", "--ref_model_id", e["ref"], "--classifier_model_id", e["cls"],
            "--data_path", e["train"], "--train_eval_save_path", e["train_eval"],
            "--output_dir", output or e["collected"], "--start_index", "0", "--end_index", "4", "--num_samples", "2",
            "--batch_size", "2", "--max_new_tokens", "4", "--eta", "0", "--use_chat_template", "0", "--dtype", "float32",
            *extra]


def combine_argv(e, folder=None):
    return ["--data_template_path", folder or e["collected"], "--data_path", e["train"],
            "--train_eval_save_path", e["train_eval"]]


def train_argv(e, *extra):
    return ["--ref_model_id", e["ref"], "--classifier_model_id", e["cls"], "--original_problems_path", e["train"],
            "--train_eval_save_path", e["train_eval"], "--init_mode", "zero", "--inference_mode", "bernoulli",
            "--dataset_type", "gsm8k", "--data_paths", e["combined"], "--output_dir", str(e["root"] / "train_out"),
            "--num_epochs", "1", "--dtype", "float32", "--drop_no_variation", "0", *extra]


def eval_argv(e, *extra, ckpt=None):
    return ["--classifier_ckpt_path", ckpt or e["ckpt"], "--data_path", e["test"], "--train_eval_save_path", e["test_eval"],
            "--num_samples", "1", "--max_new_tokens", "4", "--output_dir", str(e["root"] / "eval_out"), *extra]


MODULES = {"collect": collect_training_data, "combine": combine_training_data, "train": train_classifier, "eval": eval_ckpt}
ARGV = {"collect": collect_argv, "combine": combine_argv, "train": train_argv, "eval": eval_argv}


def fails(capsys, stage: str, argv: list[str]) -> str:
    """Run a stage; it must exit 2 with exactly one ``error:`` line on stderr. Returns that line."""
    module = MODULES[stage]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(module.main, module.parse_args(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def replace(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("stage,flag,message", [
    ("collect", "--data_path", "problem file .* does not exist"),
    ("eval", "--data_path", "problem file .* does not exist"),
    ("train", "--original_problems_path", "problem file .* does not exist"),
    ("train", "--data_paths", "problem file .* does not exist"),
    ("eval", "--train_eval_save_path", "split map not found"),
    ("train", "--train_eval_save_path", "split map not found"),
    ("combine", "--data_template_path", "is not a folder"),
    ("combine", "--train_eval_save_path", "split map not found"),
    ("eval", "--classifier_ckpt_path", "checkpoint .* does not exist"),
])
def test_missing_path(env, capsys, stage, flag, message):
    argv = replace(ARGV[stage](env), flag, str(env["root"] / "nowhere" / "missing.json"))
    assert re.search(message, fails(capsys, stage, argv))


def test_problem_path_is_a_folder(env, capsys):
    error = fails(capsys, "collect", replace(collect_argv(env), "--data_path", str(env["root"])))
    assert "is a folder, not a jsonl file" in error


# ---------------------------------------------------------------- file contents


def test_malformed_jsonl_line_names_file_and_line(env, capsys):
    lines = Path(env["train"]).read_text().splitlines()
    lines[2] = lines[2][:-5]  # truncated record on line 3
    bad = write(env["root"] / "bad.jsonl", "\n".join(lines))
    assert f"{bad}:3: malformed JSON line" in fails(capsys, "collect", replace(collect_argv(env), "--data_path", bad))


@pytest.mark.parametrize("field,extra", [("prompt", []), ("answer", ["--dataset_type", "gsm8k"])])
def test_record_without_required_field(env, capsys, field, extra):
    records = [json.loads(line) for line in Path(env["train"]).read_text().splitlines()]
    del records[1][field]
    bad = write(env["root"] / f"no_{field}.jsonl", "\n".join(json.dumps(r) for r in records))
    error = fails(capsys, "collect", replace(collect_argv(env, *extra), "--data_path", bad))
    assert f"record 1 (line 2) has no {field} field" in error


# ---------------------------------------------------------------- ranges and values


@pytest.mark.parametrize("stage,start,end,message", [
    ("collect", "8", "-1", "--start_index 8 is out of range: the file holds 8 problems"),
    ("collect", "-1", "4", "--start_index -1 is out of range"),
    ("collect", "0", "9", "--end_index 9 must be -1 or in (0, 8]"),
    ("collect", "5", "3", "--end_index 3 must be -1 or in (5, 8]"),
    ("eval", "4", "-1", "--start_index 4 is out of range: the file holds 4 problems"),
    ("eval", "3", "1", "--end_index 1 must be -1 or in (3, 4]"),
])
def test_index_range(env, capsys, stage, start, end, message):
    argv = ARGV[stage](env)
    argv = replace(replace(argv, "--start_index", start), "--end_index", end) if "--start_index" in argv else [
        *argv, "--start_index", start, "--end_index", end]
    assert message in fails(capsys, stage, argv)


@pytest.mark.parametrize("stage", ["collect", "train", "eval"])
def test_negative_eta(env, capsys, stage):
    argv = ARGV[stage](env)
    argv = replace(argv, "--eta", "-1") if "--eta" in argv else [*argv, "--eta", "-1"]
    assert "--eta: must be at least 0, got '-1'" in fails(capsys, stage, argv)


# ---------------------------------------------------------------- unknown names list the valid ones


@pytest.mark.parametrize("stage,flag,valid", [
    ("collect", "--classifier_type", "'Q', 'V'"),
    ("train", "--classifier_type", "'Q', 'V'"),
    ("collect", "--loss_type", "'bce', 'mse', 'mle'"),
    ("train", "--loss_type", "'bce', 'mse', 'mle'"),
    ("eval", "--inference_mode", "'bernoulli', 'expectation', 'mle', 'disabled'"),
    ("train", "--inference_mode", "'bernoulli', 'expectation', 'mle', 'disabled'"),
    ("collect", "--match_fn_type", "'strict', 'symbolic'"),
    ("eval", "--dataset_type", "'gsm8k', 'math'"),
    ("train", "--dataset_type", "'gsm8k', 'math'"),
    ("train", "--init_mode", "'zero', 'random', 'reuse', 'warmstart'"),
    ("collect", "--dtype", "'float32', 'bfloat16', 'float16'"),
])
def test_unknown_name_lists_valid_values(env, capsys, stage, flag, valid):
    argv = ARGV[stage](env)
    argv = replace(argv, flag, "nonsense") if flag in argv else [*argv, flag, "nonsense"]
    error = fails(capsys, stage, argv)
    assert "invalid choice: 'nonsense'" in error and valid in error


# ---------------------------------------------------------------- incompatible settings


def test_expectation_targets_outside_unit_interval(env, capsys):
    """The original's expectation recipe needs --shift_reward 1 (R = correctness - 1); with
    R = correctness + 1 every target exp(eta * R) is at least e^eta."""
    argv = train_argv(env, "--loss_type", "mse", "--eta", "1", "--shift_reward", "-1")
    argv = replace(replace(argv, "--inference_mode", "expectation"), "--output_dir", str(env["root"] / "train_expectation"))
    error = fails(capsys, "train", argv)
    assert "targets exp(eta * R) span [2.71828" in error and "outside [0, 1]" in error and "--shift_reward 1" in error


def test_mle_inference_needs_mle_loss(env, capsys):
    assert "--inference_mode mle needs --loss_type mle" in fails(
        capsys, "train", replace(train_argv(env), "--inference_mode", "mle"))


def test_cd_baseline_needs_a_scalar_head(env, capsys):
    """The original silently guides an mle head with the distributional offset under --cd_baseline 1."""
    argv = train_argv(env, "--loss_type", "mle", "--cd_baseline", "1")
    assert "--cd_baseline 1 needs a scalar head" in fails(capsys, "train", argv)


@pytest.fixture(scope="module")
def other_vocab_lm(tmp_path_factory):
    """A causal LM (and tokenizer) with a 300-token vocabulary: not the tiny reference's 400."""
    path = tmp_path_factory.mktemp("other_vocab")
    tokenizer = build_tokenizer(vocab_size=300)
    build_model("llama", tokenizer, 32, 1, 2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("stage", ["collect", "train"])
def test_vocabulary_mismatch(env, capsys, other_vocab_lm, stage):
    argv = replace(ARGV[stage](env), "--classifier_model_id", other_vocab_lm)
    if stage == "collect":
        argv = replace(replace(argv, "--eta", "2"), "--output_dir", str(env["root"] / "vocab_out"))
    assert "incompatible vocabularies" in fails(capsys, stage, argv)


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def broken_ckpt(env, tmp_path):
    """``broken_ckpt(without)``: a copy of the checkpoint (and args.json) minus the named files."""

    def make(*without: str) -> str:
        exp = tmp_path / "exp"
        shutil.copytree(Path(env["ckpt"]).parent, exp)
        for name in without:
            (exp / name).unlink()
        return str(exp / "ckpt_0")

    return make


def test_checkpoint_without_args_json(env, capsys, broken_ckpt):
    ckpt = broken_ckpt("args.json")
    assert "has no args.json" in fails(capsys, "eval", eval_argv(env, ckpt=ckpt))
    argv = [*replace(collect_argv(env, "--classifier_ckpt_path", ckpt), "--is_first_round", "0")]
    assert "has no args.json" in fails(capsys, "collect", argv)


def test_checkpoint_without_weights(env, capsys, broken_ckpt):
    ckpt = broken_ckpt("ckpt_0/model.safetensors")
    argv = eval_argv(env, ckpt=ckpt)
    argv = replace(argv, "--output_dir", str(Path(ckpt).parent / "out"))
    assert "holds no classifier head" in fails(capsys, "eval", argv)


# ---------------------------------------------------------------- output folders


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("flag,value", [("--temperature", "0.5"), ("--max_new_tokens", "6"), ("--eta", "3")])
def test_collect_output_folder_from_other_settings(env, capsys, flag, value):
    folder = Path(env["collected"])
    before = snapshot(folder)
    argv = replace(collect_argv(env), flag, value) if flag in collect_argv(env) else collect_argv(env, flag, value)
    error = fails(capsys, "collect", [*argv, "--force", "1"])
    assert "holds files from other settings" in error and flag.lstrip("-") in error
    assert snapshot(folder) == before, "a refused run changed the folder"


def test_collect_resumes_with_other_batch_size_and_shard(env, capsys):
    """What does not change the data (batch size, index range, dtype) may differ between runs."""
    folder = Path(env["collected"])
    before = snapshot(folder)
    argv = replace(replace(collect_argv(env), "--batch_size", "3"), "--end_index", "2")
    run(collect_training_data.main, collect_training_data.parse_args(argv))
    assert snapshot(folder) == before  # everything was already there


def test_force_redoes_only_this_runs_files(env, tmp_path):
    """--force 1 deletes (and rewrites) the files of its own range and repeats, nothing else."""
    folder = tmp_path / "collected"
    shutil.copytree(env["collected"], folder)
    (folder / "notes.txt").write_text("mine")
    for path in folder.iterdir():
        os.utime(path, (0, 0))  # a rewritten file gets a fresh time
    before = {p.name: (p.stat().st_mtime, p.read_bytes()) for p in folder.iterdir()}
    argv = replace(replace(collect_argv(env, output=str(folder)), "--end_index", "2"), "--num_samples", "1")
    run(collect_training_data.main, collect_training_data.parse_args([*argv, "--force", "1"]))
    after = {p.name: (p.stat().st_mtime, p.read_bytes()) for p in folder.iterdir()}
    assert set(after) == set(before)
    redone = {name for name in after if after[name][0] != before[name][0]}
    assert redone == {"0_r0.json", "1_r0.json"}
    assert all(after[name][1] == before[name][1] for name in after), "same seed, same samples"


def test_run_settings_bind_a_folder_once_it_holds_results(tmp_path):
    from utils.cli import check_run_settings

    check_run_settings(tmp_path, {"eta": 0.0, "data_path": str(tmp_path)})
    check_run_settings(tmp_path, {"eta": 1.0, "data_path": str(tmp_path)})  # no results yet: the new settings hold
    (tmp_path / "0_r0.json").write_text("{}")
    relative = os.path.relpath(tmp_path)  # the same path written another way is the same setting
    check_run_settings(tmp_path, {"eta": 1.0, "data_path": relative})
    with pytest.raises(ValueError, match="eta 1.0 there, 2.0 now"):
        check_run_settings(tmp_path, {"eta": 2.0, "data_path": relative})


def test_eval_output_folder_from_other_settings(env, capsys):
    out = env["root"] / "eval_settings"
    argv = replace(eval_argv(env, "--eta", "0"), "--output_dir", str(out))
    run(eval_ckpt.main, eval_ckpt.parse_args(argv))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    error = fails(capsys, "eval", replace(argv, "--max_new_tokens", "6"))
    assert "holds files from other settings" in error and "max_new_tokens" in error
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- combine checks what it merges


@pytest.fixture
def collected_copy(env, tmp_path):
    """A copy of the collected folder with an existing all_train_data.jsonl that must survive."""
    folder = tmp_path / "collected"
    shutil.copytree(env["collected"], folder)
    (folder / "all_train_data.jsonl").write_text("previous output\n")
    return folder


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case,message", [
    ("truncated", "0_r1.json: not valid JSON"),
    ("not_object", "0_r1.json: expected a JSON object"),
    ("duplicate_name", "both hold problem 0, repeat 1"),
    ("duplicate_problem", "hold the same problem and repeat 0"),
    ("missing_field", "field partial_guided_predictions is missing"),
    ("unequal_lists", "collected lists differ in length"),
    ("other_problem", "its problem text differs"),
    ("id_beyond_file", "problem id 99 is not in"),
    ("not_in_split_map", "is not in the split map"),
])
def test_combine_refuses_bad_files_and_keeps_output(env, capsys, collected_copy, tmp_path, case, message):
    folder = collected_copy
    split_map = env["train_eval"]
    if case == "truncated":
        text = (folder / "0_r1.json").read_text()
        (folder / "0_r1.json").write_text(text[: len(text) // 2])
    elif case == "not_object":
        (folder / "0_r1.json").write_text("[1, 2]")
    elif case == "duplicate_name":
        shutil.copy(folder / "0_r1.json", folder / "00_r1.json")
    elif case == "duplicate_problem":
        records = Path(env["train"]).read_text().splitlines()
        records[3] = records[0]  # two lines of the problem file hold one problem
        data_path = write(tmp_path / "dup.jsonl", "\n".join(records))
        edit(folder / "3_r0.json", lambda d: d.update(problem=json.loads(records[0])["problem"]))
    elif case == "missing_field":
        edit(folder / "1_r0.json", lambda d: d.pop("partial_guided_predictions"))
    elif case == "unequal_lists":
        edit(folder / "1_r0.json", lambda d: d["partial_guided_predictions"].append("extra"))
    elif case == "other_problem":
        edit(folder / "2_r0.json", lambda d: d.update(problem="another problem"))
    elif case == "id_beyond_file":
        shutil.copy(folder / "0_r0.json", folder / "99_r0.json")
    elif case == "not_in_split_map":
        split_map = env["test_eval"]  # the split map of other problems
    argv = combine_argv(env, str(folder))
    argv = replace(argv, "--train_eval_save_path", split_map)
    if case == "duplicate_problem":
        argv = replace(argv, "--data_path", data_path)
    assert message in fails(capsys, "combine", argv)
    assert (folder / "all_train_data.jsonl").read_text() == "previous output\n"


# ---------------------------------------------------------------- the real command line


@pytest.mark.parametrize("stage,argv_change,message", [
    ("collect_training_data.py", ("--data_path", "missing.jsonl"), "problem file missing.jsonl does not exist"),
    ("eval_ckpt.py", ("--inference_mode", "greedy"), "invalid choice: 'greedy'"),
])
def test_command_line_prints_one_line_without_traceback(env, stage, argv_change, message):
    argv = collect_argv(env) if stage.startswith("collect") else eval_argv(env)
    flag, value = argv_change
    argv = replace(argv, flag, value) if flag in argv else [*argv, flag, value]
    result = subprocess.run([sys.executable, str(REPO / stage), *argv], cwd=env["root"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------- flag domains


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path`` (or ``path`` itself) with its bytes and mtime; {} when absent."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def refused(capsys, stage: str, argv: list[str], watched: list[Path]) -> str:
    """:func:`fails`, and the files under ``watched`` (existing outputs, or outputs that must
    not appear) are exactly as before."""
    before = {str(path): tree(path) for path in watched}
    error = fails(capsys, stage, argv)
    assert {str(path): tree(path) for path in watched} == before, "a refused run changed files"
    return error


def with_flag(argv: list[str], flag: str, *values: str) -> list[str]:
    """``argv`` with ``flag`` set to ``values`` (replaced where given, else appended)."""
    if flag not in argv:
        return [*argv, flag, *values]
    at = argv.index(flag)
    return [*argv[:at + 1], *values, *argv[at + 2:]]


def outputs(e, stage: str) -> list[Path]:
    """What a refused run of ``stage`` must leave as it is."""
    return {"collect": [Path(e["collected"]), Path(e["train_eval"])], "combine": [Path(e["collected"])],
            "train": [e["root"] / "train_out"], "eval": [e["root"] / "eval_out", Path(e["ckpt"]).parent]}[stage]


@pytest.mark.parametrize("stage,flag,value,message", [
    ("collect", "--top_p", "1.5", "must be in [0, 1], got '1.5'"),
    ("collect", "--temperature", "-0.5", "must be at least 0, got '-0.5'"),
    ("collect", "--temperature", "nan", "expected a finite number, got 'nan'"),
    ("collect", "--eta", "inf", "expected a finite number, got 'inf'"),
    ("collect", "--num_samples", "0", "must be at least 1, got '0'"),
    ("collect", "--batch_size", "0", "must be at least 1, got '0'"),
    ("collect", "--max_new_tokens", "-5", "must be at least 1, got '-5'"),
    ("collect", "--top_k", "0", "must be at least 1, or -1, got '0'"),
    ("collect", "--seed", "-1", "must be in [0, 4294967295], got '-1'"),
    ("collect", "--eval_ratio", "1.5", "must be in [0, 1], got '1.5'"),
    ("collect", "--max_batch_tokens", "-1", "must be at least 0, got '-1'"),
    ("collect", "--num_atoms", "1", "must be at least 2, got '1'"),
    ("collect", "--V_max", "nan", "expected a finite number, got 'nan'"),
    ("collect", "--batch_size", "2.5", "expected an integer, got '2.5'"),
    ("eval", "--top_p", "-0.1", "must be in [0, 1], got '-0.1'"),
    ("eval", "--max_new_tokens", "0", "must be at least 1, got '0'"),
    ("eval", "--num_samples", "0", "must be at least 1, got '0'"),
    ("eval", "--max_prompt_length", "0", "must be at least 1, or -1, got '0'"),
    ("eval", "--kl_batch_size", "0", "must be at least 1, got '0'"),
    ("train", "--lr", "0", "must be greater than 0, got '0'"),
    ("train", "--id_eval_ratio", "1", "must be in [0, 1), got '1'"),
    ("train", "--num_epochs", "0", "must be at least 1, got '0'"),
    ("train", "--batch_size", "0", "must be at least 1, got '0'"),
    ("train", "--shift_reward", "nan", "expected a finite number, got 'nan'"),
    ("train", "--weight_decay", "-0.1", "must be at least 0, got '-0.1'"),
    ("train", "--warmup_step", "-2", "must be at least 0, or -1, got '-2'"),
    ("train", "--keep_last_n", "0", "must be at least 1, or -1, got '0'"),
    ("train", "--max_length", "0", "must be at least 1, or -1, got '0'"),
    ("train", "--eval_max_size", "0", "must be at least 1, got '0'"),
    ("train", "--world_size", "0", "must be at least 1, got '0'"),
    ("train", "--top_p", "2", "must be in [0, 1], got '2'"),
])
def test_flag_out_of_its_domain(env, capsys, stage, flag, value, message):
    error = refused(capsys, stage, with_flag(ARGV[stage](env), flag, value), outputs(env, stage))
    assert f"argument {flag}: {message}" in error


def test_every_value_of_a_sweep_is_checked(env, capsys):
    error = refused(capsys, "eval", eval_argv(env, "--eta", "0", "1", "nan"), outputs(env, "eval"))
    assert "argument --eta: expected a finite number, got 'nan'" in error


def parser_of(module) -> argparse.ArgumentParser:
    """The argument parser a stage's ``parse_args`` builds."""
    seen = []

    def grab(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    with mock.patch.object(ArgumentParser, "parse_args", grab), pytest.raises(SystemExit):
        module.parse_args([])
    return seen[0]


@pytest.mark.parametrize("stage", ["collect", "combine", "train", "eval"])
def test_every_numeric_flag_declares_its_domain(env, capsys, stage):
    """No numeric flag is a bare int or float (the index range excepted: it is checked against
    the problem file); each refuses a value outside its domain, naming the flag."""
    actions = [a for a in parser_of(MODULES[stage])._actions if a.option_strings and a.type not in (None, str, int01)]
    bare = [a.dest for a in actions if a.type in (int, float)]
    assert set(bare) <= {"start_index", "end_index"}, f"flags without a domain: {bare}"
    for action in (a for a in actions if a.type not in (int, float)):
        flag = action.option_strings[0]
        bad = "-2" if action.type.__name__.startswith("int_at_least") else "nan"
        error = fails(capsys, stage, with_flag(ARGV[stage](env), flag, bad))
        assert f"argument {flag}: " in error and repr(bad) in error


def test_inherited_value_out_of_its_domain(env, capsys, tmp_path):
    """args.json is checked against the same domains (it is written by train, or by hand)."""
    exp = tmp_path / "exp"
    shutil.copytree(Path(env["ckpt"]).parent, exp)
    edit(exp / "args.json", lambda d: d.update(temperature=-1.0))
    argv = eval_argv(env, ckpt=str(exp / "ckpt_0"))
    error = refused(capsys, "eval", argv, [exp, env["root"] / "eval_out"])
    assert f"{exp / 'args.json'}: temperature must be at least 0, got '-1.0'" in error
    (exp / "args.json").write_text("[]")
    assert "args.json: expected a JSON object, found list" in fails(capsys, "eval", argv)


# ---------------------------------------------------------------- records: file, line and field


def problem_lines(e) -> list[dict]:
    return [json.loads(line) for line in Path(e["train"]).read_text().splitlines()]


@pytest.mark.parametrize("case,extra,message", [
    ("gsm8k_without_answer", [], "record 1 (line 2) has no answer field (other records carry answer"),
    ("math_without_solution", ["--dataset_type", "math"], "record 1 (line 2) has no solution field"),
    ("prompt_not_a_string", [], "record 1 (line 2): field prompt is not a string but int"),
    ("not_an_object", [], "record 1 (line 2) is not a JSON object but list"),
    ("after_a_blank_line", [], "record 1 (line 3) has no prompt field"),
])
def test_problem_record_refused_with_file_line_and_field(env, capsys, tmp_path, case, extra, message):
    """Never graded: before, a GSM8K record without answer turned the file into MATH, graded
    on solutions (no box in GSM8K's): every sample False."""
    records = problem_lines(env)
    lines = [json.dumps(r) for r in records]
    if case == "gsm8k_without_answer":
        del records[1]["answer"]
        lines[1] = json.dumps(records[1])
    elif case == "math_without_solution":
        del records[1]["solution"]
        lines[1] = json.dumps(records[1])
    elif case == "prompt_not_a_string":
        lines[1] = json.dumps({**records[1], "prompt": 5})
    elif case == "not_an_object":
        lines[1] = "[1, 2]"
    elif case == "after_a_blank_line":
        del records[1]["prompt"]
        lines[1:2] = ["", json.dumps(records[1])]
    bad = write(tmp_path / "problems.jsonl", "\n".join(lines))
    argv = with_flag(collect_argv(env, *extra, output=str(tmp_path / "out")), "--data_path", bad)
    error = refused(capsys, "collect", argv, [tmp_path / "out", Path(env["train_eval"])])
    assert f"{bad}: {message}" in error


@pytest.mark.parametrize("change,message", [
    (lambda d: d["partial_guided_prompts_tokenized"].__setitem__(0, ["a"]),
     "field partial_guided_prompts_tokenized, entry 0: expected a list of token ids"),
    (lambda d: d["partial_guided_predictions_correctness"].__setitem__(0, "yes"),
     "field partial_guided_predictions_correctness, entry 0: expected true/false (or 0/1), got 'yes'"),
    (lambda d: d.update(fully_guided_predictions="text"), "field fully_guided_predictions is not a list"),
    (lambda d: d.pop("problem"), "field problem is missing"),
])
def test_combine_refuses_bad_collected_entries(env, capsys, collected_copy, change, message):
    edit(collected_copy / "1_r0.json", change)
    error = refused(capsys, "combine", combine_argv(env, str(collected_copy)), [collected_copy])
    assert f"{collected_copy / '1_r0.json'}: {message}" in error


@pytest.mark.parametrize("case,message", [
    ("missing_field", ":2: field partial_guided_predictions_correctness is missing"),
    ("unequal_lists", ":2: collected lists differ in length"),
    ("not_an_object", ":2: expected a JSON object, found int"),
    ("bad_token", ":2: field partial_guided_responses_tokenized, entry 0: expected a list of token ids"),
])
def test_train_refuses_bad_collected_lines(env, capsys, tmp_path, case, message):
    records = [json.loads(line) for line in Path(env["combined"]).read_text().splitlines()]
    line = records[1]
    if case == "missing_field":
        del line["partial_guided_predictions_correctness"]
    elif case == "unequal_lists":
        line["partial_guided_predictions"].append("extra")
    elif case == "bad_token":
        line["partial_guided_responses_tokenized"][0] = [1, -3]
    text = [json.dumps(r) for r in records]
    if case == "not_an_object":
        text[1] = "7"
    bad = write(tmp_path / "all_train_data.jsonl", "\n".join(text))
    out = tmp_path / "train_out"
    write(out / "args.json", "previous run")
    error = refused(capsys, "train", with_flag(with_flag(train_argv(env), "--data_paths", bad), "--output_dir", str(out)),
                    [out])
    assert f"{bad}{message}" in error


# ---------------------------------------------------------------- model, tokenizer and checkpoint loads


@pytest.fixture(scope="module")
def corrupt_ref(env, tmp_path_factory):
    """``corrupt_ref(name)``: a copy of the reference model with that file cut in half."""

    def make(name: str) -> str:
        folder = tmp_path_factory.mktemp("corrupt_ref")
        shutil.copytree(env["ref"], folder, dirs_exist_ok=True)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        return str(folder)

    return make


@pytest.mark.parametrize("stage,flag,path,message", [
    ("collect", "--ref_model_id", "{root}/nowhere/ref", "reference model {path} does not exist (a local path"),
    ("collect", "--ref_model_id", "./typo_ref", "reference model ./typo_ref does not exist (a local path"),
    ("collect", "--ref_model_id", "models/typo/ref", "reference model models/typo/ref does not exist (a local path"),
    ("train", "--ref_model_id", "{root}/nowhere/ref", "tokenizer {path} does not exist (a local path"),
    ("train", "--classifier_model_id", "{root}/nowhere/cls", "model config {path} does not exist (a local path"),
    ("eval", "--ref_model_id", "{root}/nowhere/ref", "reference model {path} does not exist (a local path"),
])
def test_mistyped_model_path_names_the_path(env, capsys, tmp_path, stage, flag, path, message):
    """A local-looking path is never sent to the hub (whose advice would be the internet connection)."""
    path = path.format(root=env["root"])
    argv = with_flag(with_flag(ARGV[stage](env), flag, path), "--output_dir", str(tmp_path / "out"))
    error = refused(capsys, stage, argv, [tmp_path / "out", Path(env["train_eval"])])
    assert message.format(path=path) in error and "internet" not in error


@pytest.mark.parametrize("stage,name", [
    ("collect", "model.safetensors"), ("collect", "tokenizer.json"), ("eval", "model.safetensors"),
    ("train", "tokenizer.json"),
])
def test_corrupt_reference_model_names_the_file(env, capsys, corrupt_ref, tmp_path, stage, name):
    ref = corrupt_ref(name)
    out = tmp_path / "out"
    argv = with_flag(ARGV[stage](env), "--ref_model_id", ref)
    argv = with_flag(argv, "--output_dir", str(out))
    error = refused(capsys, stage, argv, [out, Path(env["train_eval"])])
    assert ref in error and name in error and "cannot be read" in error


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_corrupt_checkpoint_names_the_file(env, capsys, broken_ckpt, name):
    """Eval refuses before it writes; train (warmstart) when it loads the checkpoint."""
    ckpt = Path(broken_ckpt())
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    error = refused(capsys, "eval", eval_argv(env, "--output_dir", str(ckpt.parent / "out"), ckpt=str(ckpt)), [ckpt.parent])
    assert f"classifier checkpoint {ckpt}: {name} cannot be read" in error
    argv = train_argv(env, "--classifier_ckpt_path", str(ckpt), "--resume_opt_scheduler", "0")
    argv = with_flag(with_flag(argv, "--init_mode", "warmstart"), "--output_dir", str(ckpt.parent / "train_out"))
    error = refused(capsys, "train", argv, [ckpt.parent])
    assert str(ckpt) in error and name in error and "cannot be read" in error


def test_hub_ids_stay_hub_ids(tmp_path, monkeypatch):
    """The rule of utils.models.is_local_path: org/name is a hub id unless such a folder exists."""
    from utils.models import is_local_path

    monkeypatch.chdir(tmp_path)
    hub = ["meta-llama/Meta-Llama-3-8B-Instruct", "gpt2", "Qwen/Qwen2.5-1.5B-Instruct"]
    local = ["./model", "../model", "/abs/model", "~/model", "checkpoints/exp/ckpt_10", "ckpt/"]
    assert not any(is_local_path(name) for name in hub) and all(is_local_path(name) for name in local)
    (tmp_path / "meta-llama" / "Meta-Llama-3-8B-Instruct").mkdir(parents=True)
    assert is_local_path("meta-llama/Meta-Llama-3-8B-Instruct")


# ---------------------------------------------------------------- the real command line, for the new kinds


def test_command_line_refuses_a_corrupt_checkpoint_in_one_line(env, broken_ckpt):
    """A library's error (safetensors) through a real process: one line, no traceback, no log lines."""
    ckpt = Path(broken_ckpt())
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = tree(ckpt.parent)
    argv = with_flag(eval_argv(env, ckpt=str(ckpt)), "--output_dir", str(ckpt.parent / "out"))
    result = subprocess.run([sys.executable, str(REPO / "eval_ckpt.py"), *argv], cwd=env["root"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"classifier checkpoint {ckpt}: model.safetensors cannot be read" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and tree(ckpt.parent) == before
