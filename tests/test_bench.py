"""The benchmarks run and print what their docstrings promise (tiny budgets; no timing is checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from bench import guidance_overhead
from bench.common import classifier_step_costs, guidance_floors, matmul_params, weight_bytes
from tests.helpers.stages import stage
from utils.classifier import ClassifierSpec, QSharpClassifier

TINY = ["--ref_hidden", "32", "--ref_layers", "2", "--classifier_hidden", "32", "--classifier_layers", "1"]
ONE_THREAD = ["--threads", "1"]  # no timing is checked; one thread is fastest on a busy machine


def run_json(script: str, *args: str) -> list[dict]:
    """``python bench/<script> --json <args>`` (in this process: :func:`tests.helpers.stages.stage`); the JSON lines."""
    out = stage(Path.cwd(), f"bench/{script}", "--json", *args)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def tiny_llama(layers: int, tied: bool = True):
    """vocab 100, hidden 16, MLP 24, 4 heads of 4 with 2 key/value heads."""
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config)


# per layer: q 16x16, k and v 16x8 (2 kv heads of 4), o 16x16, gate and up 16x24, down 24x16
LAYER = 16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 24  # 1920
LM_HEAD = 100 * 16


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_counts_layers_and_lm_head_once(tied):
    ref = tiny_llama(2, tied)
    assert (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight) == tied
    assert matmul_params(ref) == 2 * LAYER + LM_HEAD == 5440  # the input embedding lookup never counts
    assert matmul_params(ref, lm_head=False) == matmul_params(ref.base_model) == 2 * LAYER
    assert weight_bytes(ref) == 4 * 5440
    assert weight_bytes(ref.to(torch.bfloat16)) == 2 * 5440


def test_matmul_params_skips_position_embeddings():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                                       bos_token_id=0, eos_token_id=0))
    # c_attn 16x48, c_proj 16x16, c_fc 16x64, c_proj 64x16, the tied lm_head; no wte, no wpe
    assert matmul_params(gpt2) == 16 * 48 + 16 * 16 + 16 * 64 + 64 * 16 + LM_HEAD


def test_guidance_floors_on_a_tied_llama():
    ref, lm = tiny_llama(2), tiny_llama(1)
    ref_macs = 2 * LAYER + LM_HEAD
    q = QSharpClassifier.from_causal_lm(lm, ClassifierSpec("Q", "bce"), init_mode="random", seed=0)
    v = QSharpClassifier.from_causal_lm(lm, ClassifierSpec("V", "bce"), init_mode="random", seed=0)
    # Q: one token through the layer, then 5 head rows; bytes: the layer + at most 3 x 5 gathered rows
    assert classifier_step_costs(q, top_k=5, batch_size=3) == {"macs": LAYER + 5 * 16, "bytes": 4 * (LAYER + 15 * 16)}
    assert classifier_step_costs(q, top_k=5, batch_size=30)["bytes"] == 4 * (LAYER + 100 * 16)  # at most the vocab
    assert classifier_step_costs(q, top_k=-1, batch_size=1)["macs"] == LAYER + 100 * 16  # -1: every token
    # V: the new token and 5 candidates through the layer, the 1 x 16 head on the 5 candidates; head read once
    assert classifier_step_costs(v, top_k=5, batch_size=3) == {"macs": 6 * LAYER + 5 * 16, "bytes": 4 * (LAYER + 16)}
    mle = QSharpClassifier.from_causal_lm(lm, ClassifierSpec("V", "mle", num_atoms=3), init_mode="random", seed=0)
    assert classifier_step_costs(mle, top_k=5, batch_size=3) == {"macs": 6 * LAYER + 5 * 3 * 16,
                                                                 "bytes": 4 * (LAYER + 3 * 16)}
    floors = guidance_floors(ref, v, top_k=5, batch_size=3)
    assert floors["reference_macs"] == ref_macs and floors["reference_bytes"] == 4 * ref_macs
    assert floors["limit"] == pytest.approx(1 + (6 * 1920 + 80) / 5440)  # 3.147
    assert floors["memory_limit"] == pytest.approx(1 + (1920 + 16) / 5440)  # 1.356
    assert guidance_floors(ref, q, top_k=5, batch_size=3)["limit"] == pytest.approx(1 + 2000 / 5440)


def llama_layer_macs(config: dict) -> int:
    """q, k, v, o and MLP weights of one Llama layer, from its config.json."""
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    return hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * mlp


def test_guidance_overhead_reports_q_and_v():
    results = run_json("guidance_overhead.py", "--repeats", "1", "--max_new_tokens", "4", "--batch_size", "2",
                       *TINY, *ONE_THREAD)
    assert [r["classifier_type"] for r in results] == ["Q", "V"]
    for r in results:
        assert r["ratio"] > 0 and 1 < r["memory_limit"] < 2
        assert r["limit"] == pytest.approx(1 + r["classifier_macs"] / r["reference_macs"], abs=1e-4)
        assert r["steps"] == [4, 4] and r["steps_range"] == [4, 4]
        assert 0 < r["classifier_share"] < r["processor_share"]
        assert r["models"] == "random" and r["dtype"] == "float32"
    q, v = results
    assert 1 < q["limit"] < 2 < v["limit"]  # V reads 1 + top_k tokens per row and step


def test_guidance_overhead_on_a_loaded_pair(tiny_dir):
    ref_dir, classifier_dir = tiny_dir() / "ref", tiny_dir() / "classifier"
    results = run_json("guidance_overhead.py", "--repeats", "1", "--max_new_tokens", "3", "--batch_size", "2",
                       "--top_k", "4", *ONE_THREAD, "--ref_model_id", str(ref_dir),
                       "--classifier_model_id", str(classifier_dir))
    ref, lm = (json.loads((d / "config.json").read_text()) for d in (ref_dir, classifier_dir))
    ref_macs = ref["num_hidden_layers"] * llama_layer_macs(ref) + ref["vocab_size"] * ref["hidden_size"]
    backbone = lm["num_hidden_layers"] * llama_layer_macs(lm)
    head = 4 * lm["hidden_size"]
    assert [r["classifier_type"] for r in results] == ["Q", "V"]
    q, v = results
    assert q["reference_macs"] == v["reference_macs"] == ref_macs
    assert q["classifier_macs"] == backbone + head and v["classifier_macs"] == 5 * backbone + head
    assert q["classifier_bytes"] == 4 * (backbone + 2 * head)  # batch 2 x top_k 4 gathered rows
    assert v["classifier_bytes"] == 4 * (backbone + lm["hidden_size"])
    assert 1 < v["memory_limit"] < v["limit"] and q["memory_limit"] > 1
    for r in results:
        assert r["ratio"] > 0
        assert 1 <= r["steps_range"][0] <= r["steps_range"][1] <= 3
        assert r["models"] == f"{ref_dir} + {classifier_dir}" and r["device"] == "cpu"


def test_guidance_overhead_wants_both_model_ids():
    with pytest.raises(SystemExit) as exit_info:
        guidance_overhead.parse_args(["--ref_model_id", "some/ref"])
    assert exit_info.value.code == 2
    args = guidance_overhead.parse_args([])
    assert args.ref_model_id is None and args.classifier_model_id is None and args.dtype == "float32"


def test_eval_kl_online_equals_two_pass():
    (result,) = run_json("eval_kl.py", "--repeats", "1", "--num_problems", "4", "--batch_size", "2",
                         "--max_new_tokens", "6", "--vocab_size", "0", *TINY, *ONE_THREAD)
    assert result["speedup"] > 0
    assert result["max_abs_diff"] <= 1e-4
    assert result["kl_mean"] > 0


@pytest.mark.parametrize("eta", ["0", "10"])
def test_collect_throughput_counts_every_file(eta):
    (result,) = run_json("collect_throughput.py", "--repeats", "1", "--num_problems", "4", "--num_samples", "1",
                         "--batch_size", "2", "--max_new_tokens", "6", "--eta", eta, *ONE_THREAD)
    assert result["problems_per_min"] > 0 and result["num_problems"] == 4
    assert result["tokens_per_s"] > 0 and 4 <= result["tokens_per_round"] <= 2 * 4 * 6  # roll-in + roll-out


def test_collect_throughput_runs_engines_side_by_side():
    """Two engines in one run: a result each, on the same problems, then each one's speed-up over the first."""
    continuous, generate, speedup = run_json("collect_throughput.py", "--repeats", "1", "--num_problems", "3",
                                             "--num_samples", "1", "--batch_size", "2", "--max_new_tokens", "5",
                                             "--engine", "continuous", "generate", *ONE_THREAD)
    assert (continuous["engine"], generate["engine"]) == ("continuous", "generate")
    assert continuous["load_seconds"] > 0 and generate["load_seconds"] > 0
    assert speedup["over"] == "continuous"
    assert speedup["speedup"]["generate"]["tokens_per_s"] == round(generate["tokens_per_s"] / continuous["tokens_per_s"], 2)


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_collect_throughput_profile_splits_the_decode_time(engine):
    (result,) = run_json("collect_throughput.py", "--repeats", "1", "--warmup", "0", "--num_problems", "3",
                         "--num_samples", "1", "--batch_size", "2", "--max_new_tokens", "4", "--eta", "10",
                         "--profile", "1", "--engine", engine, *ONE_THREAD)
    profile = result["profile"]
    shares = [profile[k] for k in ("reference_decode", "reference_prefill", "processor", "top_p", "rest")]
    # every part is timed, and no part is counted twice (the rest stays positive)
    assert all(0 < share < 1 for share in shares)
    # 3 roll-ins and at most 3 roll-outs prefilled, at most one prefill each; every other
    # forward is one decode step
    assert 2 <= profile["reference_prefill_calls"] <= 6 and profile["reference_decode_calls"] >= 3


def test_collect_throughput_on_a_loaded_pair_with_chat_template(tiny_dir):
    (result,) = run_json("collect_throughput.py", "--repeats", "1", "--num_problems", "2", "--num_samples", "1",
                         "--batch_size", "2", "--max_new_tokens", "5", "--eta", "10", "--use_chat_template", "1",
                         *ONE_THREAD, "--ref_model_id", str(tiny_dir() / "ref"),
                         "--classifier_model_id", str(tiny_dir() / "classifier"))
    assert result["problems_per_min"] > 0 and result["use_chat_template"] == 1
    assert result["tokens_per_s"] > 0 and 2 <= result["tokens_per_round"] <= 2 * 2 * 5
    assert result["models"] == str(tiny_dir() / "ref")
