"""``train_classifier.py --resume 1``: a run killed with SIGKILL and re-run with the identical
command ends with the checkpoints of an uninterrupted run, bit for bit (one CPU process,
float32), and within the measured tolerance on 2 processes under ``accelerate launch``.

The runs are real subprocesses on tiny models and fake collected data: 2 epochs of 9
batches, a checkpoint every 5 global steps (so checkpoints fall inside an epoch and inside
a gradient accumulation of 2), an evaluation every 4. The classifier's attention dropout is
0.1, so the training draws from the torch RNG and a resume without the RNG states differs.
A ``sitecustomize`` hook on the child's path SIGKILLs it at the n-th occurrence of an event:

    opt_step     inside ``AdamW.step`` (a training step)
    eval         inside ``eval_metrics`` (an evaluation)
    save_write   inside the checkpoint's ``torch.save`` of ``rng_state_0.pth`` (a folder half-written)
    save_rename  just before the checkpoint folder is renamed into place (written, not yet in place)
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.fake_collected import write_fake_collected
from tests.helpers.processes import run_tree
from utils.demo.tiny_models import write_tiny_models

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240
STALL = 90  # a 2-process run here takes 8-15 s

KILL_HOOK = '''
import os
_spec = os.environ.get("QSHARP_KILL")
if _spec:
    import signal
    _event, _count = _spec.split(":")
    _seen = [0]

    def _tick(name):
        if name == _event and os.environ.get("RANK", "0") == "0":
            _seen[0] += 1
            if _seen[0] == int(_count):
                os.kill(os.getpid(), signal.SIGKILL)

    import torch
    _step, _save, _replace = torch.optim.AdamW.step, torch.save, os.replace

    def step(self, *args, **kwargs):
        _tick("opt_step")
        return _step(self, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("rng_state_0.pth"):
            _tick("save_write")
        return _save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)).startswith("ckpt_"):
            _tick("save_rename")
        return _replace(src, dst, *args, **kwargs)

    torch.optim.AdamW.step, torch.save, os.replace = step, save, replace
    import utils.training.metrics
    _metrics = utils.training.metrics.eval_metrics

    def eval_metrics(*args, **kwargs):
        _tick("eval")
        return _metrics(*args, **kwargs)

    utils.training.metrics.eval_metrics = eval_metrics

if os.environ.get("QSHARP_CHECK_TEARDOWN"):  # no DDP model may outlive the process group (utils.distributed.end_training)
    import gc
    import sys

    import torch.distributed
    from torch.nn.parallel import DistributedDataParallel

    _destroy = torch.distributed.destroy_process_group

    def destroy_process_group(*args, **kwargs):
        alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
        if alive:
            sys.stderr.write(f"teardown: {alive} DistributedDataParallel model(s) alive as the process group goes\\n")
            sys.stderr.flush()
            os._exit(3)
        return _destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = destroy_process_group
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """tiny/ models (classifier with attention dropout 0.1), fake data, the kill hook, the flags."""
    root = tmp_path_factory.mktemp("train_resume")
    write_tiny_models(root / "tiny", arch="llama")
    config_path = root / "tiny" / "classifier" / "config.json"
    config = json.loads(config_path.read_text())
    config["attention_dropout"] = 0.1
    config_path.write_text(json.dumps(config))
    paths = write_fake_collected(root / "data", num_train=12, repeats=2)
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(KILL_HOOK)
    flags = ["--ref_model_id", "tiny/ref", "--classifier_model_id", "tiny/classifier",
             "--original_problems_path", paths["problems"], "--train_eval_save_path", paths["split"],
             "--init_mode", "random", "--inference_mode", "bernoulli", "--dataset_type", "gsm8k",
             "--data_paths", paths["data"], "--drop_no_variation", "0", "--id_eval_ratio", "0.2",
             "--batch_size", "2", "--dtype", "float32", "--lr", "1e-3", "--num_epochs", "2",
             "--ckpt_freq", "5", "--eval_freq", "4", "--gradient_accumulation_step", "2", "--resume", "1"]
    return {"root": root, "flags": flags}


def env_for(work, kill: str | None = None, check_teardown: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work["root"] / "hook"), str(REPO)]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(work["root"] / "hf_home"), "PYTHONUNBUFFERED": "1"}
    env.pop("QSHARP_KILL", None)
    env.pop("QSHARP_CHECK_TEARDOWN", None)
    if kill:
        env["QSHARP_KILL"] = kill
    if check_teardown:
        env["QSHARP_CHECK_TEARDOWN"] = "1"
    return env


def train(work, output_dir: str, *extra: str, kill: str | None = None, processes: int = 1,
          kill_when: tuple[Path, float] | None = None) -> subprocess.CompletedProcess:
    """train_classifier.py with the test's flags (on ``processes`` processes under accelerate
    launch); ``kill``: the hook's event; ``kill_when (path, seconds)``: SIGKILL from outside
    once ``path`` exists, after a random wait of up to ``seconds``."""
    if processes == 1:
        cmd = [sys.executable, str(REPO / "train_classifier.py")]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(REPO / "train_classifier.py"), "--world_size", str(processes)]
    cmd += [*work["flags"], "--output_dir", output_dir, *extra]
    if kill_when is None:
        return run_tree(cmd, cwd=work["root"], env=env_for(work, kill, check_teardown=processes > 1),
                        timeout=TIMEOUT if processes == 1 else STALL)
    proc = subprocess.Popen(cmd, cwd=work["root"], env=env_for(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    path, seconds = kill_when
    deadline = time.time() + TIMEOUT
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    wait = random.Random().uniform(0, seconds)
    print(f"killed {wait:.2f} s after {path.name} appeared")
    time.sleep(wait)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def checkpoint_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path / "model.safetensors") for path in sorted(folder.glob("ckpt_*"))}


def assert_same_checkpoints(run: Path, reference: Path, names: list[str] | None = None, atol: float = 0.0) -> None:
    """``run``'s checkpoints (``names``, default all of the reference's) equal the reference's."""
    mine, theirs = checkpoint_weights(run), checkpoint_weights(reference)
    names = sorted(theirs) if names is None else names
    assert sorted(mine) == sorted(names), (sorted(mine), names)
    for name in names:
        assert mine[name].keys() == theirs[name].keys()
        for key in theirs[name]:
            if atol == 0.0:
                assert torch.equal(mine[name][key], theirs[name][key]), f"{name} {key} differs"
            else:
                torch.testing.assert_close(mine[name][key], theirs[name][key], atol=atol, rtol=0)
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporaries left: {leftovers}"


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run (same command, nothing to resume)."""
    result = train(work, "reference")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = work["root"] / "reference"
    assert sorted(p.name for p in folder.glob("ckpt_*")) == ["ckpt_0", "ckpt_10", "ckpt_15", "ckpt_18", "ckpt_5"]
    state = json.loads((folder / "ckpt_5" / "trainer_state.json").read_text())
    assert (state["epoch"], state["position"], state["accumulation_phase"]) == (0, 5, 1)
    return folder


# One command run again and again: each run resumes where the last was killed and is killed at
# the n-th event of its own; the checkpoint the NEXT run must resume from.
CHAIN = [
    ("opt_step:4", "ckpt_5"),     # inside the 4th optimizer step (batch 8); ckpt_5 cuts an accumulation
    ("save_write:1", "ckpt_5"),   # while ckpt_10 is half-written
    ("save_rename:1", "ckpt_5"),  # ckpt_10 written, not yet renamed into place
    ("eval:3", "ckpt_10"),        # inside the evaluation at step 12 (ckpt_10 is in place)
    ("opt_step:3", "ckpt_15"),    # in the second epoch (batch 16), after ckpt_15 (epoch 1, batch 6 of 9)
]


def test_killed_run_resumes_to_the_same_weights(work, reference):
    """The chain of kills with ``--keep_last_n 2``, then the command once more: the final
    checkpoints equal the uninterrupted run's, bit for bit, and no resume lacked its checkpoint."""
    output = work["root"] / "chain"
    expected_start = None
    for kill, resumes_from in CHAIN:
        result = train(work, "chain", "--keep_last_n", "2", kill=kill)
        assert result.returncode == -signal.SIGKILL, (kill, result.stderr[-3000:])
        if expected_start:
            assert f"resuming from chain/{expected_start} " in result.stdout, (kill, result.stdout[-2000:])
        kept = sorted(p.name for p in output.glob("ckpt_*"))
        assert resumes_from in kept and len(kept) <= 2, (kill, kept)
        expected_start = resumes_from
    result = train(work, "chain", "--keep_last_n", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from chain/{expected_start} " in result.stdout
    assert_same_checkpoints(output, reference, names=["ckpt_15", "ckpt_18"])


def test_kill_at_a_random_moment(work, reference):
    """SIGKILL from outside at a random moment after ckpt_5 appears, then the same command."""
    result = train(work, "random", kill_when=(work["root"] / "random" / "ckpt_5", 0.6))
    assert result.returncode == -signal.SIGKILL
    result = train(work, "random")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from random/ckpt_" in result.stdout
    assert_same_checkpoints(work["root"] / "random", reference)


def test_incomplete_checkpoints_are_never_resumed_from(work, reference):
    """A truncated optimizer state, a folder holding only a config, and a checkpoint without
    the resume state (an older or --resume 0 run's) are skipped: the run resumes from
    ckpt_5, the newest whole one, and rewrites the others to the reference's weights."""
    output = work["root"] / "broken"
    shutil.copytree(reference, output)
    for name in ("ckpt_15", "ckpt_18"):
        shutil.rmtree(output / name)
    optimizer = output / "ckpt_10" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # killed mid-write by an older, non-atomic writer
    (output / "ckpt_16").mkdir()
    shutil.copy(output / "ckpt_10" / "config.json", output / "ckpt_16" / "config.json")
    shutil.copytree(output / "ckpt_5", output / "ckpt_12")
    (output / "ckpt_12" / "trainer_state.json").unlink()
    result = train(work, "broken")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("ckpt_16", "ckpt_12", "ckpt_10"):
        assert f"broken/{name} is not a complete resumable checkpoint; skipped" in result.stdout
    assert "resuming from broken/ckpt_5 " in result.stdout
    shutil.rmtree(output / "ckpt_16")  # not a checkpoint of the reference run: left as found
    shutil.rmtree(output / "ckpt_12")
    assert_same_checkpoints(output, reference)


def test_other_settings_are_refused_naming_each(work, reference):
    import train_classifier

    args = train_classifier.parse_args([*work["flags"], "--output_dir", str(reference), "--lr", "2e-3",
                                        "--num_workers", "0", "--keep_last_n", "3"])  # the last two may change
    with pytest.raises(ValueError, match=r"holds a run with other settings \(lr 0.001 there, 0.002 now\); "):
        train_classifier.resume_point(args, reference)
    args = train_classifier.parse_args([*work["flags"], "--output_dir", "elsewhere"])  # the folder may move
    assert train_classifier.resume_point(args, reference, log=lambda line: None)[0] == reference / "ckpt_18"


def test_a_finished_run_is_left_as_it_is(work, reference):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    result = train(work, "reference")
    assert result.returncode == 0 and "resuming from reference/ckpt_18 " in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir() if p.name != "args.json"} == \
        {name: mtime for name, mtime in before.items() if name != "args.json"}


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_two_processes_resume_to_the_same_weights(work):
    """2 processes (gloo on the CPU): killed (rank 0, inside its 4th optimizer step), resumed,
    against an uninterrupted 2-process run. Every run that ends must end with no DDP model
    alive as the process group goes (the hook's QSHARP_CHECK_TEARDOWN; else gloo's teardown
    can deadlock, see ``utils.distributed.end_training``)."""
    result = train(work, "two_reference", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    result = train(work, "two", processes=2, kill="opt_step:3")
    assert result.returncode != 0
    result = train(work, "two", processes=2)
    assert "resuming from two/ckpt_10 " in result.stdout, result.stdout[-2000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_checkpoints(work["root"] / "two", work["root"] / "two_reference")


def test_wandb_run_is_resumed_from_the_checkpoint_step(work, reference):
    """--track 1: the resumed process continues the killed one's wandb run (same id, offline)
    and logs only the steps after its checkpoint, so nothing before it appears twice; the two
    offline files together hold every step of the uninterrupted series."""
    from tests.helpers.tracking import inspect, wandb_env

    (work["root"] / "wandb").mkdir()
    env = wandb_env(work["root"] / "wandb", os.pathsep.join([str(work["root"] / "hook"), str(REPO)]))
    base = [sys.executable, str(REPO / "train_classifier.py"), *work["flags"], "--output_dir", "tracked", "--track", "1"]
    killed = subprocess.run(base, cwd=work["root"], env={**env, "QSHARP_KILL": "opt_step:4"}, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = subprocess.run(base, cwd=work["root"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0 and "resuming from tracked/ckpt_5 " in resumed.stdout, resumed.stderr[-3000:]
    runs = sorted((work["root"] / "wandb" / "wandb_dir" / "wandb").glob("offline-run-*"))
    run_id = (work["root"] / "tracked" / ".wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)
    steps = []
    for run in runs:
        records = [json.loads(line) for line in inspect(run, env).splitlines()]
        steps.append([r["history"]["item"]["_step"] for r in records if r["type"] == "history"])
    assert steps[1] == [6, 8, 10, 12, 14, 16, 18], steps  # from the step after ckpt_5 on, each once
    assert set(steps[0]) <= {0, 1, 2, 4, 6}, steps  # what the killed run got onto disk before the kill
