"""Train/eval split maps: ``{problem_text: {"split": "train"|"eval", "id": i}}``.

The maps of the original code put the ``eval`` ids at the first ``int(eval_ratio * n)``
entries of ``numpy.random.RandomState(seed).permutation(n)`` (eval_ratio 0.1, seed 47);
test sets are all ``eval``. On disk a map is ``json.dumps(obj, indent=4)`` with no
trailing newline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from utils.data.io import atomic_open

SPLITS = ("train", "eval")


def build_split_map(problems: list[str], eval_ratio: float | None, seed: int = 47) -> dict:
    """Map each problem (in list order, ``id`` = position) to its split.

    ``eval_ratio=None`` puts every problem in ``eval``. A problem text that appears twice
    raises ``ValueError`` naming both 0-based line indices.
    """
    first_seen: dict[str, int] = {}
    for index, problem in enumerate(problems):
        if not isinstance(problem, str):
            raise ValueError(f"problem at line index {index} is not a string: {type(problem).__name__}")
        if problem in first_seen:
            raise ValueError(
                f"duplicate problem text at line indices {first_seen[problem]} and {index}: {problem[:80]!r}"
            )
        first_seen[problem] = index
    n = len(problems)
    if eval_ratio is None:
        eval_ids = set(range(n))
    else:
        if not 0.0 <= eval_ratio <= 1.0:
            raise ValueError(f"eval_ratio must be in [0, 1] or None, got {eval_ratio}")
        k = int(eval_ratio * n)
        eval_ids = {int(i) for i in np.random.RandomState(seed).permutation(n)[:k]}
    return {problem: {"split": "eval" if i in eval_ids else "train", "id": i} for i, problem in enumerate(problems)}


def dumps_split_map(split_map: dict) -> str:
    """The exact on-disk text of a split map (``indent=4``, no trailing newline)."""
    return json.dumps(split_map, indent=4)


def write_split_map(path: str | os.PathLike, split_map: dict) -> None:
    """Atomically write ``split_map`` as ``json.dumps(obj, indent=4)`` with no trailing newline."""
    with atomic_open(path) as handle:
        handle.write(dumps_split_map(split_map))


def validate_split_map(split_map: object, name: str = "split map") -> dict:
    """Check the map's shape: str keys, ``{"split", "id"}`` values, ids 0..n-1 in key order."""
    if not isinstance(split_map, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(split_map).__name__}")
    for position, (problem, entry) in enumerate(split_map.items()):
        if not isinstance(entry, dict) or entry.get("split") not in SPLITS or entry.get("id") != position:
            raise ValueError(
                f"{name}: entry {position} ({problem[:60]!r}) must be "
                f'{{"split": "train"|"eval", "id": {position}}}, got {entry!r}'
            )
    return split_map


def load_split_map(path: str | os.PathLike) -> dict:
    """Read and validate a split map; missing -> ``FileNotFoundError``, malformed -> ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split map not found: {path}")
    try:
        split_map = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON split map ({err})") from None
    return validate_split_map(split_map, str(path))


def ensure_split_map(path: str | os.PathLike, problems: list[str], eval_ratio: float, seed: int = 47) -> dict:
    """The split map at ``path``; built from ``problems`` with ``eval_ratio`` and written when missing.

    An existing map must hold every problem.
    """
    if not Path(path).is_file():
        split_map = build_split_map(problems, eval_ratio, seed)
        write_split_map(path, split_map)
        print(f"split map {path} did not exist: built it with eval_ratio {eval_ratio} (seed {seed})")
        return split_map
    split_map = load_split_map(path)
    missing = [index for index, problem in enumerate(problems) if problem not in split_map]
    if missing:
        raise ValueError(f"{len(missing)} problem(s) are not in the split map {path} (first: line index {missing[0]})")
    return split_map
