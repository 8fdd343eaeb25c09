"""Model/tokenizer helpers: pad set-up, stop ids, response ends, prompt tokenisation, vocab check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.models import (
    check_vocab_compatible,
    ensure_pad_token,
    get_dtype,
    get_stop_ids,
    response_lengths,
    tokenize_prompts,
)
from utils.demo.tiny_models import END, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "rows,stops,expected",
    [
        ([[5, 6, 2, 0, 0]], [2], [3]),  # stop id counted in the length
        ([[5, 6, 7, 8, 9]], [2], [5]),  # cut by max_new_tokens
        ([[2, 2, 2, 2, 2]], [2], [1]),  # pad == eos: the first one is the end
        ([[5, 3, 6, 2, 9]], [2, 3], [2]),  # several stop ids (e.g. <|eot_id|>)
        ([[5, 6, 2, 0], [3, 0, 0, 0]], [2, 3], [3, 1]),
    ],
    ids=["eos", "no-stop", "pad-is-eos", "two-stop-ids", "batch"],
)
def test_response_lengths(rows, stops, expected):
    assert response_lengths(torch.tensor(rows), stops).tolist() == expected


def test_stop_ids_include_generation_config_and_tokenizer(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir() / "ref")
    stops = get_stop_ids(model, tokenizer)
    assert stops == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)})
    assert len(stops) == 2


def test_tokenize_prompts_left_pads_and_returns_only_model_inputs(tokenizer):
    prompts = ["short", "a much longer prompt than the first one"]
    batch = tokenize_prompts(tokenizer, prompts, use_chat_template=True)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padding
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    text = tokenizer.decode(batch["input_ids"][1], skip_special_tokens=False)
    assert text.count(tokenizer.bos_token) == 1, "chat template plus add_special_tokens doubled the BOS"
    assert text.rstrip().endswith("<|assistant|>") and "<|user|>" in text
    plain = tokenize_prompts(tokenizer, prompts, use_chat_template=False)
    assert tokenizer.decode(plain["input_ids"][1], skip_special_tokens=True) == prompts[1]


def test_tokenize_prompts_without_chat_template_errors(tokenizer):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_prompts(bare, ["x"], use_chat_template=True)


def test_ensure_pad_token_prefers_a_token_distinct_from_eos():
    tok = build_tokenizer()
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    tok = build_tokenizer()
    tok.pad_token = None
    tok.add_special_tokens({"additional_special_tokens": []})
    vocab_without_pad = {k: v for k, v in tok.get_vocab().items() if k != "<pad>"}
    tok.get_vocab = lambda: vocab_without_pad  # a GPT-2 style tokenizer: nothing pad-like
    ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token


def test_get_dtype():
    assert get_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="valid values: float32, bfloat16, float16"):
        get_dtype("fp8")


def test_incompatible_vocabularies_name_both_sizes(tokenizer):
    smaller = build_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} tokens.*{len(smaller)} tokens"):
        check_vocab_compatible(tokenizer, len(tokenizer), smaller)
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} tokens.*only 300 rows"):
        check_vocab_compatible(tokenizer, 300)
    check_vocab_compatible(tokenizer, len(tokenizer) + 64, build_tokenizer())  # padded embedding is fine


def test_tiny_models_cli(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "utils.tiny_models", "--out_dir", str(out), "--arch", "qwen2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    ref = AutoModelForCausalLM.from_pretrained(out / "ref")
    classifier = AutoModelForCausalLM.from_pretrained(out / "classifier")
    assert ref.config.model_type == classifier.config.model_type == "qwen2"
    assert ref.num_parameters() > 2 * classifier.num_parameters()
    tok_ref, tok_cls = AutoTokenizer.from_pretrained(out / "ref"), AutoTokenizer.from_pretrained(out / "classifier")
    assert tok_ref.get_vocab() == tok_cls.get_vocab()
    assert tok_ref.pad_token_id is not None and tok_ref.pad_token_id != tok_ref.eos_token_id
    assert tok_ref.chat_template and ref.config.vocab_size == len(tok_ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_tiny_tokenizer_is_identical_for_every_arch(tiny_dir, tokenizer, arch):
    """transformers picks the tokenizer class from the model type (qwen2 -> Qwen2Tokenizer);
    every arch must still read the same vocabulary and produce the same ids."""
    loaded = AutoTokenizer.from_pretrained(tiny_dir(arch) / "ref")
    model_vocab = AutoModelForCausalLM.from_pretrained(tiny_dir(arch) / "ref").config.vocab_size
    assert len(loaded) == model_vocab == len(tokenizer)
    text = "Natalia sold 48/2 = 24 clips, \\boxed{72}.\n\nSolution: it's  3.5 $ x^2"
    assert loaded(text).input_ids == tokenizer(text).input_ids
