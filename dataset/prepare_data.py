"""Build the processed GSM8K / MATH files and their train/eval split maps.

    python dataset/prepare_data.py --raw_dir ../shared/datasets/raw --splits_dir ../shared/datasets/splits
    python dataset/prepare_data.py [--datasets gsm8k math] [--eval_ratio 0.1] [--seed 47] [--out_dir dataset]

writes into ``--out_dir`` (default: this folder)

    gsm8k_train.jsonl  gsm8k_test.jsonl    {"problem", "solution", "answer", "prompt"}
    math_train.jsonl   math500_test.jsonl  {"problem", "solution", "category", "difficulty", "prompt"}
    gsm8k_train_eval.json  gsm8k_test_eval.json  math_train_eval.json  math500_test_eval.json

Records are ``json.dumps(record)`` joined with "\\n" (no trailing newline); split maps are
``{problem: {"split": "train"|"eval", "id": i}}`` as ``json.dumps(obj, indent=4)``.
Without ``--raw_dir`` the data come from the Hugging Face hub (openai/gsm8k,
HuggingFaceH4/MATH-500, EleutherAI/hendrycks_math); with it, from
``RAW_DIR/{gsm8k,math}/{train,test}.jsonl``. Without ``--splits_dir`` the maps are built
(train: the first ``int(eval_ratio * n)`` ids of ``RandomState(seed).permutation(n)`` are
eval; test: all eval), which reproduces the original maps at the defaults; with it, the
maps are copied byte for byte after checking that their keys are exactly the problems,
and every processed file is put in its map's key order. Nothing is written unless every
input checks out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as ``python dataset/prepare_data.py``
    sys.path.insert(0, str(REPO_ROOT))

from utils.data.io import atomic_open, dumps_jsonl, read_jsonl  # noqa: E402
from utils.registry import choose  # noqa: E402
from utils.data.problems import gsm8k_record, math_record  # noqa: E402
from utils.data.splits import build_split_map, dumps_split_map, load_split_map  # noqa: E402

DATASETS = ("gsm8k", "math")
PARTS = ("train", "test")
# dataset -> part -> (processed file, split map file)
OUTPUT_FILES = {
    "gsm8k": {"train": ("gsm8k_train.jsonl", "gsm8k_train_eval.json"), "test": ("gsm8k_test.jsonl", "gsm8k_test_eval.json")},
    "math": {"train": ("math_train.jsonl", "math_train_eval.json"), "test": ("math500_test.jsonl", "math500_test_eval.json")},
}
GSM8K_HUB = ("openai/gsm8k", "main")
MATH500_HUB = "HuggingFaceH4/MATH-500"
MATH_TRAIN_HUB = "EleutherAI/hendrycks_math"
MATH_TRAIN_HUB_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
CONVERTERS: dict[str, Callable[[dict], dict]] = {"gsm8k": gsm8k_record, "math": math_record}


def convert_rows(dataset: str, rows: list[dict], source: str) -> list[dict]:
    """Convert every raw row; a bad row raises ``ValueError`` naming ``source`` and its 0-based index."""
    convert = choose("dataset", dataset, CONVERTERS)
    if not rows:
        raise ValueError(f"{source}: no records")
    records = []
    for index, row in enumerate(rows):
        try:
            records.append(convert(row))
        except ValueError as err:
            raise ValueError(f"{source}: record {index}: {err}") from None
    return records


# --------------------------------------------------------------------------- loading


def load_raw(raw_dir: str | Path, dataset: str) -> dict[str, tuple[list[dict], str]]:
    """``{part: (rows, source)}`` from ``RAW_DIR/<dataset>/<part>.jsonl``."""
    choose("dataset", dataset, DATASETS)
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"--raw_dir {raw_dir} is not a folder")
    loaded = {}
    for part in PARTS:
        path = raw_dir / dataset / f"{part}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"raw file not found: {path} (expected RAW_DIR/{dataset}/{part}.jsonl)")
        loaded[part] = (read_jsonl(path), str(path))
    return loaded


def load_hub(dataset: str) -> dict[str, tuple[list[dict], str]]:
    """``{part: (rows, source)}`` from the Hugging Face hub (needs network or a warm cache)."""
    choose("dataset", dataset, DATASETS)
    from datasets import load_dataset  # slow import, only needed here

    if dataset == "gsm8k":
        name, config = GSM8K_HUB
        splits = load_dataset(name, config)
        return {part: ([dict(row) for row in splits[part]], f"{name}:{config}/{part}") for part in PARTS}
    train_rows: list[dict] = []
    for config in MATH_TRAIN_HUB_CONFIGS:
        train_rows.extend(dict(row) for row in load_dataset(MATH_TRAIN_HUB, config, split="train"))
    test_rows = [dict(row) for row in load_dataset(MATH500_HUB, split="test")]
    return {
        "train": (train_rows, f"{MATH_TRAIN_HUB}/train"),
        "test": (test_rows, f"{MATH500_HUB}/test"),
    }


# --------------------------------------------------------------------------- split maps


def align_to_split_map(records: list[dict], split_map: dict, name: str) -> list[dict]:
    """Return ``records`` in the key order of ``split_map``; the keys must be exactly their problems."""
    by_problem: dict[str, dict] = {}
    for index, record in enumerate(records):
        problem = record["problem"]
        if problem in by_problem:
            first = next(i for i, r in enumerate(records) if r["problem"] == problem)
            raise ValueError(f"{name}: duplicate problem text at line indices {first} and {index}: {problem[:80]!r}")
        by_problem[problem] = record
    missing = [problem for problem in by_problem if problem not in split_map]
    extra = [key for key in split_map if key not in by_problem]
    if missing or extra:
        example = f"e.g. {missing[0][:80]!r} is not a key" if missing else f"e.g. key {extra[0][:80]!r} is not a problem"
        raise ValueError(
            f"{name}: keys do not match the {len(records)} problems "
            f"({len(missing)} problems missing from the map, {len(extra)} keys not among the problems; {example})"
        )
    return [by_problem[key] for key in split_map]


def _count_splits(split_map: dict) -> str:
    n_eval = sum(entry["split"] == "eval" for entry in split_map.values())
    return f"{len(split_map)} keys ({len(split_map) - n_eval} train / {n_eval} eval)"


def prepare_dataset(
    dataset: str,
    loaded: dict[str, tuple[list[dict], str]],
    splits_dir: str | Path | None = None,
    eval_ratio: float = 0.1,
    seed: int = 47,
) -> list[tuple[str, bytes, str]]:
    """Everything to write for one dataset: ``[(file name, bytes, summary), ...]``.

    Train maps use ``eval_ratio``; test maps are all eval. With ``splits_dir`` the maps are
    copied verbatim and the records are put in their key order.
    """
    outputs = []
    for part in PARTS:
        data_name, map_name = OUTPUT_FILES[dataset][part]
        rows, source = loaded[part]
        records = convert_rows(dataset, rows, source)
        if splits_dir is None:
            split_map = build_split_map([r["problem"] for r in records], eval_ratio if part == "train" else None, seed)
            map_bytes = dumps_split_map(split_map).encode("utf-8")
        else:
            map_path = Path(splits_dir) / map_name
            split_map = load_split_map(map_path)
            records = align_to_split_map(records, split_map, str(map_path))
            map_bytes = map_path.read_bytes()
        outputs.append((data_name, dumps_jsonl(records).encode("utf-8"), f"{len(records)} records"))
        outputs.append((map_name, map_bytes, _count_splits(split_map)))
    return outputs


# --------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=str, default=str(Path(__file__).resolve().parent), help="where the files go (default: this folder)")
    parser.add_argument("--raw_dir", type=str, default=None, help="RAW_DIR/{gsm8k,math}/{train,test}.jsonl (default: load from the Hugging Face hub)")
    parser.add_argument("--splits_dir", type=str, default=None, help="copy the split maps from here (default: build them)")
    parser.add_argument("--datasets", type=str, nargs="+", default=list(DATASETS), choices=DATASETS, help="which datasets to prepare")
    parser.add_argument("--eval_ratio", type=float, default=0.1, help="eval fraction of the train maps (ignored with --splits_dir)")
    parser.add_argument("--seed", type=int, default=47, help="permutation seed of the train maps (ignored with --splits_dir)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    if not 0.0 <= args.eval_ratio <= 1.0:
        raise ValueError(f"--eval_ratio must be in [0, 1], got {args.eval_ratio}")
    if args.splits_dir is not None and not Path(args.splits_dir).is_dir():
        raise FileNotFoundError(f"--splits_dir {args.splits_dir} is not a folder")
    outputs = []
    for dataset in dict.fromkeys(args.datasets):  # unique, in order
        loaded = load_raw(args.raw_dir, dataset) if args.raw_dir is not None else load_hub(dataset)
        outputs.extend(prepare_dataset(dataset, loaded, args.splits_dir, args.eval_ratio, args.seed))
    out_dir = Path(args.out_dir)
    for name, data, summary in outputs:  # every input checked before the first write
        path = out_dir / name
        with atomic_open(path, "wb") as handle:
            handle.write(data)
        print(f"{path}: {summary}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, OSError) as err:  # OSError covers FileNotFoundError and hub connection errors
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
        sys.exit(1)
