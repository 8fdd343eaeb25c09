"""Evaluation samples of a batch of prompts through the ``generate`` backend, on models already loaded."""

from __future__ import annotations

from utils.decoding.generate import GenerateBackend
from utils.decoding.rollout import sample


def generate_samples(ref_model, tokenizer, records: list[dict], processor, *, use_chat_template: bool,
                     temperature: float, top_p: float, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """One sample per record, all in one ``generate()`` batch seeded by ``seed`` (``set_seed(seed)``),
    with evaluation's fields (``utils.decoding.rollout.sample_record``), in record order."""
    backend = GenerateBackend.from_model(ref_model, tokenizer, batch_size=len(records), temperature=temperature,
                                         top_p=top_p)
    samples = {}
    sample(backend, tokenizer, records, [(i, 0) for i in range(len(records))], processor,
           lambda index, _, fields: samples.__setitem__(index, fields), seed=seed,
           use_chat_template=use_chat_template, max_new_tokens=max_new_tokens)
    return [samples[i] for i in range(len(records))]
