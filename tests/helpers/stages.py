"""Helpers of the end-to-end tests: run a stage script with a user's command line, and check
the files that the stages hand to each other (collected per-repeat files, evaluation outputs)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
from pathlib import Path

import torch

from utils.cli import run
from utils.data.problems import COLLECTED_FIELDS

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "datasets"
RESULT_NAME = re.compile(r"\d+_r\d+\.json")


def stage(workdir: Path, script: str, *args: str) -> str:
    """``python <script> <args>`` from ``workdir``, run in this process: the script's own
    ``parse_args`` and ``main`` under ``utils.cli.run``, its stdout returned (fail with its
    stderr). In-process because a fresh interpreter spends 3-4 s importing torch and
    transformers; the scripts as real processes are run by test_quickstart, test_readme,
    test_errors and the resume tests."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    out, err = io.StringIO(), io.StringIO()
    try:
        with in_workdir(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(module.main, module.parse_args(list(args)))
    except SystemExit as exit:
        raise AssertionError(f"{script} exited with {exit.code}:\n{err.getvalue()[-3000:]}") from None
    return out.getvalue()


@contextlib.contextmanager
def in_workdir(workdir: Path, threads: int | None = None):
    """Run from ``workdir`` (with ``threads`` CPU threads, if given); the directory and this
    process's thread count (which a script's ``--threads`` may set) are restored after."""
    before_dir, before_threads = os.getcwd(), torch.get_num_threads()
    os.chdir(workdir)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        os.chdir(before_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_collected(folder: Path, records: list[dict], num_problems: int, num_samples: int, max_new_tokens: int) -> None:
    """One file per (problem, repeat) of problems ``0..num_problems-1``: the problem record
    unchanged plus one entry of every collected list, with consistent token counts."""
    files = sorted(folder.glob("*_r*.json"))
    assert len(files) == num_problems * num_samples
    for path in files:
        data = json.loads(path.read_text())
        problem_id = int(path.name.split("_")[0])
        assert {key: data[key] for key in records[problem_id]} == records[problem_id]
        assert all(len(data[field]) == 1 for field in COLLECTED_FIELDS)
        partial = data["partial_guided_prompts_tokenized"][0]
        kept = data["num_response_tokens_in_partial_guided_prompts"][0]
        rollout = data["partial_guided_responses_tokenized"][0]
        assert all(isinstance(t, int) for t in partial + rollout)
        assert 1 <= kept <= max_new_tokens and kept < len(partial)
        assert len(rollout) <= max_new_tokens  # the roll-out's own budget, as the original
        assert isinstance(data["partial_guided_predictions_correctness"][0], bool)
        assert isinstance(data["fully_guided_predictions"][0], str)


def check_eval(checkpoint: Path, tag: str, num_problems: int, num_samples: int) -> dict:
    """Sample files, per-problem results and reward stats of one evaluation; returns the stats."""
    samples = list((checkpoint / f"individual_eval_inference_{tag}").glob("*_r*.json"))
    assert len(samples) == num_problems * num_samples
    results = read_jsonl(checkpoint / f"inference_eval_results_{tag}.jsonl")
    assert len(results) == num_problems
    for result in results:
        assert len(result["predictions"]) == len(result["traj_kl"]) == len(result["predictions_correctness"]) == num_samples
        assert all(kl >= -1e-6 for kl in result["traj_kl"])
        assert isinstance(result["majority_vote_correct"], bool) and isinstance(result["pass_at_k"], bool)
    stats = json.loads((checkpoint / f"reward_stats_{tag}.json").read_text())
    for key in ("single_sample_accuracy_mean", "majority_vote_accuracy_mean", "pass_k_accuracy_mean"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["pass_k_accuracy_mean"] >= stats["single_sample_accuracy_mean"]
    assert stats["kl_mean"] >= 0.0
    return stats


def check_original_globs(collect_dir: Path, sample_dir: Path, num_samples: int) -> None:
    """The folders pass through the original's scripts: its combine reads every
    ``<dir>/*.json`` as a collected problem (it crashed on a settings file there), its eval
    every ``*_r<k>.json`` of a sample folder as a sample with the original's fields."""
    import glob

    collected = glob.glob(f"{collect_dir}/*.json")
    assert collected and all(RESULT_NAME.fullmatch(Path(path).name) for path in collected)
    for path in collected:
        data = json.loads(Path(path).read_text())
        assert "problem" in data and all(field in data for field in COLLECTED_FIELDS)
    for repeat in range(num_samples):
        samples = glob.glob(f"{sample_dir}/*_r{repeat}.json")
        assert samples and all(RESULT_NAME.fullmatch(Path(path).name) for path in samples)
        for path in samples:
            sample = json.loads(Path(path).read_text())
            assert {"input_ids", "output_ids", "prediction", "token_kl", "traj_kl"} <= set(sample)
            assert len(sample["token_kl"]) == len(sample["output_ids"])
