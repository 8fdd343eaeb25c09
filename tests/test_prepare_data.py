"""dataset/prepare_data.py rebuilds the reference files and the original split maps byte for byte."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dataset import prepare_data
from utils.data.problems import PROMPT
from dataset.prepare_data import load_hub, prepare_dataset
from utils.data.problems import gsm8k_record, math_record, parse_level
from utils.data.splits import build_split_map, load_split_map, write_split_map

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SCRIPT = REPO / "dataset" / "prepare_data.py"
MAP_FILES = ("gsm8k_train_eval.json", "gsm8k_test_eval.json", "math_train_eval.json", "math500_test_eval.json")

needs_shared = pytest.mark.skipif(not (SHARED / "raw").is_dir(), reason=f"shared datasets not found at {SHARED}")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two full runs: maps copied from ``splits/`` and maps rebuilt from the rule."""
    if not (SHARED / "raw").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    copied = tmp_path_factory.mktemp("copied")
    rebuilt = tmp_path_factory.mktemp("rebuilt")
    for out_dir, extra in ((copied, ["--splits_dir", str(SHARED / "splits")]), (rebuilt, [])):
        result = run_script("--raw_dir", str(SHARED / "raw"), "--out_dir", str(out_dir), *extra)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.strip().splitlines()) == 8, result.stdout
    return {"copied": copied, "rebuilt": rebuilt}


# --------------------------------------------------------------------------- full runs on the shared data


@pytest.mark.parametrize("name", ["gsm8k_test.jsonl", "math500_test.jsonl"])
def test_test_files_equal_reference_bytes(built, name):
    assert (built["copied"] / name).read_bytes() == (SHARED / "reference" / name).read_bytes()


@pytest.mark.parametrize("mode", ["copied", "rebuilt"])
@pytest.mark.parametrize("name", MAP_FILES)
def test_split_maps_equal_original_bytes(built, mode, name):
    assert (built[mode] / name).read_bytes() == (SHARED / "splits" / name).read_bytes()


def test_both_runs_write_the_same_data_files(built):
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl", "math_train.jsonl", "math500_test.jsonl"):
        assert (built["copied"] / name).read_bytes() == (built["rebuilt"] / name).read_bytes(), name


def test_gsm8k_train_records(built):
    data = (built["copied"] / "gsm8k_train.jsonl").read_text(encoding="utf-8")
    assert not data.endswith("\n")
    records = read_records(built["copied"] / "gsm8k_train.jsonl")
    assert len(records) == 7473
    assert all(list(r) == ["problem", "solution", "answer", "prompt"] for r in records)
    assert all("," not in r["answer"] and r["answer"].lstrip("-").isdigit() for r in records)
    assert all(r["prompt"] == PROMPT.format(problem=r["problem"]) for r in records)
    assert all("####" not in r["solution"] for r in records)
    raw = [json.loads(line) for line in (SHARED / "raw" / "gsm8k" / "train.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in records] == [r["question"] for r in raw]
    assert sum("," in r["answer"].rpartition("#### ")[2] for r in raw) == 79  # the comma answers were cleaned


def test_math_train_records(built):
    records = read_records(built["copied"] / "math_train.jsonl")
    assert len(records) == 7500
    split_map = json.loads((SHARED / "splits" / "math_train_eval.json").read_text())
    assert [r["problem"] for r in records] == list(split_map)
    assert all(list(r) == ["problem", "solution", "category", "difficulty", "prompt"] for r in records)
    difficulties = [r["difficulty"] for r in records]
    assert all(d is None or (type(d) is int and 1 <= d <= 5) for d in difficulties)
    assert difficulties.count(None) == 2
    assert all(r["prompt"] == PROMPT.format(problem=r["problem"]) for r in records)


def test_math_train_is_reordered_to_the_map(tmp_path):
    """Rows in another order (as the hub gives them) come out in the map's key order."""
    if not (SHARED / "raw").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    lines = (SHARED / "raw" / "math" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    raw = tmp_path / "raw" / "math"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (raw / "test.jsonl").write_bytes((SHARED / "raw" / "math" / "test.jsonl").read_bytes())
    out = tmp_path / "out"
    result = run_script("--raw_dir", str(tmp_path / "raw"), "--splits_dir", str(SHARED / "splits"), "--datasets", "math", "--out_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["math500_test.jsonl", "math500_test_eval.json", "math_train.jsonl", "math_train_eval.json"]
    split_map = json.loads((SHARED / "splits" / "math_train_eval.json").read_text())
    assert [r["problem"] for r in read_records(out / "math_train.jsonl")] == list(split_map)


@needs_shared
def test_hub_loader_with_fake_load_dataset(monkeypatch):
    """load_hub's calls and concatenation, with ``datasets.load_dataset`` replaced by local rows."""
    gsm8k = {p: [json.loads(l) for l in (SHARED / "raw" / "gsm8k" / f"{p}.jsonl").read_text().splitlines()] for p in ("train", "test")}
    math_train = [json.loads(l) for l in (SHARED / "raw" / "math" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    math500 = [json.loads(l) for l in (SHARED / "raw" / "math" / "test.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "openai/gsm8k" and name == "main" and split is None:
            return gsm8k
        if path == "HuggingFaceH4/MATH-500" and split == "test":
            return math500
        if path == "EleutherAI/hendrycks_math" and split == "train":
            # reversed within each subject, so that the hub order differs from the map's
            return [r for r in math_train if r["type"].lower().replace(" & ", "_and_").replace(" ", "_") == name][::-1]
        raise AssertionError(f"unexpected load_dataset call {path, name, split}")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    loaded = load_hub("math")
    assert len(calls) == 8 and len(loaded["train"][0]) == 7500
    subjects = sorted({r["type"] for r in math_train})  # the configs are concatenated in alphabetical order
    expected = [r["problem"] for s in subjects for r in [r for r in math_train if r["type"] == s][::-1]]
    assert [r["problem"] for r in loaded["train"][0]] == expected
    outputs = {name: data for name, data, _ in prepare_dataset("math", loaded, SHARED / "splits")}
    assert outputs["math500_test.jsonl"] == (SHARED / "reference" / "math500_test.jsonl").read_bytes()
    split_map = json.loads((SHARED / "splits" / "math_train_eval.json").read_text())
    assert [json.loads(l)["problem"] for l in outputs["math_train.jsonl"].decode().split("\n")] == list(split_map)
    gsm = {name: data for name, data, _ in prepare_dataset("gsm8k", load_hub("gsm8k"), None)}
    assert gsm["gsm8k_test.jsonl"] == (SHARED / "reference" / "gsm8k_test.jsonl").read_bytes()
    assert gsm["gsm8k_train_eval.json"] == (SHARED / "splits" / "gsm8k_train_eval.json").read_bytes()


# --------------------------------------------------------------------------- bad input


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_empty_raw_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "raw").mkdir()
    result = run_script("--raw_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "train.jsonl")
    assert not (tmp_path / "out").exists()


def write_tiny_gsm8k(raw: Path, answers: list[str]) -> list[str]:
    questions = [f"What is {i} + {i}?" for i in range(len(answers))]
    for part in ("train", "test"):
        (raw / "gsm8k").mkdir(parents=True, exist_ok=True)
        rows = [json.dumps({"question": q, "answer": a}) for q, a in zip(questions, answers)]
        (raw / "gsm8k" / f"{part}.jsonl").write_text("\n".join(rows) + "\n")
    return questions


def test_split_map_keys_must_match_the_problems(tmp_path):
    questions = write_tiny_gsm8k(tmp_path / "raw", ["0 + 0 = <<0+0=0>>0\n#### 0", "2\n#### 2", "4\n#### 4"])
    splits = tmp_path / "splits"
    write_split_map(splits / "gsm8k_train_eval.json", build_split_map(questions, 0.5))
    write_split_map(splits / "gsm8k_test_eval.json", build_split_map(questions[:2] + ["another problem"], None))
    result = run_script("--raw_dir", str(tmp_path / "raw"), "--splits_dir", str(splits), "--datasets", "gsm8k", "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "gsm8k_test_eval.json", "keys do not match")
    assert not (tmp_path / "out").exists()  # nothing written, not even the valid train files
    write_split_map(splits / "gsm8k_test_eval.json", build_split_map(questions, None))
    result = run_script("--raw_dir", str(tmp_path / "raw"), "--splits_dir", str(splits), "--datasets", "gsm8k", "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "out" / "gsm8k_test.jsonl")
    assert records[0] == {"problem": questions[0], "solution": "0 + 0 = <<0+0=0>>0", "answer": "0", "prompt": PROMPT.format(problem=questions[0])}


def test_malformed_gsm8k_answer_is_a_one_line_error(tmp_path):
    write_tiny_gsm8k(tmp_path / "raw", ["2\n#### 2", "no final answer line"])
    result = run_script("--raw_dir", str(tmp_path / "raw"), "--datasets", "gsm8k", "--out_dir", str(tmp_path / "out"))
    assert_one_line_error(result, "record 1", "####")


def test_unknown_dataset_is_rejected():
    result = run_script("--datasets", "aime")
    assert result.returncode != 0 and "invalid choice" in result.stderr


# --------------------------------------------------------------------------- units


def test_build_split_map_ids_and_counts():
    problems = [f"p{i}" for i in range(10)]
    split_map = build_split_map(problems, 0.3, seed=47)
    assert list(split_map) == problems
    assert [entry["id"] for entry in split_map.values()] == list(range(10))
    eval_ids = [entry["id"] for entry in split_map.values() if entry["split"] == "eval"]
    assert eval_ids == sorted(int(i) for i in np.random.RandomState(47).permutation(10)[:3])
    assert len(eval_ids) == 3 and sum(e["split"] == "train" for e in split_map.values()) == 7
    assert build_split_map(problems, 0.3, seed=48) != split_map
    assert sum(e["split"] == "eval" for e in build_split_map(problems, 0.29).values()) == 2  # int(2.9), not rounded
    assert all(e["split"] == "train" for e in build_split_map(problems, 0.0).values())


def test_build_split_map_all_eval_and_duplicates():
    assert build_split_map(["a", "b"], None) == {"a": {"split": "eval", "id": 0}, "b": {"split": "eval", "id": 1}}
    assert build_split_map([], None) == {}
    with pytest.raises(ValueError, match=r"line indices 1 and 3"):
        build_split_map(["a", "b", "c", "b"], 0.5)
    with pytest.raises(ValueError, match="eval_ratio"):
        build_split_map(["a"], 1.5)


def test_split_map_file_round_trip_and_errors(tmp_path):
    split_map = build_split_map(["x", "y\nz", "é"], 0.4)
    path = tmp_path / "m.json"
    write_split_map(path, split_map)
    assert path.read_text(encoding="utf-8") == json.dumps(split_map, indent=4)
    assert load_split_map(path) == split_map
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_split_map(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"x": {"split": "eval", "id": 0}')
    with pytest.raises(ValueError, match="bad.json"):
        load_split_map(tmp_path / "bad.json")
    (tmp_path / "ids.json").write_text(json.dumps({"x": {"split": "eval", "id": 1}}))
    with pytest.raises(ValueError, match="ids.json"):
        load_split_map(tmp_path / "ids.json")


def test_record_conversions():
    assert gsm8k_record({"question": "Q", "answer": "a\n#### b\nc\n#### 1,450,000"}) == {
        "problem": "Q", "solution": "a\n#### b\nc", "answer": "1450000", "prompt": PROMPT.format(problem="Q")
    }
    assert PROMPT.format(problem="Q") == "Problem:\n\nQ Write your answer inside \\boxed{}.\n\nSolution:"
    assert [parse_level(x) for x in ("Level 1", "Level 5", "Level ?", 3)] == [1, 5, None, 3]
    with pytest.raises(ValueError, match="level"):
        parse_level("hard")
    train = math_record({"problem": "P", "level": "Level 2", "type": "Algebra", "solution": "S"})
    test = math_record({"problem": "P", "solution": "S", "answer": "1", "subject": "Algebra", "level": 2, "unique_id": "u"})
    assert train == test == {"problem": "P", "solution": "S", "category": "Algebra", "difficulty": 2, "prompt": PROMPT.format(problem="P")}
    with pytest.raises(ValueError, match="'solution'"):
        math_record({"problem": "P", "level": 1, "type": "Algebra"})
    assert prepare_data.DATASETS == ("gsm8k", "math")
