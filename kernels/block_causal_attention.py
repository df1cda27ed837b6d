"""Block-causal softmax attention (DESIGN.md sections 2 and 4). PLACEHOLDER: reference only, Triton to come."""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_nonempty, check_same_dtype_and_device, check_scale, check_tensor
from .backend import use_triton


def block_causal_mask(t: int, group_size: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where query i may see key j: ``j // group_size <= i // group_size``."""
    index = torch.arange(t, device=device) // group_size
    return index[None, :] <= index[:, None]


def block_causal_attention_reference(q, k, v, *, group_size=3, scale=None):
    """Dense mask + softmax in float32. q, k: (B, H, T, D); v: (B, H, T, Dv) -> (B, H, T, Dv)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~block_causal_mask(q.shape[-2], group_size, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(v.dtype)


def block_causal_attention(q, k, v, *, group_size=3, scale=None):
    """Block-causal attention. q, k: (B, H, T, D); v: (B, H, T, Dv) -> (B, H, T, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_dtype_and_device(q=q, k=k, v=v)
    check_nonempty(q=q, k=k, v=v)
    check_scale(scale)
    if use_triton(q, k, v):
        raise NotImplementedError("Triton block-causal attention not written yet")
    return block_causal_attention_reference(q, k, v, group_size=group_size, scale=scale)


class BlockCausalMultiheadAttention(nn.Module):
    """PLACEHOLDER with nn.MultiheadAttention's parameter layout; batch-first (B, T, E)."""

    def __init__(self, embed_dim, num_heads, *, group_size=3, dropout=0.0, bias=True):
        super().__init__()
        self.embed_dim, self.num_heads, self.group_size, self.dropout = embed_dim, num_heads, group_size, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key=None, value=None):
        key = query if key is None else key
        value = key if value is None else value
        b, t, e = query.shape
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        split = lambda x: x.view(b, t, h, e // h).transpose(1, 2)
        q = split(nn.functional.linear(query, w_q, b_q))
        k = split(nn.functional.linear(key, w_k, b_k))
        v = split(nn.functional.linear(value, w_v, b_v))
        out = block_causal_attention(q, k, v, group_size=self.group_size)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, e))


class BlockCausalTransformerLayer(nn.Module):
    """PLACEHOLDER post-norm Transformer layer over BlockCausalMultiheadAttention: forward(x, context=None)."""

    def __init__(self, d_model, nhead, dim_feedforward=None, dropout=0.1, *, group_size=3):
        super().__init__()
        dim_feedforward = dim_feedforward or 4 * d_model
        self.attn = BlockCausalMultiheadAttention(d_model, nhead, group_size=group_size)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, context=None):
        context = x if context is None else context
        x = self.norm1(x + self.dropout(self.attn(x, context, context)))
        return self.norm2(x + self.dropout(self.ff(x)))


def aot_configurations():
    return []
