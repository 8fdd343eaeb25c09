"""Naive, cache-free reference computations the tests compare the real code against."""

from __future__ import annotations

import math

import torch


def naive_candidate_logits(classifier, input_ids, attention_mask, candidates):
    """Head logits [batch, k, A] of every candidate, recomputed from scratch without a cache.

    V: run prefix + candidate as one full sequence and read the head at the candidate.
    Q: run the prefix, project the last state onto the *whole* vocabulary, pick the rows.
    Position ids are counted over unmasked tokens.
    """
    batch, k = candidates.shape
    A = classifier.spec.num_outputs
    with torch.no_grad():
        if classifier.spec.classifier_type == "V":
            seqs = torch.cat([input_ids.repeat_interleave(k, 0), candidates.reshape(-1, 1)], dim=1)
            mask = torch.cat([attention_mask.repeat_interleave(k, 0), torch.ones(batch * k, 1, dtype=torch.long)], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = classifier.model(input_ids=seqs, attention_mask=mask, position_ids=positions).last_hidden_state
            return classifier.score(hidden[:, -1]).view(batch, k, A)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = classifier.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
        full = classifier.score(hidden[:, -1]).view(batch, -1, A)  # [batch, vocab, A]
        return torch.stack([full[b, candidates[b]] for b in range(batch)])


def closed_form_offsets(logits, mode, eta, atoms=None):
    """The offsets of the table in ``utils/decoding/guidance.py``'s docstring written out
    literally, [batch, k] from [batch, k, A]."""
    logits = logits.double()
    if mode == "disabled":
        return torch.zeros(logits.shape[:-1], dtype=torch.float64)
    if mode == "mle":  # the original's: minus the row's lowest candidate offset
        pmf = torch.softmax(logits, -1)
        offsets = torch.log((pmf * torch.exp(eta * atoms.double())).sum(-1))
        return offsets - offsets.min(-1, keepdim=True).values
    if mode == "cd" and atoms is not None:  # distributional head: eta * mean of the histogram
        return eta * (torch.softmax(logits, -1) * atoms.double()).sum(-1)
    p = 1.0 / (1.0 + torch.exp(-logits[..., 0]))
    if mode == "bernoulli":
        return torch.log(1 - p + p * math.exp(eta))
    if mode == "expectation":
        return torch.log(p)
    if mode == "cd":
        return eta * p
    raise ValueError(mode)


def expected_guided(classifier, input_ids, mask, scores, mode, eta, top_k):
    """Reference guided logits: top-k of the raw scores + closed-form offset of naive values."""
    vocab = min(scores.shape[1], classifier.vocab_size)
    k = vocab if top_k == -1 else top_k
    candidates = scores[:, :vocab].topk(k, dim=-1).indices
    logits = naive_candidate_logits(classifier, input_ids, mask, candidates)
    atoms = classifier.spec.atoms() if classifier.spec.loss_type == "mle" else None
    offsets = closed_form_offsets(logits, mode, eta, atoms)
    return scores.double().scatter_add(1, candidates, offsets).float(), candidates
