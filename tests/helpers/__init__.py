"""What the test modules share: reference computations, probes, fixtures' data and runners.

Test modules import shared code from here only, never from one another (``tests/test_layout.py``
checks it); ``bench/`` does not import ``tests``.
"""
