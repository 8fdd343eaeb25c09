"""Collection's roll-in / cut / roll-out (``utils.decoding.rollout.collect``) on the tiny models, through both backends."""

from __future__ import annotations

import pytest
import torch

from utils.decoding.backends import BACKENDS
from utils.decoding.rollout import collect

PROMPTS = ["Problem:\n\nWhat is 2 + 3?\n\nSolution:", "Problem:\n\nA longer one, 17 + 25 * 3?\n\nSolution:"]


@pytest.mark.parametrize("engine", ["continuous", "generate"])  # vllm: tests/test_vllm.py
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


def test_generate_backend_runs_whole_chunks_seeded_by_their_first_problem(tokenizer, ref_model):
    """``--engine generate`` redoes a chunk of ``batch_size`` problems with any file missing (its seed
    covers the chunk), batches one (seed, repeat, stage) at a time, seeds a batch from its first
    problem, and runs the follow-ups of a batch next, under the same seed."""
    from utils.decoding.generate import GenerateBackend
    from utils.decoding.requests import Request
    from utils.seeding import batch_seed

    class Recording(GenerateBackend):
        def _generate(self, batch, processor):
            self.batches.append(([r.stream for r in batch], torch.initial_seed()))
            for request in batch:
                request.tokens = [1]

    backend = Recording.from_model(ref_model, tokenizer, batch_size=3)
    backend.batches = []
    done = {(0, 0), (1, 0), (2, 0), (4, 0)}
    work = backend.pending(list(range(7)), 2, lambda i, r: (i, r) in done)
    assert work == [(3, 0), (4, 0), (5, 0), (6, 0)] + [(i, 1) for i in range(7)]

    def follow(request):
        seed, repeat, problem, stage = request.stream
        return [Request([2], 4, (seed, repeat, problem, "roll_out"))] if stage == "roll_in" else None

    backend.run([Request([5], 4, (47, r, i, "roll_in")) for i, r in work], follow)
    streams = [([s[2] for s in streams], {s[1] for s in streams}, {s[3] for s in streams}, seed)
               for streams, seed in backend.batches]
    assert streams == [
        ([3, 4, 5], {0}, {"roll_in"}, batch_seed(47, 0, 3)), ([3, 4, 5], {0}, {"roll_out"}, batch_seed(47, 0, 3)),
        ([6], {0}, {"roll_in"}, batch_seed(47, 0, 6)), ([6], {0}, {"roll_out"}, batch_seed(47, 0, 6)),
        ([0, 1, 2], {1}, {"roll_in"}, batch_seed(47, 1, 0)), ([0, 1, 2], {1}, {"roll_out"}, batch_seed(47, 1, 0)),
        ([3, 4, 5], {1}, {"roll_in"}, batch_seed(47, 1, 3)), ([3, 4, 5], {1}, {"roll_out"}, batch_seed(47, 1, 3)),
        ([6], {1}, {"roll_in"}, batch_seed(47, 1, 6)), ([6], {1}, {"roll_out"}, batch_seed(47, 1, 6)),
    ]
