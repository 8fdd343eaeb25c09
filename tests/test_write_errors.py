"""A full disk while a stage writes, and collection shards over overlapping ranges.

- A write of any stage's output that hits a full disk (ENOSPC: the file's data cut in half,
  then ``os.fsync`` fails; for a checkpoint, safetensors failing as it does on a full disk)
  ends the run with exit code 2 and one ``error:`` line that names the file and the space
  error, without a traceback; the output folder is byte for byte what it was (the previous
  version of the file kept) and holds no temporary. Each run is a stage's ``main``
  in-process through ``utils.cli.run``, the tiny models and synthetic problems.
- Two ``collect_training_data.py`` processes over overlapping ranges writing into one folder
  at the same time leave the files of a single run over the union: same names, same bytes,
  nothing else. A problem's samples depend on its batch (``batch_seed`` of the batch's first
  index, padding within the batch), so the ranges are whole ``--batch_size`` chunks of the
  single run's: 0..5 and 3..8 with ``--batch_size 3`` (chunks 0-2 and 3-5, 3-5 and 6-8).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

import collect_training_data
import combine_training_data
import eval_ckpt
import train_classifier
from utils.demo.synthetic import write_synthetic_dataset
from tests.helpers.fake_collected import train_flags, write_fake_collected
from tests.helpers.scripts import command, finish, start
from utils.cli import ARGS_FILE, SETTINGS_FILE, eval_tag, run

NO_SPACE = "No space left on device"
TAG = eval_tag(0.0, 20, 0.8)  # eval at --eta 0, the default top_k and temperature
SAMPLING = ["--use_chat_template", "0", "--dtype", "float32", "--max_new_tokens", "4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir):
    """Synthetic problems and tiny models, and the outputs of first runs that a failing run
    must leave as they are: a collection of problems 0..3 (2 repeats) with its combined file,
    a training run on fake collected data, an evaluation of its ckpt_0 at eta 0."""
    root = tmp_path_factory.mktemp("write_errors")
    e = {"root": root, "models": tiny_dir("llama"), **write_synthetic_dataset(root / "data", 9, 2, seed=0)}
    e["fake"] = write_fake_collected(root / "fake", num_train=1, repeats=2)
    for module, argv in ((collect_training_data, collect_argv(e, root / "collected", 4)),
                         (combine_training_data, combine_argv(e, root / "collected")),
                         (train_classifier, train_argv(e, root / "train")),
                         (eval_ckpt, eval_argv(e, root / "eval", 1))):
        run(module.main, module.parse_args(argv))
    return e


def collect_argv(e, output: Path, end: int) -> list[str]:
    return ["--is_first_round", "1", "--eta", "0", "--ref_model_id", str(e["models"] / "ref"),
            "--classifier_model_id", str(e["models"] / "classifier"), "--data_path", str(e["train"]),
            "--train_eval_save_path", str(e["train_eval"]), "--start_index", "0", "--end_index", str(end),
            "--num_samples", "2", "--batch_size", "2", "--output_dir", str(output), *SAMPLING]


def combine_argv(e, folder: Path) -> list[str]:
    return ["--data_template_path", str(folder), "--data_path", str(e["train"]),
            "--train_eval_save_path", str(e["train_eval"])]


def train_argv(e, output: Path) -> list[str]:
    return [*train_flags(e["fake"], e["models"]), "--output_dir", str(output)]


def eval_argv(e, output: Path, num_samples: int) -> list[str]:
    return ["--classifier_ckpt_path", str(e["root"] / "train" / "ckpt_0"), "--eta", "0", "--data_path", str(e["test"]),
            "--train_eval_save_path", str(e["test_eval"]), "--num_samples", str(num_samples), "--batch_size", "2",
            "--output_dir", str(output), *SAMPLING]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder``, hidden ones included: file -> its bytes, folder -> None."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def disk_full_on(monkeypatch, name: str) -> None:
    """Writing a file named ``name`` (its temporary ``.<name>.*``, or ``name`` itself when
    written in place) hits a full disk: half its data lands, then ``os.fsync`` raises ENOSPC."""
    fsync = os.fsync

    def full(fd: int) -> None:
        written = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if written == name or written.startswith(f".{name}."):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise OSError(errno.ENOSPC, NO_SPACE)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)


def fails_cleanly(capsys, module, argv: list[str], folder: Path, name: str, may_add=()) -> None:
    """``main`` exits 2 with one ``error:`` line naming ``name`` and the full disk, no
    traceback, and leaves ``folder`` as it was, except for the complete files ``may_add``
    that the run may have finished before the failing write."""
    before = tree(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(module.main, module.parse_args(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    assert NO_SPACE in errors[0] and name in errors[0], errors[0]
    after = tree(folder)
    added, removed = sorted(set(after) - set(before) - set(may_add)), sorted(set(before) - set(after))
    assert not added and not removed, f"entries added {added}, removed {removed}"
    assert [rel for rel in before if rel in after and after[rel] != before[rel]] == [], "files changed"


@pytest.mark.parametrize("case", ["collect_settings", "collect_result", "combine", "train_args",
                                  "eval_sample", "eval_results", "eval_stats"])
def test_full_disk_is_one_error_line_and_keeps_previous_files(env, capsys, monkeypatch, tmp_path, case):
    monkeypatch.delenv("QSHARP_DEBUG", raising=False)
    folder = tmp_path / "out"
    may_add = []
    if case == "collect_settings":  # a folder without results takes new settings: their write fails
        folder.mkdir()
        (folder / SETTINGS_FILE).write_text('{"eta": 9.0}')
        module, argv, name = collect_training_data, collect_argv(env, folder, 2), SETTINGS_FILE
    elif case == "collect_result":  # problems 0..3 done, 4 and 5 to go
        shutil.copytree(env["root"] / "collected", folder)
        module, argv, name = collect_training_data, collect_argv(env, folder, 6), "4_r0.json"
        may_add = ["5_r0.json"]  # the continuous engine writes each file as its problem ends
    elif case == "combine":
        shutil.copytree(env["root"] / "collected", folder)
        module, argv, name = combine_training_data, combine_argv(env, folder), combine_training_data.OUTPUT_NAME
    elif case == "train_args":
        folder.mkdir()
        (folder / ARGS_FILE).write_text('{"lr": 0.5}')
        module, argv, name = train_classifier, train_argv(env, folder), ARGS_FILE
    else:  # a second evaluation: one more sample per problem, or the same again (aggregates rewritten)
        shutil.copytree(env["root"] / "eval", folder)
        name = {"eval_sample": "0_r1.json", "eval_results": f"inference_eval_results_{TAG}.jsonl",
                "eval_stats": f"reward_stats_{TAG}.json"}[case]
        module, argv = eval_ckpt, eval_argv(env, folder, 2 if case == "eval_sample" else 1)
    disk_full_on(monkeypatch, name)
    fails_cleanly(capsys, module, argv, folder, name, may_add)


def test_full_disk_keeps_previous_checkpoint(env, capsys, monkeypatch, tmp_path):
    """A second training run into the folder of a first fails to write ckpt_0's weights."""
    import safetensors.torch
    from safetensors import SafetensorError

    monkeypatch.delenv("QSHARP_DEBUG", raising=False)
    folder = tmp_path / "train"
    run(train_classifier.main, train_classifier.parse_args(train_argv(env, folder)))

    def full(tensors, filename, metadata=None):  # what safetensors does on a full disk
        Path(filename).write_bytes(safetensors.torch.save(tensors, metadata)[:100])
        raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error {errno.ENOSPC})")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    fails_cleanly(capsys, train_classifier, train_argv(env, folder), folder, "ckpt_0")


def test_overlapping_shards_at_once_write_the_single_run_files(env, tmp_path):
    shared, single = tmp_path / "shared", tmp_path / "single"

    def argv(output: Path, start_index: int, end_index: int) -> list[str]:
        flags = collect_argv(env, output, end_index)
        flags[flags.index("--start_index") + 1] = str(start_index)
        flags[flags.index("--batch_size") + 1] = "3"
        return flags

    ranges = [(0, 6), (3, 9)]
    logs = [tmp_path / f"shard_{first}.log" for first, _ in ranges]
    shards = [start(tmp_path, command("collect_training_data.py", *argv(shared, *span)), log)
              for span, log in zip(ranges, logs)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the shards (OMP_NUM_THREADS=1): the sampled bits depend on the thread count
    try:
        run(collect_training_data.main, collect_training_data.parse_args(argv(single, 0, 9)))
    finally:
        torch.set_num_threads(threads)
        for shard, log in zip(shards, logs):
            finish(shard, log)
    for (first, end), log in zip(ranges, logs):
        assert f"collect: problems {first}..{end - 1}, 2 repeats" in log.read_text()
    want, got = tree(single), tree(shared)
    assert len(want) == 9 * 2 + 1  # 9 problems x 2 repeats, .run_settings.json
    assert sorted(got) == sorted(want)
    assert [rel for rel in want if got[rel] != want[rel]] == []
