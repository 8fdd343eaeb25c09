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


class RowCache:
    """The KV cache of left-padded rows that come and go, with the bookkeeping every decode step
    needs: ``mask`` [rows, seen] (1 = a token the row attends to, 0 = padding) and ``next_pos``
    [rows, 1], the position id of each row's next token. The reference model's rows in the
    continuous engine and the classifier's rows in the Q# processor are both kept here.

    The mask (and its additive form) live in buffers with spare columns, all attended, so a
    step that only counts a new token (:meth:`extend`) costs a slice; they double when full.
    """

    SPARE = 16  # columns added to a buffer when it is built

    def __init__(self, cache: DynamicCache | None = None, mask: torch.Tensor | None = None):
        """Rows just prefilled: ``cache`` of their left-padded prompts and its ``mask`` [rows, n]."""
        self.cache, self.next_pos = cache, None if mask is None else mask.long().sum(-1, keepdim=True)  # [rows, 1]
        self._set_mask(mask)

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        """Take ``mask`` [rows, seen] into a fresh buffer; the additive form is built again when asked."""
        self._seen = 0 if mask is None else mask.shape[1]
        self._mask = None if mask is None else torch.cat([mask.long(), mask.new_ones(mask.shape[0], self.SPARE).long()], 1)
        self._additive = None  # [rows, 1, 1, capacity], spare columns 0 (attended)

    @property
    def mask(self) -> torch.Tensor | None:
        """[rows, seen]: 1 = a token the row attends to, 0 = padding."""
        return None if self._mask is None else self._mask[:, : self._seen]

    def __len__(self) -> int:
        return 0 if self._mask is None else self._mask.shape[0]

    def extend(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Count one new token per row: the mask [rows, seen + 1] that reads it and its
        position ids [rows, 1] (the next positions move on by one)."""
        self._seen += 1
        if self._seen > self._mask.shape[1]:
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask)], dim=1)
        position, self.next_pos = self.next_pos, self.next_pos + 1
        return self.mask, position

    def join(self, other: RowCache) -> None:
        """Append the rows of ``other`` after these, the shorter side left-padded (masked)."""
        if not len(self):
            self.cache, self.next_pos = other.cache, other.next_pos
            self._set_mask(other.mask)
            return
        width = max(self._seen, other._seen)
        self._set_mask(torch.cat([left_pad_seq(self.mask, width, dim=1), left_pad_seq(other.mask, width, dim=1)]))
        self.cache = merge(self.cache, other.cache)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])

    def select(self, keep: torch.Tensor, trim: bool = True) -> None:
        """Keep only rows ``keep`` [n]; with ``trim``, drop the leading columns no kept row attends to."""
        if keep.numel() == 0:
            self.cache = self.next_pos = None
            self._set_mask(None)
            return
        mask = self.mask[keep]
        self.cache, self.next_pos = select(self.cache, keep), self.next_pos[keep]
        start = leading_masked(mask.bool()) if trim else 0
        if start:
            self.cache, mask = trim_left(self.cache, start), mask[:, start:]
        self._set_mask(mask)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive attention mask [rows, 1, 1, seen]: 0 where attended, the
        lowest ``dtype`` value at padding."""
        if self._additive is None or self._additive.dtype != dtype:
            self._additive = torch.zeros(self._mask.shape[0], 1, 1, self._mask.shape[1], dtype=dtype,
                                         device=self._mask.device)
            self._additive.masked_fill_(self._mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        elif self._additive.shape[-1] < self._mask.shape[1]:  # the mask's buffer doubled: spare columns are 0
            missing = self._mask.shape[1] - self._additive.shape[-1]
            self._additive = torch.cat([self._additive, self._additive.new_zeros(*self._additive.shape[:-1], missing)], -1)
        return self._additive[..., : self._seen]
