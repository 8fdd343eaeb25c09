"""Shared library of the Q# math-reasoning scripts.

``classifier`` (Q/V value heads, losses, checkpoints), ``guidance`` (the guided-sampling
logits processor), ``answers`` (grading, maj@k, pass@k), ``models`` (loading, tokenisation,
stop ids), ``data`` (json/jsonl I/O), ``seeding``, ``registry`` and ``tiny_models``.
"""
