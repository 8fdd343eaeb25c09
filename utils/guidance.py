"""Guided sampling: a ``LogitsProcessor`` that adds the Q# offset to the top-k reference logits.

With ``l`` the classifier's logit for candidate ``a`` and ``p = sigmoid(l)``, the offset
added to the *raw* reference logit of each of the ``top_k`` most likely tokens is

=============  ==================================================  =======================
mode           offset                                              classifier target
=============  ==================================================  =======================
bernoulli      log(1 - p + p e^eta) = softplus(eta + l) - softplus(l)   R in {0, 1} (bce)
mle            logsumexp_j(log pmf_j + eta * atom_j)                R binned to atoms
expectation    log p = logsigmoid(l)                               exp(eta R) in [0, 1]
cd             eta * E[R]  (Controlled-Decoding baseline)          R
disabled       0                                                   --
=============  ==================================================  =======================

The offset is added before temperature and top-p (``generate`` runs user processors
before its warpers), so the effective strength at temperature T is eta / T, as in the
original code. ``eta == 0`` and ``disabled`` are exact no-ops that never run the classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor

from utils.models import response_lengths
from utils.classifier import ClassifierSpec, QSharpClassifier, expected_reward, position_ids_from_mask
from utils.registry import choose

INFERENCE_MODES = ("bernoulli", "expectation", "mle", "disabled")
GUIDANCE_MODES = ("bernoulli", "expectation", "mle", "cd", "disabled")


def resolve_guidance_mode(inference_mode: str, loss_type: str, cd_baseline: bool = False) -> str:
    """The offset formula in force for the script flags ``--inference_mode``, ``--loss_type``, ``--cd_baseline``.

    A distributional (``mle``) head is always read as a distribution, so ``bernoulli``
    with ``--loss_type mle`` means the distributional offset.
    """
    choose("inference_mode", inference_mode, INFERENCE_MODES)
    if inference_mode == "disabled":
        return "disabled"
    if cd_baseline:
        return "cd"
    if loss_type == "mle":
        if inference_mode == "expectation":
            raise ValueError("--inference_mode expectation needs a scalar head (--loss_type bce or mse), not mle")
        return "mle"
    if inference_mode == "mle":
        raise ValueError(f"--inference_mode mle needs --loss_type mle, got --loss_type {loss_type}")
    return inference_mode


def guidance_offsets(logits: torch.Tensor, mode: str, eta: float, spec: ClassifierSpec) -> torch.Tensor:
    """Logit offsets [...] from classifier head logits [..., A] (computed in float32)."""
    choose("guidance mode", mode, GUIDANCE_MODES)
    logits = logits.float()
    if mode == "disabled" or eta == 0:
        return torch.zeros(logits.shape[:-1], device=logits.device)
    if mode == "bernoulli":
        return F.softplus(eta + logits[..., 0]) - F.softplus(logits[..., 0])
    if mode == "expectation":
        return F.logsigmoid(logits[..., 0])
    if mode == "cd":
        return eta * expected_reward(logits, spec)
    atoms = spec.atoms(logits.device)  # mle
    return torch.logsumexp(logits.log_softmax(-1) + eta * atoms, dim=-1)


def kl_divergence(guided: torch.Tensor, reference: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(guided / T) || softmax(reference / T)) per row, [batch] from [batch, vocab].

    Tokens masked to -inf in both (by other logits processors) contribute nothing.
    """
    log_p = torch.log_softmax(guided.float() / temperature, dim=-1)
    log_q = torch.log_softmax(reference.float() / temperature, dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p > float("-inf"), terms, torch.zeros_like(terms)).sum(-1)


class QSharpLogitsProcessor(LogitsProcessor):
    """Adds the Q# offset to the ``top_k`` largest reference logits at every decoding step.

    Works inside any ``model.generate(..., logits_processor=[processor])`` call. The
    classifier keeps its own KV cache across the steps of one ``generate`` call; a call
    whose ``input_ids`` do not continue the previous one (other batch size, or length not
    previous + 1) starts afresh. Call :meth:`reset` between ``generate`` calls to be safe
    (``generate_responses`` does) and to pass the prompt's attention mask; without it
    the mask is inferred from ``pad_token_id`` (left padding).

    ``top_k=-1`` guides every token (with a V head that is one candidate per vocabulary
    entry and row: practical only for small vocabularies). Candidate ids beyond the classifier's vocabulary
    (reference logits wider than the classifier's embedding) are never chosen as
    candidates and keep their reference logit.
    """

    def __init__(
        self,
        classifier: QSharpClassifier | None,
        eta: float,
        top_k: int = 20,
        inference_mode: str = "bernoulli",
        cd_baseline: bool = False,
        pad_token_id: int | None = None,
        kl_temperature: float | None = None,
    ):
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        if top_k == 0 or top_k < -1:
            raise ValueError(f"top_k must be positive or -1 (all tokens), got {top_k}")
        loss_type = classifier.spec.loss_type if classifier is not None else "bce"
        self.mode = resolve_guidance_mode(inference_mode, loss_type, cd_baseline)
        self.eta = float(eta)
        self.top_k = top_k
        self.pad_token_id = pad_token_id
        if classifier is None and not self.is_noop:
            raise ValueError("a classifier is needed unless guidance is a no-op (eta 0 or inference_mode disabled)")
        self.classifier = classifier
        self.kl_temperature = kl_temperature
        self.reset()

    @property
    def is_noop(self) -> bool:
        """True when guidance leaves the reference logits unchanged (classifier never runs)."""
        return self.mode == "disabled" or self.eta == 0

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the cache; ``attention_mask`` [batch, prompt_len] is the next prompt's mask."""
        self._cache = None
        self._mask = None  # [batch, seen_len] mask of every token the classifier has read
        self._prompt_mask = attention_mask
        self._kl_steps: list[torch.Tensor] = []

    def kl_per_step(self) -> torch.Tensor:
        """KL(guided || reference) of every decoding step since the last reset, [batch, steps].

        Recorded only with ``kl_temperature`` set: both next-token distributions at that
        temperature (before top-p), from the logits at hand while decoding, so no second
        forward pass is needed. Steps after a sequence ended are included; mask them with
        the response lengths.
        """
        if not self._kl_steps:
            raise ValueError("no KL recorded: create the processor with kl_temperature and run it first")
        return torch.stack(self._kl_steps, dim=1)

    # ---- per-step entry point
    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.is_noop:
            return scores
        new_ids, new_mask = self._advance(input_ids)  # [batch, n]
        vocab = min(scores.shape[-1], self.classifier.vocab_size)
        k = vocab if self.top_k == -1 else min(self.top_k, vocab)
        if k == vocab and self.classifier.spec.classifier_type == "Q":
            logits = self._q_values(new_ids, new_mask, None)  # [batch, vocab, A]
            offsets = guidance_offsets(logits, self.mode, self.eta, self.classifier.spec)
            guided = scores.clone()
            guided[:, :vocab] += offsets.to(scores.dtype)
            return self._record_kl(scores, guided)
        candidates = scores[:, :vocab].topk(k, dim=-1).indices  # [batch, k]
        if self.classifier.spec.classifier_type == "Q":
            logits = self._q_values(new_ids, new_mask, candidates)  # [batch, k, A]
        else:
            logits = self._v_values(new_ids, new_mask, candidates)  # [batch, k, A]
        offsets = guidance_offsets(logits, self.mode, self.eta, self.classifier.spec)  # [batch, k]
        return self._record_kl(scores, scores.scatter_add(1, candidates, offsets.to(scores.dtype)))

    def _record_kl(self, scores: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
        if self.kl_temperature is not None:
            self._kl_steps.append(kl_divergence(guided, scores, self.kl_temperature))
        return guided

    # ---- cache bookkeeping
    def _advance(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens the classifier has not read yet and their mask; starts a new sequence if needed."""
        batch, length = input_ids.shape
        continues = self._mask is not None and self._mask.shape == (batch, length - 1)
        if continues:
            new_mask = torch.ones(batch, 1, dtype=self._mask.dtype, device=input_ids.device)
            return input_ids[:, -1:], new_mask
        mask = self._prompt_mask
        if mask is None or tuple(mask.shape) != (batch, length):
            if self.pad_token_id is None:
                mask = torch.ones_like(input_ids)
            else:  # left padding: everything before the first non-pad token
                mask = ((input_ids != self.pad_token_id).long().cumsum(-1) > 0).long()
        self._cache, self._mask, self._prompt_mask = DynamicCache(config=self.classifier.config), None, None
        return input_ids, mask.to(input_ids.device).long()

    def _remember(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' mask; returns the full 2-D mask [batch, seen_len]."""
        self._mask = new_mask if self._mask is None else torch.cat([self._mask, new_mask], dim=1)
        return self._mask

    # ---- classifier calls
    def _q_values(self, new_ids, new_mask, candidates):
        """Q head: read the new tokens, gather the candidates' head rows at the last state."""
        mask = self._remember(new_mask)
        hidden, self._cache = self.classifier.hidden_states(
            new_ids, attention_mask=mask, past_key_values=self._cache, use_cache=True
        )
        return self.classifier.head_logits(hidden[:, -1], candidates)  # [batch, k or vocab, A]

    def _v_values(self, new_ids, new_mask, candidates):
        """V head: one forward reads the new tokens and scores every candidate after them.

        Input = [new tokens (n), candidates (k)]. Candidate j sits at the position after the
        last token, attends to the valid prefix, the new tokens and itself only; new tokens
        attend causally. The candidates are cropped from the cache afterwards.
        """
        batch, n = new_ids.shape
        k = candidates.shape[1]
        past_mask = self._mask  # [batch, past_len] or None
        past_len = 0 if past_mask is None else past_mask.shape[1]
        full_mask = self._remember(new_mask)  # [batch, past_len + n]
        positions = position_ids_from_mask(full_mask)  # [batch, past_len + n]
        next_position = full_mask.sum(-1, keepdim=True)  # [batch, 1]
        position_ids = torch.cat([positions[:, past_len:], next_position.expand(batch, k)], dim=1)

        device = new_ids.device
        valid = full_mask.bool()  # [batch, past_len + n]
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        eye_n = torch.eye(n, dtype=torch.bool, device=device)
        # rows: queries [n + k]; columns: keys [past_len + n + k]
        allowed = torch.zeros(batch, n + k, past_len + n + k, dtype=torch.bool, device=device)
        allowed[:, :, : past_len + n] = valid[:, None, :]
        allowed[:, :n, past_len : past_len + n] &= causal  # new tokens: causal over valid tokens
        allowed[:, :n, past_len : past_len + n] |= eye_n  # and themselves, so a pad row is never fully masked
        allowed[:, n:, past_len + n :] = torch.eye(k, dtype=torch.bool, device=device)  # candidates: themselves only
        dtype = self.classifier.dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)

        hidden, cache = self.classifier.hidden_states(
            torch.cat([new_ids, candidates], dim=1),
            attention_mask=additive[:, None],  # [batch, 1, n + k, past_len + n + k]
            position_ids=position_ids,
            past_key_values=self._cache,
            use_cache=True,
        )
        cache.crop(-k)  # drop the k candidates (negative = tokens to remove, in every release)
        self._cache = cache
        return self.classifier.head_logits(hidden[:, n:])  # [batch, k, A]


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
    up to and including its first stop id.
    """
    processors = []
    if processor is not None and not processor.is_noop:
        processor.reset(batch["attention_mask"])
        processors.append(processor)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
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
