"""Decoding with transformers' ``generate()``: the helper that samples one left-padded batch, and
``--engine generate``, the backend that runs requests as such batches.

A batch is up to ``batch_size`` consecutive requests of one (seed, repeat, stage), seeded
as a whole from its first problem (``utils.seeding.batch_seed``); its follow-up requests
(collection's roll-outs) run as the next batches, without a new seed. Draws the caller makes
(collection's cut) come from that same seeded global RNG, in request order.
"""

from __future__ import annotations

import torch

from utils.decoding.guidance import QSharpLogitsProcessor
from utils.decoding.requests import Backend, OnFinish, Request
from utils.models import left_pad, response_lengths
from utils.seeding import batch_seed, set_seed


def generate_responses(
    model,
    batch: dict[str, torch.Tensor],
    stop_ids: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    processor: QSharpLogitsProcessor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses (guided when ``processor`` is given) for a left-padded prompt batch.

    ``temperature == 0`` decodes greedily. Returns the generated ids [batch, steps]
    (prompt removed, padding after the end) and each response's length [batch], counted
    up to and including its first stop id. A processor that records KL also stands in for
    generate's temperature and top-p warpers (see ``QSharpLogitsProcessor``).
    """
    processors = []
    warps = processor is not None and processor.records_kl  # the processor returns the sampling logits
    if warps:
        processor.check_sampling(temperature, top_p)
    if processor is not None and (not processor.is_noop or warps):
        processor.reset(batch["attention_mask"], stop_ids=stop_ids)
        processors.append(processor)
    sampling = {"do_sample": True, "temperature": 1.0 if warps else temperature, "top_p": 1.0 if warps else top_p,
                "top_k": None}
    output = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_processor=processors,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id,
        **(sampling if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}),
    )
    responses = output[:, batch["input_ids"].shape[1] :]
    return responses, response_lengths(responses, stop_ids)


class GenerateBackend(Backend):
    """``--engine generate``: one ``generate()`` call per batch of ``batch_size`` problems."""

    def pending(self, indices, repeats, done):
        """Every pair of each ``batch_size`` chunk of ``indices`` that has one not ``done``: a
        chunk is sampled whole, as its seed covers it (finished files are not written again)."""
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return [(i, r) for r in range(repeats) for chunk in chunks if not all(done(i, r) for i in chunk) for i in chunk]

    def generator(self, stream):
        """None: the caller's draws come from the batch's seeded global RNG."""
        return None

    def _run(self, requests: list[Request], on_finish: OnFinish, processor) -> None:
        start = 0
        while start < len(requests):
            end = start + 1
            while end < len(requests) and end - start < self.batch_size and _group(requests[end]) == _group(requests[start]):
                end += 1
            seed, repeat, problem, _ = requests[start].stream
            set_seed(batch_seed(seed, repeat, problem))
            pending = requests[start:end]
            while pending:  # the batch, then its follow-ups, batch_size at a time
                follow = []
                for first in range(0, len(pending), self.batch_size):
                    batch = pending[first : first + self.batch_size]
                    self._generate(batch, processor)
                    for request in batch:
                        follow.extend(on_finish(request) or [])
                pending = follow
            start = end

    def _generate(self, batch: list[Request], processor) -> None:
        """One ``generate()`` call for ``batch``: fills each request's tokens (and KL when recorded)."""
        if len({r.guided for r in batch}) > 1 or len({r.max_new_tokens for r in batch}) > 1:
            raise ValueError("a generate() batch needs one guided flag and one token budget for all its requests")
        processor = processor if batch[0].guided else None
        prompts = left_pad([r.prompt for r in batch], self.tokenizer.pad_token_id, self.model.device)
        ids, lengths = generate_responses(self.model, prompts, self.stop_ids, self.tokenizer.pad_token_id,
                                          batch[0].max_new_tokens, self.temperature, self.top_p, processor)
        ids, lengths = ids.cpu(), lengths.tolist()
        if processor is not None and processor.records_kl:
            kl, plain = processor.kl_per_step().cpu(), processor.kl_per_step(before_top_p=True).cpu()  # [batch, steps]
        for row, request in enumerate(batch):
            request.tokens = ids[row, : lengths[row]].tolist()
            if processor is not None and processor.records_kl:
                request.token_kl = kl[row, : lengths[row]].tolist()
                request.token_kl_before_top_p = plain[row, : lengths[row]].tolist()
        self._count("tokens", batch[0].kind, sum(min(n, ids.shape[1]) for n in lengths))
        self._count("row_steps", batch[0].kind, ids.shape[0] * ids.shape[1])


def _group(request: Request) -> tuple:
    """What the requests of one batch share: (seed, repeat, stage)."""
    seed, repeat, _, stage = request.stream
    return seed, repeat, stage
