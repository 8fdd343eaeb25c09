"""json / jsonl I/O whose writes are atomic: a file appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success.

    A crash or exception inside the block leaves ``path`` untouched (old content or
    absent) and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """Load one JSON document; a malformed file raises ``ValueError`` naming it."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 4) -> None:
    """Atomically write ``obj`` as JSON."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=indent)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Load a JSON-lines file (blank lines skipped); a bad line raises ``ValueError`` with file and line number."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: malformed JSON line ({err.msg})") from None
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Atomically write one JSON object per line (with a trailing newline)."""
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
