"""Decoding: the Q# guidance, its KL, the backends behind one seam, and the collection and evaluation algorithms."""
