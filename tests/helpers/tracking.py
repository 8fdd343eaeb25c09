"""wandb offline, as ``train_classifier.py --track 1`` logs to it in the tests: the environment
of such a run and wandb's own reader of what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def wandb_env(root: Path, pythonpath: str) -> dict:
    """Offline, silent wandb writing under ``root/wandb_dir``; no key, no user config, no server."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    wandb_dir = root / "wandb_dir"
    env.update(PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               WANDB_SILENT="true", WANDB_DIR=str(wandb_dir), WANDB_CONFIG_DIR=str(wandb_dir / "config"),
               WANDB_CACHE_DIR=str(wandb_dir / "cache"), WANDB_DATA_DIR=str(wandb_dir / "data"),
               WANDB_BASE_URL="http://127.0.0.1:9")  # a closed port: any upload attempt would fail
    return env


def inspect(run_dir: Path, env: dict, *flags: str) -> str:
    """``wandb leet inspect --json [flags] run_dir`` (wandb's reader of the transaction log)."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
