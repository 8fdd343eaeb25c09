"""Problem records: the prompt template, conversion of GSM8K/MATH rows, loading, validation, reference answers, dataset type."""

from __future__ import annotations

import os
from typing import Any

from utils.data.io import read_jsonl
from utils.registry import choose

# the prompt every stage feeds the model (the original's template)
PROMPT = "Problem:\n\n{problem} Write your answer inside \\boxed{{}}.\n\nSolution:"
DATASET_TYPES = ("gsm8k", "math")
# field holding the reference each dataset type is graded against
REFERENCE_FIELD = {"gsm8k": "answer", "math": "solution"}


GSM8K_ANSWER_MARK = "\n#### "


def _field(row: Any, key: str) -> Any:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise ValueError(f"missing field {key!r}")
    return row[key]


def _text(row: Any, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def gsm8k_record(row: dict) -> dict:
    """``{question, answer}`` -> ``{problem, solution, answer, prompt}``.

    solution = the answer text before the final "\\n#### "; answer = the text after it,
    commas removed (``"1,450,000"`` -> ``"1450000"``).
    """
    question = _text(row, "question")
    raw_answer = _text(row, "answer")
    if GSM8K_ANSWER_MARK not in raw_answer:
        raise ValueError(f"answer has no final {GSM8K_ANSWER_MARK!r} line")
    solution, _, final = raw_answer.rpartition(GSM8K_ANSWER_MARK)
    return {
        "problem": question,
        "solution": solution,
        "answer": final.replace(",", ""),
        "prompt": PROMPT.format(problem=question),
    }


def parse_level(level: Any) -> int | None:
    """MATH difficulty: an int stays, ``"Level N"`` -> N, ``"Level ?"`` -> None."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str) and level.startswith("Level "):
        rest = level[len("Level ") :]
        if rest == "?":
            return None
        if rest.isdigit():
            return int(rest)
    raise ValueError(f"unrecognised level {level!r} (expected an int or 'Level N' / 'Level ?')")


def math_record(row: dict) -> dict:
    """MATH500 ``{problem, solution, subject, level:int, ...}`` or MATH train
    ``{problem, solution, type, level:"Level N"}`` -> ``{problem, solution, category, difficulty, prompt}``."""
    problem = _text(row, "problem")
    category = _text(row, "subject" if isinstance(row, dict) and "subject" in row else "type")
    return {
        "problem": problem,
        "solution": _text(row, "solution"),
        "category": category,
        "difficulty": parse_level(_field(row, "level")),
        "prompt": PROMPT.format(problem=problem),
    }


def infer_dataset_type(records: list[dict]) -> str:
    """``gsm8k`` when any record carries an ``answer`` field (then every record must), else
    ``math`` (graded on ``solution``). A GSM8K file with one ``answer`` missing is thus refused
    at that record, never graded on the solutions of the whole file."""
    return "gsm8k" if any(isinstance(record, dict) and "answer" in record for record in records) else "math"


def load_problems(path: str | os.PathLike, dataset_type: str | None = None) -> tuple[list[dict], str]:
    """Problem records of a jsonl file and its dataset type (inferred when ``None``).

    Every record must be an object holding the strings ``problem``, ``prompt`` and its
    reference field (``answer`` for gsm8k, ``solution`` for math); the first one that does
    not is named with its file, line and field.
    """
    if not os.path.isfile(path):
        what = "is a folder, not a jsonl file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"problem file {path} {what}")
    lines = read_jsonl(path, line_numbers=True)
    if not lines:
        raise ValueError(f"problem file {path} holds no records")
    records = [record for _, record in lines]
    given = dataset_type is not None
    dataset_type = choose("dataset_type", dataset_type or infer_dataset_type(records), DATASET_TYPES)
    reference = REFERENCE_FIELD[dataset_type]
    for index, (line, record) in enumerate(lines):
        where = f"{path}: record {index} (line {line})"
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not a JSON object but {type(record).__name__}")
        for field in ("problem", "prompt", reference):
            if field not in record:
                hint = "" if given or field != reference else (
                    f" (other records carry {reference}, so the file is graded as {dataset_type}; "
                    "--dataset_type chooses)")
                raise ValueError(f"{where} has no {field} field{hint}")
            if not isinstance(record[field], str):
                raise ValueError(f"{where}: field {field} is not a string but {type(record[field]).__name__}")
    return records, dataset_type


def reference_of(record: dict, dataset_type: str) -> str:
    """What ``utils.data.answers.grade`` compares against: the ``answer`` (gsm8k) or ``solution`` (math)."""
    return record[REFERENCE_FIELD[choose("dataset_type", dataset_type, DATASET_TYPES)]]


def resolve_range(start_index: int, end_index: int, total: int) -> range:
    """Problem indices ``[start_index, end_index)``; ``end_index -1`` means all."""
    end = total if end_index == -1 else end_index
    if not 0 <= start_index < total:
        raise ValueError(f"--start_index {start_index} is out of range: the file holds {total} problems (0..{total - 1})")
    if not start_index < end <= total:
        raise ValueError(f"--end_index {end_index} must be -1 or in ({start_index}, {total}] (the file holds {total} problems)")
    return range(start_index, end)


# Lists that collection writes per repeat and combine concatenates across repeats (and rounds),
# with the type of their entries.
_TOKENS, _CORRECTNESS = "a list of token ids", "true/false (or 0/1)"
COLLECTED_ENTRY = {
    "fully_guided_predictions": "a string",
    "fully_guided_predictions_correctness": _CORRECTNESS,
    "partial_guided_prompts": "a string",
    "partial_guided_prompts_tokenized": _TOKENS,
    "num_response_tokens_in_partial_guided_prompts": "a whole number",
    "partial_guided_responses_tokenized": _TOKENS,
    "partial_guided_predictions": "a string",
    "partial_guided_predictions_correctness": _CORRECTNESS,
}
COLLECTED_FIELDS = tuple(COLLECTED_ENTRY)


def _entry_ok(kind: str, value) -> bool:
    if kind == _TOKENS:
        return isinstance(value, list) and (not value or set(map(type, value)) == {int} and min(value) >= 0)
    if kind == _CORRECTNESS:
        return value in (0, 1) and type(value) in (bool, int, float)
    return isinstance(value, str) if kind == "a string" else type(value) is int


def check_collected(record, where: str) -> dict:
    """A collected record (one ``<id>_r<k>.json`` file, or one line of ``all_train_data.jsonl``)
    as combine and training read it: an object with a ``problem`` string and every
    :data:`COLLECTED_FIELDS` list, of equal lengths and entries of their type. ``where``
    (``file`` or ``file:line``) starts the error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if not isinstance(record.get("problem"), str):
        raise ValueError(f"{where}: field problem is {'missing' if 'problem' not in record else 'not a string'}")
    for field in COLLECTED_FIELDS:
        if not isinstance(record.get(field), list):
            raise ValueError(f"{where}: field {field} is {'missing' if field not in record else 'not a list'}")
    lengths = {field: len(record[field]) for field in COLLECTED_FIELDS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: collected lists differ in length ({', '.join(f'{k} {v}' for k, v in lengths.items())})")
    for field, kind in COLLECTED_ENTRY.items():
        for position, value in enumerate(record[field]):
            if not _entry_ok(kind, value):
                raise ValueError(f"{where}: field {field}, entry {position}: expected {kind}, got {str(value)[:40]!r}")
    return record
