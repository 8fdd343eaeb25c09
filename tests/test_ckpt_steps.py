"""What ``<step>`` in ``ckpt_<step>`` counts, when the optimizer steps, what is logged.

``<step>`` is the original's ``global_step``: after a process's b-th batch (counted across
epochs) it is b x world_size, so a checkpoint name means the same data seen whatever the
number of processes. Checkpoints and evaluations are tested after every batch. The
optimizer steps after every ``accumulation``-th batch; the original steps one batch earlier
((b + 1) % accumulation == 0), a departure that leaves every checkpoint name as it is.

The worked example of the original's notes (world_size 2, accumulation 2, 10 batches,
ckpt_freq 2) is hard-coded in ``tests/helpers/checkpoints.py``, and compared with the golden
``ckpt_steps.json`` when ``../shared/golden`` is there. The 2-process run of that example is
in test_accelerate.py.
"""

from __future__ import annotations

import json

import pytest

import train_classifier
from tests.helpers.checkpoints import (
    EXAMPLE_NAMES,
    EXAMPLE_STEPS_DONE,
    ORIGINAL_STEPS_DONE,
    checkpoint_names,
    optimizer_states_steps,
)
from tests.helpers.fake_collected import train_flags, write_fake_collected
from tests.helpers.golden import GOLDEN
from utils.classifier import QSharpClassifier
from utils.cli import run
from utils.training.state import checkpoint_due, eval_due, global_step_after, optimizer_step_due

TRAIN_METRICS = {"Training Loss", "Learning Rate", "Steps per Min", "Gradient Norm"}


def step_timeline(world_size: int, accumulation: int, ckpt_freq: int, num_batches: int) -> list[dict]:
    """The training loop's step helpers composed over a process's ``num_batches`` batches, in
    the layout of the golden ``ckpt_steps.json`` timeline: ``batch``, ``global_step``,
    ``optimizer_step`` (did the optimizer step after it), ``optimizer_steps_done``, ``checkpoint``."""
    timeline, done = [], 0
    for batch in range(1, num_batches + 1):
        global_step = global_step_after(batch, world_size)
        stepped = optimizer_step_due(batch, accumulation)
        done += stepped
        saved = checkpoint_due(global_step, ckpt_freq)
        timeline.append({"batch": batch, "global_step": global_step, "optimizer_step": stepped,
                         "optimizer_steps_done": done, "checkpoint": f"ckpt_{global_step}" if saved else None})
    return timeline


def test_worked_example_timeline():
    timeline = step_timeline(world_size=2, accumulation=2, ckpt_freq=2, num_batches=10)
    assert [t["batch"] for t in timeline] == list(range(1, 11))
    assert [t["global_step"] for t in timeline] == list(range(2, 21, 2))
    assert [t["checkpoint"] for t in timeline] == EXAMPLE_NAMES
    assert [t["optimizer_steps_done"] for t in timeline] == EXAMPLE_STEPS_DONE
    assert [t["optimizer_step"] for t in timeline] == [b % 2 == 0 for b in range(1, 11)]
    # the original's steps, one batch earlier: after batch b here = after batch b - 1 there
    assert EXAMPLE_STEPS_DONE == [0, *ORIGINAL_STEPS_DONE[:-1]]


def test_names_count_batches_summed_over_processes():
    def names(world_size, accumulation, ckpt_freq, num_batches):
        return [t["checkpoint"] for t in step_timeline(world_size, accumulation, ckpt_freq, num_batches)
                if t["checkpoint"]]

    # the same data seen (20 batches of all processes), the same name, whatever the split
    assert names(1, 1, 4, 20)[-1] == names(2, 1, 4, 10)[-1] == names(4, 1, 4, 5)[-1] == "ckpt_20"
    assert names(1, 4, 4, 20) == names(1, 1, 4, 20)  # accumulation leaves the names alone
    # the counter only takes multiples of world_size: every ckpt_freq / gcd(ckpt_freq, world_size) batches
    assert names(2, 1, 3, 10) == ["ckpt_6", "ckpt_12", "ckpt_18"]
    assert names(2, 1, 2, 3) == ["ckpt_2", "ckpt_4", "ckpt_6"]
    # evaluations: every eval_freq, plus after the first batch of a single process
    assert [b for b in range(1, 8) if eval_due(global_step_after(b, 1), 3)] == [1, 3, 6]
    assert [b for b in range(1, 8) if eval_due(global_step_after(b, 2), 3)] == [3, 6]


def test_matches_the_golden_timeline():
    path = GOLDEN / "ckpt_steps.json"
    if not path.is_file():
        pytest.skip(f"{path} not there (../shared/golden is outside the repository)")
    golden = json.loads(path.read_text())
    ws, acc, n, freq = (golden[k] for k in ("world_size", "gradient_accumulation_step", "batches_per_process", "ckpt_freq"))
    assert (ws, acc, n, freq) == (2, 2, 10, 2)
    ours = step_timeline(ws, acc, freq, n)
    for key in ("batch", "global_step", "checkpoint"):
        assert [t[key] for t in ours] == [g[key] for g in golden["timeline"]], key
    assert ["ckpt_0", *(t["checkpoint"] for t in ours if t["checkpoint"])] == [c["name"] for c in golden["checkpoints"]]
    # the optimizer steps: the golden ones are the original's rule; ours come one batch later
    original = [(b + 1) % acc == 0 for b in range(1, n + 1)]
    assert [g["optimizer_step"] for g in golden["timeline"]] == original
    assert [g["optimizer_steps_done"] for g in golden["timeline"]] == ORIGINAL_STEPS_DONE
    assert [t["optimizer_step"] for t in ours] == [False, *original[:-1]]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_dir):
    """One process, accumulation 2, 5 batches, ckpt_freq 2: the logged values (a fake
    tracker: ``Accelerator.log`` recorded) and every micro-batch's loss."""
    root = tmp_path_factory.mktemp("ckpt_steps")
    paths = write_fake_collected(root / "data", num_train=5, repeats=1, num_ood=1)
    logged, losses = [], []
    patch = pytest.MonkeyPatch()
    loss_of = QSharpClassifier.loss

    def recorded_loss(self, *args, **kwargs):
        loss = loss_of(self, *args, **kwargs)
        if self.training:
            losses.append(loss.item())
        return loss

    patch.setattr(QSharpClassifier, "loss", recorded_loss)
    patch.setattr(train_classifier.Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    try:
        run(train_classifier.main, train_classifier.parse_args([
            *train_flags(paths, tiny_dir("llama")), "--gradient_accumulation_step", "2", "--ckpt_freq", "2",
            "--eval_freq", "100", "--save_opt_scheduler", "1", "--init_mode", "random", "--output_dir", str(root / "out")]))
    finally:
        patch.undo()
    return {"out": root / "out", "logged": logged, "losses": losses}


def test_single_process_names_and_optimizer_steps(single_run):
    out = single_run["out"]
    # ckpt_2, ckpt_4 as the original; ckpt_5: the last batch was no checkpoint (an addition)
    assert checkpoint_names(out) == ["ckpt_0", "ckpt_2", "ckpt_4", "ckpt_5"]
    assert [optimizer_states_steps(out / name) for name in checkpoint_names(out)] == [0, 1, 2, 2]
    for name in checkpoint_names(out):
        files = {p.name for p in (out / name).iterdir()}
        assert {"optimizer.pt", "lr_scheduler.pt"} <= files and "scheduler.pt" not in files
    # evaluations: the starting weights, after the first batch (the original's), at the end
    eval_steps = [step for step, values in single_run["logged"] if "OOD Eval Loss" in values]
    assert eval_steps == [0, 1, 5]


def test_training_loss_is_the_mean_over_the_steps_micro_batches(single_run):
    losses = single_run["losses"]
    assert len(losses) == 5 and len(set(losses)) > 1
    train_logs = [(step, values) for step, values in single_run["logged"] if "Training Loss" in values]
    assert [step for step, _ in train_logs] == [2, 4]  # at the optimizer steps, wandb step = global step
    assert all(set(values) == TRAIN_METRICS for _, values in train_logs)
    for (step, values), pair in zip(train_logs, (losses[0:2], losses[2:4])):
        assert values["Training Loss"] == pytest.approx(sum(pair) / 2, rel=1e-6), step
        assert values["Learning Rate"] == pytest.approx(1e-3)
        assert values["Gradient Norm"] > 0 and values["Steps per Min"] > 0
