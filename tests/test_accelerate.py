"""Several processes: ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo),
and the eta sweep of ``eval_ckpt.py``.

- Collection and evaluation launched on 2 processes write exactly the files (bytes) of a
  single process: each rank samples whole ``--batch_size`` chunks counted from
  ``--start_index``, so every batch has the problems and seed it has in one process. The
  evaluation's results and reward stats are written once, by the main process.
- Training on 2 processes: args.json and every checkpoint are renamed into place once, by
  rank 0, and nothing half-written is left; each log line appears once; the step-0 eval
  metrics equal a single process's; each rank trains on every other batch (half the
  batches; the prepared loader gives the ranks disjoint batches), and ``ckpt_<step>``
  counts the batches of both (the original's global_step).
- The worked example of the original's step counters (2 processes, accumulation 2, 10
  batches each, ckpt_freq 2): checkpoints ckpt_0, ckpt_2, ..., ckpt_20, and the optimizer
  steps done at each (see test_ckpt_steps.py).
- Every epoch is a new shuffle on every rank, also with ``--max_batch_num_tokens`` (whose
  batch sampler accelerate's shard wrapper hides from ``set_epoch``), and the ranks' batches
  stay disjoint.
- ``--eta 0 2 5`` writes the files of three separate runs and loads each model once.

The single-process references run in-process with one CPU thread, as the launched
processes do (``OMP_NUM_THREADS=1``): the KL values of the eval files depend, in their last
bits, on the number of threads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import collect_training_data
import combine_training_data
import eval_ckpt
import train_classifier
from utils.demo.synthetic import write_synthetic_dataset
from tests.helpers.fake_collected import train_flags, write_fake_collected
from tests.helpers.processes import accelerate_command, run_tree
from tests.helpers.stages import in_workdir
from tests.helpers.checkpoints import EXAMPLE_NAMES, EXAMPLE_STEPS_DONE, checkpoint_names, optimizer_states_steps
from utils.cli import run
from utils.distributed import Process, rank_share, set_loader_epoch
from utils.demo.tiny_models import write_tiny_models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 12, 6
SAMPLING = ["--use_chat_template", "0", "--dtype", "float32", "--max_new_tokens", "12", "--num_samples", "2"]
COLLECT = ["--is_first_round", "1", "--eta", "5", "--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier",
           "--data_path", "data/synth_train.jsonl", "--train_eval_save_path", "data/synth_train_eval.json",
           "--start_index", "1", "--end_index", "11", "--batch_size", "3", *SAMPLING]  # chunks 1-3, 4-6, 7-9, 10
EVAL = ["--classifier_ckpt_path", "exp/ckpt_0", "--data_path", "data/synth_test.jsonl",
        "--train_eval_save_path", "data/synth_test_eval.json", "--batch_size", "2", "--max_new_tokens", "12",
        "--num_samples", "2"]
TRAIN = ["--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier",
         "--original_problems_path", "data/synth_train.jsonl", "--train_eval_save_path", "data/synth_train_eval.json",
         "--init_mode", "zero", "--inference_mode", "bernoulli", "--dataset_type", "gsm8k",
         "--data_paths", "collect_1/all_train_data.jsonl", "--drop_no_variation", "0", "--id_eval_ratio", "0.3",
         "--num_epochs", "1", "--batch_size", "2", "--dtype", "float32", "--ckpt_freq", "2", "--eval_freq", "2",
         "--lr", "1e-3"]
TIMEOUT = 240

# Records every rename into place (os.replace / os.rename: atomic files and checkpoint
# folders) with the pid and RANK of the process that did it.
AUDIT = '''
import os
_log = os.environ.get("QSHARP_TEST_RENAMES")
if _log:
    _replace, _rename = os.replace, os.rename

    def _record(dst):
        with open(_log, "a") as handle:
            handle.write(f"{os.getpid()} {os.environ.get('RANK', '-')} {os.path.abspath(dst)}\\n")

    def _audited(move):
        def moved(src, dst, *args, **kwargs):
            move(src, dst, *args, **kwargs)
            _record(dst)
        return moved

    os.replace, os.rename = _audited(_replace), _audited(_rename)
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """tiny/ models, data/ (synthetic problems), exp/ckpt_0 (a V/bce checkpoint with a random
    head and the args.json evaluation inherits from, eta 5), the rename audit hook."""
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.models import load_tokenizer

    root = tmp_path_factory.mktemp("accelerate")
    write_tiny_models(root / "tiny", arch="llama")
    write_synthetic_dataset(root / "data", NUM_TRAIN, NUM_TEST, seed=0)
    classifier = QSharpClassifier.from_causal_lm(str(root / "tiny" / "classifier"), ClassifierSpec("V", "bce"),
                                                 init_mode="random", dtype="float32", seed=0)
    classifier.save_pretrained(root / "exp" / "ckpt_0", tokenizer=load_tokenizer(str(root / "tiny" / "classifier")))
    saved = {"ref_model_id": "tiny/ref", "classifier_model_id": "tiny/classifier", "classifier_type": "V",
             "inference_mode": "bernoulli", "loss_type": "bce", "use_bias": 0, "dataset_type": "gsm8k",
             "original_problems_path": "data/synth_train.jsonl", "train_eval_save_path": "data/synth_train_eval.json",
             "use_chat_template": 0, "eta": 5.0, "temperature": 0.8, "top_p": 0.9, "dtype": "float32",
             "match_fn_type": "symbolic", "num_atoms": 11, "V_min": 0.0, "V_max": 1.0}
    (root / "exp" / "args.json").write_text(json.dumps(saved))
    (root / "audit").mkdir()
    (root / "audit" / "sitecustomize.py").write_text(AUDIT)
    (root / "hf_home").mkdir()  # no accelerate config file of the user's is read
    return root


def launch(workdir: Path, script: str, *args: str, renames: Path | None = None) -> str:
    """``accelerate launch --multi_gpu --num_processes 2 script args`` (gloo on the CPU); its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir / "audit"), str(REPO)]), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HOME": str(workdir / "hf_home")}
    env.pop("QSHARP_TEST_RENAMES", None)
    if renames is not None:
        env["QSHARP_TEST_RENAMES"] = str(renames)
    result = run_tree(accelerate_command(REPO / script, *args), cwd=workdir, env=env, timeout=TIMEOUT)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def in_process(workdir: Path, module, argv: list[str], threads: int = 1) -> None:
    """A stage's ``main`` in this process, from ``workdir``, with ``threads`` CPU threads
    (its output to capsys; a user error raises SystemExit)."""
    with in_workdir(workdir, threads):
        run(module.main, module.parse_args(argv))


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def collected(workdir):
    """The single-process collection (the reference, and the training data)."""
    in_process(workdir, collect_training_data, [*COLLECT, "--output_dir", "collect_1"])
    in_process(workdir, combine_training_data, ["--data_template_path", "collect_1", "--data_path", "data/synth_train.jsonl",
                                                "--train_eval_save_path", "data/synth_train_eval.json"])
    return workdir / "collect_1"


def test_rank_share_is_whole_batches_in_blocks():
    items = list(range(1, 11))  # --start_index 1 --end_index 11, --batch_size 3
    shares = [rank_share(items, 3, Process(rank, 2, rank)) for rank in range(2)]
    assert shares == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    shares = [rank_share(items, 3, Process(rank, 3, rank)) for rank in range(3)]
    assert shares == [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]
    assert [rank_share([1, 2], 3, Process(rank, 2, rank)) for rank in range(2)] == [[], [1, 2]]
    for world in range(1, 6):
        for batch in range(1, 5):
            shares = [rank_share(items, batch, Process(rank, world, rank)) for rank in range(world)]
            assert sum(shares, []) == items
            assert all(len(share) % batch == 0 for share in shares[:-1] if share)


@pytest.mark.parametrize("visible,local_rank,count,expected", [
    (None, 0, 1, "0"),
    (None, 3, 1, "3"),
    (None, 1, 2, "2,3"),
    ("4,5,6,7", 1, 1, "5"),
    ("4, 5,6,7", 1, 2, "6,7"),
    ("GPU-a,GPU-b", 1, 1, "GPU-b"),
])
def test_each_rank_owns_its_block_of_gpus(monkeypatch, visible, local_rank, count, expected):
    """An engine that runs on the first GPUs it sees (vLLM) gets, in each rank, that rank's block of
    ``count`` GPUs among those visible, as the only ones its process (and its workers) see."""
    from utils.distributed import own_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible or "")  # restored after the test, also when unset before
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert own_gpus(Process(local_rank + 4, 8, local_rank), count) == expected  # rank on a second machine
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_too_few_gpus_for_a_rank_is_one_line(monkeypatch):
    from utils.distributed import own_gpus, process_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK 1 needs GPUs 2 to 3 of CUDA_VISIBLE_DEVICES=0,1,2: launch at most "
                                         r"one process per 2 GPU\(s\)$"):
        own_gpus(Process(1, 2, 1), 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert process_device(Process(1, 2, 1), 1) == torch.device("cpu")  # this CPU build: no CUDA at all
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="after CUDA started"):
        own_gpus(Process(0, 2, 0), 1)


def test_collect_on_two_processes_writes_the_single_process_files(workdir, collected):
    # another batch size than the single run's 3: each request samples from its own stream
    out = launch(workdir, "collect_training_data.py", *COLLECT, "--batch_size", "2", "--output_dir", "collect_2")
    assert len(lines(out, "collect: eta=")) == 1
    assert lines(out, "[rank 0/2] collect: problems 1..4,") and lines(out, "[rank 1/2] collect: problems 5..10,")
    single, double = files(collected), files(workdir / "collect_2")
    single.pop("all_train_data.jsonl")
    assert sorted(double) == sorted(single) and len(single) == 10 * 2 + 1  # 10 problems x 2 repeats, .run_settings.json
    assert [name for name in double if single[name] != double[name]] == []


def test_eval_on_two_processes_writes_the_single_process_files(workdir):
    renames = workdir / "eval_renames.txt"
    out = launch(workdir, "eval_ckpt.py", *EVAL, "--eta", "0", "5", "--output_dir", "eval_2", renames=renames)
    for eta in ("0", "5"):  # the references: one single-process run per eta
        in_process(workdir, eval_ckpt, [*EVAL, "--eta", eta, "--output_dir", "eval_1"])
    single, double = files(workdir / "eval_1"), files(workdir / "eval_2")
    assert sorted(double) == sorted(single) and len(single) == 2 * (NUM_TEST * 2 + 3)
    assert [name for name in double if single[name] != double[name]] == []
    # the aggregation ran once per eta, on the main process, after both ranks' samples
    # (searched anywhere: the two processes share one stdout pipe, so another rank's line can
    # start before the main process's summary on the same line)
    summaries = re.findall(r"eval \[(eta_[^\]]+)\]: pass@1", out)
    assert summaries == ["eta_0.0_top_k_20_temp_0.8", "eta_5.0_top_k_20_temp_0.8"], out
    assert lines(out, "[rank 0/2] eval: 2 problems") and lines(out, "[rank 1/2] eval: 4 problems")
    aggregated = [line.split() for line in renames.read_text().splitlines()
                  if re.search(r"/(inference_eval_results|reward_stats)_[^/]*$", line)]
    assert len(aggregated) == 4 and {rank for _, rank, _ in aggregated} == {"0"}


def test_train_on_two_processes(workdir, collected, capsys):
    renames = workdir / "train_renames.txt"
    out = launch(workdir, "train_classifier.py", *TRAIN, "--world_size", "2", "--output_dir", "train_2", renames=renames)
    capsys.readouterr()
    in_process(workdir, train_classifier, [*TRAIN, "--output_dir", "train_1"])
    single = capsys.readouterr().out
    single_steps = int(re.search(r"^train: (\d+) steps", single, re.M).group(1))

    # every log line once; each rank takes every other batch (accelerate pads the last round);
    # the step counts the batches of both ranks: ckpt_freq 2 is every batch of a rank
    batches = math.ceil(single_steps / 2)
    steps = 2 * batches
    checkpoints = list(range(0, steps + 1, 2))
    for prefix in ("train: V/bce head", "train: 10 problems",
                   f"train: {steps} steps ({batches} batches per process, {batches} optimizer steps), "
                   f"last checkpoint train_2/ckpt_{steps}"):
        assert len(lines(out, prefix)) == 1, out
    assert [int(line.split()[1].rstrip(":")) for line in lines(out, "step ")] == checkpoints
    # every rank evaluates the whole eval sets: step 0 (same weights) as in one process
    assert lines(out, "step 0:") == lines(single, "step 0:")

    # args.json and each checkpoint renamed into place once, by rank 0; nothing else left
    output = workdir / "train_2"
    expected = sorted(["args.json", *(f"ckpt_{step}" for step in checkpoints)])
    assert sorted(p.name for p in output.iterdir()) == expected
    moved = [line.split() for line in renames.read_text().splitlines() if line.split()[2].startswith(f"{output}{os.sep}")]
    assert sorted(Path(path).name for _, _, path in moved) == expected
    assert {rank for _, rank, _ in moved} == {"0"} and len({pid for pid, _, _ in moved}) == 1
    for step in checkpoints:
        names = {p.name for p in (output / f"ckpt_{step}").iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and not any(n.startswith(".") for n in names)


def test_worked_example_on_two_processes(workdir):
    """2 processes, accumulation 2, 10 batches each, ckpt_freq 2: the original's checkpoint
    names, and at each the optimizer steps of the project's rule (one after every 2nd batch)."""
    paths = write_fake_collected(workdir / "fake_example", num_train=10, repeats=2)  # 20 batches of 1
    out = launch(workdir, "train_classifier.py", *train_flags(paths, workdir / "tiny"), "--world_size", "2",
                 "--gradient_accumulation_step", "2", "--ckpt_freq", "2", "--eval_freq", "1000",
                 "--save_opt_scheduler", "1", "--output_dir", "train_example")
    assert lines(out, "train: 20 steps (10 batches per process, 5 optimizer steps), last checkpoint train_example/ckpt_20")
    output = workdir / "train_example"
    assert checkpoint_names(output) == ["ckpt_0", *EXAMPLE_NAMES]
    assert [optimizer_states_steps(output / name) for name in EXAMPLE_NAMES] == EXAMPLE_STEPS_DONE
    assert optimizer_states_steps(output / "ckpt_0") == 0
    assert [int(line.split()[1].rstrip(":")) for line in lines(out, "step ")] == [0]  # eval_freq 1000; no step 1


# Launched on 2 processes: the training loader of each rank over 3 epochs, started as
# train_classifier.main starts them; each rank writes the example indices of its batches.
EPOCHS_SCRIPT = '''
import json, sys
from types import SimpleNamespace
import torch
from accelerate import Accelerator
import train_classifier
from utils.distributed import accelerator_cpu, current_process, set_loader_epoch

accelerator = Accelerator(cpu=accelerator_cpu(current_process()))
args = train_classifier.parse_args(sys.argv[2:])
examples = [SimpleNamespace(index=i, input_ids=[0] * 4) for i in range(24)]  # 12 batches of 2 either way
loader = accelerator.prepare(train_classifier.make_train_loader(args, examples,
                                                                lambda b: torch.tensor([e.index for e in b])))
epochs = []
for epoch in range(3):
    set_loader_epoch(loader, epoch)
    epochs.append([batch.tolist() for batch in loader])
with open(f"{sys.argv[1]}.{accelerator.process_index}.json", "w") as handle:
    json.dump(epochs, handle)
accelerator.end_training()  # releases the gloo group; exiting with it alive can abort ("terminate called ...")
'''


@pytest.mark.parametrize("budget", [-1, 8], ids=["batch_size", "max_batch_num_tokens"])
def test_every_epoch_is_a_new_shuffle_on_two_processes(workdir, budget):
    script = workdir / "epochs.py"
    script.write_text(EPOCHS_SCRIPT)
    prefix = workdir / f"epochs_{budget}"
    launch(workdir, str(script), str(prefix), *TRAIN, "--max_batch_num_tokens", str(budget))
    ranks = [json.loads(Path(f"{prefix}.{rank}.json").read_text()) for rank in range(2)]
    for epochs in ranks:
        assert len(epochs) == 3 and all(len(batches) == 6 for batches in epochs)
        orders = [[i for batch in batches for i in batch] for batches in epochs]
        assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2], "an epoch repeated"
    for epoch in range(3):  # the ranks' batches: disjoint, together every example once
        indices = [i for epochs in ranks for batch in epochs[epoch] for i in batch]
        assert sorted(indices) == list(range(24)), epoch


@pytest.mark.parametrize("budget", [-1, 8], ids=["batch_size", "max_batch_num_tokens"])
def test_each_rank_trains_on_its_own_batches(budget):
    """What ``accelerator.prepare`` makes of the training loader on 2 processes: every other
    batch of the same shuffled order, so the ranks' batches are disjoint and cover the data."""
    from types import SimpleNamespace

    from accelerate.data_loader import prepare_data_loader

    args = train_classifier.parse_args([*TRAIN, "--max_batch_num_tokens", str(budget)])
    examples = [SimpleNamespace(index=i, input_ids=[0] * 4) for i in range(12)]  # 6 batches of 2 either way
    def loader():  # as each rank builds it (same seed)
        return train_classifier.make_train_loader(args, examples, lambda batch: [e.index for e in batch])

    single = loader()
    prepared = [prepare_data_loader(loader(), num_processes=2, process_index=rank) for rank in range(2)]
    seen = []
    for epoch in range(2):  # started as train_classifier.main starts them
        for each in (single, *prepared):
            set_loader_epoch(each, epoch)
        whole = list(single)
        shards = [list(shard) for shard in prepared]
        assert shards == [whole[0::2], whole[1::2]]
        assert sorted(i for shard in shards for batch in shard for i in batch) == list(range(12))
        assert whole != sorted(whole), "shuffled"
        seen.append(whole)
    assert seen[0] != seen[1], "the second epoch repeats the first"


def test_eta_sweep_writes_the_files_of_separate_runs_and_loads_each_model_once(workdir, monkeypatch, capsys):
    from utils.classifier import QSharpClassifier
    from utils.decoding import requests

    loads = {"reference": 0, "classifier": 0}
    load_causal_lm, from_pretrained = requests.load_causal_lm, QSharpClassifier.from_pretrained.__func__

    def counted_reference(*args, **kwargs):
        loads["reference"] += 1
        return load_causal_lm(*args, **kwargs)

    def counted_classifier(cls, *args, **kwargs):
        loads["classifier"] += 1
        return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(requests, "load_causal_lm", counted_reference)  # every backend loads the reference here
    monkeypatch.setattr(QSharpClassifier, "from_pretrained", classmethod(counted_classifier))
    capsys.readouterr()
    in_process(workdir, eval_ckpt, [*EVAL, "--eta", "0", "2", "5", "--output_dir", "eval_sweep"], threads=2)
    out = capsys.readouterr().out
    assert loads == {"reference": 1, "classifier": 1}
    assert "eta=[0.0, 2.0, 5.0] (flag)" in out
    assert [line.split("]")[0] for line in lines(out, "eval [")] == [
        f"eval [eta_{eta}_top_k_20_temp_0.8" for eta in ("0.0", "2.0", "5.0")]

    for argv in (["--eta", "0"], ["--eta", "2"], []):  # no --eta: 5.0 from the checkpoint's args.json
        in_process(workdir, eval_ckpt, [*EVAL, *argv, "--output_dir", "eval_separate"], threads=2)
    assert "eta=5.0 (args.json)" in capsys.readouterr().out
    assert loads == {"reference": 4, "classifier": 3}  # eta 0 alone loads no classifier
    assert files(workdir / "eval_sweep") == files(workdir / "eval_separate")


def test_world_size_must_match_the_launch(workdir, collected, capsys):
    with pytest.raises(SystemExit):
        in_process(workdir, train_classifier, [*TRAIN, "--world_size", "2", "--output_dir", "train_bad"])
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --world_size 2 but 1 process(es) were launched")
    if not torch.cuda.is_available():
        assert "--multi_gpu" in error
