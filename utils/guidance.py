"""Guided sampling: a ``LogitsProcessor`` that adds the Q# offset to the top-k reference logits.

With ``l`` the classifier's logit for candidate ``a`` and ``p = sigmoid(l)``, the offset
added to the *raw* reference logit of each of the ``top_k`` most likely tokens is

=============  ==================================================  =======================
mode           offset                                              classifier target
=============  ==================================================  =======================
bernoulli      log(1 - p + p e^eta) = softplus(eta + l) - softplus(l)   R in {0, 1} (bce)
mle            logsumexp_j(log pmf_j + eta * atom_j) - row minimum  R binned to atoms
expectation    log p = logsigmoid(l)  (eta not used)               exp(eta R) in [0, 1]
cd             eta * E[R]  (Controlled-Decoding baseline)          R
disabled       0                                                   --
=============  ==================================================  =======================

As in the original code: the mle offset is shifted by its minimum over each row's
candidates, so the lowest candidate keeps its reference logit (with ``top_k`` < vocabulary
this changes the distribution, not only a constant); ``expectation`` ignores eta, so at
``eta == 0`` it still adds ``logsigmoid(l)`` (evaluation switches eta 0 to ``disabled``,
collection does not). The offset is added before temperature and top-p (``generate`` runs
user processors before its warpers), so the effective strength at temperature T is eta / T.
``disabled``, and ``eta == 0`` in every mode but ``expectation``, are exact no-ops that
never run the classifier.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor, TopPLogitsWarper

from utils.kv_cache import leading_masked, left_pad_seq, merge as merge_caches, select as select_cache, trim_left
from utils.models import attention_window, response_lengths
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
    if loss_type == "mle":  # the original reads an mle head as a distribution whatever the other flags say
        if cd_baseline:
            raise ValueError("--cd_baseline 1 needs a scalar head (--loss_type bce or mse): the original silently "
                             "guides an mle head with the distributional offset instead")
        if inference_mode == "expectation":
            raise ValueError("--inference_mode expectation needs a scalar head (--loss_type bce or mse), not mle")
        return "mle"
    if cd_baseline:
        return "cd"
    if inference_mode == "mle":
        raise ValueError(f"--inference_mode mle needs --loss_type mle, got --loss_type {loss_type}")
    return inference_mode


def is_noop_guidance(mode: str, eta: float) -> bool:
    """True when guidance leaves the reference logits unchanged: ``disabled``, or eta 0 in a mode
    whose offset scales with eta (every mode but ``expectation``, whose offset ignores eta)."""
    return mode == "disabled" or (eta == 0 and mode != "expectation")


def guidance_offsets(logits: torch.Tensor, mode: str, eta: float, spec: ClassifierSpec) -> torch.Tensor:
    """Logit offsets [batch, k] of each row's k candidates from head logits [batch, k, A] (float32).

    mle offsets are shifted by the row's minimum over its candidates, as in the original.
    """
    choose("guidance mode", mode, GUIDANCE_MODES)
    logits = logits.float()
    if is_noop_guidance(mode, eta):
        return torch.zeros(logits.shape[:-1], device=logits.device)
    if mode == "bernoulli":
        return F.softplus(eta + logits[..., 0]) - F.softplus(logits[..., 0])
    if mode == "expectation":
        return F.logsigmoid(logits[..., 0])
    if mode == "cd":
        return eta * expected_reward(logits, spec)
    atoms = spec.atoms(logits.device)  # mle
    offsets = torch.logsumexp(logits.log_softmax(-1) + eta * atoms, dim=-1)  # [batch, k]
    return offsets - offsets.min(dim=-1, keepdim=True).values


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


class QSharpLogitsProcessor(LogitsProcessor):
    """Adds the Q# offset to the ``top_k`` largest reference logits at every decoding step.

    Works inside any ``model.generate(..., logits_processor=[processor])`` call. The
    classifier keeps its own KV cache across the steps of one ``generate`` call; a call
    whose ``input_ids`` do not continue the previous one (other batch size, or length not
    previous + 1) starts afresh. Call :meth:`reset` between ``generate`` calls to be safe
    (``generate_responses`` does) and to pass the prompt's attention mask; without it
    the mask is inferred from ``pad_token_id`` (left padding).

    Per step after the prompt, the classifier reads one token per row (Q) or the new
    token plus the ``k`` candidates (V) with a 4-D additive mask and position ids kept
    incrementally (no mask rebuilt by ``transformers``, no Python loop over rows). A
    backbone with sliding-window attention (Mistral, some Qwen2 and Gemma configs) gets
    the window in those masks and a cache that keeps every token. With
    ``stop_ids`` known (constructor or :meth:`reset`), rows that have finished are dropped
    from the classifier's batch and keep their reference logits: their next tokens are
    padding anyway.

    With ``kl_temperature`` set, every step also records the original evaluation's KL
    (:func:`kl_divergence` at that temperature and ``kl_top_p``), a no-op guidance included,
    and the processor returns the logits that KL is taken on, :func:`sampling_logits`: it
    stands in for ``generate``'s temperature and top-p warpers (:func:`generate_responses` then
    runs none), so the nucleus is computed once per step for the KL and the sample.

    ``top_k=-1`` guides every token (with a V head that is one candidate per vocabulary
    entry and row: practical only for small vocabularies). Candidate ids beyond the
    classifier's vocabulary (reference logits wider than the classifier's embedding) are
    never chosen as candidates and keep their reference logit.
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
        stop_ids: list[int] | None = None,
        kl_top_p: float = 1.0,
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
            raise ValueError("a classifier is needed unless guidance is a no-op "
                             "(inference_mode disabled, or eta 0 in any mode but expectation)")
        self.classifier = classifier
        self._window, self._mixed = (None, False) if self.is_noop else attention_window(classifier.config)
        self.kl_temperature = kl_temperature
        self.kl_top_p = float(kl_top_p)
        self.stop_ids = None if stop_ids is None else list(stop_ids)
        self._block_key = None  # (k, dtype, device) of the cached candidate mask block
        self.reset()

    @property
    def is_noop(self) -> bool:
        """True when guidance leaves the reference logits unchanged (classifier never runs)."""
        return is_noop_guidance(self.mode, self.eta)

    @property
    def records_kl(self) -> bool:
        """True when each step's KL is recorded (``kl_temperature`` set)."""
        return self.kl_temperature is not None

    def reset(self, attention_mask: torch.Tensor | None = None, stop_ids: list[int] | None = None) -> None:
        """Forget the cache; ``attention_mask`` [batch, prompt_len] is the next prompt's mask,
        ``stop_ids`` (if given) replace the ones used to detect finished rows."""
        self._cache = None
        self._shape = None  # (batch, length) of the input_ids the next step continues from
        self._prompt_mask = attention_mask
        self._key_mask = None  # [active, 1, 1, capacity] additive mask over the cached tokens (first _seen valid)
        self._seen = 0
        self._next_pos = None  # [active, 1] position id of the next token of each active row
        self._rows = None  # [active] batch rows still generating (None until the prompt is read)
        self._stops = None  # stop ids as a tensor on the prompt's device
        self._kl_steps: list[torch.Tensor] = []  # the original's KL (after top-p) of each step, [batch]
        self._kl_plain_steps: list[torch.Tensor] = []  # the same before top-p
        if stop_ids is not None:
            self.stop_ids = list(stop_ids)

    def kl_per_step(self, before_top_p: bool = False) -> torch.Tensor:
        """KL(guided || reference) of every decoding step since the last reset, [batch, steps].

        Recorded only with ``kl_temperature`` set, from the logits at hand while decoding (no
        second forward pass): :func:`kl_divergence` at ``kl_temperature`` and ``kl_top_p``, the
        original evaluation's definition; ``before_top_p`` gives it at top_p 1. Steps after a
        sequence ended are included; mask them with the response lengths.
        """
        steps = self._kl_plain_steps if before_top_p else self._kl_steps
        if not steps:
            raise ValueError("no KL recorded: create the processor with kl_temperature and run it first")
        return torch.stack(steps, dim=1)

    def check_sampling(self, temperature: float, top_p: float) -> None:
        """Refuse to record KL on another distribution than the one sampled at ``temperature`` and
        ``top_p``: the KL's ``sampling_logits`` are the sampler's. Greedy decoding (``temperature``
        0) picks the argmax of the logits themselves, which goes with KL at temperature 1 and top_p 1."""
        sampled = (float(temperature), float(top_p)) if temperature > 0 else (1.0, 1.0)
        if self.records_kl and (float(self.kl_temperature), self.kl_top_p) != sampled:
            raise ValueError(f"KL recorded at temperature {self.kl_temperature} and top_p {self.kl_top_p}, but sampling "
                             f"is at temperature {temperature} and top_p {top_p}: the KL is taken on the sampled "
                             f"distribution (temperature 1 and top_p 1 for greedy decoding)")

    def step_kl(self, guided: torch.Tensor, scores: torch.Tensor,
                warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's KL of the guided against the reference logits (both raw, [batch, vocab]):
        :func:`kl_divergence` after and before top-p ([batch] each), sharing the reference's
        log-probabilities. ``warped`` [batch, vocab] are the sampler's
        ``sampling_logits(guided, kl_temperature, kl_top_p)``, whose nucleus is not computed again."""
        log_q = torch.log_softmax(_scaled(scores, self.kl_temperature), dim=-1)  # [batch, vocab]
        plain = _kl_from_log_probs(torch.log_softmax(_scaled(guided, self.kl_temperature), dim=-1), log_q)
        if self.kl_top_p >= 1.0:
            return plain, plain
        return _kl_from_log_probs(torch.log_softmax(warped, dim=-1), log_q), plain

    # ---- per-step entry point
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.is_grad_enabled():  # called outside generate(), which disables gradients itself
            with torch.no_grad():
                return self(input_ids, scores)
        guided = scores if self.is_noop else self._guide(input_ids, scores)
        if not self.records_kl:
            return guided
        warped = sampling_logits(guided, self.kl_temperature, self.kl_top_p)  # [batch, vocab]
        kl, plain = self.step_kl(guided, scores, warped)
        self._kl_steps.append(kl)
        self._kl_plain_steps.append(plain)
        return warped

    def _guide(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The guided logits [batch, vocab]: ``scores`` with the offsets on each row's candidates."""
        candidates, vocab = self._candidates(scores)
        rows, logits = self._values(input_ids, candidates)  # [active], [active, k or vocab, A]
        return self._apply(scores, candidates, rows, logits, vocab)

    def _candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Each row's top-k candidate ids [batch, k] (``None``: every token, Q only) and the
        guided vocabulary width."""
        vocab = min(scores.shape[-1], self.classifier.vocab_size)
        k = vocab if self.top_k == -1 else min(self.top_k, vocab)
        if k == vocab and self.classifier.spec.classifier_type == "Q":
            return None, vocab
        return scores[:, :vocab].topk(k, dim=-1).indices, vocab

    def _apply(self, scores, candidates, rows, logits, vocab: int) -> torch.Tensor:
        """``scores`` with the offsets of head ``logits`` [active, k or vocab, A] added to the
        ``candidates`` of the active ``rows`` (``None`` = all)."""
        full_q = candidates is None
        offsets = guidance_offsets(logits, self.mode, self.eta, self.classifier.spec).to(scores.dtype)
        guided = scores.clone()
        if full_q:
            guided[slice(None) if rows is None else rows, :vocab] += offsets
        elif rows is None:  # every row is active
            guided.scatter_add_(1, candidates, offsets)
        else:  # only the active rows get offsets
            guided[rows] = scores[rows].scatter_add(1, candidates[rows], offsets)
        return guided

    # ---- classifier calls
    def _values(self, input_ids: torch.LongTensor, candidates: torch.Tensor | None):
        """Head logits of the active rows' candidates (``None``: every token, Q only).

        Returns the active rows (``None`` = all) and logits [active, k or vocab, A].
        """
        batch, length = input_ids.shape
        continues = self._shape == (batch, length - 1)
        self._shape = (batch, length)
        if not continues:
            return None, self._read_prompt(input_ids, candidates)
        self._drop_finished(input_ids[:, -1])
        rows = self._rows
        active = rows.shape[0]
        if active == 0:  # every row has finished
            width = self.classifier.vocab_size if candidates is None else candidates.shape[1]
            return rows, torch.zeros(0, width, self.classifier.spec.num_outputs, device=input_ids.device)
        new_ids = input_ids[rows, -1:] if active < batch else input_ids[:, -1:]  # [active, 1]
        if active < batch and candidates is not None:
            candidates = candidates[rows]
        return (None if active == batch else rows), self._advance(new_ids, candidates)

    def _advance(self, new_ids: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """Read one new token per cached row (``new_ids`` [active, 1]); head logits of the
        ``candidates`` [active, k] (``None``: every token, Q only), [active, k or vocab, A]."""
        active = new_ids.shape[0]
        key_mask = self._grow_key_mask()  # [active, 1, 1, seen_len]
        position = self._next_pos
        self._next_pos = position + 1
        if self.classifier.spec.classifier_type == "Q":
            hidden, self._cache = self.classifier.hidden_states(
                new_ids, attention_mask=self._backbone_mask(key_mask, 0), position_ids=position,
                past_key_values=self._cache, use_cache=True,
            )
            logits = self.classifier.head_logits(hidden[:, -1], candidates)
        else:
            k = candidates.shape[1]
            mask = torch.cat(  # [active, 1, 1 + k, seen_len + k]
                [key_mask.expand(-1, -1, 1 + k, -1), self._candidate_block(k).expand(active, -1, -1, -1)], dim=-1
            )
            position_ids = torch.cat([position, (position + 1).expand(-1, k)], dim=1)  # [active, 1 + k]
            logits = self._v_forward(torch.cat([new_ids, candidates], dim=1), mask, position_ids, k)
        return logits

    def _read_prompt(self, input_ids: torch.LongTensor, candidates: torch.Tensor | None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """First step of a sequence: read the whole (left-padded) prompt; logits [batch, k, A]."""
        batch, n = input_ids.shape
        mask = self._prompt_mask if mask is None else mask
        if mask is None or tuple(mask.shape) != (batch, n):
            if self.pad_token_id is None:
                mask = torch.ones_like(input_ids)
            else:  # left padding: everything before the first non-pad token
                mask = ((input_ids != self.pad_token_id).long().cumsum(-1) > 0).long()
        mask = mask.to(input_ids.device).long()
        # full-length layers whatever the attention type: the masks apply any window, and
        # a sliding layer could not take the V candidates back out
        self._cache, self._prompt_mask = DynamicCache(), None
        dtype, device = self.classifier.dtype, input_ids.device
        self._key_mask = torch.zeros(batch, 1, 1, n + 16, dtype=dtype, device=device)  # room to grow (doubles when full)
        self._key_mask[..., :n].masked_fill_(mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        self._seen = n
        self._next_pos = mask.sum(-1, keepdim=True)  # [batch, 1]
        self._rows = torch.arange(batch, device=device)
        self._stops = torch.tensor(self.stop_ids, device=device) if self.stop_ids else None
        positions = position_ids_from_mask(mask)  # [batch, n]
        if self.classifier.spec.classifier_type == "Q":
            hidden, self._cache = self.classifier.hidden_states(
                input_ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True
            )
            return self.classifier.head_logits(hidden[:, -1], candidates)
        # V: [prompt (n), candidates (k)]; prompt tokens attend causally to valid tokens (and
        # themselves, so a pad row is never fully masked); candidate j attends to the valid
        # prompt and itself, at the position after the prompt.
        k = candidates.shape[1]
        valid = mask.bool()
        allowed = torch.zeros(batch, n + k, n + k, dtype=torch.bool, device=device)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        allowed[:, :n, :n] = (valid[:, None, :] & causal) | torch.eye(n, dtype=torch.bool, device=device)
        allowed[:, n:, :n] = valid[:, None, :]
        allowed[:, n:, n:] = torch.eye(k, dtype=torch.bool, device=device)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        position_ids = torch.cat([positions, self._next_pos.expand(batch, k)], dim=1)
        return self._v_forward(torch.cat([input_ids, candidates], dim=1), additive[:, None], position_ids, k)

    def _backbone_mask(self, mask: torch.Tensor, k: int):
        """The additive ``mask`` [rows, 1, Q, KV] as the backbone takes it, with its sliding window.

        Keys are the cached slots ``0 .. KV - k - 1`` then ``k`` candidates that all stand
        at slot ``KV - k``; queries are the last ``Q`` of those. Without a window the mask is
        returned as is; with one, keys ``window`` or more slots behind their query are
        masked too, and a backbone whose other layers attend fully gets ``{layer type: mask}``.
        """
        if self._window is None:
            return mask
        cached = mask.shape[-1] - k
        device = mask.device
        kv_slots = torch.cat([torch.arange(cached, device=device), torch.full((k,), cached, device=device)])  # [KV]
        q_slots = kv_slots[-mask.shape[-2] :]  # [Q]
        far = kv_slots[None, :] <= q_slots[:, None] - self._window  # [Q, KV]
        windowed = mask.masked_fill(far, torch.finfo(mask.dtype).min)
        return {"full_attention": mask, "sliding_attention": windowed} if self._mixed else windowed

    def _v_forward(self, ids, mask, position_ids, k: int) -> torch.Tensor:
        """Read ``ids`` = [new tokens, k candidates], keep only the new tokens in the cache; [rows, k, A]."""
        hidden, cache = self.classifier.hidden_states(
            ids, attention_mask=self._backbone_mask(mask, k), position_ids=position_ids, past_key_values=self._cache,
            use_cache=True,
        )
        cache.crop(-k)  # drop the k candidates (negative = tokens to remove, in every release)
        self._cache = cache
        return self.classifier.head_logits(hidden[:, -k:])

    def _grow_key_mask(self) -> torch.Tensor:
        """Count the new token (an attended zero) and return the mask [active, 1, 1, seen_len].

        The buffer has spare columns, all zero, so a step is a slice; it doubles when full.
        """
        self._seen += 1
        if self._seen > self._key_mask.shape[-1]:
            self._key_mask = torch.cat([self._key_mask, torch.zeros_like(self._key_mask)], dim=-1)
        return self._key_mask[..., : self._seen]

    def _candidate_block(self, k: int) -> torch.Tensor:
        """Additive mask [1, 1, 1 + k, k] of the new token and the k candidates over the candidates:
        the new token sees none, each candidate sees itself."""
        key = (k, self._key_mask.dtype, self._key_mask.device)
        if self._block_key != key:
            dtype, device = key[1], key[2]
            seen = torch.cat([torch.zeros(1, k, dtype=torch.bool, device=device), torch.eye(k, dtype=torch.bool, device=device)])
            block = torch.zeros(1 + k, k, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
            self._block_key, self._block = key, block[None, None]
        return self._block

    def _drop_finished(self, last_tokens: torch.Tensor) -> None:
        """Remove rows whose last token is a stop id from the classifier's batch and cache.

        A finished row's later tokens are padding, so only active rows are checked.
        """
        if self._stops is None or self._rows.shape[0] == 0:
            return
        active = self._rows.shape[0]
        done = torch.isin(last_tokens if active == last_tokens.shape[0] else last_tokens[self._rows], self._stops)
        if not bool(done.any()):  # one host sync per step; generate() syncs every step anyway
            return
        index = (~done).nonzero().squeeze(-1)
        self._rows = self._rows[index]
        self._key_mask, self._next_pos = self._key_mask[index], self._next_pos[index]
        if index.numel() > 0:
            self._cache.batch_select_indices(index)


    # ---- rows that join and leave (continuous batching, ``utils.engine``)
    def guide_rows(self, scores: torch.Tensor, new_ids: torch.Tensor | None, join: dict | None) -> torch.Tensor:
        """The guided logits [rows, vocab] of a batch whose rows come and go.

        ``scores`` [old + joining, vocab] are the reference logits of the rows the processor
        already follows (in its order) and then of the rows joining now. ``new_ids`` [old, 1]:
        the token each old row emitted last step (``None`` when there are none); ``join``: the
        left-padded ``input_ids`` / ``attention_mask`` of the joining rows' prompts (or
        ``None``). The joiners' prompts are read into a cache of their own, which is then
        merged into the running one with left padding. Rows leave through :meth:`select_rows`.
        """
        candidates, vocab = self._candidates(scores)
        n_old = 0 if new_ids is None else new_ids.shape[0]
        parts = []
        if n_old:
            parts.append(self._advance(new_ids, None if candidates is None else candidates[:n_old]))
        if join is not None:
            old = (self._cache, self._key_mask, self._seen, self._next_pos) if n_old else None
            parts.append(self._read_prompt(join["input_ids"], None if candidates is None else candidates[n_old:],
                                           join["attention_mask"]))
            if old is not None:
                self._merge_rows(*old)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # [old + joining, k or vocab, A]
        return self._apply(scores, candidates, None, logits, vocab)

    def _merge_rows(self, cache, key_mask, seen: int, next_pos) -> None:
        """Put the rows of an earlier state (``cache``, ``key_mask`` with ``seen`` valid columns,
        ``next_pos``) before the current ones, the shorter left-padded (masked) to the longer."""
        length = max(seen, self._seen)
        lowest = torch.finfo(key_mask.dtype).min
        merged = torch.cat([left_pad_seq(key_mask[..., :seen], length, dim=-1, value=lowest),
                            left_pad_seq(self._key_mask[..., : self._seen], length, dim=-1, value=lowest)])
        self._key_mask = torch.cat([merged, torch.zeros_like(merged[..., :16])], dim=-1)  # spare columns
        self._seen = length
        self._cache = merge_caches(cache, self._cache)
        self._next_pos = torch.cat([next_pos, self._next_pos])
        self._rows = torch.arange(self._next_pos.shape[0], device=self._next_pos.device)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` [n] (indices in the processor's order) and drop the leading
        cache columns that no kept row attends to."""
        if keep.numel() == 0:
            self._cache, self._key_mask, self._seen, self._next_pos, self._rows = None, None, 0, None, None
            return
        self._key_mask, self._next_pos = self._key_mask[keep], self._next_pos[keep]
        self._cache = select_cache(self._cache, keep)
        self._rows = torch.arange(keep.numel(), device=keep.device)
        start = leading_masked(self._key_mask[:, 0, 0, : self._seen] == 0)
        if start:
            self._key_mask, self._seen = self._key_mask[..., start:], self._seen - start
            self._cache = trim_left(self._cache, start)


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
