"""The vLLM checks of tests/test_vllm.py, run in a process of their own: vLLM started in a process
changes it for good (it initialises ``torch.distributed`` and sets environment variables such as
``LD_PRELOAD`` and ``LOCAL_WORLD_SIZE``), so it never runs inside the test process.

    python -m tests.helpers.vllm_checks MODELS_DIR OUT_JSON          # the tiny pair
    python -m tests.helpers.vllm_checks REAL_DIR OUT_JSON real       # SmolLM2-135M-Instruct and its 6-layer cut

``MODELS_DIR`` holds ``ref`` and ``classifier`` (:func:`write_vllm_pair`), ``REAL_DIR`` the
folders of ``utils.real_models``; ``OUT_JSON`` gets the tokens and KL of each scenario, for the
tests to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

BUDGET = 20


def write_vllm_pair(root: Path) -> None:
    """A tiny reference and classifier vLLM's CPU attention takes (head dimension 32)."""
    from utils.demo.tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    for name, (hidden, layers, heads) in {"ref": (64, 4, 2), "classifier": (32, 2, 1)}.items():
        build_model("llama", tokenizer, hidden, layers, heads, seed=3).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


def prompts_for(tokenizer) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, len(tokenizer), (n,), generator=g).tolist() for n in (3, 15, 7, 11, 4, 9, 21)]


def processor_for(root: Path, tokenizer, classifier_type, classifier="classifier", **kwargs):
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.decoding.guidance import QSharpLogitsProcessor

    if classifier_type is None:
        return None
    classifier = QSharpClassifier.from_causal_lm(str(root / classifier), ClassifierSpec(classifier_type, "bce"),
                                                 init_mode="random", dtype="float32", seed=1).eval()
    return QSharpLogitsProcessor(classifier, eta=3.0, top_k=5, pad_token_id=tokenizer.pad_token_id, **kwargs)


def run(backend, requests, processor, temperature=0.0, top_p=1.0) -> dict:
    backend.temperature, backend.top_p = temperature, top_p
    done = {}
    backend.run(requests, lambda r: done.__setitem__(r.tag, r), processor)
    return done


def main(root: Path, out: Path) -> None:
    from utils.decoding.engine import ContinuousBackend
    from utils.decoding.generate import generate_responses
    from utils.decoding.requests import Request
    from utils.decoding.vllm_engine import VLLMBackend, _v2_runner
    from utils.demo.tiny_models import write_tiny_models
    from utils.models import left_pad, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(root / "ref"))
    ref = load_causal_lm(str(root / "ref"), "float32", "cpu")
    prompts, pad = prompts_for(tokenizer), tokenizer.pad_token_id
    settings = {"dtype": "float32", "device": "cpu", "batch_size": 4, "temperature": 0.0}
    backend = VLLMBackend(str(root / "ref"), tokenizer, vllm_settings={"enforce_eager": True, "kv_cache_gib": 1}, **settings)
    requests = lambda: [Request(p, BUDGET, (0, 0, i, "eval"), guided=True, tag=i) for i, p in enumerate(prompts)]  # noqa: E731
    tokens = lambda done: [done[i].tokens for i in range(len(prompts))]  # noqa: E731
    results = {}

    def generated(classifier_type):
        ids, lengths = generate_responses(ref, left_pad(prompts, pad), backend.stop_ids, pad, BUDGET, temperature=0,
                                          processor=processor_for(root, tokenizer, classifier_type))
        return [ids[i, : lengths[i]].tolist() for i in range(len(prompts))]

    results["v2_runner"] = {}  # before an engine starts: vLLM then caches its environment
    for setting in ("0", "1", None):  # the runner (and so the processor interface) vLLM will use
        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
        if setting is not None:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = setting
        results["v2_runner"][str(setting)] = _v2_runner()
    os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    backend.load()
    results["aot_compile"] = os.environ.get("VLLM_USE_AOT_COMPILE")  # off on a CPU: vLLM cannot reload its AOT cache
    for classifier_type in (None, "Q", "V"):  # greedy, against generate()
        done = run(backend, requests(), processor_for(root, tokenizer, classifier_type, kl_temperature=1.0))
        results[f"greedy_{classifier_type}"] = {"vllm": tokens(done), "generate": generated(classifier_type),
                                                "kl_lengths": [len(done[i].token_kl) for i in range(len(prompts))]}
    done = run(backend, requests(), processor_for(root, tokenizer, "V", kl_temperature=1.0))  # KL, against the engine
    engine = ContinuousBackend.from_model(ref, tokenizer, batch_size=3, temperature=0.0)
    theirs = {}
    engine.run(requests(), lambda r: theirs.__setitem__(r.tag, r), processor_for(root, tokenizer, "V", kl_temperature=1.0))
    results["kl"] = {name: [[getattr(d[i], field) for i in range(len(prompts))] for field in
                            ("tokens", "token_kl", "token_kl_before_top_p")] for name, d in (("vllm", done), ("engine", theirs))}
    target = lambda: Request(prompts[2], BUDGET, (5, 1, 2, "roll_in"), guided=True, tag="target")  # noqa: E731
    others = [Request(p, BUDGET, (5, 1, i, "roll_in"), guided=True, tag=i) for i, p in enumerate(prompts) if i != 2]
    results["batch_mates"] = {
        "alone": run(backend, [target()], processor_for(root, tokenizer, "V"), 0.8, 0.9)["target"].tokens,
        "among": run(backend, others[:3] + [target()] + others[3:], processor_for(root, tokenizer, "V"), 0.8,
                     0.9)["target"].tokens,
    }
    try:
        run(backend, [Request(prompts[0], 5000, (0, 0, 0, "eval"), tag=0)], None)
    except ValueError as error:
        results["too_long"] = str(error)
    chunked = VLLMBackend(str(root / "ref"), tokenizer, **settings,
                          vllm_settings={"enforce_eager": True, "kv_cache_gib": 1, "max_num_batched_tokens": 24})
    done = run(chunked, requests(), processor_for(root, tokenizer, "V", kl_temperature=1.0))
    results["chunked"] = {"vllm": tokens(done), "generate": generated("V"),
                          "kl_lengths": [len(done[i].token_kl) for i in range(len(prompts))]}
    try:  # a KV cache larger than the machine's free memory
        run(VLLMBackend(str(root / "ref"), tokenizer, **settings, vllm_settings={"enforce_eager": True, "kv_cache_gib": 4096}),
            [Request(prompts[0], 4, (0, 0, 0, "eval"), tag=0)], None)
    except ValueError as error:
        results["kv_too_big"] = str(error)
    head16 = write_tiny_models(root / "head16")["ref"]  # a head dimension vLLM's CPU attention does not take
    try:
        run(VLLMBackend(str(head16), tokenizer, **settings, vllm_settings={"enforce_eager": True, "kv_cache_gib": 1}),
            [Request(prompts[0], 4, (0, 0, 0, "eval"), tag=0)], None)
    except ValueError as error:
        results["unservable"] = str(error)
    results["v2_runner_engine"] = backend.llm.llm_engine.vllm_config.use_v2_model_runner
    out.write_text(json.dumps(results))


def real(root: Path, out: Path) -> None:
    """Greedy float32 on the real pair: vLLM against ``generate()``, unguided and Q/V guided, three
    chat prompts of different lengths (48 new tokens)."""
    from utils.decoding.generate import generate_responses
    from utils.decoding.requests import Request
    from utils.decoding.vllm_engine import VLLMBackend
    from utils.demo.real_models import CLASSIFIER_NAME, REF_NAME
    from utils.models import load_causal_lm, load_tokenizer, tokenize_prompts

    budget = 48
    tokenizer = load_tokenizer(str(root / REF_NAME))
    batch = tokenize_prompts(tokenizer, REAL_PROMPTS, use_chat_template=True)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    ref = load_causal_lm(str(root / REF_NAME), "float32", "cpu")
    backend = VLLMBackend(str(root / REF_NAME), tokenizer, dtype="float32", device="cpu", batch_size=4, temperature=0.0,
                          vllm_settings={"enforce_eager": True, "kv_cache_gib": 1})
    backend.load()
    results = {}
    for classifier_type in (None, "Q", "V"):
        processor = lambda: processor_for(root, tokenizer, classifier_type, CLASSIFIER_NAME, kl_temperature=1.0)  # noqa: E731
        done = run(backend, [Request(p, budget, (0, 0, i, "eval"), guided=True, tag=i) for i, p in enumerate(prompts)],
                   processor())
        ids, lengths = generate_responses(ref, batch, backend.stop_ids, tokenizer.pad_token_id, budget,
                                          temperature=0, processor=processor())
        results[f"greedy_{classifier_type}"] = {"vllm": [done[i].tokens for i in range(len(prompts))],
                                                "generate": [ids[i, : lengths[i]].tolist() for i in range(len(prompts))]}
    out.write_text(json.dumps(results))


REAL_PROMPTS = [  # chat prompts of different lengths, as the stage scripts write them
    "Problem:\n\nWhat is 2 + 3? Write your answer inside \\boxed{}.\n\nSolution:",
    "Problem:\n\nNatalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Write your answer inside \\boxed{}.\n\nSolution:",
    "Problem:\n\nx = 6 and y = 4. Compute x + y. Write your answer inside \\boxed{}.\n\nSolution:",
]


if __name__ == "__main__":
    (real if sys.argv[3:] == ["real"] else main)(Path(sys.argv[1]), Path(sys.argv[2]))
