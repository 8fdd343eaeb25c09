"""The stage scripts as real processes (a fresh interpreter each, on the tiny models): the command
line of a script, started in the background and waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.stages import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
TIMEOUT = 300


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


def start(workdir: Path, cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in the background (stdout and stderr into ``log``)."""
    with open(log, "wb") as handle:
        return subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=handle, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    """Wait for ``proc``; it must succeed."""
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{Path(proc.args[1]).name} failed:\n{log.read_text()[-3000:]}"
