"""Kept at this path for outside code: the Q# guidance lives in ``utils.decoding.guidance``, its KL in ``utils.decoding.kl``."""

from utils.decoding.guidance import QSharpLogitsProcessor, guidance_offsets, resolve_guidance_mode
from utils.decoding.kl import kl_divergence

__all__ = ["QSharpLogitsProcessor", "guidance_offsets", "kl_divergence", "resolve_guidance_mode"]
