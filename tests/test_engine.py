"""The continuous-batching engine (``utils.decoding.engine``): greedy equality with ``generate()``,
samples independent of their batch mates, classifier values under joins and leaves."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from tests.helpers.naive import expected_guided
from tests.helpers.probes import NucleusCount
from utils.classifier import ClassifierSpec, QSharpClassifier
from utils.decoding.engine import ContinuousEngine
from utils.decoding.generate import generate_responses
from utils.decoding.guidance import QSharpLogitsProcessor
from utils.decoding.requests import Request
from utils.models import get_stop_ids, left_pad

BUDGET = 20


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Seven prompts of different lengths (3 to 15 tokens)."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    lengths = [3, 15, 7, 11, 4, 9, 13]
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def request(prompt, budget, seed, stage="eval", **kwargs) -> Request:
    """A request whose stream is seeded by ``seed`` (problem 0, repeat 0)."""
    return Request(prompt, budget, (seed, 0, 0, stage), **kwargs)


def processor_for(make_classifier, classifier_type, **kwargs):
    if classifier_type is None:
        return None
    return QSharpLogitsProcessor(make_classifier(classifier_type, "bce"), eta=3.0, top_k=5, **kwargs)


def run_engine(ref_model, stop_ids, pad, requests, batch_size, processor=None, **kwargs):
    """{tag: request} of every finished request."""
    engine = ContinuousEngine(ref_model, stop_ids, pad, batch_size, processor=processor, **kwargs)
    done = {}
    engine.run(requests, lambda r: done.__setitem__(r.tag, r))
    return done, engine


@pytest.fixture(scope="module")
def early_stops(ref_model, tokenizer, prompts):
    """Stop ids that end the greedy responses at different steps: the EOS plus two tokens that
    the unguided greedy responses emit part-way."""
    stops = get_stop_ids(ref_model, tokenizer)
    ids, lengths = generate_responses(ref_model, left_pad(prompts, tokenizer.pad_token_id), stops,
                                      tokenizer.pad_token_id, BUDGET, temperature=0)
    return sorted(set(stops) | {int(ids[0, 6]), int(ids[3, 12])})


@pytest.mark.parametrize("classifier_type", [None, "Q", "V"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_equals_generate(ref_model, tokenizer, make_classifier, prompts, early_stops, classifier_type, batch_size):
    """Temperature 0: token for token the output of ``model.generate()`` on the whole batch,
    unguided and Q- or V-guided, with rows ending at different steps and (batch size < 7)
    requests joining mid-run."""
    pad = tokenizer.pad_token_id

    def generate(stops):
        ids, lengths = generate_responses(ref_model, left_pad(prompts, pad), stops, pad, BUDGET, temperature=0,
                                          processor=processor_for(make_classifier, classifier_type, pad_token_id=pad))
        return ids, [ids[i, : lengths[i]].tolist() for i in range(len(prompts))]

    ids, _ = generate(early_stops)  # this guidance's own responses: stop at two of their tokens
    early_stops = sorted(set(early_stops) | {int(ids[1, 5]), int(ids[4, 11])})
    _, expected = generate(early_stops)
    assert len(set(len(e) for e in expected)) > 2, "rows must end at different steps"
    requests = [request(p, BUDGET, 0, guided=True, tag=i) for i, p in enumerate(prompts)]
    done, engine = run_engine(ref_model, early_stops, pad, requests, batch_size, temperature=0,
                              processor=processor_for(make_classifier, classifier_type))
    assert [done[i].tokens for i in range(len(prompts))] == expected
    assert engine.stats["tokens"]["eval"] == sum(len(e) for e in expected)


def test_sample_does_not_depend_on_batch_mates(ref_model, tokenizer, make_classifier, prompts, early_stops):
    """One request sampled alone, and among other neighbours in batches of 3 and 8: the same
    tokens and the same KL (V-guided, temperature 0.8, top-p 0.9)."""
    pad = tokenizer.pad_token_id
    target = request(prompts[2], BUDGET, 1234, guided=True, tag="target")

    def sample(neighbours, batch_size):
        requests = [request(p, BUDGET - i, 7 + i, guided=True, tag=i) for i, p in enumerate(neighbours)]
        requests.insert(len(requests) // 2, request(target.prompt, BUDGET, 1234, guided=True, tag="target"))
        processor = processor_for(make_classifier, "V", kl_temperature=0.8, kl_top_p=0.9)
        done, _ = run_engine(ref_model, early_stops, pad, requests, batch_size, processor, temperature=0.8, top_p=0.9)
        return done["target"]

    alone = sample([], 1)
    assert len(alone.tokens) > 3
    for neighbours, batch_size in [(prompts[:1] + prompts[4:5], 3), (prompts[3:], 3), (prompts, 8), (prompts[::-1], 8)]:
        other = sample(neighbours, batch_size)
        assert other.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(other.token_kl), torch.tensor(alone.token_kl), atol=1e-5, rtol=1e-5)
    another_seed = request(target.prompt, BUDGET, 99, guided=True, tag="target")
    done, _ = run_engine(ref_model, early_stops, pad, [another_seed], 1,
                         processor_for(make_classifier, "V"), temperature=0.8, top_p=0.9)
    assert done["target"].tokens != alone.tokens  # the seed does decide the sample


def test_one_nucleus_per_step_for_kl_and_sample(monkeypatch, ref_model, tokenizer, make_classifier, prompts,
                                                early_stops):
    """The KL of the guided rows is taken on the sampler's own top-p filtered logits: one
    nucleus computation per step, with guided and unguided rows side by side."""
    count = NucleusCount(monkeypatch)
    requests = [request(p, BUDGET, i, guided=i % 2 == 0, tag=i) for i, p in enumerate(prompts)]
    processor = processor_for(make_classifier, "V", kl_temperature=0.8, kl_top_p=0.9)
    done, engine = run_engine(ref_model, early_stops, tokenizer.pad_token_id, requests, 3, processor, temperature=0.8,
                              top_p=0.9)
    assert all(len(r.token_kl) == len(r.tokens) for r in done.values() if r.guided)
    assert (count.filter_calls, count.warper_calls) == (engine.stats["steps"], 0)


def sliding_classifier(tokenizer, classifier_type):
    config = MistralConfig(sliding_window=6, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    classifier = QSharpClassifier.from_causal_lm(lm, ClassifierSpec(classifier_type, "bce"), dtype="float32").eval()
    with torch.no_grad():
        classifier.score.weight.normal_(0.0, 1.0)
    return classifier


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
@pytest.mark.parametrize("backbone", ["llama", "mistral-window-6"])
def test_classifier_values_under_joins_and_leaves(monkeypatch, ref_model, tokenizer, make_classifier, prompts,
                                                  early_stops, classifier_type, backbone):
    """At every step, the guided logits of every live row equal a from-scratch recomputation
    (no cache) on that row's prompt + tokens so far, while rows leave and join (batch 3,
    float32); a sliding-window classifier included."""
    classifier = (make_classifier(classifier_type, "bce") if backbone == "llama"
                  else sliding_classifier(tokenizer, classifier_type))
    processor = QSharpLogitsProcessor(classifier, eta=3.0, top_k=5)
    original = ContinuousEngine._process
    checked = {"steps": 0, "joins": 0, "rows": set()}

    def checking(self, scores, live, rows, n_old, last):
        guided = original(self, scores, live, rows, n_old, last)
        sequences = [r.prompt + r.tokens for r in live]
        batch = left_pad(sequences, tokenizer.pad_token_id)
        expected, _ = expected_guided(classifier, batch["input_ids"], batch["attention_mask"], scores, "bernoulli", 3.0, 5)
        torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-5,
                                   msg=lambda m: f"step {checked['steps']}: {m}")
        checked["steps"] += 1
        checked["joins"] += len(live) > n_old > 0  # rows joined a running batch
        checked["rows"].update(r.tag for r in live)
        return guided

    monkeypatch.setattr(ContinuousEngine, "_process", checking)
    requests = [request(p, BUDGET - 2 * i, i, guided=True, tag=i) for i, p in enumerate(prompts)]  # leave apart
    done, _ = run_engine(ref_model, early_stops, tokenizer.pad_token_id, requests, 3, processor, temperature=0.8)
    assert len(done) == len(prompts) and checked["rows"] == set(range(len(prompts)))
    assert checked["joins"] >= 2, "requests must join a running batch"
    if backbone != "llama":
        assert max(len(r.prompt) + len(r.tokens) for r in done.values()) > 6  # past the window


def test_follow_ups_and_unguided_rows_share_the_batch(ref_model, tokenizer, make_classifier, prompts, early_stops):
    """``on_finish`` may return follow-ups (as a roll-in returns its roll-out); they join the same
    batch unguided next to guided rows, and equal the same requests decoded on their own."""
    pad = tokenizer.pad_token_id
    processor = processor_for(make_classifier, "V")
    order = []

    def on_finish(finished_request):
        order.append(finished_request.tag)
        if finished_request.kind == "roll_in":
            seed = finished_request.stream[0]
            return [request(finished_request.prompt + finished_request.tokens[:2], BUDGET, seed, "roll_out",
                            tag=("out", finished_request.tag))]
        return None

    requests = [request(p, BUDGET - i, i, "roll_in", guided=True, tag=i) for i, p in enumerate(prompts)]
    engine = ContinuousEngine(ref_model, early_stops, pad, 3, processor=processor, temperature=0.8)
    finished = {}
    engine.run(requests, lambda r: (finished.__setitem__(r.tag, r), on_finish(r))[1])
    assert len(finished) == 2 * len(prompts)
    first_out = min(i for i, tag in enumerate(order) if isinstance(tag, tuple))
    assert first_out < len(prompts) - 1, "a roll-out must start while other roll-ins are still running"
    alone = {}
    for i in range(len(prompts)):
        rollout = finished[("out", i)]
        single = Request(rollout.prompt, BUDGET, rollout.stream, tag="x")
        done, _ = run_engine(ref_model, early_stops, pad, [single], 1, temperature=0.8)
        alone[i] = done["x"].tokens
        assert alone[i] == rollout.tokens
    assert engine.stats["tokens"]["roll_out"] == sum(len(t) for t in alone.values())


def test_prefill_cap_and_bad_sizes(ref_model, tokenizer, prompts, early_stops):
    """``max_batch_tokens`` bounds a step's padded prefill (one request always joins); sizes
    below 1 (batch) or 0 (cap) are refused."""
    pad = tokenizer.pad_token_id
    widths = []
    original = ContinuousEngine._admit

    def recording(self, queue, n_live, on_finish):
        joiners = original(self, queue, n_live, on_finish)
        if joiners:
            widths.append(len(joiners) * max(len(r.prompt) for r in joiners))
        return joiners

    ContinuousEngine._admit = recording
    try:
        requests = [request(p, BUDGET, i, tag=i) for i, p in enumerate(prompts)]
        done, _ = run_engine(ref_model, early_stops, pad, requests, 8, temperature=0, max_batch_tokens=20)
    finally:
        ContinuousEngine._admit = original
    assert len(done) == len(prompts)
    assert all(w <= 20 or w == max(len(p) for p in prompts) for w in widths) and len(widths) > 1
    expected, _ = run_engine(ref_model, early_stops, pad, [request(p, BUDGET, 0, tag=i) for i, p in enumerate(prompts)],
                             8, temperature=0)
    assert {k: r.tokens for k, r in done.items()} == {k: r.tokens for k, r in expected.items()}
    with pytest.raises(ValueError, match="--batch_size"):
        ContinuousEngine(ref_model, early_stops, pad, 0)
    with pytest.raises(ValueError, match="--max_batch_tokens"):
        ContinuousEngine(ref_model, early_stops, pad, 2, max_batch_tokens=-1)


def test_forwards_compute_the_last_position_logits_only(ref_model, tokenizer, prompts, early_stops):
    """Prefills (and decode steps) ask for one position's logits, as ``generate()`` does, not
    the whole vocabulary at every prompt token."""
    widths = []
    hook = ref_model.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[1]))
    try:
        requests = [request(p, BUDGET, i, tag=i) for i, p in enumerate(prompts)]
        run_engine(ref_model, early_stops, tokenizer.pad_token_id, requests, 3, temperature=0.8, top_p=0.9)
    finally:
        hook.remove()
    assert widths and set(widths) == {1} and max(len(p) for p in prompts) > 1
