"""Causal-masked entmax-1.5 attention (DESIGN.md sections 2-3). PLACEHOLDER: reference only, Triton to come."""
from __future__ import annotations

import torch

from ._checks import check_nonempty, check_same_dtype_and_device, check_scale, check_tensor
from .backend import use_triton


def entmax15_attention_reference(q, k, v, *, causal=True, scale=None):
    """``entmax15(mask(q k^T * scale)) @ v`` in float32 with the ``entmax`` package; (B, H, T, Dv)."""
    import entmax

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        t = q.shape[-2]
        hidden = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return (entmax.entmax15(scores, dim=-1) @ v.float()).to(v.dtype)


def entmax15_attention(q, k, v, *, causal=True, scale=None):
    """Entmax-1.5 attention. q, k: (B, H, T, D); v: (B, H, T, Dv) -> (B, H, T, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_dtype_and_device(q=q, k=k, v=v)
    check_nonempty(q=q, k=k, v=v)
    check_scale(scale)
    if use_triton(q, k, v):
        raise NotImplementedError("Triton entmax attention not written yet")
    return entmax15_attention_reference(q, k, v, causal=causal, scale=scale)


def aot_configurations():
    return []


class FusedEntmaxCausalAttention(torch.nn.Module):
    """PLACEHOLDER. forward(x (B, T, E), *, return_context=False, need_weights=False)."""

    def __init__(self, embed_dim, num_heads=1, *, bias=True, out_proj=True):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias) if out_proj else None

    def forward(self, x, *, return_context=False, need_weights=False):
        b, t, e = x.shape
        h = self.num_heads
        split = lambda y: y.view(b, t, h, e // h).transpose(1, 2)
        out = entmax15_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        out = out.transpose(1, 2).reshape(b, t, e)
        return self.out_proj(out) if self.out_proj is not None else out


EntmaxCausalAttention = FusedEntmaxCausalAttention
