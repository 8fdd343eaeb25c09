"""Continuous batching: a decode loop that keeps up to ``batch_size`` live rows and refills them.

Each step is one forward of the reference over the live rows with their KV cache (plus a
prefill of the requests that join this step), then the logits processors in ``generate()``'s
order: the Q# processor on the guided rows, then temperature and top-p
(``utils.decoding.kl.sampling_logits``, bit for bit transformers' warpers), then sampling. The
KL of the guided rows is taken on those same sampling logits: one nucleus per step. A row
that emits a stop id or reaches its budget leaves at once, with its cache rows; a queued
request takes its place by prefill, its cache merged into the running one with left padding.
Position ids come from the attention mask, as ``generate()`` computes them, so greedy
decoding (``temperature == 0``) reproduces ``generate()`` token for token.

Every request samples from its own stream: at join it draws ``max_new_tokens`` uniforms
from a generator seeded with ``Request.seed`` (from its ``stream``) and samples step ``t`` by the inverse CDF at
the ``t``-th of them. Its tokens therefore do not depend on its batch mates, the batch
size, the process or a restart. Unlike ``generate()``, the model's generation config is not
read: the sampling is exactly temperature, top-p and the given processor.

The reference's cache, mask and positions of the live rows are a
:class:`utils.decoding.kv_cache.RowCache`; at each step the processor is told which of its
rows stayed and which joined (``update_rows``), then guides them (``guide_rows``).
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Iterable

import torch
from transformers import DynamicCache

from utils.classifier import position_ids_from_mask
from utils.decoding.kl import sampling_logits
from utils.decoding.kv_cache import RowCache
from utils.decoding.requests import Backend, OnFinish, Request
from utils.models import left_pad


class ContinuousEngine:
    """Decodes a queue of :class:`Request` with at most ``batch_size`` live rows.

    ``max_batch_tokens`` > 0 caps a step's prefill at that many padded prompt tokens (one
    request always joins when a row is free). ``processor`` (a ``QSharpLogitsProcessor``)
    guides the rows whose request has ``guided`` set; with ``kl_temperature`` set it also
    records their KL, a no-op guidance included. ``stats`` counts, per request ``kind``, the
    tokens decoded, and the step slots (``batch_size`` per step) the loop ran.
    """

    def __init__(self, model, stop_ids: list[int], pad_token_id: int, batch_size: int, *, temperature: float = 1.0,
                 top_p: float = 1.0, processor=None, max_batch_tokens: int = 0):
        if batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        if max_batch_tokens < 0:
            raise ValueError(f"--max_batch_tokens must be 0 (no cap) or positive, got {max_batch_tokens}")
        self.model, self.pad_token_id, self.batch_size = model, pad_token_id, batch_size
        self.stop_ids = set(int(i) for i in stop_ids)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.processor, self.max_batch_tokens = processor, max_batch_tokens
        if processor is not None:
            processor.check_sampling(self.temperature, self.top_p)
        self.stats = {"steps": 0, "slot_steps": 0, "tokens": {}}
        # the last position's logits only, as generate() asks of models that take it
        takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forward_kwargs = {"logits_to_keep": 1} if takes_keep else {}

    # ---- the loop
    @torch.no_grad()
    def run(self, requests: Iterable[Request], on_finish: OnFinish) -> None:
        """Decode every request; ``on_finish(request)`` is called as each one ends and may return
        follow-up requests, which go to the front of the queue."""
        device = self.model.device
        queue = deque(requests)
        live: list[Request] = []
        rows = RowCache()  # the reference's cache of the live rows
        last = uniforms = None  # [live, 1] last tokens, [live, budget] each row's uniforms
        guiding = self.processor is not None and not self.processor.is_noop
        if guiding:
            self.processor.reset(stop_ids=sorted(self.stop_ids))
        kept_guided = None  # [n] the processor's rows that stayed since the last step (None: all)
        while queue or live:
            joiners = self._admit(queue, len(live), on_finish)
            if not live and not joiners:
                continue
            logits = []
            if live:
                mask, position = rows.extend()
                out = self.model(input_ids=last, attention_mask=mask, position_ids=position, past_key_values=rows.cache,
                                 use_cache=True, **self.forward_kwargs)
                rows.cache = out.past_key_values
                logits.append(out.logits[:, -1].float())
            if joiners:
                batch = left_pad([r.prompt for r in joiners], self.pad_token_id, device)
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=position_ids_from_mask(batch["attention_mask"]),
                                 past_key_values=DynamicCache(), use_cache=True, **self.forward_kwargs)
                logits.append(out.logits[:, -1].float())
                rows.join(RowCache(out.past_key_values, batch["attention_mask"]))
                own = [self._uniforms(r) for r in joiners]
                budget = max(d.shape[0] for d in own)
                draws = torch.stack([widen(d[None], budget)[0] for d in own]).to(device)  # [joining, budget]
                uniforms = draws if uniforms is None else torch.cat([widen(uniforms, draws.shape[1]),
                                                                     widen(draws, uniforms.shape[1])])
            n_old, live = len(live), live + joiners
            scores = logits[0] if len(logits) == 1 else torch.cat(logits)  # [live, vocab] float32
            guided = [i for i, r in enumerate(live) if r.guided] if self.processor is not None else []
            if guiding:
                joining = [r.prompt for r in joiners if r.guided]
                self.processor.update_rows(kept_guided, left_pad(joining, self.pad_token_id, device) if joining else None)
            processed = self._process(scores, live, guided, n_old, last) if guiding and guided else scores
            warped = self._warp(processed)  # [live, vocab]
            if guided and self.processor.records_kl:
                self._record_kl(scores, processed, warped, live, guided)
            tokens = self._sample(warped, live, uniforms)  # [live]
            self.stats["steps"] += 1
            self.stats["slot_steps"] += self.batch_size
            done = []
            for request, token in zip(live, tokens.tolist()):
                request.tokens.append(token)
                self.stats["tokens"][request.kind] = self.stats["tokens"].get(request.kind, 0) + 1
                done.append(token in self.stop_ids or len(request.tokens) >= request.max_new_tokens)
            last = tokens[:, None]
            kept_guided = None
            if any(done):
                keep = torch.tensor([i for i, d in enumerate(done) if not d], dtype=torch.long, device=device)
                kept_guided = torch.tensor([j for j, i in enumerate(guided) if not done[i]], dtype=torch.long,
                                           device=device)
                finished = [r for r, d in zip(live, done) if d]
                live = [r for r, d in zip(live, done) if not d]
                rows.select(keep)
                if live:
                    last, uniforms = last[keep], uniforms[keep]
                else:
                    last = uniforms = None
                for request in finished:
                    queue.extendleft(reversed(on_finish(request) or []))

    def _admit(self, queue: deque, n_live: int, on_finish) -> list[Request]:
        """The requests that join this step: free rows filled from the queue's front, the padded
        prefill within ``max_batch_tokens`` (at least one joins)."""
        joiners: list[Request] = []
        while queue and n_live + len(joiners) < self.batch_size:
            request = queue[0]
            if request.max_new_tokens <= 0:  # nothing to decode
                queue.popleft()
                queue.extendleft(reversed(on_finish(request) or []))
                continue
            width = max([len(r.prompt) for r in joiners] + [len(request.prompt)])
            if joiners and self.max_batch_tokens and (len(joiners) + 1) * width > self.max_batch_tokens:
                break
            joiners.append(queue.popleft())
        return joiners

    @staticmethod
    def _uniforms(request: Request) -> torch.Tensor:
        """The request's own uniforms in [0, 1), one per token of its budget (float64)."""
        generator = torch.Generator().manual_seed(request.seed)
        return torch.rand(request.max_new_tokens, generator=generator, dtype=torch.float64)

    def _process(self, scores, live: list[Request], guided: list[int], n_old: int, last) -> torch.Tensor:
        """The logits [live, vocab] of the ``live`` requests with guidance on the ``guided`` rows
        (indices into ``live``; the first ``n_old`` rows were live last step)."""
        index = torch.tensor(guided, dtype=torch.long, device=scores.device)
        old = [i for i in guided if i < n_old]
        new_ids = last[torch.tensor(old, dtype=torch.long, device=scores.device)] if old else None
        processed = scores.clone()
        processed[index] = self.processor.guide_rows(scores[index], new_ids)
        return processed

    def _warp(self, processed: torch.Tensor) -> torch.Tensor:
        """The logits [live, vocab] sampled from: ``top_p(processed / T)``, the processed logits
        themselves at temperature 0 (greedy)."""
        return sampling_logits(processed, self.temperature, self.top_p) if self.temperature > 0 else processed

    def _record_kl(self, scores, processed, warped, live, guided: list[int]) -> None:
        """The guided rows' KL of this step, on their sampling logits, appended to their requests."""
        index = torch.tensor(guided, dtype=torch.long, device=scores.device)
        kl, plain = self.processor.kl.step(processed[index], scores[index], warped[index])
        for row, a, b in zip(guided, kl.tolist(), plain.tolist()):
            live[row].token_kl.append(a)
            live[row].token_kl_before_top_p.append(b)

    def _sample(self, warped: torch.Tensor, live: list[Request], uniforms: torch.Tensor) -> torch.Tensor:
        """Next token of every live row [live] from its sampling logits ``warped``: argmax at
        temperature 0, else the row's inverse CDF at its own uniform for this step."""
        if self.temperature <= 0:
            return warped.argmax(dim=-1)
        probs = torch.softmax(warped, dim=-1)  # [live, vocab] float32
        cdf = probs.double().cumsum(dim=-1)  # [live, vocab]
        step = torch.tensor([len(r.tokens) for r in live], dtype=torch.long, device=warped.device)
        u = uniforms.gather(1, step[:, None]) * cdf[:, -1:]  # [live, 1]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=warped.shape[-1] - 1)


def widen(draws: torch.Tensor, width: int) -> torch.Tensor:
    """``draws`` [rows, budget] widened with trailing zeros to ``width`` columns (never read:
    a row stops at its own budget)."""
    missing = width - draws.shape[1]
    return draws if missing <= 0 else torch.cat([draws, draws.new_zeros(draws.shape[0], missing)], dim=1)


class ContinuousBackend(Backend):
    """``--engine continuous``: :class:`ContinuousEngine` with ``batch_size`` live rows, every
    request sampled from its own stream (a file does not depend on its batch mates, the
    shard, the process count or a restart)."""

    def _run(self, requests: list[Request], on_finish: OnFinish, processor) -> None:
        engine = ContinuousEngine(self.model, self.stop_ids, self.tokenizer.pad_token_id, self.batch_size,
                                  temperature=self.temperature, top_p=self.top_p, processor=processor,
                                  max_batch_tokens=self.max_batch_tokens)
        engine.run(requests, on_finish)
        for kind, count in engine.stats["tokens"].items():
            self._count("tokens", kind, count)
        self._count("row_steps", "all", engine.stats["slot_steps"])
