"""Merge the per-problem files of a collection run into ``all_train_data.jsonl``.

    python combine_training_data.py --data_template_path collected_data/llama_3_8b_instruct_gsm8k/ \
        --data_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json

Reads every ``<id>_r<repeat>.json`` in ``--data_template_path`` and writes, next to them,
one line per problem that has collected data: the problem record plus each collected list
concatenated over repeats in repeat order. Problems without any file are left out.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from utils.cli import run
from utils.data import read_json, write_jsonl
from utils.problems import COLLECTED_FIELDS, load_problems
from utils.splits import load_split_map

OUTPUT_NAME = "all_train_data.jsonl"
FILE_PATTERN = re.compile(r"^(\d+)_r(\d+)\.json$")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_template_path", type=str, required=True, help="folder of the per-problem files")
    p.add_argument("--data_path", type=str, required=True, help="problems jsonl the data was collected on")
    p.add_argument("--train_eval_save_path", type=str, required=True, help="split map json of those problems")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    folder = Path(args.data_template_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data_template_path {folder} is not a folder")
    records, _ = load_problems(args.data_path)
    split_map = load_split_map(args.train_eval_save_path)

    files: dict[int, dict[int, Path]] = defaultdict(dict)
    for path in folder.iterdir():
        match = FILE_PATTERN.match(path.name)
        if match:
            files[int(match.group(1))][int(match.group(2))] = path
    if not files:
        raise ValueError(f"no collected files (<id>_r<repeat>.json) in {folder}")

    merged = []
    for problem_id in tqdm(sorted(files), desc="combine", unit="problem"):
        if problem_id >= len(records):
            raise ValueError(f"{files[problem_id][min(files[problem_id])]}: problem id {problem_id} is not in "
                             f"{args.data_path} ({len(records)} problems)")
        record = dict(records[problem_id])
        if record["problem"] not in split_map:
            raise ValueError(f"problem {problem_id} of {args.data_path} is not in the split map {args.train_eval_save_path}")
        lists = {field: [] for field in COLLECTED_FIELDS}
        for repeat in sorted(files[problem_id]):
            path = files[problem_id][repeat]
            data = read_json(path)
            if data.get("problem") != record["problem"]:
                raise ValueError(f"{path}: its problem text differs from problem {problem_id} of {args.data_path}")
            for field in COLLECTED_FIELDS:
                if field not in data:
                    raise ValueError(f"{path}: missing field {field}")
                lists[field].extend(data[field])
        merged.append({**record, **lists})

    output = folder / OUTPUT_NAME
    write_jsonl(output, merged)
    repeats = sum(len(m["partial_guided_predictions_correctness"]) for m in merged)
    print(f"combine: {len(merged)} problems, {repeats} samples -> {output}")


if __name__ == "__main__":
    run(main, parse_args())
