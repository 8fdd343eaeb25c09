"""Merge the per-problem files of a collection run into ``all_train_data.jsonl``.

    python combine_training_data.py --data_template_path collected_data/llama_3_8b_instruct_gsm8k/ \
        --data_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json

Reads every ``<id>_r<repeat>.json`` in ``--data_template_path`` and writes, next to them,
one line per problem that has collected data: the problem record plus each collected list
concatenated over repeats in repeat order. Problems without any file are left out. Every
file is checked first (readable and whole, its problem that line of ``--data_path`` and in
the split map, no (problem, repeat) twice, lists of equal length); the first that fails is
named, the exit code is 2 and an existing output is left as it was.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from utils.cli import ArgumentParser, run
from utils.data.io import read_json, remove_stale_temporaries, write_jsonl
from utils.data.problems import COLLECTED_FIELDS, check_collected, load_problems
from utils.data.splits import load_split_map

OUTPUT_NAME = "all_train_data.jsonl"
FILE_PATTERN = re.compile(r"^(\d+)_r(\d+)\.json$")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_template_path", type=str, required=True, help="folder of the per-problem files")
    p.add_argument("--data_path", type=str, required=True, help="problems jsonl the data was collected on")
    p.add_argument("--train_eval_save_path", type=str, required=True, help="split map json of those problems")
    return p.parse_args(argv)


def find_files(folder: Path) -> dict[int, dict[int, Path]]:
    """``{problem id: {repeat: path}}`` of the ``<id>_r<repeat>.json`` files; two names for one
    (id, repeat), such as ``3_r0.json`` and ``03_r0.json``, are an error."""
    files: dict[int, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.iterdir()):
        match = FILE_PATTERN.match(path.name)
        if match:
            problem_id, repeat = int(match.group(1)), int(match.group(2))
            if repeat in files[problem_id]:
                raise ValueError(f"{path} and {files[problem_id][repeat]} both hold problem {problem_id}, repeat {repeat}")
            files[problem_id][repeat] = path
    if not files:
        raise ValueError(f"no collected files (<id>_r<repeat>.json) in {folder}")
    return files


def read_repeat(path: Path, record: dict) -> dict[str, list]:
    """The collected lists of one file, checked (:func:`utils.data.problems.check_collected`) and
    its problem ``record``'s."""
    data = check_collected(read_json(path), str(path))  # a truncated or malformed file raises ValueError naming it
    if data["problem"] != record["problem"]:
        raise ValueError(f"{path}: its problem text differs from that line of the problem file")
    return {field: data[field] for field in COLLECTED_FIELDS}


def main(args: argparse.Namespace) -> None:
    folder = Path(args.data_template_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data_template_path {folder} is not a folder")
    records, _ = load_problems(args.data_path)
    split_map = load_split_map(args.train_eval_save_path)
    remove_stale_temporaries(folder)
    files = find_files(folder)

    merged, seen = [], {}  # seen: (problem text, repeat) -> file
    for problem_id in tqdm(sorted(files), desc="combine", unit="problem"):
        first = files[problem_id][min(files[problem_id])]
        if problem_id >= len(records):
            raise ValueError(f"{first}: problem id {problem_id} is not in {args.data_path} ({len(records)} problems)")
        record = dict(records[problem_id])
        if record["problem"] not in split_map:
            raise ValueError(f"{first}: problem {problem_id} of {args.data_path} is not in the split map "
                             f"{args.train_eval_save_path}")
        lists = {field: [] for field in COLLECTED_FIELDS}
        for repeat in sorted(files[problem_id]):
            path = files[problem_id][repeat]
            key = (record["problem"], repeat)
            if key in seen:
                raise ValueError(f"{path} and {seen[key]} hold the same problem and repeat {repeat}")
            seen[key] = path
            for field, values in read_repeat(path, record).items():
                lists[field].extend(values)
        merged.append({**record, **lists})

    output = folder / OUTPUT_NAME  # written only once everything has been read and checked
    write_jsonl(output, merged)
    repeats = sum(len(m["partial_guided_predictions_correctness"]) for m in merged)
    print(f"combine: {len(merged)} problems, {repeats} samples -> {output}")


if __name__ == "__main__":
    run(main, parse_args())
