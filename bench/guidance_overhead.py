"""Cost of guided decoding relative to plain sampling from the reference model.

    python bench/guidance_overhead.py [--json] [--ref_hidden 64 --ref_layers 24 --classifier_hidden 64 --classifier_layers 3]
    python bench/guidance_overhead.py [--json] --ref_model_id REF --classifier_model_id LM [--dtype float32]
    python bench/guidance_overhead.py [--json] --ref_model_id REF --classifier_model_id LM --engine vllm

Same prompts (``--batch_size`` 16, ``--max_new_tokens`` 64, temperature 0.8, top-p 0.9,
one seed per call), same random Llama reference; a random classifier backbone with 1/8 of
the reference's per-token compute gets a random Q head and a random V head (``--top_k``
20, eta 10, bernoulli). The default pair has the same width and 1/8 of the layers, so the
classifier costs 1/8 whether arithmetic or the per-layer call overhead of eager PyTorch
dominates (at these sizes on a CPU, the latter). With ``--ref_model_id`` and
``--classifier_model_id`` (both or neither) a real pair is loaded instead (``--dtype``,
default float32; on the first GPU, else the CPU): the tokenizer is the reference's, the
prompts the same texts as user turns of its chat template (raw when it has none), the
classifier the backbone of the second LM with a random head (init_mode "random").
Each configuration runs once to warm up, then ``--repeats`` times, unguided
and guided interleaved (alternating which goes first); ``ratio`` is the median guided time
over the median unguided time, ``pair_ratio_median`` the median of the per-repeat ratios.
``steps`` are the generated lengths of the warm-up calls (unguided, guided) and
``steps_range`` the least and most of the timed calls: a real pair's responses can end
early, and a guided call that stops at another step does other work.

Floors, per decode step (after the prompt), counted from the weight shapes (2-D weights:
attention q, k, v, o and MLP projections of every layer; attention-score FLOPs, norms and
embedding lookups left out; ``bench.common.guidance_floors``). With ``R`` the reference's
multiply-adds per token (decoder layers + ``lm_head``, vocab x hidden, counted also when
tied to the input embedding), ``B`` the classifier backbone's (decoder layers only: the
head reads its hidden states, the LM's own head never runs), ``k`` = ``--top_k``, ``A``
the head's outputs per token (1 for bce) and ``H`` its hidden size:

- ``limit`` (compute) = 1 + C / R, with C = B + k * A * H for Q (one new token per row,
  then only the k head rows of the candidates) and C = (1 + k) * B + k * A * H for V
  (the processor feeds the new token and the k candidates, 1 + k tokens per row, through
  the backbone in one forward, and the head runs on the k candidates' hidden states).
- ``memory_limit`` (weights read) = 1 + classifier bytes / reference bytes, each read once
  per step whatever k: the backbone + the A * H V head, or the backbone + the gathered Q
  head rows (at most min(vocab, batch * k) * A * H), against the reference's weights with
  its lm_head once.

Neither floor bounds every run: a decode bound by arithmetic cannot beat ``limit``, one bound
by reading weights cannot beat ``memory_limit``. A small-batch decode is mostly the latter
(or per-call overhead), and the V head's 1 + k tokens per row go through the backbone in one
wide forward that uses the hardware better than the reference's one token per row, so
``ratio`` can fall well below a V head's ``limit``.

``--engine vllm`` (a loaded pair only; ``pip install -r requirements-vllm.txt``) decodes the same
prompts in vLLM instead of ``generate()``: one engine (compiled unless ``--vllm_enforce_eager 1``)
for every call, each request seeded from its own stream as in collection, the Q# processor
inside vLLM's sampler. The models are loaded once more with transformers, for the floors.
Responses end at other steps guided and unguided, so vLLM's ``ratio`` is taken per generated
token (``token_ratio``: guided seconds per token over unguided seconds per token) and
``ratio`` is reported beside it; ``processor_share`` is then the time inside the processor's
step (``utils.decoding.vllm_engine.guide``).

``--json`` prints one line per head: ``{"classifier_type", "ratio", "limit", "memory_limit", ...}``.

Where the extra time goes (medians over the guided runs, as shares of the unguided time):
``classifier_share`` is the classifier's own forward passes, ``processor_share`` the whole
logits processor (forward included: top-k, head rows, offsets, scatter, stop checks).
``ratio - 1 - processor_share`` is what guided steps cost outside the processor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_pair_flags, add_run_flags, add_size_flags, build_pair, chat_prompt_batch, elapsed, guidance_floors, load_pair,
    prompt_batch, set_threads, sync,
)
from utils.classifier import ClassifierSpec, QSharpClassifier  # noqa: E402
from utils.decoding.generate import generate_responses  # noqa: E402
from utils.decoding.guidance import QSharpLogitsProcessor  # noqa: E402
from utils.models import get_stop_ids  # noqa: E402


def timed(fn, totals: dict, key: str, device="cpu"):
    """``fn`` that adds its wall time (the GPU's queued work included) to ``totals[key]``."""
    def wrapper(*a, **kw):
        sync(device)
        start = time.perf_counter()
        out = fn(*a, **kw)
        sync(device)
        totals[key] += time.perf_counter() - start
        return out
    return wrapper


def main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.engine == "vllm":
        return main_vllm(args)
    if args.ref_model_id is None:
        tokenizer, ref, lm = build_pair(args)
        batch = prompt_batch(tokenizer, args.batch_size)
    else:
        tokenizer, ref, lm = load_pair(args.ref_model_id, args.classifier_model_id, args.dtype)
        batch = chat_prompt_batch(tokenizer, args.batch_size, ref.device)
    device = ref.device
    stop_ids = get_stop_ids(ref, tokenizer)

    def sample(processor):
        torch.manual_seed(args.seed)
        with torch.no_grad():
            ids, _ = generate_responses(
                ref, batch, stop_ids, tokenizer.pad_token_id, args.max_new_tokens, args.temperature, args.top_p, processor
            )
        sync(device)
        return ids.shape[1]

    for classifier_type in args.heads:
        spec = ClassifierSpec(classifier_type, "bce")
        classifier = QSharpClassifier.from_causal_lm(lm, spec, init_mode="random", seed=args.seed).eval()
        totals = {"processor": 0.0, "classifier": 0.0}  # seconds inside each, for the current call
        classifier.hidden_states = timed(classifier.hidden_states, totals, "classifier", device)
        timed_class = type("TimedProcessor", (QSharpLogitsProcessor,),
                           {"__call__": timed(QSharpLogitsProcessor.__call__, totals, "processor", device)})
        processor = timed_class(classifier, args.eta, args.top_k, pad_token_id=tokenizer.pad_token_id)
        steps = (sample(None), sample(processor))  # warm-up
        unguided, guided, inside, lengths = [], [], {"processor": [], "classifier": []}, []
        for repeat in range(args.repeats):  # alternate the order so that a slow drift cancels
            for guided_run in ((False, True) if repeat % 2 == 0 else (True, False)):
                totals.update(processor=0.0, classifier=0.0)
                seconds = elapsed(lambda: lengths.append(sample(processor if guided_run else None)))
                (guided if guided_run else unguided).append(seconds)
                if guided_run:
                    for key in inside:
                        inside[key].append(totals[key])
        unguided_s, guided_s = statistics.median(unguided), statistics.median(guided)
        floors = guidance_floors(ref, classifier, args.top_k, args.batch_size)
        result = {
            "classifier_type": classifier_type,
            "ratio": round(guided_s / unguided_s, 4),
            "limit": round(floors["limit"], 4),
            "memory_limit": round(floors["memory_limit"], 4),
            "pair_ratio_median": round(statistics.median(g / u for g, u in zip(guided, unguided)), 4),
            "classifier_share": round(statistics.median(inside["classifier"]) / unguided_s, 4),
            "processor_share": round(statistics.median(inside["processor"]) / unguided_s, 4),
            "unguided_s": round(unguided_s, 4),
            "guided_s": round(guided_s, 4),
            "steps": list(steps),
            "steps_range": [min(lengths), max(lengths)],
            **{key: floors[key] for key in ("reference_macs", "classifier_macs", "reference_bytes", "classifier_bytes")},
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "models": "random" if args.ref_model_id is None else f"{args.ref_model_id} + {args.classifier_model_id}",
            "dtype": str(ref.dtype).removeprefix("torch."),
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{classifier_type}: guided {guided_s:.3f} s / unguided {unguided_s:.3f} s = {result['ratio']:.3f}x "
                  f"(compute floor {result['limit']:.3f}x, memory floor {result['memory_limit']:.3f}x; "
                  f"{args.batch_size} x {steps[1]} tokens); classifier forward "
                  f"{result['classifier_share']:.1%}, whole processor {result['processor_share']:.1%} of unguided", flush=True)


def main_vllm(args: argparse.Namespace) -> None:
    """The same comparison with the reference decoded by vLLM (``--engine vllm``)."""
    from utils.decoding import vllm_engine
    from utils.decoding.requests import Request

    tokenizer, ref, lm = load_pair(args.ref_model_id, args.classifier_model_id, args.dtype, device="cpu")
    batch = chat_prompt_batch(tokenizer, args.batch_size)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    backend = vllm_engine.VLLMBackend(args.ref_model_id, tokenizer, dtype=args.dtype, device="cpu", batch_size=args.batch_size,
                                      temperature=args.temperature, top_p=args.top_p,
                                      vllm_settings={"enforce_eager": bool(args.vllm_enforce_eager),
                                                     "kv_cache_gib": args.vllm_kv_cache_gib})
    totals = {"processor": 0.0, "classifier": 0.0}
    vllm_engine.guide = timed(vllm_engine.guide, totals, "processor")  # the processor's step, as vLLM's sampler calls it

    def sample(processor, call: int) -> tuple[float, int]:
        """Seconds and generated tokens of one call (a fresh seed per call, one stream per request)."""
        requests = [Request(p, args.max_new_tokens, (args.seed + call, 0, i, "roll_in"), guided=True, tag=i)
                    for i, p in enumerate(prompts)]
        tokens = []
        seconds = elapsed(lambda: backend.run(requests, lambda r: tokens.append(len(r.tokens)), processor))
        return seconds, sum(tokens)

    for classifier_type in args.heads:
        classifier = QSharpClassifier.from_causal_lm(lm, ClassifierSpec(classifier_type, "bce"), init_mode="random",
                                                     seed=args.seed).eval()
        classifier.hidden_states = timed(classifier.hidden_states, totals, "classifier")
        processor = QSharpLogitsProcessor(classifier, args.eta, args.top_k, pad_token_id=tokenizer.pad_token_id)
        sample(None, 0), sample(processor, 0)  # warm-up (the engine starts in the first)
        runs = {False: [], True: []}  # guided -> [(seconds, tokens, processor s, classifier s)]
        for repeat in range(args.repeats):
            for guided_run in ((False, True) if repeat % 2 == 0 else (True, False)):
                totals.update(processor=0.0, classifier=0.0)
                seconds, tokens = sample(processor if guided_run else None, 1 + repeat)
                runs[guided_run].append((seconds, tokens, totals["processor"], totals["classifier"]))
        median = lambda values: statistics.median(values)  # noqa: E731
        unguided_s, guided_s = median(r[0] for r in runs[False]), median(r[0] for r in runs[True])
        per_token = {g: median(r[0] / r[1] for r in runs[g]) for g in runs}
        floors = guidance_floors(ref, classifier, args.top_k, args.batch_size)
        result = {
            "engine": "vllm",
            "classifier_type": classifier_type,
            "token_ratio": round(per_token[True] / per_token[False], 4),
            "ratio": round(guided_s / unguided_s, 4),
            "limit": round(floors["limit"], 4),
            "memory_limit": round(floors["memory_limit"], 4),
            "classifier_share": round(median(r[3] / r[0] for r in runs[True]), 4),
            "processor_share": round(median(r[2] / r[0] for r in runs[True]), 4),
            "unguided_tokens_per_s": round(1 / per_token[False], 2),
            "guided_tokens_per_s": round(1 / per_token[True], 2),
            "tokens": {"unguided": [r[1] for r in runs[False]], "guided": [r[1] for r in runs[True]]},
            **{key: floors[key] for key in ("reference_macs", "classifier_macs", "reference_bytes", "classifier_bytes")},
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "top_k": args.top_k,
            "models": f"{args.ref_model_id} + {args.classifier_model_id}", "dtype": args.dtype,
            "enforce_eager": bool(args.vllm_enforce_eager), "threads": torch.get_num_threads(),
        }
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{classifier_type} (vLLM): guided {result['guided_tokens_per_s']} / unguided {result['unguided_tokens_per_s']} "
                  f"tokens/s: {result['token_ratio']:.3f}x time per token (compute floor {result['limit']:.3f}x, memory "
                  f"floor {result['memory_limit']:.3f}x); processor {result['processor_share']:.1%} of the guided time, "
                  f"classifier forward {result['classifier_share']:.1%}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; a model id without the other is refused (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--top_k", type=int, default=20, help="guided candidates per step")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (the README's runs use 0.8)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold (the README's runs use 0.9)")
    parser.add_argument("--eta", type=float, default=10.0, help="guidance strength")
    parser.add_argument("--heads", nargs="+", default=["Q", "V"], choices=["Q", "V"], help="classifier heads to time")
    parser.add_argument("--engine", choices=["generate", "vllm"], default="generate",
                        help="decode with generate() (default) or vLLM (a loaded pair only)")
    parser.add_argument("--vllm_enforce_eager", type=int, choices=[0, 1], default=0,
                        help="--engine vllm: 1 runs the reference eager (starts faster, decodes slower)")
    parser.add_argument("--vllm_kv_cache_gib", type=int, default=2, help="--engine vllm on a CPU: GiB of KV cache")
    add_run_flags(parser, repeats=9, json_help="one JSON line per head")
    add_size_flags(parser)
    add_pair_flags(parser)
    args = parser.parse_args(argv)
    if (args.ref_model_id is None) != (args.classifier_model_id is None):
        parser.error("--ref_model_id and --classifier_model_id go together (or neither: the random pair)")
    if args.engine == "vllm" and args.ref_model_id is None:
        parser.error("--engine vllm needs a loaded pair (--ref_model_id and --classifier_model_id)")
    return args


if __name__ == "__main__":
    main(parse_args())
