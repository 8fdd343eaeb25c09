"""json / jsonl I/O: round trips, atomic writes, malformed lines reported with their line number."""

from __future__ import annotations

import pytest

from utils.data.io import atomic_open, read_json, read_jsonl, write_json, write_jsonl
from utils.seeding import repeat_seed


def test_jsonl_round_trip(tmp_path):
    records = [{"problem": "1 + 1", "answer": "2"}, {"problem": "\\frac{1}{2} é", "answer": "0.5"}]
    write_jsonl(tmp_path / "a.jsonl", records)
    assert read_jsonl(tmp_path / "a.jsonl") == records
    write_json(tmp_path / "b.json", {"k": [1, 2]})
    assert read_json(tmp_path / "b.json") == {"k": [1, 2]}


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write('{"new": tr')
            raise RuntimeError("killed mid-write")
    assert read_json(path) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON line"):
        read_jsonl(path)
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_repeat_seed_matches_original():
    assert [repeat_seed(47, r) for r in range(3)] == [47, 97, 147]


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp makes 0600 files; results on a shared filesystem must be readable like any other file."""
    write_json(tmp_path / "a.json", {"x": 1})
    with open(tmp_path / "b.json", "w") as handle:
        handle.write("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777
