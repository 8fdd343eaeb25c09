"""Collection's roll-in / cut / roll-out (``utils.decoding.rollout.collect``) on the tiny models, through both backends."""

from __future__ import annotations

import pytest

from utils.decoding.backends import BACKENDS
from utils.decoding.rollout import collect

PROMPTS = ["Problem:\n\nWhat is 2 + 3?\n\nSolution:", "Problem:\n\nA longer one, 17 + 25 * 3?\n\nSolution:"]


@pytest.mark.parametrize("engine", sorted(BACKENDS))
def test_rollout_gets_a_fresh_token_budget(tokenizer, ref_model, engine):
    """As the original: the roll-out from prompt + c + 1 response tokens may add another
    --max_new_tokens, so the partial response plus roll-out can exceed --max_new_tokens."""
    backend = BACKENDS[engine].from_model(ref_model, tokenizer, batch_size=8)
    max_new_tokens = 8
    records = [{"prompt": PROMPTS[i % 2], "answer": "5"} for i in range(16)]
    results = {}
    collect(backend, tokenizer, records, [(i, 0) for i in range(16)], None,
            lambda index, repeat, lists: results.__setitem__((index, repeat), lists), seed=0, dataset_type="gsm8k",
            match_fn_type="symbolic", use_chat_template=True, max_new_tokens=max_new_tokens)
    assert sorted(results) == [(i, 0) for i in range(16)]
    totals = []
    for result in results.values():
        kept = result["num_response_tokens_in_partial_guided_prompts"][0]
        rollout = result["partial_guided_responses_tokenized"][0]
        assert 1 <= kept <= max_new_tokens and len(rollout) <= max_new_tokens
        ended = bool(rollout) and rollout[-1] in backend.stop_ids
        assert ended or not rollout or len(rollout) == max_new_tokens  # a roll-out stops only at a stop id or its budget
        totals.append(kept + len(rollout))
    assert max(totals) > max_new_tokens
    assert set(backend.stats["tokens"]) == {"roll_in", "roll_out"}
