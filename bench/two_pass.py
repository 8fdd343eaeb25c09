"""The original code's two-pass KL, which ``bench/eval_kl.py`` times as its "before" and
``tests/test_guidance.py`` checks the online KL against: every step's guided logits kept
(memory O(batch x steps x vocab)), then a second forward pass of the reference model."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class KeepScores(LogitsProcessor):
    """Wraps a guidance processor and keeps every step's guided logits, as the original
    evaluation did (memory O(batch x steps x vocab)); the inner processor records no KL."""

    is_noop = records_kl = False

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def reset(self, attention_mask=None, stop_ids=None):
        self.steps = []
        if not self.inner.is_noop:
            self.inner.reset(attention_mask, stop_ids=stop_ids)

    def __call__(self, input_ids, scores):
        out = scores if self.inner.is_noop else self.inner(input_ids, scores)
        self.steps.append(out.clone())
        return out


def naive_top_p(logits, top_p):
    """Nucleus filter [rows, vocab] written out: drop the tokens whose cumulative mass, counted
    from the least likely one, is <= 1 - top_p; the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    drop = torch.softmax(ascending, -1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def two_pass_kl(ref_model, batch, responses, lengths, guided_steps, temperature, kl_batch_size=2, top_p=1.0):
    """KL per response [batch], computed the original way: every step's guided logits kept,
    then a second reference pass; KL(softmax(top_p(guided / T)) || softmax(reference / T)).

    ``guided_steps`` [batch, steps, vocab] are the (raw) guided logits kept during decoding;
    a second forward pass of the reference model over prompt + response (``kl_batch_size``
    rows at a time) gives the reference logits of every step. Steps after a response's end
    are left out.
    """
    prompt_len, steps = batch["input_ids"].shape[1], responses.shape[1]
    ids = torch.cat([batch["input_ids"], responses], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(responses)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    per_step = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], kl_batch_size):
            rows = slice(start, start + kl_batch_size)
            logits = ref_model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions[rows]).logits
            reference = logits[:, prompt_len - 1 : prompt_len - 1 + steps].float()  # [rows, steps, vocab]
            guided = guided_steps[rows].float() / temperature  # [rows, steps, vocab]
            guided = torch.stack([naive_top_p(guided[:, t], top_p) for t in range(steps)], dim=1)
            log_p = torch.log_softmax(guided, dim=-1)
            log_q = torch.log_softmax(reference / temperature, dim=-1)
            terms = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
            per_step.append(terms.sum(-1))
    per_step = torch.cat(per_step)  # [batch, steps]
    inside = torch.arange(steps)[None, :] < lengths.cpu()[:, None]
    return (per_step.cpu() * inside).sum(-1)


def two_pass_sample_batch(ref_model, tokenizer, records, processor, *, use_chat_template, temperature, top_p,
                          max_new_tokens, stop_ids, kl_batch_size=2):
    """One ``generate()`` batch of evaluation samples with the original's KL: keep every step's scores, then
    a second reference pass. ``processor`` must not record KL itself."""
    from utils.decoding.generate import generate_responses
    from utils.models import tokenize_prompts

    keeper = KeepScores(processor)
    batch = tokenize_prompts(tokenizer, [r["prompt"] for r in records], use_chat_template, ref_model.device)
    responses, lengths = generate_responses(ref_model, batch, stop_ids, tokenizer.pad_token_id, max_new_tokens,
                                            temperature, top_p, keeper)
    guided = torch.stack(keeper.steps, dim=1)  # [batch, steps, vocab]
    sampled = temperature > 0
    kl = two_pass_kl(ref_model, batch, responses, lengths, guided, temperature if sampled else 1.0, kl_batch_size,
                     top_p if sampled else 1.0)
    results = []
    for row in range(len(records)):
        length = int(lengths[row])
        results.append({
            "prediction": tokenizer.decode(responses[row, :length].tolist(), skip_special_tokens=True),
            "num_response_tokens": length,
            "traj_kl": float(kl[row]),
        })
    return results
