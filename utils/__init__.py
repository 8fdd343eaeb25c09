"""Shared library of the Q# math-reasoning scripts, grouped by the pipeline.

``data`` (problem records and their prompt, split maps, grading, atomic I/O), ``decoding``
(the Q# guidance, its KL, the backends behind one seam, collection and evaluation),
``training`` (examples, targets, the resumable training state, metrics), and beside them
the pieces every stage shares: ``cli``, ``models``, ``classifier``, ``seeding``,
``distributed``, ``registry``. ``demo`` holds what only the quickstart and the real-model
demo use. ``guidance``, ``answers``, ``tiny_models`` and ``real_models`` are kept paths
that re-export from their sub-packages.
"""
