"""Training runs of exactly known size without a collection: fake collected data.

:func:`write_fake_collected` writes a problem file, its split map and an
``all_train_data.jsonl`` in the combined format whose token ids are random (within the
tiny models' vocabulary) and whose rewards alternate 0/1, so that ``train_classifier.py``
gets ``num_train x repeats`` training examples (with ``--id_eval_ratio 0``) and
``num_ood x repeats`` OOD eval examples, and ``--batch_size 1`` gives that many batches.
"""

from __future__ import annotations

import random
from pathlib import Path

from utils.data.io import write_json, write_jsonl
from utils.data.problems import COLLECTED_FIELDS

VOCAB = range(3, 300)  # the tiny tokenizer has 400 ids; 0-2 are special


def write_fake_collected(folder: Path, num_train: int, repeats: int, num_ood: int = 1, seed: int = 0) -> dict[str, str]:
    """``problems.jsonl``, ``problems_eval.json`` (the first ``num_ood`` problems ``eval``)
    and ``all_train_data.jsonl`` in ``folder``; returns their paths as train_classifier flags."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    problems, split_map, combined = [], {}, []
    for i in range(num_ood + num_train):
        problem = {"problem": f"Problem {i}: what is {i} + 1?", "solution": f"The answer is \\boxed{{{i + 1}}}.",
                   "answer": str(i + 1), "prompt": f"Problem {i}: what is {i} + 1?"}
        problems.append(problem)
        split_map[problem["problem"]] = {"split": "eval" if i < num_ood else "train", "id": i}
        record = {**problem, **{field: [] for field in COLLECTED_FIELDS}}
        for r in range(repeats):
            kept = rng.randint(1, 3)
            partial = [rng.choice(VOCAB) for _ in range(rng.randint(4, 7) + kept)]
            rollout = [rng.choice(VOCAB) for _ in range(rng.randint(0, 3))]
            correct = (i + r) % 2 == 0
            for field, value in (("fully_guided_predictions", "x"), ("fully_guided_predictions_correctness", correct),
                                 ("partial_guided_prompts", "x"), ("partial_guided_prompts_tokenized", partial),
                                 ("num_response_tokens_in_partial_guided_prompts", kept),
                                 ("partial_guided_responses_tokenized", rollout), ("partial_guided_predictions", "x"),
                                 ("partial_guided_predictions_correctness", correct)):
                record[field].append(value)
        combined.append(record)
    paths = {"problems": folder / "problems.jsonl", "split": folder / "problems_eval.json",
             "data": folder / "all_train_data.jsonl"}
    write_jsonl(paths["problems"], problems)
    write_json(paths["split"], split_map)
    write_jsonl(paths["data"], combined)
    return {name: str(path) for name, path in paths.items()}


def train_flags(paths: dict[str, str], models: Path) -> list[str]:
    """train_classifier.py flags of a quick float32 run on the fake data: one batch per
    example (``--batch_size 1``), no ID eval set, no example dropped."""
    return ["--ref_model_id", str(models / "ref"), "--classifier_model_id", str(models / "classifier"),
            "--original_problems_path", paths["problems"], "--train_eval_save_path", paths["split"],
            "--init_mode", "zero", "--inference_mode", "bernoulli", "--dataset_type", "gsm8k",
            "--data_paths", paths["data"], "--drop_no_variation", "0", "--id_eval_ratio", "0",
            "--batch_size", "1", "--dtype", "float32", "--lr", "1e-3", "--num_epochs", "1"]
