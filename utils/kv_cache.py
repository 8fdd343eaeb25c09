"""Row surgery on a ``DynamicCache`` for continuous batching: merge, select, trim.

Every cache here holds full-length layers (``DynamicCache()`` without a config, as the
classifier's guidance uses): any sliding window is applied by the attention masks, so rows
can be padded, joined and cut without a layer dropping tokens on its own. Tensors are
[batch, heads, seq, head_dim]; a row's valid tokens are always a contiguous suffix of the
sequence axis (left padding), which is what a left-padded 2-D attention mask describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer, each [batch, heads, seq, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def from_tensors(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A full-length ``DynamicCache`` holding ``tensors`` (one (keys, values) pair per layer)."""
    return DynamicCache(ddp_cache_data=tensors)


def left_pad_seq(tensor: torch.Tensor, length: int, dim: int = -2, value: float = 0.0) -> torch.Tensor:
    """``tensor`` left-padded along ``dim`` with ``value`` to ``length`` entries."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    dim = dim % tensor.dim()
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad, value=value)


def merge(first: DynamicCache | None, second: DynamicCache | None) -> DynamicCache | None:
    """The rows of ``first`` then those of ``second``, the shorter left-padded with zeros (masked
    by the caller's attention mask, padded alike)."""
    if first is None or second is None:
        return second if first is None else first
    a, b = layer_tensors(first), layer_tensors(second)
    length = max(a[0][0].shape[-2], b[0][0].shape[-2])
    return from_tensors([
        (torch.cat([left_pad_seq(ka, length), left_pad_seq(kb, length)]),
         torch.cat([left_pad_seq(va, length), left_pad_seq(vb, length)]))
        for (ka, va), (kb, vb) in zip(a, b)
    ])


def select(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """The cache of rows ``index`` [n] only (n > 0)."""
    cache.batch_select_indices(index)
    return cache


def trim_left(cache: DynamicCache, start: int) -> DynamicCache:
    """Drop the first ``start`` positions of every row (columns that every row masks)."""
    if start <= 0:
        return cache
    return from_tensors([(k[:, :, start:], v[:, :, start:]) for k, v in layer_tensors(cache)])


def leading_masked(valid: torch.Tensor) -> int:
    """How many leading columns of ``valid`` [batch, seq] (bool) no row attends to."""
    used = valid.any(dim=0)  # [seq]
    return int(used.int().argmax()) if bool(used.any()) else valid.shape[1]
