"""Probes the tests put around the code under test: record what a logits processor saw, count
nucleus computations."""

from __future__ import annotations

from transformers import LogitsProcessor


class Recorder(LogitsProcessor):
    """Wraps a processor and keeps (input_ids, scores in, scores out) of every step."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def __call__(self, input_ids, scores):
        out = self.inner(input_ids, scores)
        self.steps.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


class NucleusCount:
    """Counts nucleus computations: calls of ``utils.decoding.kl.top_p_filter`` and calls of
    transformers' ``TopPLogitsWarper`` made outside it (generate's or the engine's own)."""

    def __init__(self, monkeypatch):
        from transformers import TopPLogitsWarper

        from utils.decoding import kl

        self.filter_calls, self.warper_calls, self.inside = 0, 0, False
        top_p_filter, warper_call = kl.top_p_filter, TopPLogitsWarper.__call__

        def counted_filter(*args):
            self.filter_calls, self.inside = self.filter_calls + 1, True
            try:
                return top_p_filter(*args)
            finally:
                self.inside = False

        def counted_warper(warper, *args):
            self.warper_calls += not self.inside
            return warper_call(warper, *args)

        monkeypatch.setattr(kl, "top_p_filter", counted_filter)
        monkeypatch.setattr(TopPLogitsWarper, "__call__", counted_warper)
