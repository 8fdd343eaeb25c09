"""Run a command whose processes may hang (``accelerate launch`` and its ranks): past its
timeout every process of its tree prints its Python stacks, then all of them are killed, so a
stall fails with where each process stood and leaves no orphan rank behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


class Stalled(AssertionError):
    """A command ran past its timeout; ``stderr`` ends with each of its processes' stacks."""

    def __init__(self, cmd: list[str], timeout: float, stdout: str, stderr: str):
        self.stdout, self.stderr = stdout, stderr
        super().__init__(f"{' '.join(cmd[:4])} ... ran past {timeout:.0f} s; the processes' stacks "
                         f"(faulthandler) close its stderr:\n{stderr[-6000:]}")


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren and so on (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def run_tree(cmd: list[str], *, timeout: float, env: dict, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` with faulthandler on in every
    process; past ``timeout`` seconds each one dumps its stacks (SIGABRT) and the tree is
    SIGKILLed: raises :class:`Stalled`."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [proc.pid, *descendants(proc.pid)]
        signal_all(tree[1:], signal.SIGABRT)  # the ranks first: the launcher would tear them down
        time.sleep(1.0)
        signal_all(tree, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        raise Stalled(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port free on this machine now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(script: Path, *args: str, num_processes: int = 2) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes N script args`` (gloo on the CPU), on a free port."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), *args]
