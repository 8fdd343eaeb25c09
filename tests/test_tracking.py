"""``train_classifier.py --track 1`` logs to wandb under the original metric names, offline
(``WANDB_MODE=offline``: no network, no login), with the run's arguments as config and the
``--wandb_*`` flags as project, entity and run name. ``--track 0`` does not import wandb.

The offline run is read back with wandb's own reader of the ``.wandb`` transaction log,
``wandb leet inspect --json`` (its records) and ``--summary --json`` (config, summary, name).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import collect_training_data
import combine_training_data
from tests.helpers.tracking import inspect, wandb_env
from utils.demo.synthetic import write_synthetic_dataset
from utils.cli import run

REPO = Path(__file__).resolve().parents[1]
# Names of the original code (listed in the README's Tracking section); users compare runs by them.
TRAIN_METRICS = ("Training Loss", "Learning Rate", "Steps per Min", "Gradient Norm")
EVAL_METRICS = ("Eval Loss", "Eval Explained Variance", "Eval R^2", "Eval Prediction Min", "Eval Prediction Max",
                "Eval Prediction Mean", "Eval Accuracy", "Eval ROC-AUC")
EVAL_NAMES = {prefix + name for prefix in ("ID ", "OOD ") for name in EVAL_METRICS}
LR = 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_dir):
    """Synthetic problems, tiny models, a combined collection whose rewards alternate 0/1
    (the tiny reference never answers right; varied rewards give defined eval metrics)."""
    root = tmp_path_factory.mktemp("tracking")
    paths = write_synthetic_dataset(root / "data", 20, 2, seed=0)
    models = tiny_dir("llama")
    d = {"root": root, "train": str(paths["train"]), "train_eval": str(paths["train_eval"]),
         "ref": str(models / "ref"), "cls": str(models / "classifier"), "collected": str(root / "collected")}
    run(collect_training_data.main, collect_training_data.parse_args([
        "--is_first_round", "1", "--ref_model_id", d["ref"], "--classifier_model_id", d["cls"], "--data_path", d["train"],
        "--train_eval_save_path", d["train_eval"], "--output_dir", d["collected"], "--num_samples", "2",
        "--batch_size", "20", "--max_new_tokens", "6", "--eta", "0", "--use_chat_template", "0", "--dtype", "float32"]))
    run(combine_training_data.main, combine_training_data.parse_args([
        "--data_template_path", d["collected"], "--data_path", d["train"], "--train_eval_save_path", d["train_eval"]]))
    combined = root / "collected" / "all_train_data.jsonl"
    records = [json.loads(line) for line in combined.read_text().splitlines()]
    for i, record in enumerate(records):
        n = len(record["partial_guided_predictions_correctness"])
        record["partial_guided_predictions_correctness"] = [(i + r) % 2 == 0 for r in range(n)]
    combined.write_text("\n".join(json.dumps(record) for record in records))
    d["combined"] = str(combined)
    return d


def train(d, root: Path, env: dict, *extra: str) -> str:
    """Run train_classifier.py (2 steps of 16 sequences, eval every step); return its stdout."""
    argv = ["--ref_model_id", d["ref"], "--classifier_model_id", d["cls"], "--original_problems_path", d["train"],
            "--train_eval_save_path", d["train_eval"], "--init_mode", "random", "--inference_mode", "bernoulli",
            "--dataset_type", "gsm8k", "--data_paths", d["combined"], "--drop_no_variation", "0", "--num_epochs", "1",
            "--batch_size", "16", "--dtype", "float32", "--lr", str(LR), "--eval_freq", "1", "--ckpt_freq", "100",
            "--output_dir", str(root / "checkpoints"), *extra]
    result = subprocess.run([sys.executable, str(REPO / "train_classifier.py"), *argv], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def as_float(value) -> float:
    return float("nan") if value == "NaN" else float(value)


def close(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def test_track_1_logs_original_names_offline(data):
    root = data["root"] / "track1"
    root.mkdir()
    env = wandb_env(root, str(REPO))
    out = train(data, root, env, "--track", "1", "--wandb_project", "qsharp-tests", "--wandb_entity", "offline-entity",
                "--wandb_run_name", "tiny-run")
    steps = int(re.search(r"train: (\d+) steps", out).group(1))
    assert steps >= 2

    runs = list((root / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and len(list(runs[0].glob("run-*.wandb"))) == 1
    summary = json.loads(inspect(runs[0], env, "--summary"))
    assert (summary["name"], summary["project"], summary["entity"]) == ("tiny-run", "qsharp-tests", "offline-entity")
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    args = json.loads((root / "checkpoints" / "args.json").read_text())
    assert {name: summary["config"].get(name) for name in args} == args

    # history rows by step: eval at step 0, then training metrics (and eval) at every step
    rows: dict[int, dict] = {}
    for line in inspect(runs[0], env).splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            item = record["history"]["item"]
            rows.setdefault(item["_step"], {}).update({k: as_float(v) for k, v in item.items() if not k.startswith("_")})
    assert sorted(rows) == list(range(steps + 1))
    assert set().union(*rows.values()) == set(TRAIN_METRICS) | EVAL_NAMES
    assert set(rows[0]) == EVAL_NAMES
    for step in range(1, steps + 1):
        assert set(rows[step]) == set(TRAIN_METRICS) | EVAL_NAMES
        assert rows[step]["Learning Rate"] == pytest.approx(LR)
        assert rows[step]["Training Loss"] > 0 and rows[step]["Gradient Norm"] > 0 and rows[step]["Steps per Min"] > 0
    assert not any(math.isnan(rows[steps][name]) for name in rows[steps])  # varied rewards: all defined

    # the summary holds the last values, and they are the ones the script printed
    logged = {name: as_float(value) for name, value in summary["summary"].items() if not name.startswith("_")}
    assert logged == rows[steps] and summary["summary"]["_step"] == steps
    printed = [line for line in out.splitlines() if line.startswith(f"step {steps}: ")][-1]
    values = dict(pair.rsplit(" ", 1) for pair in printed.split(": ", 1)[1].split(", "))
    assert set(values) == EVAL_NAMES
    assert all(close(float(values[name]), logged[name], 1e-4) for name in EVAL_NAMES)


def test_track_0_imports_no_wandb(data):
    root = data["root"] / "track0"
    fake = root / "fake_site" / "wandb"  # found before the real wandb: importing it leaves a marker
    fake.mkdir(parents=True)
    marker = root / "wandb_imported"
    fake.joinpath("__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('wandb imported')\n")
    env = wandb_env(root, os.pathsep.join([str(fake.parent), str(REPO)]))

    probe = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and marker.exists()  # the fake is what an import would get
    marker.unlink()

    out = train(data, root, env, "--track", "0")
    assert re.search(r"train: \d+ steps", out)
    assert not marker.exists()
    assert not (root / "wandb_dir").exists()
