"""Collection's roll-in / cut / roll-out on the tiny models."""

from __future__ import annotations

import torch

from utils.models import get_stop_ids
from utils.decoding.rollout import collect_batch

PROMPTS = ["Problem:\n\nWhat is 2 + 3?\n\nSolution:", "Problem:\n\nA longer one, 17 + 25 * 3?\n\nSolution:"]


def test_rollout_gets_a_fresh_token_budget(tokenizer, ref_model):
    """As the original: the roll-out from prompt + c + 1 response tokens may add another
    --max_new_tokens, so the partial response plus roll-out can exceed --max_new_tokens."""
    stop_ids = get_stop_ids(ref_model, tokenizer)
    max_new_tokens = 8
    records = [{"prompt": PROMPTS[i % 2]} for i in range(16)]
    torch.manual_seed(0)
    with torch.no_grad():
        results = collect_batch(ref_model, tokenizer, records, ["5"] * len(records), None, dataset_type="gsm8k",
                                match_fn_type="symbolic", use_chat_template=True, temperature=1.0, top_p=1.0,
                                max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    totals = []
    for result in results:
        kept = result["num_response_tokens_in_partial_guided_prompts"][0]
        rollout = result["partial_guided_responses_tokenized"][0]
        assert 1 <= kept <= max_new_tokens and len(rollout) <= max_new_tokens
        ended = bool(rollout) and rollout[-1] in stop_ids
        assert ended or not rollout or len(rollout) == max_new_tokens  # a roll-out stops only at a stop id or its budget
        totals.append(kept + len(rollout))
    assert max(totals) > max_new_tokens
