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

:class:`TrainState` is that state while the run goes on: it counts the batches, writes the
checkpoints (:meth:`TrainState.save`), reads one back (:meth:`TrainState.restore`) and
continues a resumed epoch at the killed run's batch (:meth:`TrainState.epoch_batches`).
``--resume_opt_scheduler 1`` (a new run from another run's checkpoint) reads only the
optimizer and scheduler: :func:`optimizer_scheduler_files`, :func:`load_optimizer_scheduler`.
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

from utils.cli import ARGS_FILE, setting_differences
from utils.data.io import read_json, temporary_prefix
from utils.distributed import set_loader_epoch
from utils.models import loading

# the original's names (its utils.py save_model); what --resume_opt_scheduler 1 reads
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "lr_scheduler.pt"
OLD_SCHEDULER_FILE = "scheduler.pt"  # what this project wrote before
# what the original's resume reads (no original code writes it): {"optimizer": ..., "scheduler": ...}
COMBINED_STATE_FILE = "optimizer_scheduler_state.pt"
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


def start_tracking(args, accelerator) -> None:
    """With ``--track 1``: accelerate's wandb tracker; with ``--resume 1`` too, one wandb run per
    output folder, continued by every resume (:func:`wandb_run_id`)."""
    if args.track:
        wandb_kwargs = {"entity": args.wandb_entity, "name": args.wandb_run_name}
        if args.resume:  # one wandb run per output folder, continued by every resume
            wandb_kwargs.update(id=wandb_run_id(Path(args.output_dir), accelerator.is_main_process), resume="allow")
        accelerator.init_trackers(args.wandb_project or "qsharp", config=vars(args), init_kwargs={"wandb": wandb_kwargs})


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


def resume_point(args, output_dir: Path, log=print) -> tuple[Path, dict] | None:
    """With ``--resume 1``: the newest resumable checkpoint of a run with these flags, or None
    (nothing to continue). A folder holding a run with other flags is refused, naming each."""
    if not args.resume or not (output_dir / ARGS_FILE).is_file():
        return None
    differ = setting_differences(read_json(output_dir / ARGS_FILE), vars(args), ignore=IGNORED_ARGS)
    if differ:
        raise ValueError(f"--resume 1 but {output_dir} holds a run with other settings ({', '.join(differ)}); "
                         "use another --output_dir, or remove that one to start over")
    found = newest_resumable(output_dir, args.world_size, log=log)
    if found is None:
        log(f"train: --resume 1 but {output_dir} holds no resumable checkpoint; starting from the beginning")
    return found


def optimizer_scheduler_files(checkpoint: Path) -> list[Path]:
    """What ``--resume_opt_scheduler 1`` reads from ``checkpoint``: ``[optimizer.pt,
    lr_scheduler.pt]`` (what ``--save_opt_scheduler 1`` writes, here and in the original;
    ``scheduler.pt`` of this project's older checkpoints is taken too), else
    ``[optimizer_scheduler_state.pt]`` (``{"optimizer": ..., "scheduler": ...}``, the file
    the original's resume reads and nothing writes). Checked before any weights are read."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--classifier_ckpt_path {checkpoint} does not exist")
    schedulers = [checkpoint / name for name in (SCHEDULER_FILE, OLD_SCHEDULER_FILE) if (checkpoint / name).is_file()]
    if (checkpoint / OPTIMIZER_FILE).is_file() and schedulers:
        return [checkpoint / OPTIMIZER_FILE, schedulers[0]]
    if (checkpoint / COMBINED_STATE_FILE).is_file():
        return [checkpoint / COMBINED_STATE_FILE]
    have = [name for name in (OPTIMIZER_FILE, SCHEDULER_FILE) if (checkpoint / name).is_file()]
    raise FileNotFoundError(
        f"--resume_opt_scheduler 1 but {checkpoint} holds neither {OPTIMIZER_FILE} + {SCHEDULER_FILE} nor "
        f"{COMBINED_STATE_FILE}{f' (only {have[0]})' if have else ''}: write its checkpoints with --save_opt_scheduler 1, "
        "or give --resume_opt_scheduler 0")


def load_optimizer_scheduler(files: list[Path], optimizer, scheduler) -> None:
    """Load the state of :func:`optimizer_scheduler_files` into ``optimizer`` and ``scheduler``."""
    states = []
    for path in files:
        with loading("optimizer/scheduler state", path):
            states.append(torch.load(path, map_location="cpu", weights_only=False))
    if len(states) == 1:
        if not isinstance(states[0], dict) or not {"optimizer", "scheduler"} <= set(states[0]):
            raise ValueError(f"{files[0]} is not a dict with keys 'optimizer' and 'scheduler'")
        states = [states[0]["optimizer"], states[0]["scheduler"]]
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1])


# The step counters, as the training loop uses them (``batches``: this process's batches so
# far, counted across epochs, never reset).
def global_step_after(batches: int, world_size: int) -> int:
    """The original's ``global_step`` after a process's ``batches``-th batch: batches summed
    over the processes (``world_size`` per batch). It names ``ckpt_<step>``, is the wandb
    step, and is what ``--ckpt_freq`` / ``--eval_freq`` count; so ``ckpt_N`` has seen the
    same data whatever the number of processes."""
    return batches * world_size


def optimizer_step_due(batches: int, accumulation: int) -> bool:
    """The optimizer steps after every ``accumulation``-th batch of a process (counted across
    epochs: a batch left over at the end of an epoch is accumulated with the next epoch's
    first ones). The original steps one batch earlier ((b + 1) % accumulation == 0: its first
    step comes after ONE batch); here every step sums exactly ``accumulation`` batches."""
    return batches % accumulation == 0


def checkpoint_due(global_step: int, ckpt_freq: int) -> bool:
    """Tested after every batch, whether or not the optimizer stepped (as the original)."""
    return global_step % ckpt_freq == 0


def eval_due(global_step: int, eval_freq: int) -> bool:
    """Tested after every batch; ``global_step == 1`` is the original's first evaluation,
    after the first batch of a single process (never true on several)."""
    return global_step % eval_freq == 0 or global_step == 1


class TrainState:
    """What the checkpoints of a training run hold besides the weights, optimizer and scheduler
    (which :meth:`save` writes too): the counters, the position in the data, and what each
    process alone knows (its RNG states, the training loader's generators, the gradient and
    summed loss of an unfinished accumulation).

    The counters: ``batches`` (this process's batches so far, across epochs), ``optimizer_steps``,
    ``global_step`` (:func:`global_step_after` ``batches``), ``last_saved`` and ``last_evaluated``
    (the global steps of the newest checkpoint and evaluation); ``step_loss``: the summed loss of
    the coming optimizer step's batches so far. ``args``: the training flags (what the
    checkpoints hold and where they go); ``model``, ``optimizer``, ``scheduler``, ``loader``:
    as ``accelerator.prepare`` returned them.
    """

    COUNTERS = ("batches", "optimizer_steps", "global_step", "last_saved", "last_evaluated")

    def __init__(self, args, accelerator, model, optimizer, scheduler, loader, tokenizer):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loader, self.tokenizer, self.output_dir = loader, tokenizer, Path(args.output_dir)
        self.resume, self.save_opt_scheduler, self.keep_last_n = args.resume, args.save_opt_scheduler, args.keep_last_n
        self.accumulation, self.world_size = args.gradient_accumulation_step, args.world_size
        self.generators = loader_generators(loader)  # the data order's randomness, saved with --resume 1
        self.num_batches = len(loader)  # per process and epoch
        self.batches = self.optimizer_steps = self.global_step = self.last_saved = self.last_evaluated = 0
        self.step_loss = 0.0
        self.epoch_start_states = get_states(self.generators)
        self.start_epoch, self.skip, self.resumed = 0, 0, None  # resumed: this process's rng_state_<rank>.pth

    def summary(self) -> str:
        """The line that closes a run."""
        pending = self.batches % self.accumulation
        return (f"train: {self.global_step} steps ({self.batches} batches per process, {self.optimizer_steps} optimizer steps"
                + (f"; the gradient of the last {pending} batch(es) was not applied" if pending else "")
                + f"), last checkpoint {self.output_dir / f'ckpt_{self.global_step}'}")

    def count_batch(self) -> int:
        """One more batch of this process; the global step after it."""
        self.batches += 1
        self.global_step = global_step_after(self.batches, self.world_size)
        return self.global_step

    def restore(self, folder: Path, trainer_state: dict, log=print) -> None:
        """Continue from ``folder``, a checkpoint :func:`resumable` accepts (``trainer_state``: its
        trainer_state.json): the counters, this process's unfinished accumulation, and (at an
        epoch boundary) the RNG and loader states of then; inside an epoch
        :meth:`epoch_batches` sets them once the loader has drawn its seeds."""
        for name in self.COUNTERS:
            if name in trainer_state:
                setattr(self, name, trainer_state[name])
        mine = torch.load(folder / RNG_FILE.format(rank=self.accelerator.process_index), map_location="cpu",
                          weights_only=False)
        self.start_epoch, self.skip, self.resumed = trainer_state["epoch"], trainer_state["position"], mine
        if mine["grads"] is not None:  # an accumulation the checkpoint cut: its gradient so far
            for param, grad in zip(self.model.parameters(), mine["grads"]):
                param.grad = None if grad is None else grad.to(param.device)
            self.step_loss = mine["step_loss"]
        log(f"train: resuming from {folder} (epoch {self.start_epoch}, batch {self.skip} of {self.num_batches})")
        if self.skip == 0:  # at an epoch boundary: the next epoch starts from the states of now
            set_states(self.generators, mine["generators_now"])
            set_rng_state(mine["rng"])

    def epoch_batches(self, epoch: int):
        """The training batches of ``epoch``. In the epoch a resume continues, the batches of the
        killed run's epoch from its position on: the loader starts from that epoch's saved
        generator states, and once it has drawn its seeds the killed run's states of then take over."""
        set_loader_epoch(self.loader, epoch)  # also a TokenBudgetBatchSampler behind accelerate's shard
        continuing = self.resumed is not None and epoch == self.start_epoch and self.skip > 0
        if continuing:  # the same batch order as the killed run's epoch
            set_states(self.generators, self.resumed["generators_epoch_start"])
        self.epoch_start_states = get_states(self.generators)
        for index, batch in enumerate(self.loader):
            if continuing:
                if index == 0:  # the loader has drawn its seeds: from here on, the killed run's states
                    set_states(self.generators, self.resumed["generators_now"])
                    set_rng_state(self.resumed["rng"])
                if index < self.skip:
                    continue
            yield batch

    def process_state(self) -> dict:
        """What this process alone knows: RNG states, the loader's generators, an unfinished accumulation."""
        pending = self.batches % self.accumulation
        grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.model.parameters()] if pending else None
        return {"rng": rng_state(), "generators_epoch_start": self.epoch_start_states,
                "generators_now": get_states(self.generators), "grads": grads, "step_loss": self.step_loss}

    def trainer_state(self, step: int) -> dict:
        """trainer_state.json of ``ckpt_<step>``."""
        epoch, position = divmod(self.batches, self.num_batches) if self.num_batches else (0, 0)
        return {"version": STATE_VERSION, "global_step": step, **{name: getattr(self, name) for name in self.COUNTERS},
                "epoch": epoch, "position": position, "accumulation_phase": self.batches % self.accumulation,
                "world_size": self.world_size}

    def gathered(self, mine: dict) -> list[dict] | None:
        """Every process's ``mine`` in rank order on the main process (None on the others)."""
        if self.accelerator.num_processes == 1:
            return [mine]
        import torch.distributed as dist

        gathered = [None] * self.accelerator.num_processes if self.accelerator.is_main_process else None
        dist.gather_object(mine, gathered, dst=0)
        return gathered

    def save(self, step: int) -> None:
        """Write ``ckpt_<step>`` (the main process; every process must call it): the weights and
        tokenizer; with ``--resume 1`` also trainer_state.json, every process's rng_state_<rank>.pth,
        and with it or ``--save_opt_scheduler 1`` optimizer.pt and lr_scheduler.pt. Then the
        checkpoints past ``--keep_last_n`` are removed."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self.last_saved = step  # before the state is written: a resume from here must not save it again
        extra = {}
        if self.resume:
            states = self.gathered(self.process_state())
            extra[TRAINER_STATE_FILE] = self.trainer_state(step)
            if accelerator.is_main_process:
                extra.update({RNG_FILE.format(rank=rank): each for rank, each in enumerate(states)})
        if self.resume or self.save_opt_scheduler:
            extra.update({OPTIMIZER_FILE: self.optimizer.state_dict(), SCHEDULER_FILE: self.scheduler.state_dict()})
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(self.output_dir / f"ckpt_{step}", tokenizer=self.tokenizer,
                                                                 extra_state=extra)
            prune(self.output_dir, self.keep_last_n, log=accelerator.print)
        accelerator.wait_for_everyone()
