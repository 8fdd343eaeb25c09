"""tests/helpers/processes.py: a stalled command fails with its processes' stacks and leaves none behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.processes import Stalled, run_tree

HANG = "import time\ndef hang_in_the_child():\n    time.sleep(600)\nhang_in_the_child()\n"
PARENT = (f"import subprocess, sys, time\nchild = subprocess.Popen([sys.executable, '-c', {HANG!r}])\n"
          "print(child.pid, flush=True)\ntime.sleep(600)\n")


def test_a_stalled_tree_dumps_every_stack_and_is_killed():
    with pytest.raises(Stalled) as stalled:
        run_tree([sys.executable, "-c", PARENT], timeout=1.5, env=dict(os.environ))
    assert "hang_in_the_child" in stalled.value.stderr  # the grandchild's stack, from faulthandler
    child = int(stalled.value.stdout.split()[0])
    time.sleep(0.2)
    assert not running(child)


def running(pid: int) -> bool:
    """``pid`` exists and is no zombie (a killed orphan may wait unreaped under a container's init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_command_within_its_timeout_is_a_completed_process():
    result = run_tree([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60, env=dict(os.environ))
    assert (result.returncode, result.stdout) == (3, "out\n")
