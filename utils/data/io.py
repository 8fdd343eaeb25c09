"""json / jsonl I/O whose writes are atomic: a file appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname().replace(".", "-") or "host"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temporary_prefix(name: str) -> str:
    """Prefix of the temporaries written for ``name``: ``.<name>.<host>.<pid>.`` (see :func:`remove_stale_temporaries`)."""
    return f".{name}.{_HOST}.{os.getpid()}."


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success.

    An exception inside the block leaves ``path`` untouched (old content or absent) and
    removes the temporary file; an ``OSError`` without a file name (a full disk: ENOSPC from
    a write, the flush or ``os.fsync``) is given ``path``, so that its one-line message names
    the file. A process killed outright (SIGKILL, out of memory) can leave its temporary
    behind; :func:`remove_stale_temporaries` clears those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # the permissions of a plain open(), not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed processes of this host left in ``folder``.

    Temporaries are named ``.<name>.<host>.<pid>.<random>.tmp``; one is stale when its
    host is this one and its process no longer runs. Those of live processes (shards
    writing into the same folder) and of other hosts are left alone. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or match.group("host") != _HOST or _process_alive(int(match.group("pid"))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+(\.tmp)?$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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


def read_jsonl(path: str | os.PathLike, line_numbers: bool = False) -> list:
    """Load a JSON-lines file (blank lines skipped); a bad line raises ``ValueError`` with file
    and line number. ``line_numbers``: ``(line number, record)`` pairs, to name a record's line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: malformed JSON line ({err.msg})") from None
            records.append((line_number, record) if line_numbers else record)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Atomically write one JSON object per line (with a trailing newline)."""
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def dumps_jsonl(records: list[dict]) -> str:
    """``json.dumps`` per record (default settings), joined with "\\n", no trailing newline."""
    return "\n".join(json.dumps(record) for record in records)
