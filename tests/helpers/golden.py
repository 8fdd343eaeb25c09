"""The golden fixtures of the original code (``../shared/golden``, outside the repository):
where they are, how a test module reads them, and how their checkpoints load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
SPEC_FIELDS = ("classifier_type", "loss_type", "use_bias", "num_atoms", "V_min", "V_max")


def load_fixtures(*names: str) -> list:
    """The named ``<name>.json`` fixtures; skips the calling module when ../shared is absent."""
    if not all((GOLDEN / f"{name}.json").is_file() for name in names):
        pytest.skip(f"golden fixtures not found in {GOLDEN}", allow_module_level=True)
    return [json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8")) for name in names]


def fixture_spec(model: str, **overrides) -> dict:
    """Head settings of a fixture checkpoint (``models/<name>/ckpt_0``) from its ``args.json``,
    where the original's eval script reads them."""
    args = json.loads((GOLDEN / model).parent.joinpath("args.json").read_text())
    return {**{name: args[name] for name in SPEC_FIELDS}, **overrides}
