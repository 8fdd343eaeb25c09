"""Evaluate a classifier checkpoint by guiding the reference model on the eval split.

    python eval_ckpt.py --classifier_ckpt_path checkpoints/llama_3_8b_instruct_gsm8k/ckpt_15000/ --eta 10 \
        --data_path dataset/gsm8k_test.jsonl --train_eval_save_path dataset/gsm8k_test_eval.json

Model, data, sampling, loss and atom flags not given are read from the checkpoint's
``../args.json`` (so ``--eta`` defaults to the training eta; it is printed, and it names
every output). ``--eta 0`` evaluates the plain reference model. Writes next to the
checkpoint (or into ``--output_dir``), with ``<tag> = eta_<eta>_top_k_<k>_temp_<T>``:
``individual_eval_inference_<tag>/<eval_id>_r<repeat>.json`` (one sample each; existing
ones are skipped, so a re-run resumes; ``--start_index/--end_index`` shard the problems),
``inference_eval_results_<tag>.jsonl`` (per problem, every eval problem whose samples are all done)
and ``reward_stats_<tag>.json`` (pass@1 = ``single_sample_accuracy_mean``, maj@k, pass@k,
mean KL(guided || reference) per trajectory).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.answers import grade, majority_vote, pass_at_k
from utils.cli import (
    MODEL_DEFAULTS,
    ArgumentParser,
    add_inherited_flags,
    check_run_settings,
    describe_sources,
    eval_tag,
    inherit,
    int01,
    load_run_args,
    problem_file_name,
    run,
)
from utils.data import read_json, remove_stale_temporaries, write_json, write_jsonl
from utils.models import default_device, format_prompts, get_stop_ids, load_causal_lm, load_tokenizer
from utils.problems import load_problems, reference_of, resolve_range
from utils.rollout import make_processor, sample_batch
from utils.seeding import batch_seed, set_seed
from utils.splits import load_split_map

INHERITED = {
    **MODEL_DEFAULTS,
    "data_path": "dataset/gsm8k_test.jsonl",
    "train_eval_save_path": "dataset/gsm8k_test_eval.json",
    "eta": 1.0,
}
RENAMED = {"data_path": "original_problems_path"}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier_ckpt_path", type=str, required=True, help="checkpoints/<exp>/ckpt_<step>/")
    p.add_argument("--start_index", type=int, default=0, help="first problem (line index of --data_path) of this shard")
    p.add_argument("--end_index", type=int, default=-1, help="one past the last problem of this shard; -1 = to the end")
    p.add_argument("--batch_size", type=int, default=8, help="problems per generate call")
    p.add_argument("--kl_batch_size", type=int, default=2,
                   help="unused: KL is computed while decoding, with no second pass (kept so original commands run)")
    p.add_argument("--num_samples", type=int, default=8, help="samples per problem (k of maj@k and pass@k)")
    p.add_argument("--cd_baseline", type=int01, default=0, help="1: Controlled-Decoding offset eta * E[R] instead of Q#")
    p.add_argument("--top_k", type=int, default=20, help="guided candidates per step (-1 = all)")
    p.add_argument("--max_prompt_length", type=int, default=-1, help="skip problems whose prompt has more tokens; -1 = off")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="response budget in tokens")
    p.add_argument("--output_dir", type=str, default=None, help="where results go (default: the checkpoint folder)")
    p.add_argument("--force", type=int01, default=0, help="1: redo existing samples of these settings")
    p.add_argument("--seed", type=int, default=47, help="base seed; repeat r uses seed + 50 * r")
    add_inherited_flags(p, INHERITED)
    return p.parse_args(argv)


def run_settings(args: argparse.Namespace, dataset_type: str) -> dict:
    """What decides the samples of one output tag besides eta, top_k, temperature and CD (in
    the tag): every shard and resume must share it (batch size, dtype, index range and sample
    count may differ)."""
    names = ["classifier_ckpt_path", "data_path", "ref_model_id", "use_chat_template", "top_p", "max_new_tokens",
             "max_prompt_length", "match_fn_type", "seed", "inference_mode", "classifier_type", "loss_type",
             "num_atoms", "V_min", "V_max"]
    return {"dataset_type": dataset_type, **{name: getattr(args, name) for name in names}}


def eval_problem_ids(args, records, tokenizer) -> list[int]:
    """Line indices of the split map's eval problems, minus prompts over --max_prompt_length tokens."""
    split_map = load_split_map(args.train_eval_save_path)
    ids = [i for i, r in enumerate(records) if split_map.get(r["problem"], {}).get("split") == "eval"]
    if not ids:
        raise ValueError(f"no problem of {args.data_path} is marked eval in {args.train_eval_save_path}")
    if args.max_prompt_length > 0:
        texts = format_prompts(tokenizer, [records[i]["prompt"] for i in ids], bool(args.use_chat_template))
        lengths = [len(tokenizer(t, add_special_tokens=not args.use_chat_template).input_ids) for t in texts]
        kept = [i for i, n in zip(ids, lengths) if n <= args.max_prompt_length]
        print(f"eval: {len(ids) - len(kept)} problem(s) skipped for prompts over {args.max_prompt_length} tokens")
        if not kept:
            raise ValueError(f"every eval prompt is longer than --max_prompt_length {args.max_prompt_length} tokens")
        ids = kept
    return ids


def aggregate(args, records, dataset_type, ids, sample_dir: Path, tag: str, output_dir: Path) -> dict:
    """Per-problem results and the reward stats from the individual sample files."""
    results, kls, kls_per_token = [], [], []
    for problem_id in ids:
        samples = [read_json(sample_dir / problem_file_name(problem_id, r)) for r in range(args.num_samples)]
        record = records[problem_id]
        reference = reference_of(record, dataset_type)
        predictions = [s["prediction"] for s in samples]
        result = {
            **record,
            "eval_id": problem_id,
            "predictions": predictions,
            "correctness": [s["correctness"] for s in samples],
            "majority_vote_correctness": majority_vote(
                predictions, reference, dataset_type, args.match_fn_type, rng=random.Random(args.seed + problem_id)
            ),
            "pass_k_correctness": pass_at_k(predictions, reference, dataset_type, args.match_fn_type),
            "num_response_tokens": [s["num_response_tokens"] for s in samples],
            "kl": [s["kl"] for s in samples],
            "kl_per_token": [s["kl_per_token"] for s in samples],
        }
        results.append(result)
        kls.extend(result["kl"])
        kls_per_token.extend(result["kl_per_token"])
    write_jsonl(output_dir / f"inference_eval_results_{tag}.jsonl", results)
    stats = {
        "single_sample_accuracy_mean": float(np.mean([np.mean(r["correctness"]) for r in results])),
        "majority_vote_accuracy_mean": float(np.mean([r["majority_vote_correctness"] for r in results])),
        "pass_k_accuracy_mean": float(np.mean([r["pass_k_correctness"] for r in results])),
        "kl_mean": float(np.mean(kls)),
        "kl_per_token_mean": float(np.mean(kls_per_token)),
        "num_problems": len(results),
        "num_samples": args.num_samples,
        "eta": args.eta,
        "top_k": args.top_k,
        "temperature": args.temperature,
        "cd_baseline": args.cd_baseline,
        "inference_mode": args.inference_mode,
    }
    write_json(output_dir / f"reward_stats_{tag}.json", stats)
    return stats


def main(args: argparse.Namespace) -> None:
    saved = load_run_args(args.classifier_ckpt_path)
    sources = inherit(args, INHERITED, saved, RENAMED)
    print(f"eval: {describe_sources(args, sources, ['eta', 'top_k', 'temperature', 'top_p', 'inference_mode', 'cd_baseline'])}")
    if args.eta < 0:
        raise ValueError(f"--eta must be non-negative, got {args.eta}")
    records, dataset_type = load_problems(args.data_path, args.dataset_type)
    tokenizer = load_tokenizer(args.ref_model_id)
    all_ids = eval_problem_ids(args, records, tokenizer)
    shard = resolve_range(args.start_index, args.end_index, len(records))
    ids = [i for i in all_ids if i in shard]

    tag = eval_tag(args.eta, args.top_k, args.temperature, bool(args.cd_baseline))
    output_dir = Path(args.output_dir or args.classifier_ckpt_path)
    sample_dir = output_dir / f"individual_eval_inference_{tag}"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for folder in (output_dir, sample_dir):
        remove_stale_temporaries(folder)
    check_run_settings(sample_dir, run_settings(args, dataset_type))
    if args.force:
        for problem_id in ids:
            for repeat in range(args.num_samples):
                (sample_dir / problem_file_name(problem_id, repeat)).unlink(missing_ok=True)

    chunks = [ids[i : i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    work = [(r, chunk) for r in range(args.num_samples) for chunk in chunks
            if not all((sample_dir / problem_file_name(i, r)).exists() for i in chunk)]
    print(f"eval: {len(ids)} problems x {args.num_samples} samples, {len(work)} of {len(chunks) * args.num_samples} "
          f"batches to run -> {sample_dir}")
    if work:
        kl_temperature = args.temperature if args.temperature > 0 else 1.0
        processor = make_processor(args, tokenizer, checkpoint=args.classifier_ckpt_path,  # a bad checkpoint fails first
                                   cd_baseline=bool(args.cd_baseline), kl_temperature=kl_temperature)
        ref_model = load_causal_lm(args.ref_model_id, args.dtype, default_device())
        stop_ids = get_stop_ids(ref_model, tokenizer)
        for repeat, chunk in tqdm(work, desc="eval", unit="batch"):
            set_seed(batch_seed(args.seed, repeat, chunk[0]))
            batch_records = [records[i] for i in chunk]
            with torch.no_grad():
                samples = sample_batch(
                    ref_model, tokenizer, batch_records, processor, use_chat_template=bool(args.use_chat_template),
                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
                )
            for problem_id, record, sample in zip(chunk, batch_records, samples):
                path = sample_dir / problem_file_name(problem_id, repeat)
                if not path.exists():
                    correct = grade(sample["prediction"], reference_of(record, dataset_type), dataset_type, args.match_fn_type)
                    write_json(path, {**record, **sample, "correctness": correct, "eta": args.eta, "top_k": args.top_k,
                                      "temperature": args.temperature, "cd_baseline": args.cd_baseline}, indent=None)
    complete = [i for i in all_ids if all((sample_dir / problem_file_name(i, r)).exists() for r in range(args.num_samples))]
    if len(complete) < len(all_ids):
        print(f"eval: results cover the {len(complete)} of {len(all_ids)} eval problems whose samples are all done "
              "(other shards still to run)")
    if not complete:
        return
    stats = aggregate(args, records, dataset_type, complete, sample_dir, tag, output_dir)
    print(f"eval [{tag}]: pass@1 {stats['single_sample_accuracy_mean']:.4f}, maj@{args.num_samples} "
          f"{stats['majority_vote_accuracy_mean']:.4f}, pass@{args.num_samples} {stats['pass_k_accuracy_mean']:.4f}, "
          f"KL {stats['kl_mean']:.4f} -> {output_dir / f'reward_stats_{tag}.json'}")


if __name__ == "__main__":
    run(main, parse_args())
