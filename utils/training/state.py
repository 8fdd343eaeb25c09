"""Exact continuation of a killed training run: ``train_classifier.py --resume 1``.

With ``--resume 1`` every ``ckpt_<step>/`` also holds what the next batch needs:

    optimizer.pt, lr_scheduler.pt     optimizer and scheduler state (the original's names)
    trainer_state.json                counters: global step, this process's batches, optimizer
                                      steps, the epoch and the position inside its batch order,
                                      the gradient-accumulation phase
    rng_state_<rank>.pth              per process: python, numpy, torch (and CUDA) RNG states,
                                      the training loader's generators at the start of the
                                      epoch and now, and the gradient of an unfinished
                                      accumulation (with its summed loss)

The folder is assembled under a temporary name and renamed into place (``save_pretrained``),
so a kill while it is written leaves the previous checkpoint as the newest complete one.
Re-running the identical command then continues from the newest checkpoint that
:func:`resumable` accepts, and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data.io import read_json, temporary_prefix

# the original's names (its utils.py save_model); what --resume_opt_scheduler 1 reads
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "lr_scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state_{rank}.pth"
WANDB_ID_FILE = ".wandb_run_id"
CKPT_NAME = re.compile(r"^ckpt_(\d+)$")
# flags that change neither the weights nor the data order (and the folder itself, which may move): a resume may bring others
IGNORED_ARGS = ("resume", "output_dir", "num_workers", "keep_last_n", "track", "wandb_entity", "wandb_project", "wandb_run_name")
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's global RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generators(loader) -> list[torch.Generator]:
    """The ``torch.Generator`` objects behind a (prepared) loader: its own, accelerate's
    synchronised one, its samplers'; each once, in a fixed order."""
    found, seen, todo = [], set(), [loader]
    while todo:
        obj = todo.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        for name in ("generator", "synchronized_generator"):
            generator = getattr(obj, name, None)
            if isinstance(generator, torch.Generator) and id(generator) not in {id(g) for g in found}:
                found.append(generator)
        todo.extend(getattr(obj, name, None) for name in ("base_dataloader", "batch_sampler", "sampler"))
    return found


def get_states(generators: list[torch.Generator]) -> list[torch.Tensor]:
    return [generator.get_state() for generator in generators]


def set_states(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    if len(generators) != len(states):
        raise ValueError(f"the checkpoint holds {len(states)} loader generator state(s), the loader has {len(generators)}")
    for generator, state in zip(generators, states):
        generator.set_state(state)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``ckpt_<step>`` in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in output_dir.iterdir()
             if path.is_dir() and (m := CKPT_NAME.match(path.name))]
    return sorted(found)


def _usable_zip(path: Path) -> bool:
    """A ``torch.save`` file written to the end (its zip directory is the last thing written)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _usable_weights(folder: Path) -> bool:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        for name in files:
            with safe_open(str(folder / name), framework="pt") as handle:
                handle.keys()
    except Exception:  # noqa: BLE001  (missing, truncated, not safetensors: not usable)
        return False
    return True


def resumable(folder: Path, step: int, world_size: int) -> dict | None:
    """The trainer state of ``folder`` (``ckpt_<step>``) if it holds everything an exact
    continuation on ``world_size`` processes reads, each file complete; else None."""
    try:
        state = read_json(folder / TRAINER_STATE_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("global_step") != step:
        return None
    if state.get("world_size") != world_size or not (folder / "config.json").is_file():
        return None
    files = [OPTIMIZER_FILE, SCHEDULER_FILE, *(RNG_FILE.format(rank=rank) for rank in range(world_size))]
    if not all(_usable_zip(folder / name) for name in files) or not _usable_weights(folder):
        return None
    return state


def newest_resumable(output_dir: Path, world_size: int, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint :func:`resumable` accepts (older ones are not looked at once one is)."""
    for step, folder in reversed(checkpoints(output_dir)):
        state = resumable(folder, step, world_size)
        if state is not None:
            return folder, state
        log(f"train: {folder} is not a complete resumable checkpoint; skipped")
    return None


def prune(output_dir: Path, keep_last_n: int, log=print) -> None:
    """Delete all but the newest ``keep_last_n`` checkpoints (-1: keep all).

    Called after a checkpoint is renamed into place, so the newest one, the one a resume
    needs, is never among them. Each is renamed to a temporary name first, so a kill
    mid-deletion leaves no folder that looks like a checkpoint.
    """
    if keep_last_n < 0:
        return
    for _, folder in checkpoints(output_dir)[:-keep_last_n]:
        doomed = folder.with_name(temporary_prefix(folder.name) + "deleted.tmp")
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        log(f"train: removed {folder} (--keep_last_n {keep_last_n})")


def wandb_run_id(output_dir: Path, is_main: bool) -> str:
    """The wandb run id of this output folder (made by the first run, read by a resume)."""
    path = output_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    if is_main:
        from utils.data.io import atomic_open

        with atomic_open(path) as handle:
            handle.write(run_id)
    return run_id
