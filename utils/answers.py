"""Kept at this path for outside code: grading lives in ``utils.data.answers``."""

from utils.data.answers import MATCH_FNS, grade, is_equiv, majority_vote, pass_at_k

__all__ = ["MATCH_FNS", "grade", "is_equiv", "majority_vote", "pass_at_k"]
