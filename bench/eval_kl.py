"""Online KL (accumulated while decoding) against the original two-pass computation.

    python bench/eval_kl.py [--json]

One evaluation run (``--num_problems`` prompts in batches of ``--batch_size``, a random V
classifier guiding a random reference, eta 1, top-k 20, temperature 0.8, top-p 0.9; both
models over a vocabulary of 128256 tokens, Llama 3's, since the cost of KL grows with the
vocabulary) is sampled twice with the same seeds:

- online: ``utils.decoding.rollout.sample`` as ``eval_ckpt.py`` runs it with ``--engine
  generate``; the processor adds the original's KL(top_p(guided / T) || reference / T) of
  each step from the two logit vectors it already holds, and hands ``generate`` the same
  top_p(guided / T) to sample from (one nucleus per step);
- two-pass (the original code): every step's guided logits are kept
  ([batch, steps, vocab]), then a second forward pass of the reference model over
  prompt + response (``--kl_batch_size`` rows at a time) gives the reference logits.

Both runs must sample the same tokens. ``--json`` prints
``{"speedup": two_pass_time / online_time, "max_abs_diff": max |KL_online - KL_two_pass|, ...}``
(times are medians of ``--repeats`` runs after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import PROMPTS, add_run_flags, add_size_flags, build_pair, elapsed, set_threads  # noqa: E402
from bench.two_pass import two_pass_sample_batch  # noqa: E402
from utils.classifier import ClassifierSpec, QSharpClassifier  # noqa: E402
from utils.decoding.guidance import QSharpLogitsProcessor  # noqa: E402
from utils.models import get_stop_ids  # noqa: E402
from utils.decoding.generate import GenerateBackend  # noqa: E402
from utils.decoding.rollout import sample  # noqa: E402
from utils.seeding import batch_seed, set_seed  # noqa: E402


def main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    tokenizer, ref, lm = build_pair(args)
    stop_ids = get_stop_ids(ref, tokenizer)
    spec = ClassifierSpec(args.classifier_type, "bce")
    classifier = QSharpClassifier.from_causal_lm(lm, spec, init_mode="random", seed=args.seed).eval()
    records = [{"prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})"} for i in range(args.num_problems)]
    batches = [records[i : i + args.batch_size] for i in range(0, len(records), args.batch_size)]
    common = {"pad_token_id": tokenizer.pad_token_id}
    online = QSharpLogitsProcessor(classifier, args.eta, args.top_k, kl_temperature=args.temperature, kl_top_p=args.top_p,
                                   **common)
    plain = QSharpLogitsProcessor(classifier, args.eta, args.top_k, **common)
    sampling = {"use_chat_template": True, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "stop_ids": stop_ids}

    def run_online():  # eval_ckpt.py's --engine generate: batches seeded by their first problem
        backend = GenerateBackend.from_model(ref, tokenizer, batch_size=args.batch_size, temperature=args.temperature,
                                             top_p=args.top_p)
        out = {}
        sample(backend, tokenizer, records, [(i, 0) for i in range(len(records))], online,
               lambda index, _, fields: out.__setitem__(index, fields), seed=args.seed, use_chat_template=True,
               max_new_tokens=args.max_new_tokens)
        return [out[i] for i in range(len(records))]

    def run_two_pass():
        out = []
        for index, chunk in enumerate(batches):
            set_seed(batch_seed(args.seed, 0, index * args.batch_size))
            with torch.no_grad():
                out += two_pass_sample_batch(ref, tokenizer, chunk, plain, kl_batch_size=args.kl_batch_size, **sampling)
        return out

    results = {"online": run_online(), "two_pass": run_two_pass()}  # warm-up, and the values compared
    if [r["prediction"] for r in results["online"]] != [r["prediction"] for r in results["two_pass"]]:
        raise SystemExit("error: the two runs sampled different responses; the comparison is void")
    diff = max(abs(a["traj_kl"] - b["traj_kl"]) for a, b in zip(results["online"], results["two_pass"]))
    times = {"online": [], "two_pass": []}
    for _ in range(args.repeats):
        times["online"].append(elapsed(run_online))
        times["two_pass"].append(elapsed(run_two_pass))
    online_s, two_pass_s = (sorted(t)[len(t) // 2] for t in (times["online"], times["two_pass"]))
    tokens = sum(r["num_response_tokens"] for r in results["online"])
    vocab = len(tokenizer)
    steps = [max(r["num_response_tokens"] for r in results["online"][i : i + args.batch_size])
             for i in range(0, len(records), args.batch_size)]
    result = {
        "speedup": round(two_pass_s / online_s, 4),
        "max_abs_diff": diff,
        "online_s": round(online_s, 4),
        "two_pass_s": round(two_pass_s, 4),
        "kl_mean": sum(r["traj_kl"] for r in results["online"]) / len(records),
        "kept_scores_mb": round(max(steps) * args.batch_size * vocab * 4 / 2**20, 1),  # two-pass, per batch
        "online_kl_state_mb": round(args.batch_size * vocab * 4 / 2**20, 1),  # one step's distributions
        "num_problems": len(records),
        "vocab_size": vocab,
        "response_tokens": tokens,
        "classifier_type": args.classifier_type,
        "kl_batch_size": args.kl_batch_size,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"online {online_s:.3f} s, two-pass {two_pass_s:.3f} s: speedup {result['speedup']:.2f}x; "
              f"max |KL difference| {diff:.2e} over {len(records)} responses ({tokens} tokens, mean KL {result['kl_mean']:.3f})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_problems", type=int, default=16, help="prompts in the evaluation run")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (eval_ckpt.py's default)")
    parser.add_argument("--kl_batch_size", type=int, default=2, help="rows per second-pass forward (the original's default)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="response budget")
    parser.add_argument("--classifier_type", type=str, default="V", choices=["Q", "V"], help="classifier head")
    parser.add_argument("--top_k", type=int, default=20, help="guided candidates per step")
    parser.add_argument("--eta", type=float, default=1.0, help="guidance strength")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (KL is taken at it)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold")
    add_run_flags(parser, repeats=3, json_help="one JSON line")
    add_size_flags(parser, ref=(512, 4), classifier=(256, 2), vocab_size=128256)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
