"""Several processes per run (``accelerate launch`` / ``torchrun``).

Collection and evaluation: each process (rank) takes its own share of the problems, whole
``--batch_size`` chunks counted from the first problem (:func:`rank_share`), so a batch
has the same problems and seed (``batch_seed(seed, repeat, chunk[0])``) as in a
single-process run and writes the same per-problem files. Each rank runs on its own device
(:func:`process_device`: ``cuda:LOCAL_RANK``, else the CPU). Ranks share nothing but the
output folder, except that evaluation waits for every rank (:func:`barrier`) before the
main process aggregates. Training uses ``accelerate.Accelerator``; on a machine without
CUDA it must be told to use the CPU (:func:`accelerator_cpu`), and each epoch of its
sharded training loader is started with :func:`set_loader_epoch`; it ends with
:func:`end_training`.

Rank, world size and local rank come from the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
variables that the launchers set; without them a run is one process of one.
"""

from __future__ import annotations

import functools
import gc
import itertools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

# How long a rank waits at a barrier for the others: a resumed evaluation can leave one
# rank with nothing to do while another still samples for hours.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Process:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def label(self) -> str:
        """``"[rank 1/2] "`` in a multi-process run, ``""`` otherwise (prefix of per-rank log lines)."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""

    def say(self, message: str) -> None:
        """Print ``message`` behind this rank's label as one write, then flush: the lines of
        processes sharing one stdout pipe never run into each other (``print`` writes the
        text and its newline separately)."""
        sys.stdout.write(f"{self.label()}{message}\n")
        sys.stdout.flush()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def current_process() -> Process:
    """Rank, world size and local rank from the launcher's environment (one of one without it)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")
    return Process(rank, world_size, local_rank)


def rank_share(items: Sequence[T], batch_size: int, process: Process) -> list[T]:
    """This rank's contiguous share of ``items``: whole ``batch_size`` chunks counted from the
    first item, the chunks dealt out in blocks whose sizes differ by at most one.

    The shares of all ranks are disjoint and cover ``items`` in order; chunking a share by
    ``batch_size`` gives exactly the chunks a single process forms. A rank may get nothing
    (fewer chunks than ranks).
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    chunks = -(-len(items) // batch_size)
    first = chunks * process.rank // process.world_size
    last = chunks * (process.rank + 1) // process.world_size
    return list(items[first * batch_size : last * batch_size])


def process_device(process: Process, gpus: int | None = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is there (also made the current
    CUDA device, so ``"cuda"`` means it), else the CPU.

    ``gpus`` k is for an engine that places itself on the first GPUs its process sees (vLLM:
    ``cuda:0``, and ``cuda:0`` to ``cuda:k-1`` for its k tensor-parallel workers). In a run of
    several processes, this rank's block of k GPUs (:func:`own_gpus`) becomes the only one its
    CUDA sees, before CUDA starts, and the device is ``cuda:0``.
    """
    index, mine = process.local_rank, None
    if gpus is not None and process.distributed:
        index, mine = 0, own_gpus(process, gpus)
    if not torch.cuda.is_available():
        if mine is not None and torch.version.cuda is not None:
            raise ValueError(f"rank {process.rank} has no GPUs: CUDA_VISIBLE_DEVICES={mine} are not there; "
                             f"launch at most one process per {gpus} GPU(s)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"LOCAL_RANK {process.local_rank} but only {count} CUDA device(s) are visible: "
                         "launch at most one process per GPU")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def own_gpus(process: Process, count: int) -> str:
    """Make this rank's ``count`` GPUs, the ``LOCAL_RANK``-th block of ``count`` among those visible
    (``CUDA_VISIBLE_DEVICES``, else all), the only ones this process and its children see; returns
    them. Must run before CUDA starts here, which reads the variable once."""
    if torch.cuda.is_initialized():
        raise RuntimeError("own_gpus after CUDA started in this process: the GPUs it sees are fixed")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = process.local_rank * count
    if visible is None:
        mine = [str(index) for index in range(first, first + count)]
    else:
        ids = [device.strip() for device in visible.split(",") if device.strip()]
        if first + count > len(ids):
            raise ValueError(f"LOCAL_RANK {process.local_rank} needs GPUs {first} to {first + count - 1} of "
                             f"CUDA_VISIBLE_DEVICES={visible}: launch at most one process per {count} GPU(s)")
        mine = ids[first : first + count]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return os.environ["CUDA_VISIBLE_DEVICES"]


def end_training(accelerator) -> None:
    """``accelerator.end_training()`` (trackers finished, process group destroyed) after the
    objects ``accelerator.prepare`` returned are released; the caller must hold none of them.

    The order matters. The reducer of the model's ``DistributedDataParallel`` wrapper holds the
    process group. Were it the last holder, the group's destructor would run with the GIL held and
    join gloo's worker threads, while a worker waits for the GIL to free the tensors of the last
    collectives (``gather_object``): a deadlock, seen at the end of 2-process CPU runs under load.
    Freed first, the wrapper leaves the group to its Python object, whose destructor lets go of
    the GIL.
    """
    accelerator.free_memory()  # accelerate's own references to the prepared objects
    gc.collect()  # and any reference cycle through them
    accelerator.end_training()


def accelerator_cpu(process: Process) -> bool:
    """``Accelerator(cpu=...)`` for a training run: True for several processes on a machine
    without CUDA. Without it ``accelerate`` ignores the launch (each process would train
    alone, every one writing the checkpoints); with it the processes join over gloo."""
    return process.distributed and not torch.cuda.is_available()


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell a (prepared) training loader and every sampler behind it that epoch ``epoch`` begins.

    ``accelerate``'s ``DataLoaderShard.set_epoch`` passes the epoch to its batch sampler and
    to a ``sampler`` under it, but on several processes that batch sampler is a
    ``BatchSamplerShard`` wrapping ours (``TokenBudgetBatchSampler``), which it never
    reaches: every epoch would repeat the first one's batches. This follows the public
    ``batch_sampler`` / ``sampler`` attributes down from ``loader`` and calls ``set_epoch``
    on each object that has one (a sampler that accelerate reaches as well, and accelerate
    again when iteration starts, gets the same epoch twice, which changes nothing).
    Samplers without ``set_epoch`` (a seeded ``RandomSampler`` draws a new order from its
    generator) are left alone.
    """
    seen, todo = set(), [loader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
        todo.extend(getattr(obj, name, None) for name in ("sampler", "batch_sampler"))


def barrier(process: Process) -> None:
    """Wait until every rank gets here (no-op for a single process).

    Counts arrivals in the launcher's key-value store (``env://``: ``MASTER_ADDR`` /
    ``MASTER_PORT``, torchrun's agent store under ``accelerate launch``), with a long timeout.
    It makes no process group: vLLM (``--engine vllm``) makes its own, of one process, in
    every rank, and a barrier on that group would not wait for the others.
    """
    if not process.distributed:
        return
    store, arrivals = _barrier_store(process.rank, process.world_size)
    key = f"barrier{next(arrivals)}"
    if store.add(key, 1) == process.world_size:  # the last rank to arrive opens it
        store.set(f"{key}/open", "1")
    store.wait([f"{key}/open"], BARRIER_TIMEOUT)


@functools.lru_cache(maxsize=None)
def _barrier_store(rank: int, world_size: int):
    """The launch's store (under a prefix of its own) and this process's barrier counter."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: "
                         "start the processes with accelerate launch or torchrun")
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=BARRIER_TIMEOUT))
    return dist.PrefixStore("qsharp", store), itertools.count(1)


def shutdown() -> None:
    """Release the store of :func:`barrier`, if one was opened (vLLM releases its own group)."""
    _barrier_store.cache_clear()
