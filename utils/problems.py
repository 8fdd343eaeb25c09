"""Problem files: loading, validation, reference answers, dataset type."""

from __future__ import annotations

import os

from utils.data import read_jsonl
from utils.registry import choose

DATASET_TYPES = ("gsm8k", "math")
# field holding the reference each dataset type is graded against
REFERENCE_FIELD = {"gsm8k": "answer", "math": "solution"}


def infer_dataset_type(records: list[dict]) -> str:
    """``gsm8k`` when records carry an ``answer`` field, else ``math`` (graded on ``solution``)."""
    return "gsm8k" if records and all("answer" in record for record in records) else "math"


def load_problems(path: str | os.PathLike, dataset_type: str | None = None) -> tuple[list[dict], str]:
    """Problem records of a jsonl file and its dataset type (inferred when ``None``).

    Every record must hold ``problem``, ``prompt`` and its reference field (``answer`` for
    gsm8k, ``solution`` for math); the first one that does not is named with its line.
    """
    if not os.path.isfile(path):
        what = "is a folder, not a jsonl file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"problem file {path} {what}")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"problem file {path} holds no records")
    dataset_type = choose("dataset_type", dataset_type or infer_dataset_type(records), DATASET_TYPES)
    needed = ("problem", "prompt", REFERENCE_FIELD[dataset_type])
    for index, record in enumerate(records):
        missing = [field for field in needed if field not in record]
        if missing:
            raise ValueError(f"{path}: record {index} (line {index + 1}) has no {', '.join(missing)} field")
    return records, dataset_type


def reference_of(record: dict, dataset_type: str) -> str:
    """What ``utils.answers.grade`` compares against: the ``answer`` (gsm8k) or ``solution`` (math)."""
    return record[REFERENCE_FIELD[choose("dataset_type", dataset_type, DATASET_TYPES)]]


def resolve_range(start_index: int, end_index: int, total: int) -> range:
    """Problem indices ``[start_index, end_index)``; ``end_index -1`` means all."""
    end = total if end_index == -1 else end_index
    if not 0 <= start_index < total:
        raise ValueError(f"--start_index {start_index} is out of range: the file holds {total} problems (0..{total - 1})")
    if not start_index < end <= total:
        raise ValueError(f"--end_index {end_index} must be -1 or in ({start_index}, {total}] (the file holds {total} problems)")
    return range(start_index, end)


# Lists that collection writes per repeat and combine concatenates across repeats (and rounds).
COLLECTED_FIELDS = (
    "fully_guided_predictions",
    "fully_guided_predictions_correctness",
    "partial_guided_prompts",
    "partial_guided_prompts_tokenized",
    "num_response_tokens_in_partial_guided_prompts",
    "partial_guided_responses_tokenized",
    "partial_guided_predictions",
    "partial_guided_predictions_correctness",
)
