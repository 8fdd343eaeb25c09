"""Resuming after a hard kill: a stage run killed with SIGKILL part-way and started again
with the same arguments ends with exactly the files of an uninterrupted run of the same
seed (same names, same parsed content, sampled text included) and no stray temporaries.

Covered: collect_training_data.py round 1 (reference policy, and guided by a zero V head)
and eval_ckpt.py on a classifier checkpoint built here. Each run is a subprocess on the
tiny random Llama models and synthetic GSM8K-format problems. A kill that lands inside a
write leaves the atomic writer's temporary (``.<name>.<host>.<pid>.<random>.tmp``) behind;
since that window is too short to hit on purpose, the killed run's temporary is also laid
down by hand, under the killed process's pid, before the run is started again.

Also training resumed from a checkpoint with ``--resume_opt_scheduler 1``: the optimizer and
scheduler state that ``--save_opt_scheduler 1`` wrote (``optimizer.pt`` + ``lr_scheduler.pt``,
the original's names), an older checkpoint's ``scheduler.pt``, or the original resume's
``optimizer_scheduler_state.pt``; a checkpoint without them is a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import train_classifier
from utils.demo.synthetic import write_synthetic_dataset
from tests.helpers.fake_collected import train_flags, write_fake_collected
from tests.helpers.scripts import command, finish, results_in, run_and_kill, start
from utils.cli import run
from utils.data.io import TMP_SUFFIX, temporary_prefix
from utils.demo.tiny_models import write_tiny_models

NUM_TRAIN, NUM_TEST, NUM_SAMPLES = 8, 6, 2
SAMPLING = ["--use_chat_template", "0", "--dtype", "float32", "--max_new_tokens", "16", "--temperature", "0.8",
            "--top_p", "0.9", "--num_samples", str(NUM_SAMPLES), "--batch_size", "2"]
# Besides the results, a run may keep this record of its settings in each result folder
# (checked by a resume); it must then be the same as in the uninterrupted run.
BOOKKEEPING = ".run_settings.json"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """tiny/ (ref and classifier models), data/ (synthetic problems) and exp/ckpt_0 (a V/bce
    checkpoint with a random head, and the exp/args.json that evaluation inherits from)."""
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.models import load_tokenizer

    root = tmp_path_factory.mktemp("resume")
    write_tiny_models(root / "tiny", arch="llama")
    paths = write_synthetic_dataset(root / "data", NUM_TRAIN, NUM_TEST, seed=0)
    classifier = QSharpClassifier.from_causal_lm(str(root / "tiny" / "classifier"), ClassifierSpec("V", "bce"),
                                                 init_mode="random", dtype="float32", seed=0)
    classifier.save_pretrained(root / "exp" / "ckpt_0", tokenizer=load_tokenizer(str(root / "tiny" / "classifier")))
    args = {
        "ref_model_id": "tiny/ref", "classifier_model_id": "tiny/classifier", "classifier_type": "V",
        "inference_mode": "bernoulli", "loss_type": "bce", "use_bias": 0, "dataset_type": "gsm8k",
        "original_problems_path": str(paths["train"].relative_to(root)),
        "train_eval_save_path": str(paths["train_eval"].relative_to(root)),
        "use_chat_template": 0, "eta": 5.0, "temperature": 0.8, "top_p": 0.9, "dtype": "float32",
        "match_fn_type": "symbolic", "num_atoms": 11, "V_min": 0.0, "V_max": 1.0,
    }
    (root / "exp" / "args.json").write_text(json.dumps(args, indent=2))
    return root


def run_to_end(workdir: Path, cmd: list[str], log: Path) -> None:
    finish(start(workdir, cmd, log), log)


@contextmanager
def alongside(workdir: Path, cmd: list[str], log: Path):
    """Run ``cmd`` in the background during the block (on the other core); it must succeed."""
    proc = start(workdir, cmd, log)
    try:
        yield
        finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def leave_killed_temporary(folder: Path, name: str, pid: int) -> Path:
    """The temporary a process ``pid`` killed while writing ``folder/name`` leaves behind."""
    prefix = temporary_prefix(name).replace(f".{os.getpid()}.", f".{pid}.")
    path = folder / f"{prefix}k1ll3d{TMP_SUFFIX}"
    path.write_text('{"problem": "half writ')
    return path


def tree(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (hidden ones included) -> its parsed JSON / JSONL content."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_dir():
                entries[rel + "/"] = None
            elif name.endswith(".jsonl"):
                entries[rel] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            elif name.endswith(".json") and not name.startswith("."):
                entries[rel] = json.loads(path.read_text())
            else:
                entries[rel] = path.read_bytes()
    return entries


def same_content(got: object, want: object, float_rtol: float) -> bool:
    """``got == want``, except that floats may differ by ``float_rtol`` relative."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=float_rtol, abs_tol=float_rtol)
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(same_content(got[k], want[k], float_rtol) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(same_content(g, w, float_rtol) for g, w in zip(got, want))
    return type(got) is type(want) and got == want


def check_same_as_uninterrupted(resumed: Path, uninterrupted: Path, expected_results: set[str],
                                float_rtol: float = 0.0) -> None:
    """Same entries (hidden ones included) as the uninterrupted run, which wrote the expected
    results and nothing else but its settings record; same parsed content everywhere (floats
    within ``float_rtol``, relative)."""
    got, want = tree(resumed), tree(uninterrupted)
    hidden = [rel for rel in got if Path(rel).name != BOOKKEEPING and any(part.startswith(".") for part in Path(rel).parts)]
    unexpected = sorted(rel for rel in set(want) - expected_results if Path(rel).name != BOOKKEEPING)
    assert not unexpected and expected_results <= set(want), (
        f"uninterrupted run: unexpected {unexpected}, missing {sorted(expected_results - set(want))}")
    visible = {rel: content for rel, content in got.items() if rel not in hidden}
    assert set(visible) == set(want), (f"missing after resume: {sorted(set(want) - set(visible))}, "
                                       f"extra: {sorted(set(visible) - set(want))}")
    different = sorted(rel for rel in want if not same_content(visible[rel], want[rel], float_rtol))
    assert not different, f"differ from the uninterrupted run: {different}"
    assert not hidden, f"stray files after resume: {hidden}"


@pytest.mark.parametrize("name, guidance", [("eta0", ["--eta", "0"]), ("eta5_V", ["--eta", "5", "--classifier_type", "V"])],
                         ids=["eta0", "eta5_V"])
def test_collect_resumes_after_sigkill(workdir, name, guidance):
    """collect_training_data.py killed mid-way, re-run with another batch size: the files of an
    uninterrupted run."""
    out, full = workdir / f"collect_{name}_killed", workdir / f"collect_{name}_full"

    def collect(output_dir: Path, *extra: str) -> list[str]:
        return command("collect_training_data.py", "--is_first_round", "1", *guidance, "--ref_model_id", "tiny/ref",
                       "--classifier_model_id", "tiny/classifier", "--data_path", "data/synth_train.jsonl",
                       "--train_eval_save_path", "data/synth_train_eval.json", *SAMPLING, "--output_dir", str(output_dir),
                       *extra)

    expected = {f"{i}_r{r}.json" for i in range(NUM_TRAIN) for r in range(NUM_SAMPLES)}
    with alongside(workdir, collect(full), workdir / f"{full.name}.log"):
        pid = run_and_kill(workdir, collect(out), out, len(expected), workdir / f"{out.name}.1.log")
        leave_killed_temporary(out, min(expected - set(results_in(out))), pid)
        # the continuous engine samples each request from its own stream: any batch size resumes
        run_to_end(workdir, collect(out, "--batch_size", "3"), workdir / f"{out.name}.2.log")
    check_same_as_uninterrupted(out, full, expected)


def test_eval_resumes_after_sigkill(workdir):
    """eval_ckpt.py killed mid-way, re-run: the samples, results and stats of an uninterrupted run.
    Tokens, texts and grades are exact. The KL floats are equal up to float32 rounding: a sample
    resumed mid-batch shares its steps with other rows than before, and the forward's rounding
    depends on the batch's shapes."""
    tag = "eta_5.0_top_k_20_temp_0.8"
    out, full = workdir / "eval_killed", workdir / "eval_full"

    def evaluate(output_dir: Path) -> list[str]:
        return command("eval_ckpt.py", "--classifier_ckpt_path", "exp/ckpt_0", "--eta", "5",
                       "--data_path", "data/synth_test.jsonl", "--train_eval_save_path", "data/synth_test_eval.json",
                       "--num_samples", str(NUM_SAMPLES), "--batch_size", "2", "--max_new_tokens", "16",
                       "--output_dir", str(output_dir))

    sample_dir = f"individual_eval_inference_{tag}"
    samples = {f"{i}_r{r}.json" for i in range(NUM_TEST) for r in range(NUM_SAMPLES)}
    expected = {f"{sample_dir}/", f"inference_eval_results_{tag}.jsonl", f"reward_stats_{tag}.json",
                *(f"{sample_dir}/{name}" for name in samples)}
    with alongside(workdir, evaluate(full), workdir / f"{full.name}.log"):
        pid = run_and_kill(workdir, evaluate(out), out / sample_dir, len(samples), workdir / f"{out.name}.1.log")
        assert not (out / f"reward_stats_{tag}.json").exists()
        leave_killed_temporary(out / sample_dir, min(samples - set(results_in(out / sample_dir))), pid)
        run_to_end(workdir, evaluate(out), workdir / f"{out.name}.2.log")
    check_same_as_uninterrupted(out, full, expected, float_rtol=1e-5)


def test_train_resumes_optimizer_and_scheduler(workdir, capsys):
    """--save_opt_scheduler 1 writes optimizer.pt + lr_scheduler.pt; --resume_opt_scheduler 1
    from such a checkpoint continues their state (the new run's ckpt_0 holds it)."""
    paths = write_fake_collected(workdir / "fake", num_train=4, repeats=1, num_ood=1)
    flags = [*train_flags(paths, workdir / "tiny"), "--warmup_step", "10", "--ckpt_freq", "2", "--eval_freq", "100",
             "--save_opt_scheduler", "1"]

    def train(output_dir: str, *extra: str) -> Path:
        run(train_classifier.main, train_classifier.parse_args([*flags, *extra, "--output_dir", str(workdir / output_dir)]))
        return workdir / output_dir

    def states(checkpoint: Path) -> tuple[dict, dict]:
        load = lambda name: torch.load(checkpoint / name, map_location="cpu", weights_only=False)  # noqa: E731
        return load("optimizer.pt"), load("lr_scheduler.pt")

    def steps(optimizer_state: dict) -> set[int]:
        return {int(s["step"]) for s in optimizer_state["state"].values()}

    first = train("train_first")
    assert {p.name for p in first.glob("ckpt_*")} == {"ckpt_0", "ckpt_2", "ckpt_4"}
    assert {"optimizer.pt", "lr_scheduler.pt"} <= {p.name for p in (first / "ckpt_4").iterdir()}
    assert not list(first.rglob("scheduler.pt"))
    optimizer_state, scheduler_state = states(first / "ckpt_4")
    assert steps(optimizer_state) == {4} and scheduler_state["last_epoch"] == 4  # mid-warmup: 4 of 10 steps

    def resume(name: str, checkpoint: Path) -> Path:
        return train(name, "--init_mode", "warmstart", "--classifier_ckpt_path", str(checkpoint), "--resume_opt_scheduler", "1")

    resumed = resume("train_resumed", first / "ckpt_4")
    start, start_scheduler = states(resumed / "ckpt_0")  # the counter restarts at 0, as the original's
    assert steps(start) == {4} and start_scheduler == scheduler_state
    for key, value in optimizer_state["state"][0].items():
        assert torch.equal(start["state"][0][key], value), key
    end, end_scheduler = states(resumed / "ckpt_4")
    assert steps(end) == {8} and end_scheduler["last_epoch"] == 8
    assert end_scheduler["_last_lr"][0] == pytest.approx(1e-3 * 8 / 10)  # the warmup went on

    # a checkpoint of this project's earlier versions: scheduler.pt
    older = workdir / "older" / "ckpt_4"
    shutil.copytree(first / "ckpt_4", older)
    os.replace(older / "lr_scheduler.pt", older / "scheduler.pt")
    assert states(resume("train_from_older", older) / "ckpt_0")[1] == scheduler_state

    # the file the original's resume reads: {"optimizer": ..., "scheduler": ...}
    combined = workdir / "combined" / "ckpt_4"
    shutil.copytree(first / "ckpt_4", combined)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state}, combined / "optimizer_scheduler_state.pt")
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        (combined / name).unlink()
    assert states(resume("train_from_combined", combined) / "ckpt_0")[1] == scheduler_state

    # none of them: one line saying what is missing and how to get it
    bare = workdir / "bare" / "ckpt_4"
    shutil.copytree(first / "ckpt_4", bare)
    (bare / "lr_scheduler.pt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        resume("train_from_bare", bare)
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"error: --resume_opt_scheduler 1 but {bare} holds neither "
                                                  "optimizer.pt + lr_scheduler.pt nor optimizer_scheduler_state.pt")
    assert "--save_opt_scheduler 1" in error
