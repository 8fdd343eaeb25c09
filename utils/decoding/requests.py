"""The seam every decoding backend implements: requests in, each one's tokens out through a callback.

A :class:`Request` is one sequence to decode: its prompt ids, budget, whether the Q#
processor guides it, and its ``stream``, (seed, repeat, problem, stage), which says where its
randomness comes from. A :class:`Backend` runs requests with
``run(requests, on_finish, processor)``: ``on_finish(request)`` is called as each request
ends and may return follow-up requests (collection's roll-out follows its roll-in). How a
backend batches and seeds is its own: the continuous engine samples every request from its
own stream, ``generate()`` seeds each batch of problems. :meth:`Backend.pending` and
:meth:`Backend.generator` let the algorithms above (``utils.decoding.rollout``) stay the
same for every backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from utils.models import get_stop_ids, load_causal_lm
from utils.seeding import request_seed


@dataclass
class Request:
    """One sequence to decode: ``prompt`` ids (unpadded), its budget and its ``stream``, the
    (seed, repeat, problem index, stage) its randomness comes from (``utils.seeding``).

    ``guided`` rows go through the processor (and get their KL recorded when it records KL);
    ``tag`` is the caller's. The backend fills ``tokens`` (up to and including the stop id) and,
    with KL recording, ``token_kl`` / ``token_kl_before_top_p`` (one value per token).
    """

    prompt: list[int]
    max_new_tokens: int
    stream: tuple[int, int, int, str]
    guided: bool = False
    tag: object = None
    tokens: list[int] = field(default_factory=list)
    token_kl: list[float] = field(default_factory=list)
    token_kl_before_top_p: list[float] = field(default_factory=list)

    @property
    def seed(self) -> int:
        """The seed of this request's own stream."""
        return request_seed(*self.stream)

    @property
    def kind(self) -> str:
        """Its stage: ``roll_in``, ``roll_out`` or ``eval``."""
        return self.stream[3]


OnFinish = Callable[[Request], "list[Request] | None"]


class Backend:
    """Decodes :class:`Request` s with the reference model ``model_id`` (loaded on the first run).

    ``batch_size`` is the backend's batch (live rows, or problems per call), ``temperature``
    0 decodes greedily. ``stats`` holds, per request kind, the tokens decoded and the
    row-steps run for them (``all`` where the backend does not tell kinds apart), and the
    seconds spent decoding in :meth:`run` (the callbacks' own time, grading and writing, left out).
    """

    def __init__(self, model_id: str, tokenizer, *, dtype: str, device, batch_size: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_batch_tokens: int = 0):
        self.model_id, self.tokenizer, self.dtype, self.device = model_id, tokenizer, dtype, device
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.model = self.stop_ids = None
        self.stats = {"seconds": 0.0, "tokens": {}, "row_steps": {}}

    @classmethod
    def missing(cls) -> str | None:
        """What this backend needs and this environment lacks, as one line (None: nothing)."""
        return None

    @classmethod
    def options(cls, args) -> dict:
        """Constructor settings of this backend's own flags (none here)."""
        return {}

    @classmethod
    def gpus(cls, args) -> int | None:
        """GPUs per process when the backend places itself on the first ones its process sees
        (:func:`utils.distributed.process_device`); None: it runs on ``cuda:LOCAL_RANK``."""
        return None

    @classmethod
    def from_model(cls, model, tokenizer, **settings) -> Backend:
        """A backend on an already loaded reference ``model`` (on its device and dtype); ``settings``
        as the constructor's, ``dtype`` and ``device`` left out."""
        backend = cls(getattr(model, "name_or_path", ""), tokenizer, dtype=str(model.dtype).removeprefix("torch."),
                      device=model.device, **settings)
        backend.model, backend.stop_ids = model, get_stop_ids(model, tokenizer)
        return backend

    def load(self) -> None:
        """The reference model and its stop ids, once."""
        if self.model is None:
            self.model = load_causal_lm(self.model_id, self.dtype, self.device)
            self.stop_ids = get_stop_ids(self.model, self.tokenizer)

    def pending(self, indices: list[int], repeats: int, done: Callable[[int, int], bool]) -> list[tuple[int, int]]:
        """The (problem index, repeat) pairs to run, repeat by repeat: those not ``done``."""
        return [(i, r) for r in range(repeats) for i in indices if not done(i, r)]

    def generator(self, stream: tuple[int, int, int, str]) -> torch.Generator | None:
        """The generator of a draw the caller makes (collection's cut): its own ``stream``'s."""
        return torch.Generator().manual_seed(request_seed(*stream))

    def run(self, requests: Iterable[Request], on_finish: OnFinish, processor=None) -> None:
        """Decode every request (the ``guided`` ones through ``processor``); ``on_finish(request)``
        is called as each one ends and may return follow-up requests."""
        self.load()
        callbacks = 0.0

        def timed_finish(request: Request):
            nonlocal callbacks
            start = time.perf_counter()
            try:
                return on_finish(request)
            finally:
                callbacks += time.perf_counter() - start

        start = time.perf_counter()
        with torch.no_grad():
            self._run(list(requests), timed_finish, processor)
        self.stats["seconds"] += time.perf_counter() - start - callbacks

    def _run(self, requests: list[Request], on_finish: OnFinish, processor) -> None:
        raise NotImplementedError

    def _count(self, key: str, kind: str, count: int) -> None:
        """Add ``count`` to ``stats[key][kind]`` (``key``: ``tokens`` or ``row_steps``)."""
        self.stats[key][kind] = self.stats[key].get(kind, 0) + count
