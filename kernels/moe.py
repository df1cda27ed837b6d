"""Top-2 mixture-of-experts dispatch (DESIGN.md sections 2 and 5). PLACEHOLDER: reference only, Triton to come."""
from __future__ import annotations

import math

import torch
from torch import nn

from .backend import use_triton


def moe_top2_reference(x, gate_weight, w1, b1, w2, b2):
    """Per-expert loop. x (N, d) -> y (N, d_out); see DESIGN.md section 2."""
    logits = x.float() @ gate_weight.float().t()
    top_logits, experts = logits.topk(2, dim=-1)
    alpha = top_logits.softmax(dim=-1)
    y = x.new_zeros(x.shape[0], w2.shape[-1], dtype=torch.float32)
    for e in range(gate_weight.shape[0]):
        rows, slot = (experts == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        hidden = nn.functional.gelu(x[rows].float() @ w1[e].float() + b1[e].float())
        out = hidden @ w2[e].float() + b2[e].float()
        y = y.index_add(0, rows, alpha[rows, slot, None] * out)
    return y.to(x.dtype)


def moe_top2(x, gate_weight, w1, b1, w2, b2):
    """Top-2 MoE: x (N, d) -> (N, d_out)."""
    if use_triton(x, gate_weight, w1, b1, w2, b2):
        raise NotImplementedError("Triton MoE not written yet")
    return moe_top2_reference(x, gate_weight, w1, b1, w2, b2)


class Top2MoE(nn.Module):
    """PLACEHOLDER: gate + experts' MLP weights; forward(x (..., d)) -> (..., d_out)."""

    def __init__(self, d_model, num_experts=4, hidden=None, d_out=None):
        super().__init__()
        hidden = hidden or 4 * d_model
        d_out = d_out or d_model
        self.gate_weight = nn.Parameter(torch.randn(num_experts, d_model) / math.sqrt(d_model))
        self.w1 = nn.Parameter(torch.randn(num_experts, d_model, hidden) / math.sqrt(d_model))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, d_out) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_out))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = moe_top2(flat, self.gate_weight, self.w1, self.b1, self.w2, self.b2)
        return y.reshape(*x.shape[:-1], y.shape[-1])


Top2MoEReference = Top2MoE


def aot_configurations():
    return []
