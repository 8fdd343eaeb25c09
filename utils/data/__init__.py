"""Problem data: records and their prompt, train/eval split maps, answer grading, atomic file I/O."""
