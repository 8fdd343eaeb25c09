"""The paths outside checks call stay where they were: each re-exports the object that now lives
in its sub-package (``python -m utils.tiny_models`` and ``python -m utils.real_models`` run as
processes in test_models and test_real_models_build)."""

from __future__ import annotations

import importlib

import pytest

KEPT = {  # kept path -> (real module, names)
    "utils.guidance": ("utils.decoding.guidance", ["QSharpLogitsProcessor"]),
    "utils.training": ("utils.training.targets", ["reward_targets"]),
    "utils.answers": ("utils.data.answers", ["grade", "majority_vote", "pass_at_k", "is_equiv"]),
    "utils.classifier": ("utils.classifier", ["ClassifierSpec", "QSharpClassifier", "per_position_loss", "reduce_loss",
                                             "expected_reward", "atom_index"]),
    "utils.tiny_models": ("utils.demo.tiny_models", ["main", "parse_args"]),
    "utils.real_models": ("utils.demo.real_models", ["main", "parse_args"]),
}


@pytest.mark.parametrize("kept", sorted(KEPT))
def test_kept_path_is_the_real_object(kept):
    real, names = KEPT[kept]
    for name in names:
        assert getattr(importlib.import_module(kept), name) is getattr(importlib.import_module(real), name), name


def test_kl_divergence_at_its_kept_path():
    from utils.decoding.kl import kl_divergence
    from utils.guidance import kl_divergence as kept

    assert kept is kl_divergence


@pytest.mark.parametrize("kept", ["utils.tiny_models", "utils.real_models"])
def test_kept_entry_points_take_out_dir(kept):
    assert importlib.import_module(kept).parse_args(["--out_dir", "somewhere"]).out_dir == "somewhere"
