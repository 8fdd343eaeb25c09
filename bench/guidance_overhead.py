"""Cost of guided decoding relative to plain sampling from the reference model.

    python bench/guidance_overhead.py [--json] [--ref_hidden 64 --ref_layers 24 --classifier_hidden 64 --classifier_layers 3]

Same prompts (``--batch_size`` 16, ``--max_new_tokens`` 64, temperature 0.8, top-p 0.9,
one seed per call), same random Llama reference; a random classifier backbone with 1/8 of
the reference's per-token compute gets a random Q head and a random V head (``--top_k``
20, eta 10, bernoulli). The default pair has the same width and 1/8 of the layers, so the
classifier costs 1/8 whether arithmetic or the per-layer call overhead of eager PyTorch
dominates (at these sizes on a CPU, the latter). Each configuration runs once to warm up, then ``--repeats`` times, unguided
and guided interleaved (alternating which goes first); ``ratio`` is the median guided time
over the median unguided time, ``pair_ratio_median`` the median of the per-repeat ratios.
``limit`` is the compute-ratio floor ``1 + classifier / reference`` weights multiplied per
token (a V head reads 1 + top_k tokens per step with those weights; on a decode that
is bound by reading weights, not arithmetic, that costs about as much as one token).
``--json`` prints one line per head: ``{"classifier_type", "ratio", "limit", ...}``.

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
    add_run_flags, add_size_flags, build_pair, elapsed, matmul_params, prompt_batch, set_threads,
)
from utils.classifier import ClassifierSpec, QSharpClassifier  # noqa: E402
from utils.guidance import QSharpLogitsProcessor, generate_responses  # noqa: E402
from utils.models import get_stop_ids  # noqa: E402


def main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    tokenizer, ref, lm = build_pair(args)
    batch = prompt_batch(tokenizer, args.batch_size)
    stop_ids = get_stop_ids(ref, tokenizer)
    ref_params = matmul_params(ref)

    def sample(processor):
        torch.manual_seed(args.seed)
        with torch.no_grad():
            ids, _ = generate_responses(
                ref, batch, stop_ids, tokenizer.pad_token_id, args.max_new_tokens, args.temperature, args.top_p, processor
            )
        return ids.shape[1]

    def timed(fn, totals, key):
        """``fn`` that adds its wall time to ``totals[key]``."""
        def wrapper(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            totals[key] += time.perf_counter() - start
            return out
        return wrapper

    for classifier_type in args.heads:
        spec = ClassifierSpec(classifier_type, "bce")
        classifier = QSharpClassifier.from_causal_lm(lm, spec, init_mode="random", seed=args.seed).eval()
        totals = {"processor": 0.0, "classifier": 0.0}  # seconds inside each, for the current call
        classifier.hidden_states = timed(classifier.hidden_states, totals, "classifier")
        timed_class = type("TimedProcessor", (QSharpLogitsProcessor,),
                           {"__call__": timed(QSharpLogitsProcessor.__call__, totals, "processor")})
        processor = timed_class(classifier, args.eta, args.top_k, pad_token_id=tokenizer.pad_token_id)
        steps = (sample(None), sample(processor))  # warm-up
        unguided, guided, inside = [], [], {"processor": [], "classifier": []}
        for repeat in range(args.repeats):  # alternate the order so that a slow drift cancels
            for guided_run in ((False, True) if repeat % 2 == 0 else (True, False)):
                totals.update(processor=0.0, classifier=0.0)
                seconds = elapsed(lambda: sample(processor if guided_run else None))
                (guided if guided_run else unguided).append(seconds)
                if guided_run:
                    for key in inside:
                        inside[key].append(totals[key])
        unguided_s, guided_s = statistics.median(unguided), statistics.median(guided)
        classifier_params = matmul_params(classifier.model) + (
            args.top_k * spec.num_outputs * classifier.config.hidden_size if classifier_type == "Q" else classifier.score.weight.numel()
        )
        result = {
            "classifier_type": classifier_type,
            "ratio": round(guided_s / unguided_s, 4),
            "limit": round(1 + classifier_params / ref_params, 4),
            "pair_ratio_median": round(statistics.median(g / u for g, u in zip(guided, unguided)), 4),
            "classifier_share": round(statistics.median(inside["classifier"]) / unguided_s, 4),
            "processor_share": round(statistics.median(inside["processor"]) / unguided_s, 4),
            "unguided_s": round(unguided_s, 4),
            "guided_s": round(guided_s, 4),
            "steps": list(steps),
            "reference_params": ref_params,
            "classifier_params": classifier_params,
            "batch_size": args.batch_size,
            "top_k": args.top_k,
            "threads": torch.get_num_threads(),
        }
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{classifier_type}: guided {guided_s:.3f} s / unguided {unguided_s:.3f} s = {result['ratio']:.3f}x "
                  f"(floor {result['limit']:.3f}x; {args.batch_size} x {steps[1]} tokens); classifier forward "
                  f"{result['classifier_share']:.1%}, whole processor {result['processor_share']:.1%} of unguided", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--top_k", type=int, default=20, help="guided candidates per step")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (the README's runs use 0.8)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold (the README's runs use 0.9)")
    parser.add_argument("--eta", type=float, default=10.0, help="guidance strength")
    parser.add_argument("--heads", nargs="+", default=["Q", "V"], choices=["Q", "V"], help="classifier heads to time")
    add_run_flags(parser, repeats=9, json_help="one JSON line per head")
    add_size_flags(parser)
    main(parser.parse_args())
