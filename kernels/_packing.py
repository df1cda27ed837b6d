"""Packed (varlen) layouts built on the device, without reading lengths on the host, so they trace under
``torch.compile(fullgraph=True)`` and never sync with a GPU."""
from __future__ import annotations

from typing import NamedTuple

import torch


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the sequence each packed row belongs to (empty sequences own no row)."""
    rows = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.long()[1:], rows, right=True)


class PackedPadding(NamedTuple):
    """A padded batch as packed rows of a static size B * T.

    ``order`` (B * T,) int64: the flattened (B * T) rows, each batch row's valid tokens first (in their order), then
    its padding. ``cu_seqlens`` int32: per batch row b, one sequence of its valid tokens, then its padding as one
    sequence ((2B + 1,) offsets) or, with ``singleton_padding``, as one sequence per padded token ((B (T + 1) + 1,)
    offsets; empty sequences fill the rest, so no size depends on the lengths). ``valid`` (B, T) bool. The padding
    rows are computed and discarded; padded tokens never see valid ones, nor valid tokens padded ones.
    """

    order: torch.Tensor
    cu_seqlens: torch.Tensor
    valid: torch.Tensor

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (B * T, ...) in packed order, zero at padding (so padding holding NaN cannot leak into
        gradients of shared weights)."""
        x = x.masked_fill(~self.valid.view(*self.valid.shape, *(1,) * (x.dim() - 2)), 0)
        return x.flatten(0, 1).index_select(0, self.order)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(B * T, ...) in packed order -> (B, T, ...), zero at padding."""
        b, t = self.valid.shape
        x = torch.zeros_like(packed).index_copy(0, self.order, packed).view(b, t, *packed.shape[1:])
        return x.masked_fill(~self.valid.view(b, t, *(1,) * (packed.dim() - 1)), 0)


def pack_padding(valid: torch.Tensor, *, singleton_padding: bool = False) -> PackedPadding:
    """The packing of a padded batch from ``valid`` (B, T) bool (True at real tokens), all on its device.

    ``singleton_padding``: each padded token its own sequence, so that padding costs O(padding) instead of
    O(padding^2) in kernels that bound each row by its own sequence (entmax); kernels whose grid counts sequences
    (block-causal) take the two-sequence form."""
    b, t = valid.shape
    start = torch.arange(b, device=valid.device) * t
    order = (torch.argsort((~valid).to(torch.uint8), dim=1, stable=True) + start[:, None]).flatten()
    lengths = valid.sum(dim=1)
    if singleton_padding:  # per row: the valid sequence's end, then one offset per padded token, clamped to T
        steps = torch.arange(t + 1, device=valid.device)
        bounds = (start[:, None] + torch.clamp(lengths[:, None] + steps, max=t)).flatten()
    else:
        bounds = torch.stack([start + lengths, start + t], dim=1).flatten()
    cu_seqlens = torch.cat([bounds.new_zeros(1), bounds]).to(torch.int32)
    return PackedPadding(order, cu_seqlens, valid)
