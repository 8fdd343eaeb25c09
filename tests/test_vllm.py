"""``--engine vllm`` (``utils.decoding.vllm_engine``): vLLM's rows as the processor follows them
(always), and, with vLLM installed, greedy float32 equality with ``generate()`` unguided and
Q/V guided, the KL against the continuous engine's, and seeded samples independent of their
batch mates. One vLLM engine for the module (eager, 1 GiB of KV cache)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from utils.decoding.requests import Request
from utils.decoding.vllm_engine import HOST_KEY, VLLMRows

BUDGET = 20
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -r requirements-vllm.txt)")


# ----------------------------------------------------------------------------- rows (no vLLM needed)


def added(index, request_id, prompt, outputs):
    return index, SimpleNamespace(extra_args={HOST_KEY: request_id}), prompt, outputs


def update(removed=(), add=(), moved=()):
    return SimpleNamespace(removed=list(removed), added=list(add), moved=list(moved))


def move(first, second, kind):
    return first, second, SimpleNamespace(name=kind)


def test_rows_follow_joins_moves_swaps_and_partial_prefills():
    """The rows the Q# processor follows, in vLLM's order: a row stays when it emitted one token
    since it was read, joins afresh otherwise (new, or after a step that emitted nothing), and
    moves and swaps carry a request to its new index; unguided requests are not followed."""
    rows = VLLMRows()
    a_out, b_out, c_out = [], [], []
    rows.update(update(add=[added(0, "a", [1, 2], a_out), added(1, "b", [3], b_out),
                            (2, SimpleNamespace(extra_args=None), [9], [])]))
    order, keep, new_ids, joins, join_rows = rows.plan()
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1], [], [], [[1, 2], [3]], [0, 1])
    a_out.append(10)  # b's step was a partial prefill: no token
    order, keep, new_ids, joins, join_rows = rows.plan()
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1], [0], [10], [[3]], [1])
    a_out.append(11)
    b_out.append(20)
    rows.update(update(removed=[2], add=[added(2, "c", [5, 6, 7], c_out)], moved=[move(0, 1, "SWAP")]))
    order, keep, new_ids, joins, join_rows = rows.plan()  # b now at 0, a at 1; c joins
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1, 2], [1, 0], [20, 11], [[5, 6, 7]], [2])
    assert rows.followed == ["b", "a", "c"]
    b_out.append(21)
    c_out.append(30)
    rows.update(update(removed=[1], moved=[move(2, 1, "UNIDIRECTIONAL")]))  # a ends, c moves into its slot
    order, keep, new_ids, joins, join_rows = rows.plan()
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1], [0, 2], [21, 30], [], [])
    assert rows.followed == ["b", "c"]


# ----------------------------------------------------------------------------- a vLLM engine


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory):
    """A tiny reference and classifier vLLM can serve (head dimension 32), and the backend."""
    from utils.decoding.vllm_engine import VLLMBackend
    from utils.demo.tiny_models import build_model, build_tokenizer
    from utils.models import load_causal_lm, load_tokenizer

    root = tmp_path_factory.mktemp("vllm_models")
    tokenizer = build_tokenizer()
    for name, (hidden, layers, heads) in {"ref": (64, 4, 2), "classifier": (32, 2, 1)}.items():
        build_model("llama", tokenizer, hidden, layers, heads, seed=3).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tokenizer = load_tokenizer(str(root / "ref"))
    backend = VLLMBackend(str(root / "ref"), tokenizer, dtype="float32", device="cpu", batch_size=4, temperature=0.0,
                          vllm_settings={"enforce_eager": True, "kv_cache_gib": 1})
    backend.load()
    return SimpleNamespace(root=root, tokenizer=tokenizer, backend=backend,
                           ref=load_causal_lm(str(root / "ref"), "float32", "cpu"))


@pytest.fixture(scope="module")
def prompts(vllm_pair):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, len(vllm_pair.tokenizer), (n,), generator=g).tolist() for n in (3, 15, 7, 11, 4, 9, 21)]


def processor_for(pair, classifier_type, **kwargs):
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.decoding.guidance import QSharpLogitsProcessor

    if classifier_type is None:
        return None
    classifier = QSharpClassifier.from_causal_lm(str(pair.root / "classifier"), ClassifierSpec(classifier_type, "bce"),
                                                 init_mode="random", dtype="float32", seed=1).eval()
    return QSharpLogitsProcessor(classifier, eta=3.0, top_k=5, pad_token_id=pair.tokenizer.pad_token_id, **kwargs)


def run(backend, requests, processor, temperature=0.0, top_p=1.0):
    backend.temperature, backend.top_p = temperature, top_p
    done = {}
    backend.run(requests, lambda r: done.__setitem__(r.tag, r), processor)
    return done


@needs_vllm
@pytest.mark.parametrize("classifier_type", [None, "Q", "V"])
def test_greedy_equals_generate(vllm_pair, prompts, classifier_type):
    """Temperature 0, float32: token for token ``generate()``'s output, unguided and Q/V guided,
    prompts of mixed lengths joining a batch of 4."""
    from utils.decoding.generate import generate_responses
    from utils.models import left_pad

    pair, pad = vllm_pair, vllm_pair.tokenizer.pad_token_id
    ids, lengths = generate_responses(pair.ref, left_pad(prompts, pad), pair.backend.stop_ids, pad, BUDGET, temperature=0,
                                      processor=processor_for(pair, classifier_type))
    expected = [ids[i, : lengths[i]].tolist() for i in range(len(prompts))]
    requests = [Request(p, BUDGET, (0, 0, i, "eval"), guided=True, tag=i) for i, p in enumerate(prompts)]
    done = run(pair.backend, requests, processor_for(pair, classifier_type, kl_temperature=1.0))
    assert [done[i].tokens for i in range(len(prompts))] == expected
    if classifier_type is not None:
        assert all(len(done[i].token_kl) == len(done[i].tokens) for i in done)


@needs_vllm
def test_kl_equals_the_continuous_engine(vllm_pair, prompts):
    """The KL recorded inside vLLM equals the continuous engine's on the same (greedy) tokens."""
    from utils.decoding.engine import ContinuousBackend

    pair = vllm_pair
    requests = lambda: [Request(p, BUDGET, (0, 0, i, "eval"), guided=True, tag=i) for i, p in enumerate(prompts)]  # noqa: E731
    ours = run(pair.backend, requests(), processor_for(pair, "V", kl_temperature=1.0))
    engine = ContinuousBackend.from_model(pair.ref, pair.tokenizer, batch_size=3, temperature=0.0)
    theirs = {}
    engine.run(requests(), lambda r: theirs.__setitem__(r.tag, r), processor_for(pair, "V", kl_temperature=1.0))
    for i in range(len(prompts)):
        assert ours[i].tokens == theirs[i].tokens
        torch.testing.assert_close(torch.tensor(ours[i].token_kl), torch.tensor(theirs[i].token_kl), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(ours[i].token_kl_before_top_p),
                                   torch.tensor(theirs[i].token_kl_before_top_p), atol=1e-5, rtol=0)


@needs_vllm
def test_sample_does_not_depend_on_batch_mates(vllm_pair, prompts):
    """Temperature 0.8, top-p 0.9, V-guided: a request's tokens are the same alone and among others."""
    pair = vllm_pair
    target = lambda: Request(prompts[2], BUDGET, (5, 1, 2, "roll_in"), guided=True, tag="target")  # noqa: E731
    alone = run(pair.backend, [target()], processor_for(pair, "V"), 0.8, 0.9)["target"]
    others = [Request(p, BUDGET, (5, 1, i, "roll_in"), guided=True, tag=i) for i, p in enumerate(prompts) if i != 2]
    among = run(pair.backend, others[:3] + [target()] + others[3:], processor_for(pair, "V"), 0.8, 0.9)["target"]
    assert len(alone.tokens) > 3 and among.tokens == alone.tokens


@needs_vllm
def test_greedy_equals_generate_with_chunked_prefill(vllm_pair, prompts):
    """Prefills chunked at 24 tokens (a row whose step was a partial prefill emits nothing and is
    read again): V-guided greedy output still equals ``generate()``'s, and the KL has one value per token."""
    from utils.decoding.generate import generate_responses
    from utils.decoding.vllm_engine import VLLMBackend
    from utils.models import left_pad

    pair, pad = vllm_pair, vllm_pair.tokenizer.pad_token_id
    backend = VLLMBackend(str(pair.root / "ref"), pair.tokenizer, dtype="float32", device="cpu", batch_size=4,
                          temperature=0.0, vllm_settings={"enforce_eager": True, "kv_cache_gib": 1,
                                                          "max_num_batched_tokens": 24})
    ids, lengths = generate_responses(pair.ref, left_pad(prompts, pad), pair.backend.stop_ids, pad, BUDGET, temperature=0,
                                      processor=processor_for(pair, "V"))
    requests = [Request(p, BUDGET, (0, 0, i, "eval"), guided=True, tag=i) for i, p in enumerate(prompts)]
    done = run(backend, requests, processor_for(pair, "V", kl_temperature=1.0))
    assert [done[i].tokens for i in range(len(prompts))] == [ids[i, : lengths[i]].tolist() for i in range(len(prompts))]
    assert all(len(r.token_kl) == len(r.tokens) for r in done.values())


@needs_vllm
def test_collection_restarts_to_the_same_files_and_keeps_its_engine(vllm_pair, tmp_path):
    """``collect_training_data.py --engine vllm``, guided (eta 5): files deleted and collected again
    come back byte for byte; the folder refuses another engine."""
    from tests.helpers.stages import stage
    from utils.demo.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(tmp_path / "data", 6, 0, seed=0)
    out = tmp_path / "collected"
    argv = ["--is_first_round", "1", "--end_index", "6", "--num_samples", "2", "--ref_model_id", str(vllm_pair.root / "ref"),
            "--classifier_model_id", str(vllm_pair.root / "classifier"), "--data_path", str(paths["train"]),
            "--train_eval_save_path", str(paths["train_eval"]), "--use_chat_template", "0", "--max_new_tokens", "16",
            "--temperature", "0.8", "--top_p", "0.9", "--eta", "5", "--dtype", "float32", "--batch_size", "4",
            "--output_dir", str(out), "--vllm_enforce_eager", "1", "--vllm_kv_cache_gib", "1"]
    stage(tmp_path, "collect_training_data.py", *argv, "--engine", "vllm")
    files = {path.name: path.read_bytes() for path in sorted(out.glob("*_r*.json"))}
    assert len(files) == 12
    for name in ("0_r0.json", "3_r1.json", "5_r0.json"):
        (out / name).unlink()
    stage(tmp_path, "collect_training_data.py", *argv, "--engine", "vllm")
    assert {path.name: path.read_bytes() for path in sorted(out.glob("*_r*.json"))} == files
    with pytest.raises(AssertionError, match="engine"):
        stage(tmp_path, "collect_training_data.py", *argv, "--engine", "continuous")


@needs_vllm
def test_bad_input_is_one_line(vllm_pair, tmp_path, prompts):
    """A budget beyond the model's length, and a model vLLM cannot serve (a head dimension of 16),
    each end with one ValueError line."""
    from utils.decoding.vllm_engine import VLLMBackend
    from utils.demo.tiny_models import write_tiny_models

    too_long = [Request(prompts[0], 5000, (0, 0, 0, "eval"), tag=0)]
    with pytest.raises(ValueError, match="--max_new_tokens 5000 exceeds the 2048 tokens"):
        run(vllm_pair.backend, too_long, None)
    tiny = write_tiny_models(tmp_path / "tiny")  # head dimension 16
    backend = VLLMBackend(str(tiny["ref"]), vllm_pair.tokenizer, dtype="float32", device="cpu", batch_size=2,
                          temperature=0.0, vllm_settings={"enforce_eager": True, "kv_cache_gib": 1})
    with pytest.raises(ValueError) as caught:
        backend.load()
        run(backend, [Request(prompts[0], 4, (0, 0, 0, "eval"), tag=0)], None)
    assert "vLLM" in str(caught.value) and "\n" not in str(caught.value)


@needs_vllm
def test_eval_sweep_on_vllm(vllm_pair, tmp_path):
    """``eval_ckpt.py --engine vllm`` over etas 0 and 3 with one engine: every sample file, the KL
    recorded per token (about -log(nucleus mass) per token at eta 0 with top-p 0.9)."""
    import json

    from tests.helpers.stages import stage
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.demo.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(tmp_path / "data", 0, 6, seed=0)
    ckpt = tmp_path / "exp" / "ckpt_0"
    classifier = QSharpClassifier.from_causal_lm(str(vllm_pair.root / "classifier"), ClassifierSpec("V", "bce"),
                                                 init_mode="random", dtype="float32", seed=1)
    classifier.save_pretrained(ckpt, tokenizer=vllm_pair.tokenizer)
    (tmp_path / "exp" / "args.json").write_text(json.dumps({
        "ref_model_id": str(vllm_pair.root / "ref"), "classifier_model_id": str(vllm_pair.root / "classifier"),
        "classifier_type": "V", "loss_type": "bce", "inference_mode": "bernoulli", "use_chat_template": 0,
        "dtype": "float32", "original_problems_path": str(paths["test"]), "train_eval_save_path": str(paths["test_eval"])}))
    out = stage(tmp_path, "eval_ckpt.py", "--classifier_ckpt_path", str(ckpt), "--eta", "0", "3", "--num_samples", "2",
                "--max_new_tokens", "12", "--temperature", "0.8", "--top_p", "0.9", "--batch_size", "4",
                "--engine", "vllm", "--vllm_enforce_eager", "1", "--vllm_kv_cache_gib", "1")
    assert out.count("eval [eta_") == 2
    for eta in ("0.0", "3.0"):
        samples = [json.loads(p.read_text()) for p in (ckpt / f"individual_eval_inference_eta_{eta}_top_k_20_temp_0.8").glob("*_r*.json")]
        assert len(samples) == 12
        assert all(len(s["token_kl"]) == s["num_response_tokens"] and s["traj_kl"] > 0 for s in samples)
