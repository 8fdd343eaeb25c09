"""Train the Q# classifier (Q or V head; bce, mse or distributional mle loss) on collected data.

    python train_classifier.py --ref_model_id meta-llama/Meta-Llama-3-8B-Instruct \
        --classifier_model_id meta-llama/Llama-3.2-1B-Instruct \
        --original_problems_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json \
        --init_mode reuse --inference_mode bernoulli --loss_type bce --dataset_type gsm8k \
        --data_paths collected_data/llama_3_8b_instruct_gsm8k/all_train_data.jsonl --drop_no_variation 1 --eta 1 \
        --output_dir checkpoints/llama_3_8b_instruct_gsm8k/ --num_epochs 5

Several ``--data_paths`` (rounds) are merged by problem. Problems marked ``eval`` in the split
map are the OOD eval set; ``--id_eval_ratio`` of the remaining examples are the ID eval set.
Writes ``<output_dir>/args.json`` and ``<output_dir>/ckpt_<step>/`` (``ckpt_0`` before
training, then every ``--ckpt_freq`` steps, and after the last batch if that was none).

``<step>`` is the original's ``global_step``, batches summed over the processes (so ``ckpt_N``
has seen the same data whatever the number of processes); ``--ckpt_freq``, ``--eval_freq``
and wandb count it. The counters and the gradient accumulation: ``utils/training/state.py``.

Data-parallel on several processes (``--batch_size`` per process; ``--world_size`` must be
the number of processes). ``--multi_gpu`` makes ``accelerate launch`` start them also on a
machine without GPUs (they then train on the CPU over gloo)::

    accelerate launch --multi_gpu --num_processes 2 train_classifier.py --world_size 2 <same flags>

The main process writes args.json and the checkpoints and prints and logs the metrics
(training loss: the main process's batches; eval: every process evaluates the whole eval
sets on the same weights, without communication, so the metrics equal one process's).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup

from utils.classifier import CLASSIFIER_TYPES, INIT_MODES, LOSS_TYPES, ClassifierSpec, QSharpClassifier
from utils.cli import (ARGS_FILE, ArgumentParser, atoms_int, finite_float, int01, nonneg_float, nonneg_int, nonneg_int_or_off,
                       positive_float, positive_int, positive_int_or_off, run, seed_int, unit_interval, unit_interval_open)
from utils.data.answers import MATCH_FNS
from utils.data.io import remove_stale_temporaries, write_json
from utils.data.problems import DATASET_TYPES
from utils.decoding.guidance import INFERENCE_MODES, resolve_guidance_mode
from utils.distributed import accelerator_cpu, current_process, end_training
from utils.models import DTYPES, check_classifier_vocab, load_tokenizer
from utils.seeding import set_seed
from utils.training.data import make_eval_loaders, make_train_loader, prepare_data
from utils.training.examples import collate, predict_dataset
from utils.training.metrics import eval_metrics
from utils.training.state import (COMBINED_STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TrainState, checkpoint_due, eval_due,
                                  load_optimizer_scheduler, optimizer_scheduler_files, optimizer_step_due, resume_point,
                                  start_tracking)

V_HEAD_GRAD_CLIP = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world_size", type=positive_int, default=1, help="number of processes; must match the accelerate launch")
    p.add_argument("--ref_model_id", type=str, default="meta-llama/Meta-Llama-3-8B-Instruct",
                   help="reference model whose tokenizer the data uses (recorded for collection/eval)")
    p.add_argument("--classifier_type", type=str, default="V", choices=CLASSIFIER_TYPES, help="value head")
    p.add_argument("--classifier_model_id", type=str, default="meta-llama/Llama-3.2-1B-Instruct", help="classifier base LM")
    p.add_argument("--classifier_ckpt_path", type=str, default=None, help="start from this checkpoint (--init_mode warmstart)")
    p.add_argument("--resume_opt_scheduler", type=int01, default=None,
                   help="with --classifier_ckpt_path (required there): 1 = also resume its optimizer and scheduler "
                        f"({OPTIMIZER_FILE} + {SCHEDULER_FILE}, or {COMBINED_STATE_FILE}); checkpoints count from 0 again")
    p.add_argument("--original_problems_path", type=str, required=True, help="problems jsonl the data was collected on")
    p.add_argument("--train_eval_save_path", type=str, required=True, help="split map: eval problems form the OOD set")
    p.add_argument("--init_mode", type=str, required=True, choices=[*INIT_MODES, "warmstart"],
                   help="head init: zero, random, reuse (Q: the LM head), warmstart (--classifier_ckpt_path)")
    p.add_argument("--inference_mode", type=str, required=True, choices=INFERENCE_MODES,
                   help="guidance the classifier is for (expectation trains on exp(eta * R), or on R with --cd_baseline 1)")
    p.add_argument("--loss_type", type=str, default="bce", choices=LOSS_TYPES, help="classifier loss")
    p.add_argument("--use_bias", type=int01, default=0, help="head has a bias")
    p.add_argument("--dataset_type", type=str, required=True, choices=DATASET_TYPES, help="grading of eval runs")
    p.add_argument("--data_paths", type=str, nargs="+", required=True, help="all_train_data.jsonl of one or more rounds")
    p.add_argument("--batch_size", type=positive_int, default=32, help="sequences per batch (per process)")
    p.add_argument("--max_batch_num_tokens", type=positive_int_or_off, default=-1,
                   help="token budget per batch (rows x longest sequence), still at most --batch_size rows; -1 = off")
    p.add_argument("--gradient_accumulation_step", type=positive_int, default=1,
                   help="batches (per process) per optimizer step; the loss is divided by it")
    p.add_argument("--shift_reward", type=finite_float, default=0.0,
                   help="R = correctness - shift_reward (expectation: use 1, so exp(eta * R) lies in [0, 1])")
    p.add_argument("--scale_reward", type=finite_float, default=1.0,
                   help="unused: kept so the original's commands run (the original parses it and never uses it)")
    p.add_argument("--cd_baseline", type=int01, default=0,
                   help="1: with expectation, train on R instead of exp(eta * R); recorded for evaluation (CD offset eta * E[R])")
    p.add_argument("--use_chat_template", type=int01, default=1, help="recorded for collection/eval")
    p.add_argument("--dtype", type=str, default="bfloat16", choices=list(DTYPES), help="classifier dtype")
    p.add_argument("--temperature", type=nonneg_float, default=0.8, help="recorded for collection/eval")
    p.add_argument("--use_all_ref_tokens", type=int01, default=1,
                   help="1: label the cut token and every roll-out token; 0: the cut token only")
    p.add_argument("--top_p", type=unit_interval, default=0.9, help="recorded for collection/eval")
    p.add_argument("--drop_no_variation", type=int01, default=1, help="drop training problems whose rewards are all equal")
    p.add_argument("--id_eval_ratio", type=unit_interval_open, default=0.1, help="share of training examples held out as ID eval")
    p.add_argument("--eta", type=nonneg_float, default=1.0,
                   help="expectation targets exp(eta * R); becomes the default eta of the next collection and eval")
    p.add_argument("--top_k", type=positive_int_or_off, default=-1, help="recorded for reference (collection/eval use their own --top_k)")
    p.add_argument("--match_fn_type", type=str, default="symbolic", choices=list(MATCH_FNS),
                   help="recorded for collection/eval")
    p.add_argument("--output_dir", type=str, default="checkpoints/temp/", help="args.json and ckpt_<step>/ go here")
    p.add_argument("--num_workers", type=nonneg_int, default=0, help="DataLoader workers")
    p.add_argument("--num_epochs", type=positive_int, default=3, help="passes over the training examples")
    p.add_argument("--eval_max_size", type=positive_int, default=1000, help="at most this many examples per eval set")
    p.add_argument("--lr", type=positive_float, default=2e-5, help="AdamW learning rate")
    p.add_argument("--warmup_step", type=nonneg_int_or_off, default=-1, help="linear warmup steps, then constant; -1 = none")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--eval_freq", type=positive_int, default=500,
                   help="evaluate every this many global steps (batches summed over processes), and after the first batch")
    p.add_argument("--ckpt_freq", type=positive_int, default=500,
                   help="write ckpt_<global step> every this many global steps (batches summed over processes)")
    p.add_argument("--save_opt_scheduler", type=int01, default=0,
                   help=f"1: every checkpoint also holds {OPTIMIZER_FILE} and {SCHEDULER_FILE} (the optimizer and "
                        "scheduler state that --resume_opt_scheduler 1 reads)")
    p.add_argument("--resume", type=int01, default=0,
                   help="1: continue from the newest complete checkpoint in --output_dir of a run with the same flags, "
                        "to the weights an uninterrupted run ends with; its checkpoints also hold the optimizer, "
                        "scheduler, counters, data position and RNG states")
    p.add_argument("--keep_last_n", type=positive_int_or_off, default=-1,
                   help="keep only the newest N checkpoints (deleted after the next one is in place); -1 = keep all")
    p.add_argument("--seed", type=seed_int, default=47, help="seed of init, ID split and shuffling")
    p.add_argument("--track", type=int01, default=0, help="1: log to wandb")
    p.add_argument("--wandb_entity", type=str, default=None, help="wandb entity")
    p.add_argument("--wandb_project", type=str, default=None, help="wandb project")
    p.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    p.add_argument("--num_atoms", type=atoms_int, default=11, help="histogram atoms (mle)")
    p.add_argument("--V_min", type=finite_float, default=0.0, help="lowest atom (mle)")
    p.add_argument("--V_max", type=finite_float, default=1.0, help="highest atom (mle)")
    p.add_argument("--max_length", type=positive_int_or_off, default=-1, help="truncate training sequences to this many tokens; -1 = off")
    return p.parse_args(argv)


def check_args(args, accelerator) -> None:
    if args.world_size != accelerator.num_processes:
        hint = ("; on a machine without GPUs accelerate launch starts several processes only with --multi_gpu"
                if accelerator.num_processes == 1 and not torch.cuda.is_available() else "")
        raise ValueError(f"--world_size {args.world_size} but {accelerator.num_processes} process(es) were launched{hint}")
    if (args.init_mode == "warmstart") != (args.classifier_ckpt_path is not None):
        raise ValueError("--init_mode warmstart and --classifier_ckpt_path go together")
    if args.classifier_ckpt_path is not None and args.resume_opt_scheduler is None:
        raise ValueError("--classifier_ckpt_path needs --resume_opt_scheduler 0 or 1")
    # the guidance this classifier is for must exist (e.g. an mle head with --cd_baseline 1 is refused there)
    resolve_guidance_mode(args.inference_mode, args.loss_type, bool(args.cd_baseline))
    for path in (args.original_problems_path, *args.data_paths):  # the first is recorded for collection and eval
        if not Path(path).is_file():
            raise FileNotFoundError(f"problem file {path} does not exist")


def build_classifier(args, spec: ClassifierSpec, resumed: tuple[Path, dict] | None) -> QSharpClassifier:
    """The starting weights: the checkpoint a resume continues from, the warmstart checkpoint, or a fresh head."""
    if resumed or args.init_mode == "warmstart":
        return QSharpClassifier.from_pretrained(resumed[0] if resumed else args.classifier_ckpt_path, spec=spec, dtype=args.dtype)
    return QSharpClassifier.from_causal_lm(args.classifier_model_id, spec, args.init_mode, dtype=args.dtype, seed=args.seed,
                                           rank=current_process().rank)


def evaluate(accelerator, model, loaders: dict, spec: ClassifierSpec, bernoulli: bool, step: int) -> None:
    """Print and log the metrics of every eval set (``loaders``: ``{metric prefix: loader}``) at ``step``."""
    metrics = {}
    for prefix, loader in loaders.items():
        loss, predictions, targets = predict_dataset(accelerator.unwrap_model(model), loader, spec, accelerator.device)
        metrics.update(eval_metrics(predictions, targets, loss, bernoulli, prefix))
    if metrics:
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        accelerator.log(metrics, step=step)


def train(args, accelerator, state: TrainState, evaluate_at) -> None:
    """The epochs from where ``state`` stands to ``--num_epochs``, then the checkpoint of the last batch."""
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    accumulation = args.gradient_accumulation_step
    max_norm = V_HEAD_GRAD_CLIP if args.classifier_type == "V" else float("inf")
    window_start, window_batches = time.time(), 0
    model.train()
    progress = tqdm(total=state.num_batches * args.num_epochs, initial=state.batches, desc="train", unit="batch",
                    disable=not accelerator.is_main_process)
    for epoch in range(state.start_epoch, args.num_epochs):
        for batch in state.epoch_batches(epoch):
            global_step = state.count_batch()
            stepping = optimizer_step_due(state.batches, accumulation)
            with contextlib.nullcontext() if stepping else accelerator.no_sync(model):  # all-reduce once per step
                logits = model(batch["input_ids"], batch["attention_mask"])
                loss = accelerator.unwrap_model(model).loss(logits, batch["targets"], batch["loss_mask"])
                accelerator.backward(loss / accumulation)
            state.step_loss = state.step_loss + loss.detach().float()  # this process's micro-batches of the coming step
            window_batches += 1
            if stepping:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                state.optimizer_steps += 1
                training_loss, state.step_loss = float(state.step_loss) / accumulation, 0.0  # mean over the step's micro-batches
                minutes = (time.time() - window_start) / 60
                progress.set_postfix(loss=f"{training_loss:.4f}")
                accelerator.log({"Training Loss": training_loss, "Learning Rate": scheduler.get_last_lr()[0],
                                 "Steps per Min": window_batches / accumulation / max(minutes, 1e-9),
                                 "Gradient Norm": float(grad_norm)}, step=global_step)
            progress.update(1)
            if eval_due(global_step, args.eval_freq):
                evaluate_at(global_step)
                state.last_evaluated = global_step
            if checkpoint_due(global_step, args.ckpt_freq):
                state.save(global_step)
            if global_step in (state.last_evaluated, state.last_saved):  # the rate counts training time only
                window_start, window_batches = time.time(), 0
    progress.close()
    if state.global_step != state.last_saved:  # the last batch was no checkpoint: keep (and evaluate) its weights too
        if state.global_step != state.last_evaluated:
            evaluate_at(state.global_step)
            state.last_evaluated = state.global_step
        state.save(state.global_step)


def main(args: argparse.Namespace) -> None:
    accelerator = Accelerator(  # gradient accumulation is the loop's own (optimizer_step_due), not accelerate's
        cpu=accelerator_cpu(current_process()),  # several processes without CUDA: gloo on the CPU
        log_with="wandb" if args.track else None
    )
    check_args(args, accelerator)
    fit(args, accelerator)
    end_training(accelerator)  # once fit's model, optimizer and loaders are gone


def fit(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Data, model and state (resumed, warm-started or fresh), then the epochs and the checkpoints."""
    resume_files = (optimizer_scheduler_files(Path(args.classifier_ckpt_path))
                    if args.classifier_ckpt_path is not None and args.resume_opt_scheduler else [])
    set_seed(args.seed)
    spec = ClassifierSpec(args.classifier_type, args.loss_type, args.num_atoms, args.V_min, args.V_max, bool(args.use_bias))
    output_dir = Path(args.output_dir)
    accelerator.print(f"train: {spec.classifier_type}/{spec.loss_type} head, inference_mode={args.inference_mode}, "
                      f"eta={args.eta}, top_k={args.top_k}, temperature={args.temperature} (recorded in args.json: the defaults "
                      f"of collection/eval from this run, top_k excepted) -> {output_dir}")
    train_examples, id_examples, ood_examples = prepare_data(args, spec, log=accelerator.print)
    resumed = resume_point(args, output_dir, log=accelerator.print)  # (ckpt_<step>, trainer state) or None
    accelerator.wait_for_everyone()  # every rank has read the folder before the main one cleans it

    tokenizer = load_tokenizer(args.ref_model_id)
    check_classifier_vocab(tokenizer, args.classifier_ckpt_path if args.init_mode == "warmstart" else args.classifier_model_id)
    model = build_classifier(args, spec, resumed)  # the vocabulary checked before any weights are read
    if accelerator.is_main_process:
        remove_stale_temporaries(output_dir)  # half-written checkpoints of a killed run
        write_json(output_dir / ARGS_FILE, vars(args))

    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    train_loader = make_train_loader(args, train_examples, collate_fn)
    eval_loaders = make_eval_loaders(args, {"ID ": id_examples, "OOD ": ood_examples}, collate_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=max(0, args.warmup_step))
    resume_files = [resumed[0] / OPTIMIZER_FILE, resumed[0] / SCHEDULER_FILE] if resumed else resume_files
    if resume_files:
        load_optimizer_scheduler(resume_files, optimizer, scheduler)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    state = TrainState(args, accelerator, model, optimizer, scheduler, train_loader, tokenizer)
    start_tracking(args, accelerator)
    # bernoulli metrics (accuracy, ROC-AUC) also for an mle head, as the original logs them
    evaluate_at = partial(evaluate, accelerator, model, eval_loaders, spec, args.inference_mode == "bernoulli")
    if resumed:
        state.restore(*resumed, log=accelerator.print)
        if state.global_step == 0:  # ckpt_0 is written before the starting weights are evaluated
            evaluate_at(0)
    else:
        state.save(0)
        evaluate_at(0)  # the starting weights (an addition: the original first evaluates after the first batch)
    train(args, accelerator, state, evaluate_at)
    accelerator.print(state.summary())


if __name__ == "__main__":
    run(main, parse_args())
