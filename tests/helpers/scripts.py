"""The stage scripts as real processes (a fresh interpreter each, on the tiny models): the command
line of a script, started in the background and waited for, or SIGKILLed part-way."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.stages import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
RESULT = re.compile(r"\d+_r\d+\.json")  # a result file: <problem id>_r<repeat>.json


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


def results_in(folder: Path) -> list[str]:
    """The ``<id>_r<repeat>.json`` result files in ``folder``."""
    return [n for n in os.listdir(folder) if RESULT.fullmatch(n)] if folder.is_dir() else []


def run_and_kill(workdir: Path, cmd: list[str], result_dir: Path, total: int, log: Path) -> int:
    """Start ``cmd``, SIGKILL it once some but not all of its ``total`` result files exist;
    return the killed process's pid."""
    proc = start(workdir, cmd, log)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not results_in(result_dir):
            assert proc.poll() is None, f"{Path(cmd[1]).name} ended before it wrote a result:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no result file written in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed: give it more problems"
    written = len(results_in(result_dir))
    assert 0 < written < total, f"killed after {written} of {total} results: not mid-way"
    return proc.pid
