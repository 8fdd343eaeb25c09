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
and ``reward_stats_<tag>.json`` (pass@1 = ``single_sample_accuracy_mean``, maj@k, pass@k, and
``kl_mean``: the original's KL per trajectory, KL(top_p(guided / T) || reference / T) summed over
the response, which is about -log(nucleus mass) per token even for the reference at eta 0;
``kl_before_top_p_mean`` is the same at top_p 1). The default continuous engine keeps
``--batch_size`` live rows, refilled as samples end, each sample from its own stream seeded by
(seed, repeat, problem); ``--engine generate`` runs one ``generate()`` per batch of problems.

Several etas, one after the other, each with its own outputs; the models are loaded once
(``--eta 0`` in a sweep runs without the classifier)::

    python eval_ckpt.py --classifier_ckpt_path checkpoints/llama_3_8b_instruct_gsm8k/ckpt_15000/ --eta 0 1 5 10 \
        --data_path dataset/gsm8k_test.jsonl --train_eval_save_path dataset/gsm8k_test_eval.json

One process per GPU (``--multi_gpu`` also on a machine without GPUs, one process per
``--num_processes`` on the CPU)::

    accelerate launch --multi_gpu --num_processes 4 eval_ckpt.py <same flags>

Each process samples whole ``--batch_size`` chunks of the eval problems (in blocks) on
``cuda:LOCAL_RANK`` (``--engine vllm``: on its own block of ``--vllm_tensor_parallel_size`` GPUs),
with the samples of a single process; once all are done, the main
process writes the results and reward stats.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data.answers import grade, majority_vote, pass_at_k
from utils.cli import (
    MODEL_DEFAULTS,
    ArgumentParser,
    add_engine_flags,
    add_inherited_flags,
    check_run_settings,
    describe_sources,
    eval_tag,
    inherit,
    int01,
    load_run_args,
    positive_int,
    positive_int_or_off,
    problem_file_name,
    run,
    seed_int,
    sweep_values,
)
from utils.data.io import read_json, remove_stale_temporaries, write_json, write_jsonl
from utils.distributed import Process, barrier, current_process, process_device, rank_share, shutdown
from utils.training.metrics import PROBLEM_MEAN, SAMPLE_MEAN, bootstrap_ci
from utils.models import check_model_files, format_prompts, load_tokenizer
from utils.data.problems import load_problems, reference_of, resolve_range
from utils.decoding.backends import backend_for, gpus_per_process
from utils.decoding.requests import Backend
from utils.decoding.rollout import make_processor, sample
from utils.data.splits import load_split_map

INHERITED = {
    **MODEL_DEFAULTS,
    "data_path": "dataset/gsm8k_test.jsonl",
    "train_eval_save_path": "dataset/gsm8k_test_eval.json",
    "eta": 1.0,
}
RENAMED = {"data_path": "original_problems_path"}
# Recorded with each run's settings: sample folders from before the original's KL and field
# names were adopted are refused rather than mixed in.
KL_DEFINITION = "KL(top_p(guided / T) || reference / T), fields token_kl/traj_kl"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classifier_ckpt_path", type=str, required=True, help="checkpoints/<exp>/ckpt_<step>/")
    p.add_argument("--start_index", type=int, default=0, help="first problem (line index of --data_path) of this shard")
    p.add_argument("--end_index", type=int, default=-1, help="one past the last problem of this shard; -1 = to the end")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="live rows of the continuous engine; problems per generate call with --engine generate")
    p.add_argument("--kl_batch_size", type=positive_int, default=2,
                   help="unused: KL is computed while decoding, with no second pass (kept so original commands run)")
    p.add_argument("--num_samples", type=positive_int, default=8, help="samples per problem (k of maj@k and pass@k)")
    p.add_argument("--cd_baseline", type=int01, default=0, help="1: Controlled-Decoding offset eta * E[R] instead of Q#")
    p.add_argument("--top_k", type=positive_int_or_off, default=20, help="guided candidates per step (-1 = all)")
    p.add_argument("--max_prompt_length", type=positive_int_or_off, default=-1, help="skip problems whose prompt has more tokens; -1 = off")
    p.add_argument("--max_new_tokens", type=positive_int, default=1024, help="response budget in tokens")
    p.add_argument("--output_dir", type=str, default=None, help="where results go (default: the checkpoint folder)")
    p.add_argument("--force", type=int01, default=0, help="1: redo existing samples of these settings")
    p.add_argument("--seed", type=seed_int, default=47, help="base seed; repeat r uses seed + 50 * r")
    add_engine_flags(p)
    add_inherited_flags(p, INHERITED, several=("eta",))
    return p.parse_args(argv)


def run_settings(args: argparse.Namespace, dataset_type: str) -> dict:
    """What decides the samples of one output tag besides eta, top_k, temperature and CD (in
    the tag): every shard and resume must share it (batch size, dtype, index range and sample
    count may differ)."""
    names = ["classifier_ckpt_path", "data_path", "ref_model_id", "use_chat_template", "top_p", "max_new_tokens",
             "max_prompt_length", "match_fn_type", "seed", "inference_mode", "classifier_type", "loss_type",
             "num_atoms", "V_min", "V_max", "engine"]
    return {"dataset_type": dataset_type, "kl_definition": KL_DEFINITION, **{name: getattr(args, name) for name in names}}


def eval_problem_ids(args, records, tokenizer, verbose: bool = True) -> list[int]:
    """Line indices of the split map's eval problems, minus prompts over --max_prompt_length tokens."""
    split_map = load_split_map(args.train_eval_save_path)
    ids = [i for i, r in enumerate(records) if split_map.get(r["problem"], {}).get("split") == "eval"]
    if not ids:
        raise ValueError(f"no problem of {args.data_path} is marked eval in {args.train_eval_save_path}")
    if args.max_prompt_length > 0:
        texts = format_prompts(tokenizer, [records[i]["prompt"] for i in ids], bool(args.use_chat_template))
        lengths = [len(tokenizer(t, add_special_tokens=not args.use_chat_template).input_ids) for t in texts]
        kept = [i for i, n in zip(ids, lengths) if n <= args.max_prompt_length]
        if verbose:
            print(f"eval: {len(ids) - len(kept)} problem(s) skipped for prompts over {args.max_prompt_length} tokens")
        if not kept:
            raise ValueError(f"every eval prompt is longer than --max_prompt_length {args.max_prompt_length} tokens")
        ids = kept
    return ids


def aggregate(args, records, dataset_type, ids, sample_dir: Path, tag: str, output_dir: Path) -> dict:
    """Per-problem results and the reward stats from the individual sample files."""
    results, kls, kls_per_token, kls_before_top_p = [], [], [], []
    for problem_id in ids:
        samples = [read_json(sample_dir / problem_file_name(problem_id, r)) for r in range(args.num_samples)]
        record = records[problem_id]
        reference = reference_of(record, dataset_type)
        predictions = [s["prediction"] for s in samples]
        result = {  # the original's field names (predictions_correctness, majority_vote_correct, pass_at_k)
            **record,
            "eval_id": problem_id,
            "predictions": predictions,
            "predictions_correctness": [s["correctness"] for s in samples],
            "majority_vote_correct": majority_vote(
                predictions, reference, dataset_type, args.match_fn_type, rng=random.Random(args.seed + problem_id)
            ),
            "pass_at_k": pass_at_k(predictions, reference, dataset_type, args.match_fn_type),
            "num_response_tokens": [s["num_response_tokens"] for s in samples],
            "traj_kl": [s["traj_kl"] for s in samples],
        }
        results.append(result)
        kls.extend(result["traj_kl"])
        kls_per_token.extend(s["traj_kl"] / max(s["num_response_tokens"], 1) for s in samples)
        kls_before_top_p.extend(s["traj_kl_before_top_p"] for s in samples)
    write_jsonl(output_dir / f"inference_eval_results_{tag}.jsonl", results)
    stats = {
        "single_sample_accuracy_mean": float(np.mean([np.mean(r["predictions_correctness"]) for r in results])),
        "majority_vote_accuracy_mean": float(np.mean([r["majority_vote_correct"] for r in results])),
        "pass_k_accuracy_mean": float(np.mean([r["pass_at_k"] for r in results])),
        "kl_mean": float(np.mean(kls)),  # the original's: mean traj_kl (top-p guided vs reference, see README)
        "kl_per_token_mean": float(np.mean(kls_per_token)),
        "kl_before_top_p_mean": float(np.mean(kls_before_top_p)),
        "num_problems": len(results),
        "num_samples": args.num_samples,
        "eta": args.eta,
        "top_k": args.top_k,
        "temperature": args.temperature,
        "cd_baseline": args.cd_baseline,
        "inference_mode": args.inference_mode,
    }
    # 95% percentile-bootstrap intervals over problems (a problem's samples stay together), the
    # same resamples for every metric (one seed); each statistic is computed as its point estimate.
    ci = {"num_resamples": 1000, "seed": args.seed, "level": 0.95}
    intervals = {
        "single_sample_accuracy_ci": ([r["predictions_correctness"] for r in results], PROBLEM_MEAN),
        "majority_vote_accuracy_ci": ([r["majority_vote_correct"] for r in results], PROBLEM_MEAN),
        "pass_k_accuracy_ci": ([r["pass_at_k"] for r in results], PROBLEM_MEAN),
        "kl_ci": ([r["traj_kl"] for r in results], SAMPLE_MEAN),  # kl_mean: the mean over all samples
    }
    for key, (per_problem, statistic) in intervals.items():
        stats[key] = list(bootstrap_ci(per_problem, statistic, **ci))
    stats.update({"ci_level": ci["level"], "ci_resamples": ci["num_resamples"], "ci_seed": ci["seed"]})
    write_json(output_dir / f"reward_stats_{tag}.json", stats)
    return stats


class Guidance:
    """The guidance of each sweep point, the classifier loaded once, when first needed (eta 0
    needs none): sweep points share it, only its eta changes."""

    def __init__(self, args: argparse.Namespace, tokenizer, device):
        self.args, self.tokenizer, self.device, self._guided = args, tokenizer, device, None
        sampled = args.temperature > 0  # greedy decoding: KL at T 1, no top-p
        self.kl = {"kl_temperature": args.temperature if sampled else 1.0, "kl_top_p": args.top_p if sampled else 1.0}

    def __call__(self, point: argparse.Namespace):
        """The processor of one sweep point (``point`` = the flags with its eta)."""
        if point.eta == 0 or point.inference_mode == "disabled":  # a no-op (as the original: eta 0 = disabled)
            return make_processor(point, self.tokenizer, checkpoint=point.classifier_ckpt_path, disabled=True,
                                  device=self.device, **self.kl)
        if self._guided is None:
            self._guided = make_processor(point, self.tokenizer, checkpoint=point.classifier_ckpt_path,
                                          cd_baseline=bool(point.cd_baseline), device=self.device, **self.kl)
        self._guided.eta = float(point.eta)
        return self._guided


def evaluate(point, backend: Backend, guidance: Guidance, records, dataset_type, all_ids, mine, output_dir: Path,
             process: Process) -> None:
    """Sample this rank's share (``mine``) at one eta (``point``); then, once every rank is
    done, the main process writes the per-problem results and reward stats."""
    tag = eval_tag(point.eta, point.top_k, point.temperature, bool(point.cd_baseline))
    sample_dir = output_dir / f"individual_eval_inference_{tag}"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for folder in (output_dir, sample_dir):
        remove_stale_temporaries(folder)  # of dead processes only: sibling ranks' are kept
    check_run_settings(sample_dir, run_settings(point, dataset_type))
    if point.force:  # this rank's samples only
        for problem_id in mine:
            for repeat in range(point.num_samples):
                (sample_dir / problem_file_name(problem_id, repeat)).unlink(missing_ok=True)
    work = backend.pending(mine, point.num_samples, lambda i, r: (sample_dir / problem_file_name(i, r)).exists())
    process.say(f"eval: {len(mine)} problems x {point.num_samples} samples, {len(work)} of "
                f"{len(mine) * point.num_samples} samples to run -> {sample_dir}")
    if work:
        processor = guidance(point)  # before the reference: a bad checkpoint fails first
        with tqdm(total=len(work), desc=f"eval eta {point.eta}", unit="sample", disable=not process.is_main) as bar:

            def write(problem_id: int, repeat: int, fields: dict) -> None:
                path = sample_dir / problem_file_name(problem_id, repeat)
                if not path.exists():
                    record = records[problem_id]
                    correct = grade(fields["prediction"], reference_of(record, dataset_type), dataset_type,
                                    point.match_fn_type)
                    write_json(path, {**record, **fields, "correctness": correct, "eta": point.eta, "top_k": point.top_k,
                                      "temperature": point.temperature, "cd_baseline": point.cd_baseline}, indent=None)
                bar.update(1)

            sample(backend, backend.tokenizer, records, work, processor, write, seed=point.seed,
                   use_chat_template=bool(point.use_chat_template), max_new_tokens=point.max_new_tokens)
    barrier(process)  # every rank's samples are written
    if not process.is_main:
        return
    complete = [i for i in all_ids if all((sample_dir / problem_file_name(i, r)).exists() for r in range(point.num_samples))]
    if len(complete) < len(all_ids):
        print(f"eval: results cover the {len(complete)} of {len(all_ids)} eval problems whose samples are all done "
              "(other shards still to run)")
    if not complete:
        return
    stats = aggregate(point, records, dataset_type, complete, sample_dir, tag, output_dir)
    print(f"eval [{tag}]: pass@1 {stats['single_sample_accuracy_mean']:.4f}, maj@{point.num_samples} "
          f"{stats['majority_vote_accuracy_mean']:.4f}, pass@{point.num_samples} {stats['pass_k_accuracy_mean']:.4f}, "
          f"KL {stats['kl_mean']:.4f} -> {output_dir / f'reward_stats_{tag}.json'}")


def main(args: argparse.Namespace) -> None:
    process = current_process()
    saved = load_run_args(args.classifier_ckpt_path)
    sources = inherit(args, INHERITED, saved, RENAMED)
    etas = sweep_values(args, "eta")
    if process.is_main:
        print(f"eval: {describe_sources(args, sources, ['eta', 'top_k', 'temperature', 'top_p', 'inference_mode', 'cd_baseline'])}")
    records, dataset_type = load_problems(args.data_path, args.dataset_type)
    check_model_files(args.ref_model_id, "reference model")  # before anything is written
    if args.inference_mode != "disabled" and any(eta > 0 for eta in etas):
        check_model_files(args.classifier_ckpt_path, "classifier checkpoint")
    tokenizer = load_tokenizer(args.ref_model_id)
    all_ids = eval_problem_ids(args, records, tokenizer, verbose=process.is_main)
    shard = resolve_range(args.start_index, args.end_index, len(records))
    mine = rank_share([i for i in all_ids if i in shard], args.batch_size, process)  # all of them for one process
    output_dir = Path(args.output_dir or args.classifier_ckpt_path)
    device = process_device(process, gpus_per_process(args))  # this rank's GPU(s), else the CPU
    backend = backend_for(args, tokenizer, device)  # the reference loads once, when first needed
    guidance = Guidance(args, tokenizer, device)
    try:
        for eta in etas:
            evaluate(argparse.Namespace(**{**vars(args), "eta": eta}), backend, guidance, records, dataset_type, all_ids,
                     mine, output_dir, process)
    finally:
        shutdown()


if __name__ == "__main__":
    run(main, parse_args())
