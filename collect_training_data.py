"""Collect classifier training data: guided roll-in, random cut, reference roll-out, graded.

    python collect_training_data.py --start_index 0 --end_index -1 --is_first_round 1 \
        --ref_model_id meta-llama/Meta-Llama-3-8B-Instruct --classifier_model_id meta-llama/Llama-3.2-1B-Instruct \
        --classifier_type V --inference_mode bernoulli --loss_type bce --use_bias 0 \
        --data_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json \
        --use_chat_template 1 --eta 0 --temperature 0.8 --top_p 0.9 --max_new_tokens 1024 \
        --dtype bfloat16 --match_fn_type symbolic --output_dir collected_data/llama_3_8b_instruct_gsm8k/

Writes ``<output_dir>/<id>_r<repeat>.json`` for every problem of ``[start_index, end_index)``
and repeat ``< num_samples``; existing files are skipped, so a re-run resumes and shards
(different index ranges) can run in parallel. The default continuous engine keeps
``--batch_size`` live rows, refilled as rows end (a roll-out joins as soon as its roll-in
ends), and samples each roll-in, cut and roll-out from its own stream seeded by (seed,
repeat, problem, stage): shards, restarts, process counts and batch sizes all write the files
of one run, and shards may overlap, even while both run. With ``--engine generate`` a batch
is seeded by its first problem, so shards write the files of one run over their union when
they share its ``--batch_size`` and their ranges start and end on its chunk boundaries.
Round 2+:
``--is_first_round 0 --classifier_ckpt_path checkpoints/<exp>/ckpt_<step>`` guides the
roll-in with that classifier; model and sampling flags not given are read from
``checkpoints/<exp>/args.json``.

One process per GPU (``--multi_gpu`` also on a machine without GPUs, one process per
``--num_processes`` on the CPU)::

    accelerate launch --multi_gpu --num_processes 4 collect_training_data.py <same flags>

Each process takes whole ``--batch_size`` chunks of ``[start_index, end_index)`` (in blocks)
on ``cuda:LOCAL_RANK`` (``--engine vllm``: on its own block of ``--vllm_tensor_parallel_size``
GPUs); the files are the same as those of one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from utils.cli import (
    MODEL_DEFAULTS,
    ArgumentParser,
    add_engine_flags,
    add_inherited_flags,
    check_run_settings,
    describe_sources,
    inherit,
    int01,
    load_run_args,
    positive_int,
    positive_int_or_off,
    problem_file_name,
    run,
    seed_int,
    unit_interval,
)
from utils.data.io import remove_stale_temporaries, write_json
from utils.distributed import current_process, process_device, rank_share
from utils.decoding.backends import backend_for, gpus_per_process
from utils.decoding.guidance import is_noop_guidance, resolve_guidance_mode
from utils.decoding.rollout import collect, make_processor
from utils.models import check_model_files, load_tokenizer
from utils.data.problems import load_problems, resolve_range
from utils.data.splits import ensure_split_map

# Flags read from the checkpoint's args.json when not given (round 2+), with their defaults.
INHERITED = {
    **MODEL_DEFAULTS,
    "classifier_model_id": "meta-llama/Llama-3.2-1B-Instruct",
    "data_path": "dataset/gsm8k_train.jsonl",
    "train_eval_save_path": "dataset/gsm8k_train_eval.json",
    "eta": 0.0,
    "max_new_tokens": 1024,
}
RENAMED = {"data_path": "original_problems_path"}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start_index", type=int, default=0, help="first problem (line index of --data_path)")
    p.add_argument("--end_index", type=int, default=-1, help="one past the last problem; -1 = to the end")
    p.add_argument("--eval_ratio", type=unit_interval, default=0.1,
                   help="share of problems marked eval when --train_eval_save_path does not exist yet and is built")
    p.add_argument("--is_first_round", type=int01, required=True,
                   help="1: roll in with the reference policy (classifier head zero); 0: with --classifier_ckpt_path")
    p.add_argument("--classifier_ckpt_path", type=str, default=None,
                   help="trained classifier checkpoint (round 2+; default: a fresh head on --classifier_model_id)")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="live rows of the continuous engine; problems per generate call with --engine generate")
    p.add_argument("--num_samples", type=positive_int, default=16, help="repeats per problem")
    p.add_argument("--top_k", type=positive_int_or_off, default=20, help="guided candidates per step (-1 = all)")
    p.add_argument("--output_dir", type=str, required=True, help="folder of the per-problem files")
    p.add_argument("--force", type=int01, default=0, help="1: redo this run's files even if they exist")
    p.add_argument("--seed", type=seed_int, default=47, help="base seed; repeat r uses seed + 50 * r")
    add_engine_flags(p)
    add_inherited_flags(p, INHERITED)
    return p.parse_args(argv)


def run_settings(args: argparse.Namespace, dataset_type: str) -> dict:
    """What decides the distribution of the collected data: every shard and resume into one
    folder must share it (batch size, dtype, index range and repeat count may differ)."""
    names = ["data_path", "ref_model_id", "use_chat_template", "eta", "temperature", "top_p", "max_new_tokens",
             "match_fn_type", "seed", "engine"]
    mode = resolve_guidance_mode(args.inference_mode, args.loss_type)
    if not is_noop_guidance(mode, args.eta):  # the classifier shapes the roll-in (expectation: also at eta 0)
        names += ["classifier_model_id" if args.is_first_round else "classifier_ckpt_path", "classifier_type",
                  "inference_mode", "loss_type", "num_atoms", "V_min", "V_max", "use_bias", "top_k"]
    return {"dataset_type": dataset_type, **{name: getattr(args, name) for name in names}}


def main(args: argparse.Namespace) -> dict:
    """Collect every missing file of this rank; returns the backend's ``stats``."""
    process = current_process()
    saved = None
    if not args.is_first_round:
        if args.classifier_ckpt_path is None:
            raise ValueError("--is_first_round 0 needs --classifier_ckpt_path")
        saved = load_run_args(args.classifier_ckpt_path)
    sources = inherit(args, INHERITED, saved, RENAMED)
    if process.is_main:
        print(f"collect: {describe_sources(args, sources, ['eta', 'top_k', 'temperature', 'top_p', 'inference_mode', 'classifier_type'])}")

    records, dataset_type = load_problems(args.data_path, args.dataset_type)
    indices = resolve_range(args.start_index, args.end_index, len(records))
    check_model_files(args.ref_model_id, "reference model")  # before anything is written
    if not is_noop_guidance(resolve_guidance_mode(args.inference_mode, args.loss_type), args.eta):
        check_model_files(args.classifier_model_id if args.is_first_round else args.classifier_ckpt_path, "classifier")
    mine = rank_share(indices, args.batch_size, process)  # all of them for a single process
    ensure_split_map(args.train_eval_save_path, [r["problem"] for r in records], args.eval_ratio, seed=47)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    check_run_settings(output_dir, run_settings(args, dataset_type))
    if args.force:  # this rank's files only: another rank may already be writing its own
        for repeat in range(args.num_samples):
            for index in mine:
                (output_dir / problem_file_name(index, repeat)).unlink(missing_ok=True)

    tokenizer = load_tokenizer(args.ref_model_id)
    device = process_device(process, gpus_per_process(args))  # this rank's GPU(s), else the CPU
    backend = backend_for(args, tokenizer, device)
    work = backend.pending(mine, args.num_samples, lambda i, r: (output_dir / problem_file_name(i, r)).exists())
    total = len(mine) * args.num_samples
    span = f"problems {mine[0]}..{mine[-1]}" if mine else "no problems (fewer batches than processes)"
    process.say(f"collect: {span}, {args.num_samples} repeats, {total - len(work)} of {total} files already done "
                f"-> {output_dir}")
    if not work:
        return backend.stats
    processor = make_processor(args, tokenizer, checkpoint=None if args.is_first_round else args.classifier_ckpt_path,
                               device=device)  # before the reference: a bad checkpoint fails first
    with tqdm(total=len(work), desc="collect", unit="file", disable=not process.is_main) as progress:

        def write(index: int, repeat: int, result: dict) -> None:
            """``<output_dir>/<index>_r<repeat>.json``: the problem's record and its collected lists,
            unless another run or shard wrote it first."""
            path = output_dir / problem_file_name(index, repeat)
            if not path.exists():
                write_json(path, {**records[index], **result}, indent=None)
            progress.update(1)

        collect(backend, tokenizer, records, work, processor, write, seed=args.seed, dataset_type=dataset_type,
                match_fn_type=args.match_fn_type, use_chat_template=bool(args.use_chat_template),
                max_new_tokens=args.max_new_tokens)
    return backend.stats


if __name__ == "__main__":
    run(main, parse_args())
