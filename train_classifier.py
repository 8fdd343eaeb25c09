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

``<step>`` is the original's ``global_step``: batches summed over the processes (after a
process's b-th batch, counted across epochs, it is b x ``--world_size``), so ``ckpt_N`` has
seen the same data whatever the number of processes. ``--ckpt_freq`` and ``--eval_freq``
count it, tested after every batch (plus the original's evaluation at step 1, after a
single process's first batch, and one of the starting weights at step 0); wandb logs at
it. The optimizer steps after every ``--gradient_accumulation_step``-th batch of a process
(loss divided by it; a batch left over at the end of an epoch is accumulated into the next
epoch's first step); ``Training Loss`` is the mean over the step's batches.

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
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup

from utils.data.answers import MATCH_FNS
from utils.classifier import INIT_MODES, ClassifierSpec, QSharpClassifier
from utils.cli import (
    ARGS_FILE,
    ArgumentParser,
    atoms_int,
    finite_float,
    int01,
    nonneg_float,
    nonneg_int,
    nonneg_int_or_off,
    positive_float,
    positive_int,
    positive_int_or_off,
    run,
    seed_int,
    setting_differences,
    unit_interval,
    unit_interval_open,
)
from utils.data.io import read_json, remove_stale_temporaries, write_json
from utils.distributed import accelerator_cpu, current_process, set_loader_epoch
from utils.decoding.guidance import resolve_guidance_mode
from utils.training.metrics import eval_metrics
from utils.models import check_classifier_vocab, load_tokenizer, loading
from utils.seeding import set_seed
from utils.data.splits import load_split_map
from utils.training.state import (
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    STATE_VERSION,
    TRAINER_STATE_FILE,
    IGNORED_ARGS,
    get_states,
    loader_generators,
    newest_resumable,
    prune,
    rng_state,
    set_rng_state,
    set_states,
    wandb_run_id,
)
from utils.training.examples import (
    TokenBudgetBatchSampler,
    build_examples,
    collate,
    merge_rounds,
    predict_dataset,
    split_examples,
)
from utils.training.targets import reward_targets

OLD_SCHEDULER_FILE = "scheduler.pt"  # what this project wrote before
# what the original's resume reads (no original code writes it): {"optimizer": ..., "scheduler": ...}
COMBINED_STATE_FILE = "optimizer_scheduler_state.pt"
V_HEAD_GRAD_CLIP = 5.0


# The step counters, as the training loop uses them (``b``: this process's batches so far,
# counted across epochs, never reset).
def global_step_after(batches: int, world_size: int) -> int:
    """The original's ``global_step`` after a process's ``batches``-th batch: batches summed
    over the processes (``world_size`` per batch). It names ``ckpt_<step>``, is the wandb
    step, and is what ``--ckpt_freq`` / ``--eval_freq`` count; so ``ckpt_N`` has seen the
    same data whatever the number of processes."""
    return batches * world_size


def optimizer_step_due(batches: int, accumulation: int) -> bool:
    """The optimizer steps after every ``accumulation``-th batch of a process (counted across
    epochs: a batch left over at the end of an epoch is accumulated with the next epoch's
    first ones). The original steps one batch earlier ((b + 1) % accumulation == 0: its first
    step comes after ONE batch); here every step sums exactly ``accumulation`` batches."""
    return batches % accumulation == 0


def checkpoint_due(global_step: int, ckpt_freq: int) -> bool:
    """Tested after every batch, whether or not the optimizer stepped (as the original)."""
    return global_step % ckpt_freq == 0


def eval_due(global_step: int, eval_freq: int) -> bool:
    """Tested after every batch; ``global_step == 1`` is the original's first evaluation,
    after the first batch of a single process (never true on several)."""
    return global_step % eval_freq == 0 or global_step == 1


def optimizer_scheduler_files(checkpoint: Path) -> list[Path]:
    """What ``--resume_opt_scheduler 1`` reads from ``checkpoint``: ``[optimizer.pt,
    lr_scheduler.pt]`` (what ``--save_opt_scheduler 1`` writes, here and in the original;
    ``scheduler.pt`` of this project's older checkpoints is taken too), else
    ``[optimizer_scheduler_state.pt]`` (``{"optimizer": ..., "scheduler": ...}``, the file
    the original's resume reads and nothing writes). Checked before any weights are read."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--classifier_ckpt_path {checkpoint} does not exist")
    schedulers = [checkpoint / name for name in (SCHEDULER_FILE, OLD_SCHEDULER_FILE) if (checkpoint / name).is_file()]
    if (checkpoint / OPTIMIZER_FILE).is_file() and schedulers:
        return [checkpoint / OPTIMIZER_FILE, schedulers[0]]
    if (checkpoint / COMBINED_STATE_FILE).is_file():
        return [checkpoint / COMBINED_STATE_FILE]
    have = [name for name in (OPTIMIZER_FILE, SCHEDULER_FILE) if (checkpoint / name).is_file()]
    raise FileNotFoundError(
        f"--resume_opt_scheduler 1 but {checkpoint} holds neither {OPTIMIZER_FILE} + {SCHEDULER_FILE} nor "
        f"{COMBINED_STATE_FILE}{f' (only {have[0]})' if have else ''}: write its checkpoints with --save_opt_scheduler 1, "
        "or give --resume_opt_scheduler 0")


def load_optimizer_scheduler(files: list[Path], optimizer, scheduler) -> None:
    """Load the state of :func:`optimizer_scheduler_files` into ``optimizer`` and ``scheduler``."""
    states = []
    for path in files:
        with loading("optimizer/scheduler state", path):
            states.append(torch.load(path, map_location="cpu", weights_only=False))
    if len(states) == 1:
        if not isinstance(states[0], dict) or not {"optimizer", "scheduler"} <= set(states[0]):
            raise ValueError(f"{files[0]} is not a dict with keys 'optimizer' and 'scheduler'")
        states = [states[0]["optimizer"], states[0]["scheduler"]]
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1])


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world_size", type=positive_int, default=1, help="number of processes; must match the accelerate launch")
    p.add_argument("--ref_model_id", type=str, default="meta-llama/Meta-Llama-3-8B-Instruct",
                   help="reference model whose tokenizer the data uses (recorded for collection/eval)")
    p.add_argument("--classifier_type", type=str, default="V", choices=["Q", "V"], help="value head")
    p.add_argument("--classifier_model_id", type=str, default="meta-llama/Llama-3.2-1B-Instruct", help="classifier base LM")
    p.add_argument("--classifier_ckpt_path", type=str, default=None, help="start from this checkpoint (--init_mode warmstart)")
    p.add_argument("--resume_opt_scheduler", type=int01, default=None,
                   help="with --classifier_ckpt_path (required there): 1 = also resume its optimizer and scheduler "
                        f"({OPTIMIZER_FILE} + {SCHEDULER_FILE}, or {COMBINED_STATE_FILE}); checkpoints count from 0 again")
    p.add_argument("--original_problems_path", type=str, required=True, help="problems jsonl the data was collected on")
    p.add_argument("--train_eval_save_path", type=str, required=True, help="split map: eval problems form the OOD set")
    p.add_argument("--init_mode", type=str, required=True, choices=[*INIT_MODES, "warmstart"],
                   help="head init: zero, random, reuse (Q: the LM head), warmstart (--classifier_ckpt_path)")
    p.add_argument("--inference_mode", type=str, required=True, choices=["bernoulli", "expectation", "mle", "disabled"],
                   help="guidance the classifier is for (expectation trains on exp(eta * R), or on R with --cd_baseline 1)")
    p.add_argument("--loss_type", type=str, default="bce", choices=["bce", "mse", "mle"], help="classifier loss")
    p.add_argument("--use_bias", type=int01, default=0, help="head has a bias")
    p.add_argument("--dataset_type", type=str, required=True, choices=["gsm8k", "math"], help="grading of eval runs")
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
    p.add_argument("--dtype", type=str, default="bfloat16", choices=["float32", "bfloat16", "float16"], help="classifier dtype")
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


def resume_point(args, output_dir: Path, log=print) -> tuple[Path, dict] | None:
    """With ``--resume 1``: the newest resumable checkpoint of a run with these flags, or None
    (nothing to continue). A folder holding a run with other flags is refused, naming each."""
    if not args.resume or not (output_dir / ARGS_FILE).is_file():
        return None
    differ = setting_differences(read_json(output_dir / ARGS_FILE), vars(args), ignore=IGNORED_ARGS)
    if differ:
        raise ValueError(f"--resume 1 but {output_dir} holds a run with other settings ({', '.join(differ)}); "
                         "use another --output_dir, or remove that one to start over")
    found = newest_resumable(output_dir, args.world_size, log=log)
    if found is None:
        log(f"train: --resume 1 but {output_dir} holds no resumable checkpoint; starting from the beginning")
    return found


def prepare_data(args, spec: ClassifierSpec, log=print):
    """Training, ID-eval and OOD-eval examples (``log``: the printer of the summary line)."""
    split_map = load_split_map(args.train_eval_save_path)
    problems = merge_rounds(args.data_paths)
    missing = [p["problem"][:60] for p in problems if p["problem"] not in split_map]
    if missing:
        raise ValueError(f"{len(missing)} problem(s) of --data_paths are not in {args.train_eval_save_path}, e.g. {missing[0]!r}")
    correctness = [np.asarray(p["partial_guided_predictions_correctness"], dtype=np.float64) for p in problems]
    targets = [reward_targets(c, args.inference_mode, args.eta, args.shift_reward, args.scale_reward, spec, args.cd_baseline)
               for c in correctness]
    train, ood = [], []
    for problem, target in zip(problems, targets):
        if split_map[problem["problem"]]["split"] == "eval":
            ood.append((problem, target))
        elif not (args.drop_no_variation and np.all(target == target[0])):
            train.append((problem, target))
    train_examples = build_examples([p for p, _ in train], [t for _, t in train], args.use_all_ref_tokens, args.max_length)
    # the original labels every roll-out token of the OOD set, whatever --use_all_ref_tokens
    ood_examples = build_examples([p for p, _ in ood], [t for _, t in ood], True, args.max_length)
    keep, held = split_examples(len(train_examples), args.id_eval_ratio, args.seed)
    id_examples = [train_examples[i] for i in held]
    train_examples = [train_examples[i] for i in keep]
    rng = np.random.RandomState(args.seed)
    cap = lambda examples: [examples[i] for i in sorted(rng.permutation(len(examples))[: args.eval_max_size])]  # noqa: E731
    log(f"train: {len(problems)} problems ({len(train)} train after drop_no_variation, {len(ood)} OOD eval); "
          f"{len(train_examples)} train / {len(id_examples)} ID eval / {len(ood_examples)} OOD eval examples")
    if not train_examples:
        cut = f", cut by --max_length {args.max_length}" if args.max_length > 0 else ""
        raise ValueError(f"no training examples (all problems dropped by --drop_no_variation{cut} or held out)")
    return train_examples, cap(id_examples), cap(ood_examples)


def make_train_loader(args, examples, collate_fn) -> DataLoader:
    """The shuffled training batches of one process before ``accelerator.prepare`` (which
    deals them out to the processes: each takes every ``world_size``-th batch).

    As in the original, token-budget batches have at most ``--batch_size`` rows, and the last
    partial batch of an epoch is dropped (``--batch_size`` batching), unless the examples do
    not fill one batch per process: then nothing is dropped (the original would train no step)."""
    if args.max_batch_num_tokens > 0:
        sampler = TokenBudgetBatchSampler([len(e.input_ids) for e in examples], args.max_batch_num_tokens, seed=args.seed,
                                          max_rows=args.batch_size)
        return DataLoader(examples, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.num_workers)
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(examples, batch_size=args.batch_size, shuffle=True, generator=generator,
                      drop_last=len(examples) >= args.batch_size * args.world_size, collate_fn=collate_fn, num_workers=args.num_workers)


def build_classifier(args, spec: ClassifierSpec) -> QSharpClassifier:
    if args.init_mode == "warmstart":
        return QSharpClassifier.from_pretrained(args.classifier_ckpt_path, spec=spec, dtype=args.dtype)
    return QSharpClassifier.from_causal_lm(args.classifier_model_id, spec, args.init_mode, dtype=args.dtype, seed=args.seed,
                                           rank=current_process().rank)


def main(args: argparse.Namespace) -> None:
    accelerator = Accelerator(  # gradient accumulation is the loop's own (optimizer_step_due), not accelerate's
        cpu=accelerator_cpu(current_process()),  # several processes without CUDA: gloo on the CPU
        log_with="wandb" if args.track else None
    )
    check_args(args, accelerator)
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
    source = args.classifier_ckpt_path if args.init_mode == "warmstart" else args.classifier_model_id
    check_classifier_vocab(tokenizer, source)  # before any weights are read
    if resumed:
        model = QSharpClassifier.from_pretrained(resumed[0], spec=spec, dtype=args.dtype)
    else:
        model = build_classifier(args, spec)
    if accelerator.is_main_process:
        remove_stale_temporaries(output_dir)  # half-written checkpoints of a killed run
        write_json(output_dir / ARGS_FILE, vars(args))

    pad = tokenizer.pad_token_id
    collate_fn = lambda examples: collate(examples, pad)  # noqa: E731
    train_loader = make_train_loader(args, train_examples, collate_fn)
    eval_loaders = {  # not prepared: every process evaluates the whole sets
        prefix: DataLoader(examples, batch_size=args.batch_size, collate_fn=collate_fn, num_workers=args.num_workers)
        for prefix, examples in (("ID ", id_examples), ("OOD ", ood_examples)) if examples
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=max(0, args.warmup_step))
    if resumed:
        resume_files = [resumed[0] / OPTIMIZER_FILE, resumed[0] / SCHEDULER_FILE]
    if resume_files:
        load_optimizer_scheduler(resume_files, optimizer, scheduler)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    generators = loader_generators(train_loader)  # the data order's randomness, saved with --resume 1
    state = resumed[1] if resumed else {}
    if args.track:
        wandb_kwargs = {"entity": args.wandb_entity, "name": args.wandb_run_name}
        if args.resume:  # one wandb run per output folder, continued by every resume
            wandb_kwargs.update(id=wandb_run_id(output_dir, accelerator.is_main_process), resume="allow")
        accelerator.init_trackers(args.wandb_project or "qsharp", config=vars(args), init_kwargs={"wandb": wandb_kwargs})
    bernoulli = args.inference_mode == "bernoulli"  # also for an mle head, as the original logs them

    def evaluate(step: int) -> None:
        metrics = {}
        for prefix, loader in eval_loaders.items():
            loss, predictions, targets = predict_dataset(accelerator.unwrap_model(model), loader, spec, accelerator.device)
            metrics.update(eval_metrics(predictions, targets, loss, bernoulli, prefix))
        if metrics:
            accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            accelerator.log(metrics, step=step)

    accumulation, world_size = args.gradient_accumulation_step, args.world_size
    max_norm = V_HEAD_GRAD_CLIP if spec.classifier_type == "V" else float("inf")
    num_batches = len(train_loader)  # per process and epoch
    counters = {"batches": 0, "optimizer_steps": 0, "global_step": 0, "last_saved": 0, "last_evaluated": 0}
    counters.update({name: state[name] for name in counters if name in state})
    epoch_start_states = get_states(generators)

    def process_state(step_loss) -> dict:
        """What this process alone knows: RNG states, the loader's generators, an unfinished accumulation."""
        pending = counters["batches"] % accumulation
        grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in model.parameters()] if pending else None
        return {"rng": rng_state(), "generators_epoch_start": epoch_start_states, "generators_now": get_states(generators),
                "grads": grads, "step_loss": step_loss}

    def save(step: int, step_loss=0.0) -> None:
        accelerator.wait_for_everyone()
        counters["last_saved"] = step  # before the state is written: a resume from here must not save it again
        extra = None
        if args.resume:
            states = [process_state(step_loss)]
            if accelerator.num_processes > 1:
                import torch.distributed as dist

                gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
                dist.gather_object(states[0], gathered, dst=0)
                states = gathered
            batches = counters["batches"]
            epoch, position = divmod(batches, num_batches) if num_batches else (0, 0)
            trainer_state = {"version": STATE_VERSION, "global_step": step, **counters, "epoch": epoch,
                             "position": position, "accumulation_phase": batches % accumulation,
                             "world_size": world_size}
            extra = {TRAINER_STATE_FILE: trainer_state}
            if accelerator.is_main_process:
                extra.update({RNG_FILE.format(rank=rank): each for rank, each in enumerate(states)})
        if args.resume or args.save_opt_scheduler:
            extra = {**(extra or {}), OPTIMIZER_FILE: optimizer.state_dict(), SCHEDULER_FILE: scheduler.state_dict()}
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(output_dir / f"ckpt_{step}", tokenizer=tokenizer, extra_state=extra)
            prune(output_dir, args.keep_last_n, log=accelerator.print)
        accelerator.wait_for_everyone()

    step_loss, window_start, window_batches = 0.0, time.time(), 0
    start_epoch, skip = 0, 0
    if resumed:
        mine = torch.load(resumed[0] / RNG_FILE.format(rank=accelerator.process_index), map_location="cpu",
                          weights_only=False)
        start_epoch, skip = state["epoch"], state["position"]
        if mine["grads"] is not None:  # an accumulation the checkpoint cut: its gradient so far
            for param, grad in zip(model.parameters(), mine["grads"]):
                param.grad = None if grad is None else grad.to(param.device)
            step_loss = mine["step_loss"]
        accelerator.print(f"train: resuming from {resumed[0]} (epoch {start_epoch}, batch {skip} of {num_batches})")
        if skip == 0:  # at an epoch boundary: the next epoch starts from the states of now
            set_states(generators, mine["generators_now"])
            set_rng_state(mine["rng"])
        if state["global_step"] == 0:  # ckpt_0 is written before the starting weights are evaluated
            evaluate(0)
    else:
        save(0)
        evaluate(0)  # the starting weights (an addition: the original first evaluates after the first batch)
    model.train()
    progress = tqdm(total=num_batches * args.num_epochs, initial=counters["batches"], desc="train", unit="batch",
                    disable=not accelerator.is_main_process)
    for epoch in range(start_epoch, args.num_epochs):
        set_loader_epoch(train_loader, epoch)  # also a TokenBudgetBatchSampler behind accelerate's shard
        continuing = resumed is not None and epoch == start_epoch and skip > 0
        if continuing:  # the same batch order as the killed run's epoch
            set_states(generators, mine["generators_epoch_start"])
        epoch_start_states = get_states(generators)
        for index, batch in enumerate(train_loader):
            if continuing:
                if index == 0:  # the loader has drawn its seeds: from here on, the killed run's states
                    set_states(generators, mine["generators_now"])
                    set_rng_state(mine["rng"])
                if index < skip:
                    continue
            counters["batches"] += 1
            batches = counters["batches"]
            global_step = counters["global_step"] = global_step_after(batches, world_size)
            stepping = optimizer_step_due(batches, accumulation)
            with contextlib.nullcontext() if stepping else accelerator.no_sync(model):  # all-reduce once per step
                logits = model(batch["input_ids"], batch["attention_mask"])
                loss = accelerator.unwrap_model(model).loss(logits, batch["targets"], batch["loss_mask"])
                accelerator.backward(loss / accumulation)
            step_loss = step_loss + loss.detach().float()  # this process's micro-batches of the coming step
            window_batches += 1
            if stepping:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                counters["optimizer_steps"] += 1
                training_loss, step_loss = float(step_loss) / accumulation, 0.0  # mean over the step's micro-batches
                minutes = (time.time() - window_start) / 60
                progress.set_postfix(loss=f"{training_loss:.4f}")
                accelerator.log({"Training Loss": training_loss, "Learning Rate": scheduler.get_last_lr()[0],
                                 "Steps per Min": window_batches / accumulation / max(minutes, 1e-9),
                                 "Gradient Norm": float(grad_norm)}, step=global_step)
            progress.update(1)
            if eval_due(global_step, args.eval_freq):
                evaluate(global_step)
                counters["last_evaluated"] = global_step
            if checkpoint_due(global_step, args.ckpt_freq):
                save(global_step, step_loss)
            if global_step in (counters["last_evaluated"], counters["last_saved"]):  # the rate counts training time only
                window_start, window_batches = time.time(), 0
    progress.close()
    global_step = counters["global_step"]
    if global_step != counters["last_saved"]:  # the last batch was no checkpoint: keep (and evaluate) its weights too
        if global_step != counters["last_evaluated"]:
            evaluate(global_step)
            counters["last_evaluated"] = global_step
        save(global_step, step_loss)
    accelerator.end_training()
    pending = counters["batches"] % accumulation
    accelerator.print(f"train: {global_step} steps ({counters['batches']} batches per process, "
                      f"{counters['optimizer_steps']} optimizer steps"
                      + (f"; the gradient of the last {pending} batch(es) was not applied" if pending else "")
                      + f"), last checkpoint {output_dir / f'ckpt_{global_step}'}")


if __name__ == "__main__":
    run(main, parse_args())
