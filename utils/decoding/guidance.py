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

The processor follows rows that come and go: a backend says which of its rows stay and which
join (:meth:`QSharpLogitsProcessor.update_rows`), then asks for their guided logits
(:meth:`QSharpLogitsProcessor.guide_rows`); inside ``generate()`` it works that out itself
from the calls' shapes and the stop ids. The classifier's cache, mask and positions of those
rows are a :class:`utils.decoding.kv_cache.RowCache`. With a KL temperature it also records
the original evaluation's KL (:class:`utils.decoding.kl.KLRecorder`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor

from utils.classifier import ClassifierSpec, QSharpClassifier, expected_reward, position_ids_from_mask
from utils.decoding.kl import KLRecorder
from utils.decoding.kv_cache import RowCache
from utils.models import attention_window
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


class QSharpLogitsProcessor(LogitsProcessor):
    """Adds the Q# offset to the ``top_k`` largest reference logits at every decoding step.

    Works inside any ``model.generate(..., logits_processor=[processor])`` call. The
    classifier keeps its own KV cache across the steps of one ``generate`` call; a call
    whose ``input_ids`` do not continue the previous one (other batch size, or length not
    previous + 1) starts afresh. Call :meth:`reset` between ``generate`` calls to be safe
    (``generate_responses`` does) and to pass the prompt's attention mask; without it
    the mask is inferred from ``pad_token_id`` (left padding). With ``stop_ids`` known
    (constructor or :meth:`reset`), rows that have finished are dropped from the
    classifier's batch and keep their reference logits: their next tokens are padding anyway.

    A backend that manages its own rows (the continuous engine) calls :meth:`update_rows`
    and :meth:`guide_rows` instead.

    Per step after the prompt, the classifier reads one token per row (Q) or the new
    token plus the ``k`` candidates (V) with a 4-D additive mask and position ids kept
    incrementally (no mask rebuilt by ``transformers``, no Python loop over rows). A
    backbone with sliding-window attention (Mistral, some Qwen2 and Gemma configs) gets
    the window in those masks and a cache that keeps every token.

    With ``kl_temperature`` set, every step also records the original evaluation's KL
    (:func:`utils.decoding.kl.kl_divergence` at that temperature and ``kl_top_p``), a no-op
    guidance included, and inside ``generate()`` the processor returns the logits that KL is
    taken on, the sampling logits: it stands in for ``generate``'s temperature and top-p
    warpers (``generate_responses`` then runs none), so the nucleus is computed once per step.

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
        self.kl = None if kl_temperature is None else KLRecorder(kl_temperature, kl_top_p)
        self.stop_ids = None if stop_ids is None else list(stop_ids)
        self._block_key = None  # (k, dtype, device) of the cached candidate mask block
        self.recipe = None  # how another process builds this guidance (utils.decoding.rollout.GuidanceRecipe), if known
        self.reset()

    @property
    def is_noop(self) -> bool:
        """True when guidance leaves the reference logits unchanged (classifier never runs)."""
        return is_noop_guidance(self.mode, self.eta)

    @property
    def records_kl(self) -> bool:
        """True when each step's KL is recorded (``kl_temperature`` set)."""
        return self.kl is not None

    def reset(self, attention_mask: torch.Tensor | None = None, stop_ids: list[int] | None = None) -> None:
        """Forget the rows and the recorded KL; ``attention_mask`` [batch, prompt_len] is the next
        ``generate()`` prompt's mask, ``stop_ids`` (if given) replace the ones used to detect finished rows."""
        self.rows = RowCache()  # the classifier's cache of the rows it follows, in its order
        self._joining = None  # left-padded prompts of the rows that join at the next guide_rows
        self._shape = None  # generate(): (batch, length) of the input_ids the next step continues from
        self._prompt_mask = attention_mask
        self._active = None  # generate(): [rows] the batch rows still generating
        self._stops = None  # generate(): stop ids as a tensor on the prompt's device
        if self.kl is not None:
            self.kl.reset()
        if stop_ids is not None:
            self.stop_ids = list(stop_ids)

    def kl_per_step(self, before_top_p: bool = False) -> torch.Tensor:
        """KL(guided || reference) of every ``generate()`` step since the last reset, [batch, steps]
        (:meth:`utils.decoding.kl.KLRecorder.per_step`)."""
        if self.kl is None:
            raise ValueError("no KL recorded: create the processor with kl_temperature and run it first")
        return self.kl.per_step(before_top_p)

    def check_sampling(self, temperature: float, top_p: float) -> None:
        """Refuse to record KL on another distribution than the one sampled (see
        :meth:`utils.decoding.kl.KLRecorder.check_sampling`)."""
        if self.kl is not None:
            self.kl.check_sampling(temperature, top_p)

    # ---- rows that come and go
    def update_rows(self, keep: torch.Tensor | None, join: dict | None, trim: bool = True) -> None:
        """Which rows the next :meth:`guide_rows` covers: the followed rows ``keep`` [n] (indices in
        the processor's order; ``None``: all of them) in that order, then the rows whose
        left-padded ``input_ids`` / ``attention_mask`` prompts ``join`` (or ``None``).
        ``trim`` drops the cache columns no kept row attends to."""
        if keep is not None:
            self.rows.select(keep, trim)
        self._joining = join

    def guide_rows(self, scores: torch.Tensor, new_ids: torch.Tensor | None) -> torch.Tensor:
        """The guided logits [rows, vocab] of the rows :meth:`update_rows` named.

        ``scores`` [kept + joining, vocab] are their reference logits; ``new_ids`` [kept, 1] the
        token each kept row emitted last (``None`` when none is kept). The joiners' prompts are
        read into a cache of their own, then merged into the running one.
        """
        candidates, vocab = self._candidates(scores)
        n_kept = len(self.rows)
        if n_kept != (0 if new_ids is None else new_ids.shape[0]):
            raise ValueError(f"guide_rows got the last tokens of {0 if new_ids is None else new_ids.shape[0]} rows, "
                             f"but {n_kept} rows stayed (update_rows)")
        parts = []
        if n_kept:
            parts.append(self._advance(new_ids, None if candidates is None else candidates[:n_kept]))
        if self._joining is not None:
            logits, joined = self._read_prompt(self._joining["input_ids"],
                                               None if candidates is None else candidates[n_kept:],
                                               self._joining["attention_mask"])
            self.rows.join(joined)
            self._joining = None
            parts.append(logits)
        if not parts:  # no rows
            return scores
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # [kept + joining, k or vocab, A]
        return self._apply(scores, candidates, logits, vocab)

    # ---- inside generate()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.is_grad_enabled():  # called outside generate(), which disables gradients itself
            with torch.no_grad():
                return self(input_ids, scores)
        guided = scores if self.is_noop else self._guide_generate(input_ids, scores)
        return guided if self.kl is None else self.kl.record(guided, scores)

    def _guide_generate(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The guided logits [batch, vocab] of one ``generate()`` step: a call that does not
        continue the previous one reads its prompt; later ones drop the rows that finished."""
        batch, length = input_ids.shape
        continues = self._shape == (batch, length - 1)
        self._shape = (batch, length)
        if not continues:
            self.rows = RowCache()
            self.update_rows(None, {"input_ids": input_ids, "attention_mask": self._generate_mask(input_ids)})
            self._active = torch.arange(batch, device=input_ids.device)
            self._stops = torch.tensor(self.stop_ids, device=input_ids.device) if self.stop_ids else None
            return self.guide_rows(scores, None)
        if self._stops is not None and len(self.rows):
            done = torch.isin(input_ids[self._active, -1], self._stops)
            if bool(done.any()):  # one host sync per step; generate() syncs every step anyway
                keep = (~done).nonzero().squeeze(-1)
                self.update_rows(keep, None, trim=False)
                self._active = self._active[keep]
        if len(self._active) == batch:
            return self.guide_rows(scores, input_ids[:, -1:])
        guided = scores.clone()
        if len(self._active):  # only the rows still generating get offsets
            guided[self._active] = self.guide_rows(scores[self._active], input_ids[self._active, -1:])
        return guided

    def _generate_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The prompt's attention mask: the one :meth:`reset` was given, else left padding by ``pad_token_id``."""
        mask, self._prompt_mask = self._prompt_mask, None
        if mask is None or tuple(mask.shape) != tuple(input_ids.shape):
            if self.pad_token_id is None:
                return torch.ones_like(input_ids)
            return ((input_ids != self.pad_token_id).long().cumsum(-1) > 0).long()  # everything before the first token
        return mask.to(input_ids.device).long()

    # ---- the offsets
    def _candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """Each row's top-k candidate ids [rows, k] (``None``: every token, Q only) and the
        guided vocabulary width."""
        vocab = min(scores.shape[-1], self.classifier.vocab_size)
        k = vocab if self.top_k == -1 else min(self.top_k, vocab)
        if k == vocab and self.classifier.spec.classifier_type == "Q":
            return None, vocab
        return scores[:, :vocab].topk(k, dim=-1).indices, vocab

    def _apply(self, scores, candidates, logits, vocab: int) -> torch.Tensor:
        """``scores`` [rows, vocab] with the offsets of head ``logits`` [rows, k or vocab, A] added
        to the ``candidates``."""
        offsets = guidance_offsets(logits, self.mode, self.eta, self.classifier.spec).to(scores.dtype)
        if candidates is None:  # every token (Q)
            guided = scores.clone()
            guided[:, :vocab] += offsets
            return guided
        return scores.scatter_add(1, candidates, offsets)

    # ---- classifier calls
    def _advance(self, new_ids: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """Read one new token per followed row (``new_ids`` [rows, 1]); head logits of the
        ``candidates`` [rows, k] (``None``: every token, Q only), [rows, k or vocab, A]."""
        rows = new_ids.shape[0]
        mask, position = self.rows.extend()  # [rows, seen], [rows, 1]
        key_mask = self.rows.additive(self.classifier.dtype)  # [rows, 1, 1, seen]
        if self.classifier.spec.classifier_type == "Q":
            hidden, self.rows.cache = self.classifier.hidden_states(
                new_ids, attention_mask=self._backbone_mask(key_mask, 0), position_ids=position,
                past_key_values=self.rows.cache, use_cache=True,
            )
            return self.classifier.head_logits(hidden[:, -1], candidates)
        k = candidates.shape[1]
        mask = torch.cat(  # [rows, 1, 1 + k, seen + k]
            [key_mask.expand(-1, -1, 1 + k, -1), self._candidate_block(k).expand(rows, -1, -1, -1)], dim=-1
        )
        position_ids = torch.cat([position, (position + 1).expand(-1, k)], dim=1)  # [rows, 1 + k]
        logits, self.rows.cache = self._v_forward(torch.cat([new_ids, candidates], dim=1), mask, position_ids, k,
                                                  self.rows.cache)
        return logits

    def _read_prompt(self, input_ids: torch.LongTensor, candidates: torch.Tensor | None,
                     mask: torch.Tensor) -> tuple[torch.Tensor, RowCache]:
        """Read whole left-padded prompts ([rows, n], ``mask`` 1 at tokens) into a fresh cache:
        the head logits [rows, k or vocab, A] and the rows' :class:`RowCache`."""
        batch, n = input_ids.shape
        mask = mask.to(input_ids.device).long()
        # full-length layers whatever the attention type: the masks apply any window, and
        # a sliding layer could not take the V candidates back out
        cache = DynamicCache()
        positions = position_ids_from_mask(mask)  # [rows, n]
        if self.classifier.spec.classifier_type == "Q":
            hidden, cache = self.classifier.hidden_states(
                input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            return self.classifier.head_logits(hidden[:, -1], candidates), RowCache(cache, mask)
        # V: [prompt (n), candidates (k)]; prompt tokens attend causally to valid tokens (and
        # themselves, so a pad row is never fully masked); candidate j attends to the valid
        # prompt and itself, at the position after the prompt.
        k = candidates.shape[1]
        dtype, device = self.classifier.dtype, input_ids.device
        valid = mask.bool()
        allowed = torch.zeros(batch, n + k, n + k, dtype=torch.bool, device=device)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        allowed[:, :n, :n] = (valid[:, None, :] & causal) | torch.eye(n, dtype=torch.bool, device=device)
        allowed[:, n:, :n] = valid[:, None, :]
        allowed[:, n:, n:] = torch.eye(k, dtype=torch.bool, device=device)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        rows = RowCache(None, mask)
        position_ids = torch.cat([positions, rows.next_pos.expand(batch, k)], dim=1)
        logits, rows.cache = self._v_forward(torch.cat([input_ids, candidates], dim=1), additive[:, None], position_ids,
                                             k, cache)
        return logits, rows

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

    def _v_forward(self, ids, mask, position_ids, k: int, cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
        """Read ``ids`` = [new tokens, k candidates] on ``cache``; the head logits [rows, k, A] and
        the cache holding only the new tokens."""
        hidden, cache = self.classifier.hidden_states(
            ids, attention_mask=self._backbone_mask(mask, k), position_ids=position_ids, past_key_values=cache,
            use_cache=True,
        )
        cache.crop(-k)  # drop the k candidates (negative = tokens to remove, in every release)
        return self.classifier.head_logits(hidden[:, -k:]), cache

    def _candidate_block(self, k: int) -> torch.Tensor:
        """Additive mask [1, 1, 1 + k, k] of the new token and the k candidates over the candidates:
        the new token sees none, each candidate sees itself."""
        dtype, device = self.classifier.dtype, self.rows.mask.device
        key = (k, dtype, device)
        if self._block_key != key:
            seen = torch.cat([torch.zeros(1, k, dtype=torch.bool, device=device), torch.eye(k, dtype=torch.bool, device=device)])
            block = torch.zeros(1 + k, k, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
            self._block_key, self._block = key, block[None, None]
        return self._block
