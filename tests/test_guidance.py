"""Guided sampling: closed forms, no-ops, KV cache against recomputation, batch invariance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, PretrainedConfig, Qwen2Config

from tests.helpers.models import ARCHS
from tests.helpers.naive import closed_form_offsets, expected_guided
from tests.helpers.probes import NucleusCount, Recorder
from tests.helpers.sampling import generate_samples
from utils.classifier import ClassifierSpec, QSharpClassifier
from utils.decoding.generate import generate_responses
from utils.decoding.guidance import QSharpLogitsProcessor, resolve_guidance_mode
from utils.models import attention_window, get_stop_ids, tokenize_prompts

PROMPTS = [
    "Problem: 2 + 3?",
    "Problem: Natalia sold 48 clips in April and half as many in May. How many altogether?",
    "Problem: x = 6, y = 4, compute x + y.",
]


# (inference_mode, loss_type, cd_baseline) -> closed form name
MODES = [
    ("bernoulli", "bce", 0, "bernoulli"),
    ("bernoulli", "mle", 0, "mle"),
    ("mle", "mle", 0, "mle"),
    ("expectation", "mse", 0, "expectation"),
    ("bernoulli", "bce", 1, "cd"),
    ("disabled", "bce", 0, "disabled"),
]


@pytest.mark.parametrize("top_k", [5, -1])
@pytest.mark.parametrize("classifier_type", ["Q", "V"])
@pytest.mark.parametrize("inference_mode,loss_type,cd_baseline,form", MODES, ids=[f"{m[3]}-{m[1]}" for m in MODES])
def test_guided_logits_equal_closed_forms(
    tokenizer, make_classifier, classifier_type, inference_mode, loss_type, cd_baseline, form, top_k
):
    classifier = make_classifier(classifier_type, loss_type, num_atoms=5, V_min=0.0, V_max=1.0)
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    torch.manual_seed(1)
    scores = torch.randn(len(PROMPTS), classifier.vocab_size) * 3
    eta = 2.5
    processor = QSharpLogitsProcessor(classifier, eta, top_k, inference_mode, bool(cd_baseline))
    processor.reset(batch["attention_mask"])
    guided = processor(batch["input_ids"], scores.clone())

    expected, candidates = expected_guided(
        classifier, batch["input_ids"], batch["attention_mask"], scores, form, eta, top_k
    )
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    outside = torch.ones_like(scores, dtype=torch.bool).scatter_(1, candidates, False)
    assert torch.equal(guided[outside], scores[outside]), "a token outside the top-k changed"
    if form != "disabled":
        assert not torch.allclose(guided, scores), "guidance changed nothing"


def explode(*args, **kwargs):
    raise AssertionError("the classifier ran although guidance is a no-op")


@pytest.mark.parametrize("eta,inference_mode", [(0.0, "bernoulli"), (5.0, "disabled")], ids=["eta0", "disabled"])
def test_noop_guidance_matches_unguided_sampling_token_for_token(
    tokenizer, ref_model, make_classifier, eta, inference_mode
):
    classifier = make_classifier("V", "bce")
    classifier.model.forward = explode  # a no-op must not even run the classifier
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    stops = get_stop_ids(ref_model, tokenizer)

    def sample(processor):
        torch.manual_seed(123)
        return ref_model.generate(
            **batch,
            logits_processor=[] if processor is None else [processor],
            do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=24, eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )

    plain = sample(None)
    guided = sample(QSharpLogitsProcessor(classifier, eta, 20, inference_mode))
    assert torch.equal(plain, guided)


def test_expectation_ignores_eta_as_the_original(tokenizer, make_classifier):
    """expectation adds logsigmoid(l) whatever eta, also at eta 0 (collection drives it so);
    evaluation's eta 0 is ``disabled`` (``make_processor(..., disabled=True)``)."""
    from argparse import Namespace

    from utils.decoding.rollout import make_processor

    classifier = make_classifier("V", "bce")
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    scores = torch.randn(len(PROMPTS), classifier.vocab_size)
    outputs = []
    for eta in (0.0, 7.0):
        processor = QSharpLogitsProcessor(classifier, eta, 5, "expectation")
        assert not processor.is_noop
        processor.reset(batch["attention_mask"])
        outputs.append(processor(batch["input_ids"], scores.clone()))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], scores)
    args = Namespace(eta=0.0, inference_mode="expectation", loss_type="bce", top_k=5)
    assert make_processor(args, tokenizer, checkpoint=None, disabled=True).is_noop


def test_real_guidance_changes_sampling(tokenizer, ref_model, make_classifier):
    """Control for the test above: the same sampling with eta > 0 does change tokens."""
    classifier = make_classifier("V", "bce")
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    stops = get_stop_ids(ref_model, tokenizer)
    outs = []
    for eta in (0.0, 8.0):
        torch.manual_seed(123)
        responses, _ = generate_responses(
            ref_model, batch, stops, tokenizer.pad_token_id, 24, 0.8, 0.9,
            QSharpLogitsProcessor(classifier, eta, 20, "bernoulli"),
        )
        outs.append(responses)
    assert not torch.equal(outs[0], outs[1])


def test_offset_is_added_before_temperature(tokenizer, ref_model, make_classifier):
    """The processor receives raw reference logits even at temperature 0.5 (strength eta / T)."""
    recorder = Recorder(QSharpLogitsProcessor(make_classifier("V"), 1.0, 5, "bernoulli"))
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    torch.manual_seed(0)
    ref_model.generate(**batch, logits_processor=[recorder], do_sample=True, temperature=0.5, max_new_tokens=1,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        raw = ref_model(**batch).logits[:, -1]
    torch.testing.assert_close(recorder.steps[0][1], raw.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_values_equal_recomputation_every_step(tokenizer, tiny_dir, make_classifier, arch, classifier_type):
    """20 guided steps on prompts of different lengths: each step's guided logits equal the
    ones computed from scratch (no cache) on the sequence generated so far."""
    from utils.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_dir(arch) / "ref"))
    ref = load_causal_lm(str(tiny_dir(arch) / "ref"), "float32", "cpu")
    classifier = make_classifier(classifier_type, "bce", arch=arch)
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == len(PROMPTS), "prompts must differ in length"
    recorder = Recorder(QSharpLogitsProcessor(classifier, 3.0, 6, "bernoulli"))
    recorder.inner.reset(batch["attention_mask"])
    torch.manual_seed(0)
    ref.generate(**batch, logits_processor=[recorder], do_sample=True, min_new_tokens=20, max_new_tokens=20,
                 pad_token_id=tokenizer.pad_token_id)
    assert len(recorder.steps) == 20
    prompt_len = batch["input_ids"].shape[1]
    for step, (input_ids, scores, guided) in enumerate(recorder.steps):
        assert input_ids.shape[1] == prompt_len + step
        mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), step, dtype=torch.long)], dim=1)
        expected, _ = expected_guided(classifier, input_ids, mask, scores, "bernoulli", 3.0, 6)
        torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")


# A window of 6 cache slots, shorter than every prompt: on every layer (Mistral) or on one of two (Qwen2).
SLIDING = {
    "mistral-every-layer": lambda **kw: MistralConfig(sliding_window=6, **kw),
    "qwen2-one-layer": lambda **kw: Qwen2Config(use_sliding_window=True, sliding_window=6, max_window_layers=1, **kw),
}


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
@pytest.mark.parametrize("backbone", sorted(SLIDING))
def test_sliding_window_values_equal_recomputation(tokenizer, backbone, classifier_type):
    """A sliding-window classifier: each step's guided logits equal the recomputation from scratch,
    where transformers applies the window itself."""
    config = SLIDING[backbone](vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    classifier = QSharpClassifier.from_causal_lm(lm, ClassifierSpec(classifier_type, "bce"), dtype="float32").eval()
    with torch.no_grad():
        classifier.score.weight.normal_(0.0, 1.0)
    assert attention_window(classifier.config) == (6, backbone == "qwen2-one-layer")
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    processor = QSharpLogitsProcessor(classifier, 3.0, 6, "bernoulli")
    processor.reset(batch["attention_mask"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for step in range(8):
        scores = torch.randn(3, classifier.vocab_size)
        guided = processor(ids, scores.clone())
        expected, _ = expected_guided(classifier, ids, mask, scores, "bernoulli", 3.0, 6)
        torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
        ids = torch.cat([ids, torch.randint(10, classifier.vocab_size, (3, 1))], dim=1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)


def test_attention_window_of_each_layer_kind():
    assert attention_window(Qwen2Config()) == (None, False)  # sliding_window is set but unused
    assert attention_window(MistralConfig(sliding_window=4096)) == (4096, False)
    assert attention_window(MistralConfig(sliding_window=None)) == (None, False)
    with pytest.raises(ValueError, match="linear_attention layers"):
        attention_window(PretrainedConfig(layer_types=["full_attention", "linear_attention"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary (relative) and learned absolute positions
@pytest.mark.parametrize("classifier_type", ["Q", "V"])
def test_batch_invariance_left_padding(tokenizer, make_classifier, classifier_type, arch):
    """A prompt's guided logits are the same alone and inside a left-padded batch of longer prompts."""
    classifier = make_classifier(classifier_type, "bce", arch=arch)
    short = PROMPTS[0]
    alone = tokenize_prompts(tokenizer, [short], use_chat_template=True)
    mixed = tokenize_prompts(tokenizer, [PROMPTS[1], short, PROMPTS[1] + " Twice as long!"], use_chat_template=True)
    assert mixed["attention_mask"][1].sum() < mixed["attention_mask"].shape[1], "the short prompt must be padded"
    processors = [QSharpLogitsProcessor(classifier, 2.0, 8, "bernoulli") for _ in range(2)]
    processors[0].reset(alone["attention_mask"])
    processors[1].reset(mixed["attention_mask"])
    ids_alone, ids_mixed = alone["input_ids"], mixed["input_ids"]
    torch.manual_seed(0)
    for step in range(6):
        scores = torch.randn(3, classifier.vocab_size)
        out_alone = processors[0](ids_alone, scores[1:2].clone())
        out_mixed = processors[1](ids_mixed, scores.clone())
        torch.testing.assert_close(out_alone[0], out_mixed[1], atol=1e-4, rtol=0)
        tokens = torch.randint(10, classifier.vocab_size, (3, 1))
        ids_alone = torch.cat([ids_alone, tokens[1:2]], dim=1)
        ids_mixed = torch.cat([ids_mixed, tokens], dim=1)


@pytest.mark.parametrize("step", [0, 3])
def test_v_candidates_equal_one_at_a_time(tokenizer, make_classifier, step):
    """All candidates scored in one shared-prefix forward equal V(prefix + a) run candidate by candidate;
    the candidates leave no trace in the classifier's cache."""
    classifier = make_classifier("V", "bce")
    batch = tokenize_prompts(tokenizer, PROMPTS[:2], use_chat_template=True)
    processor = QSharpLogitsProcessor(classifier, 1.5, -1, "bernoulli")  # every token is a candidate
    processor.reset(batch["attention_mask"])
    input_ids = batch["input_ids"]
    torch.manual_seed(0)
    for _ in range(step + 1):
        scores = torch.randn(2, classifier.vocab_size)
        guided = processor(input_ids, scores)
        last_ids = input_ids
        input_ids = torch.cat([input_ids, torch.randint(10, classifier.vocab_size, (2, 1))], dim=1)
    assert processor.rows.cache.get_seq_length() == last_ids.shape[1], "candidates stayed in the cache"
    mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
    offsets = guided - scores  # every token is a candidate
    for token in range(0, classifier.vocab_size, 7):
        with torch.no_grad():
            seq = torch.cat([last_ids, torch.full((2, 1), token)], dim=1)
            seq_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = classifier.model(input_ids=seq, attention_mask=seq_mask, position_ids=positions).last_hidden_state
            logit = classifier.score(hidden[:, -1])  # [2, 1]
        expected = closed_form_offsets(logit[:, None, :], "bernoulli", 1.5)[:, 0].float()
        torch.testing.assert_close(offsets[:, token], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
def test_reference_logits_wider_than_classifier_vocabulary(tokenizer, make_classifier, classifier_type):
    """Ids beyond the classifier's vocabulary (padded reference logits) are never candidates."""
    classifier = make_classifier(classifier_type)
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    vocab = classifier.vocab_size
    scores = torch.randn(3, vocab + 64)
    scores[:, vocab:] += 100.0  # the padded ids would be the top-k if they were eligible
    processor = QSharpLogitsProcessor(classifier, 2.0, 5, "bernoulli")
    processor.reset(batch["attention_mask"])
    guided = processor(batch["input_ids"], scores.clone())
    assert torch.equal(guided[:, vocab:], scores[:, vocab:])
    changed = (guided != scores).sum(-1)
    assert changed.tolist() == [5, 5, 5]


def test_processor_restarts_on_each_generate_call(tokenizer, ref_model, make_classifier):
    """A processor reused across generate calls gives what a fresh processor gives."""
    classifier = make_classifier("V")
    stops = get_stop_ids(ref_model, tokenizer)
    first = tokenize_prompts(tokenizer, PROMPTS[:2], use_chat_template=True)
    second = tokenize_prompts(tokenizer, PROMPTS[1:], use_chat_template=True)
    reused = QSharpLogitsProcessor(classifier, 4.0, 10, "bernoulli", pad_token_id=tokenizer.pad_token_id)

    def sample(processor, batch):
        torch.manual_seed(7)
        return ref_model.generate(**batch, logits_processor=[processor], do_sample=True, max_new_tokens=10,
                                  eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)

    sample(reused, first)  # leaves a cache behind; the next call must not continue it
    fresh = QSharpLogitsProcessor(classifier, 4.0, 10, "bernoulli", pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(sample(reused, second), sample(fresh, second))


@pytest.mark.parametrize(
    "inference_mode,loss_type,cd_baseline,expected",
    [
        ("bernoulli", "bce", False, "bernoulli"),
        ("bernoulli", "mle", False, "mle"),
        ("expectation", "mse", False, "expectation"),
        ("bernoulli", "bce", True, "cd"),
        ("disabled", "mle", True, "disabled"),
    ],
)
def test_resolve_guidance_mode(inference_mode, loss_type, cd_baseline, expected):
    assert resolve_guidance_mode(inference_mode, loss_type, cd_baseline) == expected


@pytest.mark.parametrize(
    "args,message",
    [
        (("greedy", "bce"), "valid values: bernoulli, expectation, mle, disabled"),
        (("mle", "bce"), "needs --loss_type mle"),
        (("expectation", "mle"), "needs a scalar head"),
        (("bernoulli", "mle", True), "--cd_baseline 1 needs a scalar head"),
    ],
)
def test_resolve_guidance_mode_errors(args, message):
    with pytest.raises(ValueError, match=message):
        resolve_guidance_mode(*args)


def test_processor_argument_errors(make_classifier):
    classifier = make_classifier("V")
    with pytest.raises(ValueError, match="eta must be non-negative"):
        QSharpLogitsProcessor(classifier, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        QSharpLogitsProcessor(classifier, 1.0, top_k=0)
    with pytest.raises(ValueError, match="a classifier is needed"):
        QSharpLogitsProcessor(None, 1.0)
    assert QSharpLogitsProcessor(None, 0.0).is_noop


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
def test_bfloat16_classifier_gives_finite_offsets_close_to_float32(tokenizer, make_classifier, classifier_type):
    classifier = make_classifier(classifier_type, "bce")
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    scores = torch.randn(3, classifier.vocab_size)
    outputs = []
    for dtype in (torch.float32, torch.bfloat16):
        processor = QSharpLogitsProcessor(classifier.to(dtype), 2.0, 8, "bernoulli")
        processor.reset(batch["attention_mask"])
        ids = batch["input_ids"]
        for step in range(3):
            out = processor(ids, scores.clone())
            ids = torch.cat([ids, torch.full((3, 1), 40 + step)], dim=1)
        outputs.append(out)
    assert torch.isfinite(outputs[1]).all() and outputs[1].dtype == torch.float32
    torch.testing.assert_close(outputs[1], outputs[0], atol=0.15, rtol=0)


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
def test_finished_rows_leave_the_classifier_batch(tokenizer, make_classifier, classifier_type):
    """A row that emitted a stop id is dropped from the classifier's batch and keeps its reference
    logits; the other rows' guided logits still equal the recomputation from scratch."""
    classifier = make_classifier(classifier_type, "bce")
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    stop, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    processor = QSharpLogitsProcessor(classifier, 3.0, 6, "bernoulli", stop_ids=[stop])
    processor.reset(batch["attention_mask"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    finished_at = {1: 2, 0: 4}  # row -> step at which it emits the stop id
    torch.manual_seed(0)
    for step in range(7):
        scores = torch.randn(3, classifier.vocab_size)
        guided = processor(ids, scores.clone())
        done = [row for row, at in finished_at.items() if step > at]
        active = [row for row in range(3) if row not in done]
        assert processor._active.tolist() == active
        for row in done:
            assert torch.equal(guided[row], scores[row]), f"step {step}: finished row {row} was guided"
        expected, _ = expected_guided(classifier, ids[active], mask[active], scores[active], "bernoulli", 3.0, 6)
        torch.testing.assert_close(guided[active], expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
        tokens = torch.randint(10, classifier.vocab_size, (3, 1))
        for row, at in finished_at.items():
            tokens[row] = stop if step == at else (pad if step > at else tokens[row])
        ids = torch.cat([ids, tokens], dim=1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)


def test_all_rows_finished_runs_no_classifier(tokenizer, make_classifier):
    classifier = make_classifier("V", "bce")
    batch = tokenize_prompts(tokenizer, PROMPTS[:2], use_chat_template=True)
    processor = QSharpLogitsProcessor(classifier, 3.0, 6, "bernoulli", stop_ids=[tokenizer.eos_token_id])
    processor.reset(batch["attention_mask"])
    scores = torch.randn(2, classifier.vocab_size)
    processor(batch["input_ids"], scores.clone())
    classifier.model.forward = explode
    ids = torch.cat([batch["input_ids"], torch.full((2, 1), tokenizer.eos_token_id)], dim=1)
    assert torch.equal(processor(ids, scores.clone()), scores)


@pytest.mark.parametrize("classifier_type,top_k", [("V", 8), ("Q", -1)])
def test_online_kl_equals_two_pass_kl(tokenizer, ref_model, make_classifier, classifier_type, top_k):
    """KL(guided || reference) accumulated while decoding equals the original's two-pass value
    (every step's guided logits kept, then a second reference forward over prompt + response)."""
    from bench.two_pass import two_pass_sample_batch

    classifier = make_classifier(classifier_type, "bce")
    records = [{"prompt": p} for p in PROMPTS]
    stops = get_stop_ids(ref_model, tokenizer)
    sampling = {"use_chat_template": True, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 24}
    results = []
    for kl_temperature in (0.8, None):
        processor = QSharpLogitsProcessor(classifier, 4.0, top_k, pad_token_id=tokenizer.pad_token_id,
                                          kl_temperature=kl_temperature, kl_top_p=0.9)
        if kl_temperature is not None:  # seeded as torch.manual_seed(5)
            results.append(generate_samples(ref_model, tokenizer, records, processor, seed=5, **sampling))
        else:
            torch.manual_seed(5)
            results.append(two_pass_sample_batch(ref_model, tokenizer, records, processor, kl_batch_size=2, stop_ids=stops,
                                                 **sampling))
    online, two_pass = results
    assert [r["prediction"] for r in online] == [r["prediction"] for r in two_pass]
    assert [r["num_response_tokens"] for r in online] == [r["num_response_tokens"] for r in two_pass]
    kl_online = torch.tensor([r["traj_kl"] for r in online])
    assert (kl_online > 0.01).all(), "guidance should move the distribution"
    torch.testing.assert_close(kl_online, torch.tensor([r["traj_kl"] for r in two_pass]), atol=1e-4, rtol=0)
    for sample in online:
        assert len(sample["token_kl"]) == sample["num_response_tokens"] == len(sample["output_ids"])
        assert sample["traj_kl"] == pytest.approx(sum(sample["token_kl"]), abs=1e-5)
        assert 0 <= sample["traj_kl_before_top_p"] < sample["traj_kl"]  # top-p adds -log(nucleus mass) per token


def test_generate_computes_one_nucleus_per_step_for_kl_and_sample(monkeypatch, tokenizer, ref_model, make_classifier):
    """With KL recorded, the sample and the KL share one top-p filter per step: generate runs no
    warper of its own."""
    count = NucleusCount(monkeypatch)
    processor = QSharpLogitsProcessor(make_classifier("V", "bce"), 4.0, 8, pad_token_id=tokenizer.pad_token_id,
                                      kl_temperature=0.8, kl_top_p=0.9)
    samples = generate_samples(ref_model, tokenizer, [{"prompt": p} for p in PROMPTS], processor, use_chat_template=True,
                               temperature=0.8, top_p=0.9, max_new_tokens=12)
    assert (count.filter_calls, count.warper_calls) == (max(s["num_response_tokens"] for s in samples), 0)


def test_kl_at_another_distribution_than_the_sampled_one_is_refused(tokenizer, ref_model, make_classifier):
    processor = QSharpLogitsProcessor(make_classifier("V", "bce"), 4.0, 8, kl_temperature=1.0, kl_top_p=0.9)
    batch = tokenize_prompts(tokenizer, PROMPTS[:1], use_chat_template=True)
    with pytest.raises(ValueError, match="the KL is taken on the sampled distribution"):
        generate_responses(ref_model, batch, [tokenizer.eos_token_id], tokenizer.pad_token_id, 4, 0.8, 0.9, processor)


def test_top_p_filter_equals_transformers_warper_bit_for_bit():
    """Random rows, rows of few distinct values (ties at the nucleus' edge: the warper's own path),
    rows with -inf, every top_p: the same filtered set and values as ``TopPLogitsWarper``."""
    from transformers import TopPLogitsWarper

    from utils.decoding.kl import top_p_filter

    g = torch.Generator().manual_seed(0)
    rows = {
        "normal": torch.randn(6, 3000, generator=g) * 4,
        "ties": torch.randint(-3, 4, (6, 3000), generator=g).float(),
        "masked": torch.randn(6, 3000, generator=g).masked_fill(torch.rand(6, 3000, generator=g) < 0.5, float("-inf")),
        "one token": torch.randn(6, 1, generator=g),
    }
    for name, logits in rows.items():
        for top_p in (1e-9, 0.1, 0.5, 0.9, 0.999):
            expected = TopPLogitsWarper(top_p, min_tokens_to_keep=1)(None, logits.clone())
            assert torch.equal(top_p_filter(logits, top_p), expected), (name, top_p)
