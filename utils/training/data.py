"""The data of a training run: train, ID-eval and OOD-eval examples of the collected rounds, and their loaders."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.classifier import ClassifierSpec
from utils.data.splits import load_split_map
from utils.training.examples import TokenBudgetBatchSampler, build_examples, merge_rounds, split_examples
from utils.training.targets import reward_targets


def prepare_data(args, spec: ClassifierSpec, log=print):
    """Training, ID-eval and OOD-eval examples (``log``: the printer of the summary line).

    The rounds of ``--data_paths`` are merged by problem; problems marked ``eval`` in the
    split map are the OOD set; ``--id_eval_ratio`` of the remaining examples are the ID set.
    Each eval set is capped at ``--eval_max_size`` examples (drawn with ``--seed``)."""
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


def make_eval_loaders(args, sets: dict[str, list], collate_fn) -> dict[str, DataLoader]:
    """``{metric prefix: loader}`` of the non-empty eval ``sets`` (in order), unshuffled and
    not prepared: every process evaluates the whole sets."""
    return {prefix: DataLoader(examples, batch_size=args.batch_size, collate_fn=collate_fn, num_workers=args.num_workers)
            for prefix, examples in sets.items() if examples}
