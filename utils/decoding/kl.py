"""The original evaluation's KL between the guided and the reference policy, and its recording while decoding.

The KL of one step is taken on the logits a sample is drawn from, :func:`sampling_logits`:
the guided logits after temperature, then top-p (the tokens outside the nucleus at -inf,
bit for bit as transformers' warpers make them), against the reference after temperature
only. :class:`KLRecorder` keeps it per step, from the logits at hand (no second pass).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import TopPLogitsWarper


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` [batch, vocab] (float32) with the tokens outside the nucleus at -inf, bit for bit
    as ``generate`` samples them (transformers' ``TopPLogitsWarper``, ``min_tokens_to_keep=1``);
    ``top_p >= 1`` returns them unchanged.

    On the CPU the nucleus comes from the sorted values alone: numpy's vectorised sort of the
    values is an order of magnitude faster than ``torch.sort`` with its indices. The warper's
    own softmax and cumulative sum over those values give how many tokens leave; every token
    below the lowest kept value leaves. A row whose boundary splits equal values, where the
    warper's order of ties decides, takes the warper's path.
    """
    if top_p >= 1.0:
        return logits
    warper = TopPLogitsWarper(top_p, min_tokens_to_keep=1)
    if logits.device.type != "cpu":
        return warper(None, logits)
    ascending = torch.from_numpy(np.sort(logits.numpy(), axis=-1))  # [batch, vocab]
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # the warper's, over the same values in the same order
    removed = (cumulative <= (1 - warper.top_p)).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)  # [batch, 1]
    lowest = ascending.gather(1, removed)  # [batch, 1] the lowest kept value
    filtered = logits.masked_fill(logits < lowest, float("-inf"))
    split = ((removed > 0) & (ascending.gather(1, (removed - 1).clamp(min=0)) == lowest)).squeeze(1)  # [batch]
    if bool(split.any()):
        filtered[split] = warper(None, logits[split])
    return filtered


def sampling_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The logits [batch, vocab] a sample is drawn from, float32: ``top_p(logits / T)``, as
    ``generate``'s temperature and top-p warpers make them (the tokens outside the nucleus at
    -inf). The original's KL is taken on them; ``T == 1`` and ``top_p == 1`` leave the logits as they are."""
    return top_p_filter(_scaled(logits, temperature), top_p)


def kl_divergence(
    guided: torch.Tensor, reference: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """The original evaluation's KL per row, [batch] from raw logits [batch, vocab]:
    KL(softmax(s) || softmax(reference / T)) with ``s = top_p(guided / T)``.

    ``s`` is what ``generate`` samples from (and records as its scores),
    :func:`sampling_logits`: the guided logits after temperature, then top-p with the tokens
    outside the nucleus at -inf, which add nothing. The reference side has no top-p, so at
    ``top_p < 1`` even the reference policy itself (``guided == reference``) has KL > 0,
    about -log(nucleus mass). ``top_p=1`` gives KL(softmax(guided / T) || softmax(reference / T)),
    the KL of the policies before top-p.
    """
    log_q = torch.log_softmax(_scaled(reference, temperature), dim=-1)
    return _kl_from_log_probs(torch.log_softmax(sampling_logits(guided, temperature, top_p), dim=-1), log_q)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in float32 (no division at T 1, as generate applies no temperature warper then)."""
    return logits.float() / temperature if temperature != 1.0 else logits.float()


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) per row; tokens with p = 0 (-inf) add nothing."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p > float("-inf"), terms, torch.zeros_like(terms)).sum(-1)


class KLRecorder:
    """The original evaluation's KL of every decoding step at ``temperature`` and ``top_p``
    (:func:`kl_divergence`), and the same before top-p, from the logits the sampler sees."""

    def __init__(self, temperature: float, top_p: float = 1.0):
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.reset()

    def reset(self) -> None:
        """Forget the recorded steps."""
        self._steps: list[torch.Tensor] = []  # [batch] per step, after top-p
        self._plain_steps: list[torch.Tensor] = []  # the same before top-p

    def check_sampling(self, temperature: float, top_p: float) -> None:
        """Refuse to record KL on another distribution than the one sampled at ``temperature`` and
        ``top_p``: the KL's ``sampling_logits`` are the sampler's. Greedy decoding (``temperature``
        0) picks the argmax of the logits themselves, which goes with KL at temperature 1 and top_p 1."""
        sampled = (float(temperature), float(top_p)) if temperature > 0 else (1.0, 1.0)
        if (self.temperature, self.top_p) != sampled:
            raise ValueError(f"KL recorded at temperature {self.temperature} and top_p {self.top_p}, but sampling "
                             f"is at temperature {temperature} and top_p {top_p}: the KL is taken on the sampled "
                             f"distribution (temperature 1 and top_p 1 for greedy decoding)")

    def step(self, guided: torch.Tensor, scores: torch.Tensor,
             warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's KL of the guided against the reference logits (both raw, [batch, vocab]):
        after and before top-p ([batch] each), sharing the reference's log-probabilities.
        ``warped`` [batch, vocab] are the sampler's ``sampling_logits(guided, temperature, top_p)``,
        whose nucleus is not computed again."""
        log_q = torch.log_softmax(_scaled(scores, self.temperature), dim=-1)  # [batch, vocab]
        plain = _kl_from_log_probs(torch.log_softmax(_scaled(guided, self.temperature), dim=-1), log_q)
        if self.top_p >= 1.0:
            return plain, plain
        return _kl_from_log_probs(torch.log_softmax(warped, dim=-1), log_q), plain

    def record(self, guided: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Keep this step's KL of every row and return the sampling logits [batch, vocab] it is taken on."""
        warped = sampling_logits(guided, self.temperature, self.top_p)  # [batch, vocab]
        kl, plain = self.step(guided, scores, warped)
        self._steps.append(kl)
        self._plain_steps.append(plain)
        return warped

    def per_step(self, before_top_p: bool = False) -> torch.Tensor:
        """The KL of every recorded step since the last reset, [batch, steps] (``before_top_p``: at top_p 1).
        Steps after a sequence ended are included; mask them with the response lengths."""
        steps = self._plain_steps if before_top_p else self._steps
        if not steps:
            raise ValueError("no KL recorded: create the processor with kl_temperature and run it first")
        return torch.stack(steps, dim=1)
